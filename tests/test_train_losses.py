"""Training-time defenses (issue 10): at, trades, alp, aad, ensemble_at, finetune_at, checkpoint selection."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adv.cli import main
from adv.data import load_dataset
from adv.errors import ConfigError
from adv.models import create_model, load_checkpoint, save_checkpoint
from adv.train import TrainConfig, fit, seed_everything
from adv.train.losses import training_loss
from adv.train.losses.aad import aad_terms, attention_mask
from adv.train.selection import RobustValidation, holdout
from tests.attack_helpers import synthetic

FAST = "eps=0.1,steps=2,step_size=0.05"
pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train", size=16, n=256), load_dataset("digits", split="test", size=16, n=64)


@pytest.fixture(scope="module")
def known(tmp_path_factory, model):
    """A .pt file of known adversarials of a tiny model (as finetune_at reads them)."""
    from adv.attacks import pgd

    x, y = synthetic(64, seed=5)
    path = tmp_path_factory.mktemp("known") / "known.pt"
    torch.save({"x_adv": pgd(model, x, y, eps=0.1, steps=5, seed=0), "y": y}, path)
    return path


def source_models(out, input_size, num_classes, dataset) -> list:
    """Two fixed, seeded source models saved as ``out/s1.pt`` and ``out/s2.pt`` (ensemble_at's sources)."""
    models = []
    for seed in (1, 2):
        seed_everything(seed)
        models.append(create_model("lenet5", input_size=input_size, num_classes=num_classes).eval())
        save_checkpoint(out / f"s{seed}.pt", models[-1], dataset=dataset)
    return models


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources")
    source_models(out, (1, 12, 12), 5, "synthetic")
    return f"{out / 's1.pt'}+{out / 's2.pt'}"


def specs(known, sources) -> dict[str, str]:
    return {"at": f"at:{FAST}", "at_fgsm_rs": "at:attack=fgsm_rs,eps=0.1", "at_mix": f"at:{FAST},mix=0.5",
            "trades": f"trades:{FAST},beta=1", "alp": f"alp:{FAST}", "aad_at": f"aad:{FAST},alpha=0.1,beta=0.1",
            "aad_alp": f"aad:base=alp,{FAST},alpha=0.1,beta=0.1",
            "ensemble_at": f"ensemble_at:{FAST},sources={sources}",
            "finetune_at": f"finetune_at:adversarials={known}"}


def value(loss_fn, model, x, y, seed=0):
    torch.manual_seed(seed)  # the losses draw their attack seeds from the (loop-seeded) global RNG
    kw = {"epoch": 1.0} if getattr(loss_fn, "takes_epoch", False) else {}
    return loss_fn(model, x, y, **kw)


def cycle_mean(loss_fn, model, x, y) -> float:
    """The loss over three batches: one full cycle of ensemble_at's (model, source 1, source 2)."""
    return sum(value(loss_fn, model, x, y).loss.item() for _ in range(3)) / 3


@pytest.mark.parametrize("name", ["at", "at_fgsm_rs", "trades", "alp", "aad_at", "aad_alp", "ensemble_at",
                                  "finetune_at"])
def test_each_loss_decreases_while_training(name, known, sources):
    seed_everything(0)
    model = create_model("lenet5", input_size=(1, 12, 12), num_classes=5)
    loss_fn = training_loss(specs(known, sources)[name]).loss_fn
    x, y = synthetic(64, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = cycle_mean(loss_fn, model, x, y)
    for step in range(20):
        out = value(loss_fn, model, x, y, seed=step + 1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = cycle_mean(loss_fn, model, x, y)
    assert after < 0.9 * before, (before, after)
    assert out.logits.shape == (64, 5) and not out.logits.requires_grad


def test_alp_with_lam_zero_equals_at_with_mix_half(model):
    x, y = synthetic(32, seed=2)
    a = value(training_loss(f"alp:{FAST},lam=0").loss_fn, model, x, y)
    b = value(training_loss(f"at:{FAST},mix=0.5").loss_fn, model, x, y)
    assert a.loss.item() == b.loss.item()
    c = value(training_loss(f"alp:{FAST},lam=1").loss_fn, model, x, y)
    assert c.loss.item() > a.loss.item()  # the pairing term is on


@pytest.mark.parametrize("base", ["at", "alp"])
def test_aad_with_alpha_beta_zero_equals_its_base(base, model):
    x, y = synthetic(32, seed=3)
    a = value(training_loss(f"aad:base={base},{FAST},alpha=0,beta=0").loss_fn, model, x, y)
    b = value(training_loss(f"{base}:{FAST}").loss_fn, model, x, y)
    assert a.loss.item() == b.loss.item()
    c = value(training_loss(f"aad:base={base},{FAST},alpha=0.1,beta=0.1").loss_fn, model, x, y)
    assert c.loss.item() != a.loss.item() and {"rectification", "preservation"} <= set(c.logs)


def test_aad_terms_carry_gradients_to_the_parameters(model):
    model, (x, y) = copy.deepcopy(model), synthetic(16, seed=4)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    rect, _, _, _ = aad_terms(model, x, x_adv, y)
    rect.backward()  # L_r: through the soft labels of x, x_m, x_adv and x_adv_m, so every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    _, pres, _, _ = aad_terms(model, x, x_adv, y)
    pres.backward()  # L_p: through the Grad-CAM graph (activations and the gradient weights alpha_k)
    for p in (model.conv1.weight, model.conv2.weight, model.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_attention_mask_covers_exactly_the_cells_at_or_above_kappa():
    cam = torch.rand(4, 6, 6)
    cam[0, 2, 3] = cam[0].mean() + 0  # a cell exactly at kappa (shifts the mean a little; recompute below)
    mask = attention_mask(cam, (12, 12))
    assert mask.shape == (4, 1, 12, 12) and set(mask.unique().tolist()) <= {0.0, 1.0}
    kappa = cam.mean((1, 2), keepdim=True)
    cells = mask[:, 0].unfold(1, 2, 2).unfold(2, 2, 2)  # (4, 6, 6, 2, 2): each cam cell is a 2x2 block
    assert (cells.amin((-2, -1)) == cells.amax((-2, -1))).all()
    assert torch.equal(cells[..., 0, 0].bool(), cam >= kappa)
    flat = torch.zeros(1, 3, 3)
    assert attention_mask(flat, (3, 3)).all()  # all cells equal the mean: all at kappa, all inside


@pytest.mark.parametrize("spec,match", [
    ("at:bogus=1", "bogus: Extra inputs are not permitted"),
    ("at:eps=-0.1", "eps: Input should be greater than or equal to 0"),
    ("aad:base=madry", "base: Input should be 'at' or 'alp'"),
    ("aad:lam=0.5", "lam is a key of base=alp"),
    ("trades:beta=-1", "beta"),
    ("ensemble_at", "needs sources"),
    ("ensemble_at:sources=missing.pt", "not found"),
    ("finetune_at", "needs adversarials"),
    ("finetune_at:adversarials=/nonexistent", "neither a run folder nor a file"),
    ("nope", "unknown training defense 'nope'"),
])
def test_bad_specs_fail_with_one_clear_line(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        training_loss(spec)
    assert "\n" not in str(info.value)


def test_cli_bad_spec_is_one_line(capsys):
    assert main(["train", "--model", "lenet5", "--dataset", "digits", "--n", "32", "--defense", "at:eps=-1",
                 "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eps" in err[0] and err[0].startswith("adv: error:")


def test_cli_trains_records_the_spec_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "lenet5", "--dataset", "digits", "--n", "100", "--n-test", "20", "--batch-size",
            "50", "--defense", "aad:base=alp,eps=0.1,steps=2,step_size=0.05,eps_ramp=2", "--out", str(out), "--quiet"]
    assert main([*argv, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--select-best", "--val-n", "20"]) == 0  # resumes: the ramp continues
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "val_robust_acc" in history[1]
    assert load_checkpoint(out / "best.pt")[1]["extra"]["selected_by"] == "val_robust_acc"
    assert history[0]["train_eps"] < history[1]["train_eps"] <= 0.1
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["extra"]["training_loss"] == summary["training_loss"]
    assert meta["extra"]["training_loss"].startswith("aad:") and "base=alp" in meta["extra"]["training_loss"]


@pytest.fixture(scope="module")
def digits_sources(tmp_path_factory):
    """Two fixed source models and a file of known adversarials, shaped like the CLI's digits (1x28x28, 10)."""
    from adv.attacks import pgd

    out = tmp_path_factory.mktemp("digits_sources")
    models = source_models(out, (1, 28, 28), 10, "digits")
    x, y = load_dataset("digits", split="test", n=32).tensors()
    torch.save({"x_adv": pgd(models[0], x, y, eps=0.1, steps=3, seed=0), "y": y}, out / "known.pt")
    return out


@pytest.mark.parametrize("spec", ["at:attack=fgsm_rs,eps=0.1", "trades:{FAST},beta=1", "alp:{FAST},lam=0.5",
                                  "aad:base=at,{FAST},alpha=0.1,beta=0.1",
                                  "ensemble_at:{FAST},sources={src}/s1.pt+{src}/s2.pt",
                                  "finetune_at:adversarials={src}/known.pt"])
def test_every_loss_trains_from_the_cli_and_resumes(spec, digits_sources, tmp_path, capsys):
    spec = spec.format(FAST=FAST, src=digits_sources)
    start = ["--checkpoint", str(digits_sources / "s1.pt")] if spec.startswith("finetune_at") else ["--model", "lenet5"]
    argv = ["train", *start, "--dataset", "digits", "--n", "100", "--n-test", "20", "--batch-size", "50",
            "--defense", spec, "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*argv, "--epochs", "1"]) == 0
    first = (tmp_path / "run" / "model.pt").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 0
    assert "at epoch 1" in capsys.readouterr().err  # resumed from train_state.pt: one more epoch, not two
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (tmp_path / "run" / "model.pt").read_bytes() != first
    _, meta = load_checkpoint(tmp_path / "run" / "model.pt")
    assert meta["extra"]["training_loss"].split(":")[0] == spec.split(":")[0]


def test_python_resume_matches_an_uninterrupted_run(digits, tmp_path):
    train, _ = digits
    spec = "at:eps=0.1,steps=2,step_size=0.05,eps_ramp=1"

    def run(epochs, out):
        seed_everything(0)
        model = create_model("lenet5", input_size=(1, 16, 16))
        fit(model, train, None, TrainConfig(epochs=epochs, batch_size=64), loss_fn=training_loss(spec).loss_fn,
            out_dir=out, show_progress=False)
        return model

    full = run(2, tmp_path / "full")
    run(1, tmp_path / "split")
    resumed = run(2, tmp_path / "split")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_selection_keeps_the_best_validation_epoch(digits, tmp_path):
    train, _ = digits
    train, val = holdout(train, 64)
    assert len(train) == 192 and len(val) == 64 and val.split.endswith("holdout")
    seed_everything(0)
    model = create_model("lenet5", input_size=(1, 16, 16))
    validate = RobustValidation(val, eps=0.05, steps=3)
    fit(model, train, None, TrainConfig(epochs=2, batch_size=64, lr=3e-3), out_dir=tmp_path, show_progress=False,
        loss_fn=training_loss("at:eps=0.05,steps=2,step_size=0.03").loss_fn, validate=validate,
        select="val_robust_acc")
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    best = max(range(2), key=lambda i: (history[i]["val_robust_acc"], i))
    best_model, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["metrics"]["epoch"] == best + 1 and meta["extra"]["selected_by"] == "val_robust_acc"
    assert validate(best_model)["val_robust_acc"] == history[best]["val_robust_acc"]
    with pytest.raises(ValueError, match="between 1 and"):
        holdout(train, 0)
    with pytest.raises(ValueError, match="select='nope' is not a metric"):
        fit(create_model("lenet5", input_size=(1, 16, 16)), train, None, TrainConfig(epochs=1),
            out_dir=tmp_path / "x", show_progress=False, select="nope")


def test_ensemble_alternates_between_the_model_and_its_sources(sources, model):
    loss_fn = training_loss(f"ensemble_at:{FAST},sources={sources}").loss_fn
    used: list[int] = []
    for i, src in enumerate(loss_fn.sources):
        src.register_forward_hook(lambda m, inp, out, i=i: used.append(i + 1))
    model, (x, y) = copy.deepcopy(model), synthetic(8, seed=6)
    pattern = []
    for _ in range(4):
        used.clear()
        value(loss_fn, model, x, y)
        pattern.append(sorted(set(used)))
    assert pattern == [[], [1], [2], []]  # batch k: the trained model, then source 1, source 2, ...
    assert all(not p.requires_grad for s in loss_fn.sources for p in s.parameters())


def test_finetune_reports_the_papers_metric(known, model):
    from adv.train.losses.finetune_at import known_accuracy, load_adversarials

    x_adv, y = load_adversarials(str(known))
    model = copy.deepcopy(model)
    before = known_accuracy(model, x_adv, y)
    loss_fn = training_loss(f"finetune_at:adversarials={known},weight=1").loss_fn
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, yc = synthetic(64, seed=9)
    for _ in range(30):
        out = loss_fn(model, x, yc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert before < 0.3 and known_accuracy(model.eval(), x_adv, y) > 0.9


def test_adv_info_lists_the_training_defenses_and_suites():
    from adv.cli.info import collect

    info = collect()
    assert {"at", "trades", "alp", "aad", "ensemble_at", "finetune_at"} <= set(info["training defenses"])
    assert "Wu et al. 2022" in info["training defenses"]["aad"]
    assert set(info["suites"]) == {"standard", "l2", "rand"}
