"""Tiny models, data and configs for the pipeline and job tests (Ray-free)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from adv.data import load_dataset
from adv.models import create_model, save_checkpoint
from adv.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]


def train_tiny(out_dir: Path) -> Path:
    """convsmall on the offline digits, 2 epochs (~90% test accuracy, a few seconds)."""
    ckpt = out_dir / "model.pt"
    if not ckpt.is_file():
        train = load_dataset("digits", split="train")
        model = create_model("convsmall", num_classes=10, input_size=train.input_size)
        fit(model, train, None, TrainConfig(epochs=2, batch_size=64, lr=3e-3), out_dir=out_dir)
    return ckpt


def random_checkpoint(path: Path) -> Path:
    model = create_model("convsmall", num_classes=10, input_size=(1, 28, 28))
    return save_checkpoint(path, model)


def tiny_config(ckpt: Path, out: Path, **overrides) -> dict:
    cfg = {
        "name": "tiny",
        "dataset": {"name": "digits", "n": 18, "seed": 1},
        "model": {"checkpoint": str(ckpt)},
        "defenses": ["dwt:wavelet=haar,level=1"],
        "attacks": [
            {"name": "fgsm", "eps": [0.1, 0.3]},
            {"name": "pgd", "eps": [0.3], "steps": [2]},
            {"name": "square", "eps": [0.3], "steps": [8]},
        ],
        "adaptive": True,
        "features": ["logits", "gradcam"],
        "shards": 3,
        "resources": {"actors": 2, "batch_size": 4},
        "output": {"path": str(out)},
        "report": {"examples": 2},
    }
    cfg.update(overrides)
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def batch_of(data, chunk_size: int = 4) -> dict[str, np.ndarray]:
    n = len(data)
    return {"image": data.images.numpy(), "label": data.labels.numpy(), "index": np.arange(n),
            "shard": np.zeros(n, np.int64), "chunk": np.arange(n) // chunk_size}


class SlowClassifier(torch.nn.Module):
    """A classifier that sleeps before each forward pass, so a run lasts long enough to lose a node in it."""

    def __init__(self, model, seconds: float):
        super().__init__()
        self.inner, self.seconds = model, seconds
        self.input_size = getattr(model, "input_size", None)
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


@dataclass(frozen=True)
class SlowLoader:
    """:class:`adv.evaluate.worker.ModelLoader` of ``checkpoint`` whose classifier sleeps ``seconds`` per call
    (the slowness is the test's: the job's code is unchanged)."""

    checkpoint: str
    seconds: float = 0.05

    def __call__(self):
        from adv.evaluate.worker import ModelLoader, Models

        models = ModelLoader(checkpoint=self.checkpoint)()
        return Models(SlowClassifier(models.classifier, self.seconds).eval(), {})


def submit_when_agent_ready(client, before_attempt=None, wait_s: float = 90, **job) -> str:
    """``client.submit_job(**job)``, retried while the fresh cluster's job agent comes up.

    Skips the calling test (with the reason) when the agent never answers: seen only when another Ray
    instance on the machine holds the agent's port 52365, which a shared developer machine can have.
    """
    import pytest

    deadline = time.time() + wait_s
    while True:
        if before_attempt is not None:
            before_attempt()
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            if time.time() > deadline:
                pytest.skip("the session cluster's job agent never came up (agent port taken by another Ray?)")
            time.sleep(2)


def on_this_cluster(command: str) -> str:
    """A job entrypoint pinned to this process's Ray cluster: Ray's job supervisor gives the driver the address
    in /tmp/ray/ray_current_cluster, which the last cluster started on the machine rewrites (a `make main`
    beside the tests got the submitted job, whose driver then met that cluster's token auth)."""
    import ray

    return f"RAY_ADDRESS={ray.get_runtime_context().gcs_address} {command}"
