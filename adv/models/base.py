"""The classifier contract every attack, defense and explainer relies on.

Inputs are always images in [0, 1], NCHW. Normalization lives *inside* the
model (a ``Normalize`` stage), so attacks and defenses never need to know the
dataset statistics (normalization outside the model is a complaint users raise in torchattacks' issues).

Each classifier also exposes the internals later methods need:

* ``features(x)`` – penultimate features, shape (N, feature_dim);
* ``head(f)`` – the dense head that maps those features to logits, so a
  middle autoencoder (Echeberria-Barrio et al. 2020) or SFE (Khoshbakht et al. 2024 (SFE)) can run the head on
  features it produced itself;
* ``cam_layer`` – the default Grad-CAM target layer (the last conv stage).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own mode is restored on exit.

    For code that runs a caller's model: the model is theirs, so it leaves as it came.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``.

    The statistics are non-persistent buffers: they follow ``.to(device)`` but
    are not written into state_dicts, so foreign checkpoints (advertorch,
    akamaster, torchvision) load without extra keys.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ImageClassifier(nn.Module):
    """Base class: ``forward(x) = head(features(x))`` on [0, 1] inputs.

    Subclasses implement ``forward_features`` (on normalized inputs) and
    ``head``, and name their Grad-CAM layer in ``cam_layer``.

    Shape:
        x: (N, C, H, W) float in [0, 1]; features: (N, feature_dim); logits: (N, num_classes)
    """

    feature_dim: int = 0

    def __init__(self, arch: str, num_classes: int, input_size: tuple[int, int, int],
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        #: The registry name (``create_model(arch)`` rebuilds it; checkpoints record it).
        self.arch = arch
        self.num_classes = int(num_classes)
        #: Channels, height, width the model expects.
        self.input_size = tuple(input_size)
        self.normalize = Normalize(mean, std)

    # --- to implement -------------------------------------------------------
    def forward_features(self, x_normalized: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def cam_layer(self) -> nn.Module:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def load_external_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a foreign state_dict; subclasses rename keys where layouts differ."""
        self.load_state_dict(state_dict, strict=True)
