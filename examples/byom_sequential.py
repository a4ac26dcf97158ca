"""Bring your own model: evaluate a plain ``torch.nn.Sequential`` with ``adv.benchmark``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/byom_sequential.py

Measured: 1 min 53 s wall (36 s of CPU) on the shared 2-core development
machine under load; clean 90.0% [82.6, 94.5], robust 24.0% [16.7, 33.2]
at eps 0.1 on 100 test digits (FGSM, then AutoAttack's standard suite).
One thread per process avoids OpenMP contention on a busy small machine.

Everything here is what a new user has: their own architecture (defined
below, no adv base class), their own normalization statistics, numpy
arrays as data. The model owns its normalization (``adv.models.Normalize``
as the first layer), so attacks work on [0, 1] images. Offline: the data
are scikit-learn's 8x8 digits, upsampled to 28x28.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import adv
from adv.models import Normalize

MEAN, STD = 0.3, 0.35  # the statistics the network was trained with


def make_net() -> nn.Sequential:
    """A plain CNN; the Normalize layer makes it take [0, 1] images."""
    return nn.Sequential(
        Normalize([MEAN], [STD]),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 28, 28) float32 images in [0, 1] and int64 labels, as numpy arrays."""
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), bunch.target


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 3) -> nn.Module:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def main() -> None:
    torch.manual_seed(0)
    x, y = digits()
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    net = train(make_net(), x_train, y_train)
    # numpy arrays are converted; eps=8 would be refused with "did you mean 8/255?"
    result = adv.benchmark(net, (x_test, y_test), eps=0.1, n=100, attacks=["fgsm"], suite="standard",
                           return_adversarials=True)
    print(result)
    ex = result.per_example
    with torch.no_grad():
        fooled = net(ex.x_adv).argmax(1) != torch.from_numpy(y_test[:100]).long()
    print(f"per example: {int(ex.robust.sum())} robust of {len(ex.robust)}; the returned adversarials fool the net "
          f"on exactly the non-robust points: {bool((fooled == ~ex.robust).all())}")
    for label, mask in ex.fooled.items():
        print(f"  {label:<28} broke {int(mask.sum())} examples")


if __name__ == "__main__":
    main()
