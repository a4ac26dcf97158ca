"""Training actually improves each learned stage (loss falls, accuracy rises vs the untrained stage),
and proactive DWT training goes through ``adv train --defense`` into the checkpoint metadata."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adv.cli import main
from adv.defenses import Defended, create_defense
from adv.evaluate.threat import build_evaluated_model
from adv.train import checkpoint_defenses
from adv.train.losses import training_loss
from adv.defenses.dwt import DWTParams, dwt_transform
from adv.errors import ConfigError
from adv.models import create_model, load_checkpoint
from adv.train import TrainConfig, evaluate_accuracy, fit
from tests.test_defenses_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    FAST, SIZE, cli_classifier, digits, one_thread, single_thread, trained_classifier,
)


def _losses(stage) -> list[float]:
    return [h["train_loss"] for h in stage.train_metrics["history"]]


def _accuracy_through(stage, clf) -> float:
    kind = stage.defense_kind
    model = Defended(stage, clf, allow_untrained=True) if kind == "preprocess" else Defended(None, stage,
                                                                                              allow_untrained=True)
    return evaluate_accuracy(model, digits("test"))


def test_initial_ae_learns_to_reconstruct():
    clf = trained_classifier()
    untrained = create_defense(f"initial_ae:{FAST}", classifier=clf)
    ae = create_defense(f"initial_ae:epochs=2,{FAST}", classifier=clf, data=digits("train").subset(800))
    x, _ = digits("test").tensors()
    with torch.no_grad():
        assert F.mse_loss(ae(x), x) < 0.5 * F.mse_loss(untrained(x), x)
    assert _losses(ae)[-1] < _losses(ae)[0] and ae.trained and not untrained.trained
    assert _accuracy_through(ae, clf) > _accuracy_through(untrained, clf) + 0.3


def test_middle_ae_learns_and_leaves_the_classifier_alone():
    clf = trained_classifier().train()  # the caller's mode and gradient flags come back as they were
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    untrained = create_defense(f"middle_ae:{FAST}", classifier=trained_classifier())
    stage = create_defense(f"middle_ae:epochs=2,{FAST}", classifier=clf, data=digits("train"))
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    assert clf.training and all(p.requires_grad for p in clf.parameters())
    assert _losses(stage)[-1] < _losses(stage)[0]
    assert _accuracy_through(stage, clf) > _accuracy_through(untrained, clf) + 0.3


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """One trained encoder variant, shared by the encoder and detector tests (they are the same weights)."""
    from adv.defenses import save_stage

    clf = trained_classifier()
    with single_thread():
        stage = create_defense(f"encoder:epochs=2,{FAST}", classifier=clf, data=digits("train"))
    return stage, save_stage(tmp_path_factory.mktemp("enc") / "encoder.pt", stage)


def test_encoder_variant_trains_a_new_head_on_the_encoder(encoder_file):
    stage, _ = encoder_file
    untrained = create_defense(f"encoder:{FAST}", classifier=trained_classifier())
    assert "middle_ae" in stage.train_metrics and not any(p.requires_grad for p in stage.encoder.parameters())
    assert _losses(stage)[-1] < _losses(stage)[0]
    assert _accuracy_through(stage, stage.classifier) > _accuracy_through(untrained, stage.classifier) + 0.3


def test_disagreement_detector_flags_exactly_the_disagreements(encoder_file):
    clf = trained_classifier()
    det = create_defense(f"disagreement:checkpoint={encoder_file[1]}", classifier=clf)
    x, _ = digits("test").tensors()
    with torch.no_grad():
        flags, score = det(x), det.score(x)
        disagree = clf(x).argmax(1) != encoder_file[0](x).argmax(1)
    assert torch.equal(flags, disagree)
    assert flags.float().mean() < 0.3  # a trained variant mostly agrees on clean digits
    assert ((0 <= score) & (score <= 1)).all() and score[flags].mean() > score[~flags].mean()


def test_unet_composite_loss_falls_and_restores_adversarials():
    from adv.attacks import get_attack

    clf = trained_classifier()
    spec = f"unet:width=0.25,attacks=fgsm,{FAST}"
    untrained = create_defense(spec, classifier=clf)
    unet = create_defense(f"{spec},epochs=2", classifier=clf, data=digits("train").subset(700))
    assert _losses(unet)[-1] < _losses(unet)[0] and unet.train_metrics["parameters"] > 0
    x, y = digits("test").subset(200).tensors()
    x_adv = get_attack("fgsm")(clf, x, y, eps=0.1)
    with torch.no_grad():
        acc = lambda stage: (clf(stage(x_adv)).argmax(1) == y).float().mean().item()  # noqa: E731
        assert acc(unet) > acc(untrained) + 0.3


def test_dwt_augmented_training_learns_the_transformed_images():
    params = DWTParams(wavelet="haar", level=2)
    loss = training_loss("dwt:level=2")
    loss_fn = loss.loss_fn
    assert loss.spec == "dwt:level=2" and loss.stages == ["dwt:level=2"]
    torch.manual_seed(0)
    model = create_model("lenet5", input_size=(1, SIZE, SIZE))
    metrics = fit(model, digits("train").subset(800), None, TrainConfig(epochs=2, batch_size=32, lr=3e-3),
                  loss_fn=loss_fn, show_progress=False)
    assert metrics["train_dwt_acc"] > 0.8
    x, y = digits("test").tensors()
    with torch.no_grad():
        assert (model(dwt_transform(x, params)).argmax(1) == y).float().mean() > 0.8
    with pytest.raises(ConfigError, match="unknown training defense 'unet'.*dwt"):
        training_loss("unet")


def test_adv_train_defense_records_the_spec_and_eval_recreates_it(tmp_path, capsys):
    code = main(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--n", "200",
                 "--defense", "dwt:wavelet=db2", "--out", str(tmp_path), "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["defenses"] == ["dwt:wavelet=db2"]
    assert summary["training_loss"] == "dwt:wavelet=db2"
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint_defenses(meta) == ["dwt:wavelet=db2"]
    evaluated = build_evaluated_model(model, [], checkpoint_meta=meta)
    assert evaluated.defended.specs == ["dwt:wavelet=db2"] and "re-created" in evaluated.describe()["notes"][0]
    assert main(["train", "--dataset", "digits", "--model", "lenet5", "--n", "50", "--defense", "unet",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown training defense 'unet'" in capsys.readouterr().err


def test_adv_defend_train_writes_a_loadable_stage(tmp_path, capsys):
    checkpoint = cli_classifier(tmp_path / "clf", epochs=1, n=300)
    capsys.readouterr()
    out = tmp_path / "mid.pt"
    code = main(["defend", "train", "middle_ae:epochs=1,bottleneck=16", "--dataset", "digits", "--n", "300",
                 "--checkpoint", str(checkpoint), "--n-test", "100", "--out", str(out), "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and out.is_file() and 0 <= summary["test_acc_clean"] <= 1
    clf, _ = load_checkpoint(checkpoint)
    stage = create_defense(f"middle_ae:checkpoint={out}", classifier=clf)
    assert stage.trained and stage.params.bottleneck == 16 and stage.stage_meta["dataset"] == "digits"
    assert main(["defend", "train", "dwt", "--dataset", "digits", "--out", str(tmp_path / "d.pt")]) == 2
    assert main(["defend", "train", "unet", "--dataset", "digits", "--out", str(tmp_path / "u.pt")]) == 2
    err = capsys.readouterr().err
    assert "nothing to train" in err and "--checkpoint" in err and "Traceback" not in err


def test_training_a_stage_twice_gives_the_same_weights():
    clf = trained_classifier()
    spec = "unet:width=0.25,epochs=1,attacks=pgd,pgd_steps=1,batch_size=32"
    a, b = (create_defense(spec, classifier=clf, data=digits("train").subset(96)) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = create_defense(spec + ",seed=1", classifier=clf, data=digits("train").subset(96))
    assert not torch.equal(a.out.weight, c.out.weight)
