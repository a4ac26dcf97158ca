"""Shared, cached tiny setups for the defense tests (no tests here).

A lenet5 on 16x16 digits trains in seconds and reaches ~0.9 accuracy: enough
for "training improves the stage" and adaptive-vs-non-adaptive properties.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from adv.cli import main
from adv.data import load_dataset
from adv.models import create_model
from adv.train import TrainConfig, fit
from tests.attack_helpers import one_thread as single_thread

SIZE = 16
#: Fast training settings for learned stages (spec-string suffix).
FAST = "batch_size=32,lr=3e-3"


@functools.lru_cache(maxsize=None)
def digits(split: str = "train"):
    return load_dataset("digits", split=split, size=SIZE)


@functools.lru_cache(maxsize=None)
def _trained_state() -> dict:
    torch.manual_seed(0)
    model = create_model("lenet5", input_size=(1, SIZE, SIZE))
    with single_thread():
        fit(model, digits("train"), None, TrainConfig(epochs=2, batch_size=32, lr=3e-3), show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_classifier():
    """A fresh copy each call (defenses freeze the classifier they wrap; tests must not share that)."""
    model = create_model("lenet5", input_size=(1, SIZE, SIZE))
    model.load_state_dict(_trained_state())
    return model.eval()


def cli_classifier(out_dir: Path, *, epochs: int, n: int, extra: tuple[str, ...] = ()) -> Path:
    """A digits lenet5 trained by ``adv train`` (the path a user takes) into ``out_dir``; its checkpoint."""
    assert main(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", str(epochs), "--n", str(n),
                 "--out", str(out_dir), "--quiet", *extra]) == 0
    return Path(out_dir) / "model.pt"


def sample_batch(n: int = 64, seed: int = 0):
    """``n`` test digits and labels, float (N, 1, 16, 16) in [0, 1]."""
    return digits("test").subset(n, seed).tensors()


@pytest.fixture(autouse=True)
def one_thread():
    """Autouse in the modules that import it (module-scoped fixtures use ``single_thread`` themselves)."""
    with single_thread():
        yield
