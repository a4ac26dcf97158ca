"""Salient feature extraction (Khoshbakht et al. 2024 after Chen et al. 2021): the coupled GAN, AdvD,
re-identification, adversarial filtration and the ImageNet plumbing, on tiny data."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from adv.cli import main
from adv.data import ImageData, load_dataset
from adv.defenses import Defended, create_defense, save_stage
from adv.defenses.sfe import SFENets, SFEParams, fit_sfe, train_sfe
from adv.defenses.stage import Stage
from adv.defenses.sfe_sources import FeatureSet, craft, pair_features
from adv.errors import AdvError, CheckpointError, ConfigError
from adv.metrics import detection_metrics
from adv.models import create_model, save_checkpoint
from tests.helpers import SHARED_DATA, needs_shared_data
from tests.test_defenses_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    cli_classifier, digits, one_thread, sample_batch, single_thread, trained_classifier,
)

FAST = "epochs=12,advd_epochs=10,hidden=64,disc_hidden=32,advd_hidden=32,batch_size=64,lr=3e-3,eps=0.15"


@functools.lru_cache(maxsize=None)
def _pairs() -> FeatureSet:
    """Features of 300 training digits and of their successful PGD adversarials (lenet5, 200-d)."""
    clf = trained_classifier()
    x, y = digits("train").subset(300).tensors()
    with single_thread():
        return pair_features(clf, x, craft(clf, x, y, SFEParams(eps=0.15, attack_steps=5)), y)


def _sfe_stage(**kw):
    spec = ("sfe", {**dict(item.split("=") for item in FAST.split(",")), **kw})
    stage = create_defense(spec, classifier=trained_classifier())
    fit_sfe(stage, _pairs())
    return stage


def test_gan_losses_decrease():
    history = _sfe_stage().train_metrics["history"]
    first, last = history[0], history[-1]
    # the generators' losses (MSE + GAN term) fall; D's rises as the generators catch up with it
    assert last["pg"] < 0.6 * first["pg"] and last["ng"] < 0.6 * first["ng"]
    assert last["pg_rec"] < first["pg_rec"] and last["ng_rec"] < first["ng_rec"]
    assert all(torch.isfinite(torch.tensor(h["d"])) for h in history)


def test_salient_features_of_a_pair_move_closer_during_training():
    feats = _pairs()
    benign = feats.target  # the benign counterpart of each adversarial example
    perm = torch.randperm(len(benign), generator=torch.Generator().manual_seed(0))

    def pair_ratio(f):
        """Distance to the counterpart over distance to a random other example (scale-free)."""
        a, b = f(feats.adv), f(benign)
        return float((a - b).norm(dim=1).mean() / (a - b[perm]).norm(dim=1).mean())

    p = SFEParams(epochs=12, hidden=64, disc_hidden=32, advd_hidden=32, batch_size=64, lr=3e-3)
    nets = SFENets(benign.shape[1], p)
    with torch.no_grad():
        nets.mean.copy_(feats.benign.mean(0))
        nets.std.copy_(feats.benign.std(0).clamp_min(1e-3))
        before, raw = pair_ratio(nets.salient), pair_ratio(lambda f: f)
    train_sfe(nets, feats, p)
    with torch.no_grad():
        after, trivial = pair_ratio(nets.salient), pair_ratio(nets.trivial)
    assert after < 0.75 * before and after < 0.75 * raw
    assert abs(trivial - raw) < 0.15  # the TF keep the input's features, so they stay as far apart as the input


def test_advd_beats_chance_on_separable_toy_data():
    gen = torch.Generator().manual_seed(0)
    n, dim = 400, 16
    benign = torch.rand(2 * n, dim, generator=gen)
    shift = torch.zeros(dim)
    shift[:4] = 0.8  # adversarial features: benign ones pushed along four directions
    adv = benign[:n] + shift
    feats = FeatureSet(benign[:n], torch.zeros(n, dtype=torch.long), adv, torch.zeros(n, dtype=torch.long),
                       benign[:n], paired=True)
    stage = _ToyStage(dim)
    fit_sfe(stage, feats)
    with torch.no_grad():
        scores = torch.cat([stage.sfe.advd_logit(benign[n:]), stage.sfe.advd_logit(benign[n:] + shift)])
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).bool()
    metrics = detection_metrics(scores.numpy(), labels.numpy(), (scores > 0).numpy())
    assert metrics["auroc"] > 0.9 and metrics["tpr"] > 0.8 and metrics["fpr"] < 0.2


class _ToyStage(Stage):
    """Just what fit_sfe touches: params and the SFE networks (no classifier needed in feature space)."""

    def __init__(self, dim: int):
        super().__init__(SFEParams(epochs=20, advd_epochs=30, hidden=32, disc_hidden=16, advd_hidden=32,
                                   batch_size=64, lr=3e-3))
        self.sfe = SFENets(dim, self.params)


def test_reidentification_is_a_composable_stage_that_saves_and_loads(tmp_path):
    clf = trained_classifier()
    untrained = create_defense("sfe", classifier=clf)
    with pytest.raises(ConfigError, match="untrained"):
        Defended(None, untrained)
    stage = _sfe_stage()
    x, y = sample_batch(32)
    with torch.no_grad():
        logits = stage(x)
        dwt_then_sfe = Defended(create_defense("dwt:wavelet=haar"), stage)(x)
    assert logits.shape == (32, clf.num_classes) == dwt_then_sfe.shape
    assert (logits.argmax(1) == y).float().mean() > 0.6  # re-identification keeps most clean predictions
    path = save_stage(tmp_path / "sfe.pt", stage)
    assert torch.load(path, weights_only=True)["name"] == "sfe"
    loaded = create_defense(f"sfe:checkpoint={path}", classifier=trained_classifier())
    detector = create_defense(f"advd:checkpoint={path}", classifier=trained_classifier())
    model = Defended(None, loaded, detector)
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)
        flags, score = model.detect(x), model.detect_score(x)
    assert flags.shape == (32,) and flags.dtype == torch.bool and ((score > 0) & (score < 1)).all()
    assert torch.equal(flags, score > 0.5)


def test_advd_flags_pgd_adversarials_and_the_joint_attack_targets_it():
    from adv.attacks import get_attack
    from adv.evaluate.adaptive import detector_aware_attack

    stage = _sfe_stage()
    clf = trained_classifier()
    detector = create_defense(("advd", stage.params), classifier=clf)
    detector.load_trained(stage.stage_state_dict())
    model = Defended(None, stage, detector)
    x, y = sample_batch(64, seed=3)
    x_adv = get_attack("pgd")(clf, x, y, eps=0.15, steps=5, seed=0)
    with torch.no_grad():
        assert model.detect(x_adv).float().mean() > model.detect(x).float().mean() + 0.3
    joint = detector_aware_attack(model, x, y, attack="pgd", eps=0.15, steps=10, seed=0)
    with torch.no_grad():
        fooled_unflagged = ((model(joint).argmax(1) != y) & ~model.detect(joint)).float().mean()
        plain = ((model(x_adv).argmax(1) != y) & ~model.detect(x_adv)).float().mean()
    assert fooled_unflagged > plain  # the adaptive attack evades AdvD far more often than transfer PGD


class _Lookup(nn.Module):
    """A 'model' whose softmax puts ``conf`` on a fixed class per image (looked up by the first pixel)."""

    def __init__(self, preds: list[int], conf: list[float], k: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        probs = torch.full((len(preds), k), 0.0)
        for i, (p, c) in enumerate(zip(preds, conf)):
            probs[i] = (1 - c) / (k - 1)
            probs[i, p] = c
        self.register_buffer("logits", probs.log())

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].mul(255).round().long()] + self.w


def test_filtration_keeps_exactly_what_every_model_misclassifies(tmp_path):
    from adv.data.filter import filter_misclassified, load_filtered_folder, write_filtered_set

    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
    data = ImageData(images, torch.tensor([0, 1, 2, 0, 1, 2]), ("a", "b", "c"), "toy", "test")
    a = _Lookup([1, 1, 0, 0, 2, 1], [0.9, 0.4, 0.9, 0.9, 0.6, 0.9])
    b = _Lookup([2, 1, 1, 1, 0, 2], [0.9, 0.9, 0.7, 0.9, 0.9, 0.9])
    result = filter_misclassified([a, b], data, threshold=0.5)
    # 0: both wrong, confident; 1: b right; 2: both wrong; 3: a right; 4: both wrong; 5: b right
    assert result.keep.tolist() == [True, False, True, False, True, False]
    assert filter_misclassified([a, b], data, threshold=0.65).keep.tolist() == [True, False, True] + [False] * 3
    manifest = write_filtered_set(tmp_path / "set", data, result, models=["a", "b"], threshold=0.5)
    assert manifest["counts"]["kept"] == 3 and manifest["counts"]["pool"] == 6 and manifest["pool_index"] == [0, 2, 4]
    back = load_filtered_folder(tmp_path / "set")
    assert torch.equal(back.images, images[[0, 2, 4]]) and back.labels.tolist() == [0, 2, 1]
    with pytest.raises(ConfigError, match="not empty"):
        write_filtered_set(tmp_path / "set", data, result, models=["a"], threshold=0.5)


def test_adv_data_filter_builds_a_set_with_a_manifest(tmp_path, capsys):
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = create_model("lenet5", input_size=(1, 28, 28))
        paths.append(str(save_checkpoint(tmp_path / f"m{seed}.pt", model, dataset="digits")))
    out = tmp_path / "digits-a"
    code = main(["data", "filter", "--dataset", "digits", "--n", "60", "--checkpoint", paths[0], "--checkpoint",
                 paths[1], "--threshold", "0.0", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and manifest["models"] == paths and manifest["threshold"] == 0.0
    assert summary["kept"] == manifest["counts"]["kept"] == len(load_dataset("filtered", root=str(out)))
    assert 0 < manifest["counts"]["kept"] <= min(manifest["counts"]["misclassified_per_model"])
    assert main(["data", "filter", "--dataset", "digits", "--out", str(tmp_path / "x")]) == 2
    assert "at least one filter model" in capsys.readouterr().err
    with pytest.raises(AdvError, match="adv data filter"):
        load_dataset("fashion-mnist-a", root=str(tmp_path))


def test_bad_configurations_fail_with_one_clear_line(tmp_path, capsys):
    class NoFeatures(nn.Module):
        num_classes, input_size = 10, (1, 16, 16)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ConfigError, match="penultimate features") as err:
        create_defense("sfe", classifier=NoFeatures())
    assert "\n" not in str(err.value)
    path = save_stage(tmp_path / "sfe.pt", _sfe_stage(epochs=1, advd_epochs=1))
    other = create_model("convsmall", input_size=(1, 16, 16))  # 100-d features, the file's SFE takes 200-d
    with pytest.raises(CheckpointError, match="feature width mismatch") as err:
        create_defense(f"advd:checkpoint={path}", classifier=other)
    assert "\n" not in str(err.value)
    capsys.readouterr()  # the helper's classifier training logs its epochs
    assert main(["defend", "train", "sfe:source=natural", "--dataset", "digits", "--model", "lenet5",
                 "--out", str(tmp_path / "s.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "natural=DIR" in err and "Traceback" not in err


def test_cli_trains_sfe_and_advd_and_eval_uses_them(tmp_path, capsys):
    checkpoint = cli_classifier(tmp_path / "clf", epochs=2, n=600)
    capsys.readouterr()
    out = tmp_path / "sfe.pt"
    assert main(["defend", "train", "sfe:" + FAST + ",attack_steps=3", "--dataset", "digits", "--n", "200",
                 "--checkpoint", str(checkpoint), "--n-test", "100", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["test_acc_clean"] <= 1 and summary["train"]["n_adversarial"] > 0
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "digits", "--n", "40",
                 "--attack", "pgd", "--eps", "0.1", "--steps", "3", "--defense", f"sfe:checkpoint={out}",
                 "--detector", f"advd:checkpoint={out}", "--adaptive", "--json", "--quiet", "--checks", "none"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["defense"]["threat_model"] == "adaptive" and report["defense"]["detector"].startswith("advd")
    assert {"tpr", "fpr", "auroc"} <= set(report["detection"]["pgd"])


@needs_shared_data
def test_imagenet_path_runs_on_the_sample_with_random_weights(tmp_path, capsys):
    """Plumbing, not accuracy: torchvision resnet50 (random weights), the shared ImageNet sample as the
    natural set (1k label space), benign images from the same folder."""
    sample = SHARED_DATA / "imagenet-sample"
    torch.manual_seed(0)
    clf = create_model("resnet50", input_size=(3, 64, 64)).eval()  # small inputs keep the CPU test short
    # every natural class needs benign examples (the class-wise objective): the whole sample serves as both
    benign = load_dataset("imagefolder", root=str(sample), size=64, resize=73, label_space="imagenet1k")
    spec = (f"sfe:source=natural,natural={sample},label_space=imagenet1k,epochs=2,advd_epochs=2,hidden=64,"
            "disc_hidden=32,advd_hidden=32,batch_size=32")
    stage = create_defense(spec, classifier=clf, data=benign)
    assert stage.train_metrics["n_adversarial"] == 100 and stage.train_metrics["paired"] is False
    x, _ = benign.tensors()
    with torch.no_grad():
        assert stage(x[:4]).shape == (4, 1000)
    code = main(["defend", "train", f"sfe:source=natural,natural={sample}", "--dataset", "imagefolder",
                 "--data-dir", str(sample),
                 "--model", "inception_v3", "--pretrained", "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "Fix:" in err and "Traceback" not in err


def test_stored_pairs_are_read_without_ray_and_paired_by_index(tmp_path):
    """A jobs.evaluate-shaped shard (tensor column = list storage + shape metadata), read with pyarrow alone."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adv.runs.stored import read_stored_pairs

    images = np.arange(5 * 16, dtype=np.float32).reshape(5, 1, 4, 4) / 100
    field = pa.field("image", pa.large_list(pa.float32()),
                     metadata={b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
                               b"ARROW:extension:metadata": b"[1, 4, 4]"})
    rows = {"index": [0, 1, 1, 0, 0], "label": [3, 4, 4, 3, 3], "defense": ["none", "none", "none", "none", "dwt"],
            "track": ["clean", "clean", "non-adaptive", "non-adaptive", "non-adaptive"],
            "attack_key": ["clean", "clean", "pgd linf eps=0.1", "pgd linf eps=0.1", "pgd linf eps=0.1"]}
    table = pa.table({**{k: pa.array(v) for k, v in rows.items()},
                      "image": pa.array(list(images.reshape(5, -1)), type=field.type)})
    table = table.cast(pa.schema([*table.schema][:-1] + [field]))
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "shard-00000.parquet")
    x, x_adv, y = read_stored_pairs(str(tmp_path))
    assert y.tolist() == [4, 3]  # adversarial rows 2 and 3 (defense none), each with its own clean row
    assert torch.equal(x_adv, torch.from_numpy(images[[2, 3]])) and torch.equal(x, torch.from_numpy(images[[1, 0]]))
    with pytest.raises(AdvError, match="no attack_key"):
        read_stored_pairs(str(tmp_path), "fgsm")
