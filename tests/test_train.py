import json

import pytest
import torch
from pydantic import ValidationError

from adv.data import load_dataset
from adv.models import create_model, load_checkpoint
from adv.train import LossOutput, TrainConfig, evaluate_accuracy, fit, seed_everything


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train", size=16), load_dataset("digits", split="test", size=16)


def _model(seed=0):
    seed_everything(seed)
    return create_model("lenet5", input_size=(1, 16, 16))


def test_tiny_training_run_learns(digits, tmp_path):
    train, test = digits
    model = _model()
    before = evaluate_accuracy(model, test)
    metrics = fit(model, train, test, TrainConfig(epochs=3, batch_size=64, lr=3e-3), out_dir=tmp_path,
                  show_progress=False)
    assert before < 0.3 and metrics["test_acc"] > 0.85
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_acc"] == metrics["test_acc"] and len(saved["history"]) == 3
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["train_config"]["epochs"] == 3 and evaluate_accuracy(loaded, test) == metrics["test_acc"]


def test_seeded_training_is_deterministic(digits):
    train, test = digits
    cfg = TrainConfig(epochs=1, batch_size=64, seed=7)
    seed_everything(0)
    model_a = _model()
    seed_everything(0)
    model_b = _model()
    torch.rand(5)  # advancing the global RNG between runs must not matter: fit seeds itself
    a = fit(model_a, train, None, cfg, show_progress=False)
    b = fit(model_b, train, None, cfg, show_progress=False)
    assert a["train_loss"] == b["train_loss"]


def test_resume_continues_where_it_stopped(digits, tmp_path):
    train, test = digits
    full = fit(_model(), train, test, TrainConfig(epochs=2, batch_size=64), out_dir=tmp_path / "full",
               show_progress=False)
    fit(_model(), train, test, TrainConfig(epochs=1, batch_size=64), out_dir=tmp_path / "split", show_progress=False)
    epochs_run = []
    resumed = fit(
        _model(), train, test, TrainConfig(epochs=2, batch_size=64), out_dir=tmp_path / "split",
        show_progress=False, on_epoch_end=lambda e, m: epochs_run.append(e),
    )
    assert epochs_run == [2]
    assert resumed["test_acc"] == pytest.approx(full["test_acc"], abs=1e-9)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)


def test_custom_batch_loss_is_used(digits):
    train, _ = digits
    calls = []

    def loss_fn(model, x, y):
        calls.append(len(y))
        logits = model(x)
        return LossOutput(torch.nn.functional.cross_entropy(logits, y), logits, {"extra": 1.0})

    metrics = fit(_model(), train.subset(100), None, TrainConfig(epochs=1, batch_size=50), loss_fn=loss_fn,
                  show_progress=False)
    assert calls == [50, 50] and metrics["train_extra"] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
     ({"schedule": "step"}, "milestones"), ({"bogus": 1}, "bogus")],
)
def test_bad_train_config_names_the_key(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        TrainConfig(**kwargs)
