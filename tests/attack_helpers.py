"""Tiny models and data for the attack and evaluation tests (no network, a few seconds of CPU)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import SHARED_MODELS

NUM_CLASSES = 5
SHAPE = (1, 12, 12)


class TinyCNN(nn.Module):
    """conv8-pool-conv16-fc: a plain nn.Module (not an ImageClassifier) with a Grad-CAM layer."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 6 * 6, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(F.relu(self.conv2(x)).flatten(1))

    @property
    def cam_layer(self):
        return self.conv2


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one smooth template per class, in [0, 1]."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(NUM_CLASSES, 1, 4, 4, generator=g), size=SHAPE[1:], mode="bilinear",
                              align_corners=False) * 0.6 + 0.2
    g.manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = (templates[y] + 0.08 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)
    return x, y


def train_tiny(seed: int = 0, steps: int = 150) -> TinyCNN:
    torch.manual_seed(seed)  # tests only: the library never seeds the global RNG
    model = TinyCNN()
    x, y = synthetic(500, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Two shared cores: one intra-op thread avoids OpenMP contention (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["NUM_CLASSES", "SHAPE", "SHARED_MODELS", "TinyCNN", "one_thread", "synthetic", "train_tiny"]
