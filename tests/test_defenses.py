"""Defense registry, spec strings, composition, stage files and per-stage shape/range properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adv.defenses import (
    Defended, build_defended, create_defense, defense_schema, describe_defense, format_defense_spec,
    list_defenses, load_stage, parse_defense_spec, save_stage, select_dwt_params,
)
from adv.defenses.dwt import DWTParams, dwt_transform
from adv.errors import AdvError, CheckpointError, ConfigError
from adv.models import create_model
from adv.metrics import image_quality
from tests.test_defenses_helpers import one_thread  # noqa: F401

PREPROCESS = list_defenses(kind="preprocess")


def _classifier(input_size=(1, 28, 28)):
    torch.manual_seed(0)
    return create_model("lenet5", input_size=input_size).eval()


# --- registry and spec strings ------------------------------------------------------------
def test_registry_lists_every_defense_of_the_issue():
    assert {"dwt", "initial_ae", "middle_ae", "encoder", "unet", "disagreement", "quantize", "noise"} <= set(
        list_defenses())
    assert set(list_defenses(kind="detector")) == {"advd", "disagreement"}
    for name in list_defenses():
        schema = defense_schema(name)
        assert schema["kind"] in describe_defense(name) and schema["params"] is not None


def test_spec_strings_parse_validate_and_round_trip():
    assert parse_defense_spec("dwt:wavelet=db4, level=2") == ("dwt", {"wavelet": "db4", "level": "2"})
    assert parse_defense_spec("quantize") == ("quantize", {})
    stage = create_defense("dwt:wavelet=db4,level=2,mode=hard")
    assert stage.params.level == 2 and stage.params.mode == "hard"
    assert stage.defense_spec == "dwt:wavelet=db4,level=2,mode=hard"
    assert format_defense_spec("dwt", {"wavelet": "haar"}) == "dwt"  # defaults are left out
    assert format_defense_spec("unet", {"attacks": "fgsm+bim"}) == "unet:attacks=fgsm+bim"
    assert create_defense(("dwt", {"level": 2})).params.level == 2


@pytest.mark.parametrize("spec,needle", [
    ("nope:x=1", "unknown defense 'nope'"),
    ("dwt:level=0", "level"),
    ("dwt:wavelet=bogus", "bogus"),
    ("dwt:mode=medium", "mode"),
    ("dwt:colour=1", "colour"),
    ("dwt:level", "expected k=v"),
    ("dwt:level=1,level=2", "given twice"),
    ("unet:attacks=fgsm+cw", "attacks"),
    ("", "non-empty"),
    ("dwt:sigma=0.1", "'sigma' was renamed to 'noise_sigma'"),  # issue 9: one meaning per name
    ("noise:sigma=0.1", "'sigma' was renamed to 'noise_std'"),
])
def test_bad_specs_raise_clear_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        create_defense(spec, classifier=_classifier())


def test_feature_space_defenses_need_a_classifier():
    with pytest.raises(ConfigError, match="needs the classifier"):
        create_defense("middle_ae")


# --- shape and range, generated from the registry ------------------------------------------
@pytest.mark.parametrize("input_size", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", PREPROCESS)
def test_preprocess_stage_keeps_shape_and_range(name, input_size):
    clf = _classifier(input_size)
    stage = create_defense(name, classifier=clf).eval()
    x = torch.rand(3, *input_size)
    with torch.no_grad():
        out = stage(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", list_defenses(kind="classifier"))
def test_classifier_stage_gives_logits(name):
    clf = _classifier()
    model = create_defense(name, classifier=clf)
    with torch.no_grad():
        assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_unet_pads_odd_sizes_and_refuses_huge_bottlenecks():
    clf = _classifier((1, 20, 20))
    assert create_defense("unet:width=0.25", classifier=clf)(torch.rand(2, 1, 20, 20)).shape == (2, 1, 20, 20)
    with pytest.raises(ValueError, match="bottleneck"):
        create_defense("unet", classifier=_classifier((3, 224, 224)))


# --- composition --------------------------------------------------------------------------
def test_defended_is_the_composition_and_refuses_untrained_stages():
    clf = _classifier()
    dwt = create_defense("dwt:level=2")
    model = Defended(dwt, clf)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), clf(dwt(x)))
    assert model.specs == ["dwt:level=2"] and not model.differentiable and not model.randomized
    with pytest.raises(ConfigError, match="untrained"):
        Defended(create_defense("initial_ae"), clf)
    with pytest.raises(AdvError, match="no detector"):
        model.detect(x)


def test_build_defended_orders_stages_and_wraps_the_classifier():
    clf = _classifier()
    model = build_defended(clf, ["quantize:bits=3", "dwt", "middle_ae"], detector="disagreement",
                           allow_untrained=True)
    assert [s.defense_name for s in model.preprocess] == ["quantize", "dwt"]
    assert model.classifier.defense_name == "middle_ae" and model.classifier.classifier is clf
    assert model.detector.defense_name == "disagreement" and model.detector.classifier is clf
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert model.detect(x).dtype == torch.bool and model.detect(x).shape == (4,)
        assert model.detect_score(x).shape == (4,)
    with pytest.raises(ConfigError, match="only one detector"):
        build_defended(clf, ["disagreement"], detector="disagreement", allow_untrained=True)


# --- stage files ------------------------------------------------------------------------------
def test_stage_files_round_trip_without_the_classifier(tmp_path):
    clf = _classifier()
    stage = create_defense("middle_ae:bottleneck=16", classifier=clf)
    stage.finish_training({})  # as if trained: the round trip is what this test checks
    path = save_stage(tmp_path / "m.pt", stage, meta={"note": "x"})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "adv-stage/1" and not any(k.startswith("classifier.") for k in payload["state_dict"])
    loaded = load_stage(path, classifier=clf)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), stage(x))
    assert loaded.params.bottleneck == 16 and loaded.trained and loaded.stage_meta == {"note": "x"}
    # the spec form takes the architecture from the file
    assert create_defense(f"middle_ae:checkpoint={path}", classifier=clf).params.bottleneck == 16
    with pytest.raises(ConfigError, match="bottleneck=16"):
        create_defense(f"middle_ae:checkpoint={path},bottleneck=32", classifier=clf)
    with pytest.raises(CheckpointError, match="not 'unet'"):
        create_defense(f"unet:checkpoint={path}", classifier=clf)
    with pytest.raises(CheckpointError, match="not found"):
        create_defense("unet:checkpoint=/no/such.pt", classifier=clf)


def test_stages_get_their_registry_info_at_construction_and_leave_the_classifier_as_it_was(tmp_path):
    clf = create_model("lenet5").train()  # a caller's model in train mode, with parameter gradients on
    stage = create_defense("middle_ae:bottleneck=16", classifier=clf)
    assert (stage.info.name, stage.info.spec, stage.info.kind) == ("middle_ae", "middle_ae:bottleneck=16", "classifier")
    assert not stage.trained and stage.stage_meta == {}
    stage.eval()
    loaded = load_stage(save_stage(tmp_path / "m.pt", stage, meta={"note": "x"}), classifier=clf)
    Defended(None, loaded).eval().train()
    assert loaded.trained and loaded.info.meta == {"note": "x"} and loaded.classifier is clf
    assert all(m.training for m in clf.modules()) and all(p.requires_grad for p in clf.parameters())


def test_encoder_files_serve_the_disagreement_detector(tmp_path):
    clf = _classifier()
    enc = create_defense("encoder:bottleneck=8", classifier=clf)
    torch.nn.init.normal_(enc.new_head[0].weight)
    path = save_stage(tmp_path / "enc.pt", enc)
    det = create_defense(f"disagreement:checkpoint={path}", classifier=clf)
    assert torch.equal(det.variant.new_head[0].weight, enc.new_head[0].weight)


# --- DWT ---------------------------------------------------------------------------------------
def test_dwt_removes_noise_and_keeps_clean_images():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = (0.5 + 0.4 * torch.sin(6 * xx) * torch.cos(4 * yy)).expand(4, 1, 32, 32).contiguous()
    noisy = (clean + 0.08 * torch.randn_like(clean)).clamp(0, 1)
    stage = create_defense("dwt:wavelet=db2,level=2")
    assert image_quality(clean, stage(noisy))["psnr"].mean() > image_quality(clean, noisy)["psnr"].mean() + 2
    assert image_quality(clean, stage(clean))["psnr"].mean() > 30


@pytest.mark.parametrize("spec", ["dwt:method=VisuShrink,mode=hard", "dwt:method=fixed,threshold=0.1",
                                  "dwt:per_channel=false", "dwt:noise_sigma=0.05,wavelet=sym4", "dwt:wavelet=coif1"])
def test_dwt_variants_run_on_rgb(spec):
    x = torch.rand(2, 3, 32, 32)
    out = create_defense(spec)(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not torch.equal(out, x)


def test_dwt_refuses_levels_too_deep_for_the_image():
    with pytest.raises(ValueError, match="level=5 is too deep"):
        dwt_transform(torch.rand(1, 1, 28, 28), DWTParams(wavelet="db4", level=5))


def test_dwt_parameter_selection_follows_psnr_and_mse():
    x = torch.rand(6, 1, 16, 16) * 0.2 + 0.4
    grid = {"wavelet": ["haar", "db2"], "level": [1, 2], "mode": ["soft"], "method": ["BayesShrink"]}
    best, table = select_dwt_params(x, grid=grid, psnr_min=25, mse_max=1e-2)
    assert len(table) == 4 and {"psnr", "mse", "ssim", "admissible"} <= set(table[0])
    admissible = [r for r in table if r["admissible"]]
    assert all(r["psnr"] >= 25 and r["mse"] <= 1e-2 for r in admissible)
    weakest = min(admissible, key=lambda r: r["psnr"])  # the strongest admissible denoising is chosen
    assert (best.wavelet, best.level) == (weakest["wavelet"], weakest["level"])
    none, _ = select_dwt_params(x, grid=grid, psnr_min=500)
    assert none is None
    with pytest.raises(ValueError, match="unknown DWT parameters"):
        select_dwt_params(x, grid={"colour": [1]})


# --- simple stages -----------------------------------------------------------------------------
def test_quantize_lands_on_the_grid_and_noise_is_random():
    x = torch.rand(2, 1, 8, 8)
    q = create_defense("quantize:bits=2")(x)
    assert set(np.unique((q * 3).round().numpy())) <= {0.0, 1.0, 2.0, 3.0} and torch.allclose(q * 3, (q * 3).round())
    noise = create_defense("noise:noise_std=0.1")
    assert noise.randomized and not torch.equal(noise(x), noise(x))
