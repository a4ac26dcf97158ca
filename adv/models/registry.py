"""Decorator registry for classifiers (after timm's ``_registry``/``_factory``).

Each entry is a builder function plus a ``ModelSpec`` that holds its
metadata as data: input size, normalization, the dataset it is meant for and
where pretrained weights come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from adv.models.base import ImageClassifier
from adv.registry import Registry

MNIST_MEAN_STD = ((0.0,), (1.0,))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: tuple[int, int, int]
    default_num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    #: torchvision weights enum name ("ResNet50_Weights.IMAGENET1K_V2") or "".
    pretrained: str = ""
    #: Channels/size are adapted to the dataset when True (small CNNs).
    adapts_to_input: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ModelEntry:
    spec: ModelSpec
    build: Callable[..., ImageClassifier] = field(repr=False)


#: Every architecture by name; importing :mod:`adv.models` registers them all.
MODELS: Registry[ModelEntry] = Registry("model")


def register_model(spec: ModelSpec):
    """Register ``fn(arch, num_classes, input_size, mean, std, **kw) -> ImageClassifier``.

    ``arch`` is the registered name; builders pass all five to the ``ImageClassifier`` constructor.
    """

    def wrap(fn: Callable[..., ImageClassifier]) -> Callable[..., ImageClassifier]:
        MODELS.add(spec.name, ModelEntry(spec, fn))
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def get_spec(name: str) -> ModelSpec:
    """The architecture's metadata (ConfigError naming the closest one when there is none)."""
    return MODELS.get(name).spec


def create_model(
    name: str,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **kwargs,
) -> ImageClassifier:
    """Build a registered classifier.

    ``input_size`` (C, H, W) and ``mean``/``std`` default to the spec's; small
    CNNs adapt to other sizes (e.g. ``lenet`` on 3x32x32), the torchvision
    ImageNet models keep 3xHxW. ``pretrained=True`` (ImageNet models only)
    downloads torchvision weights, failing offline with a clear error.
    """
    spec = get_spec(name)
    num_classes = spec.default_num_classes if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    input_size = tuple(spec.input_size if input_size is None else input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    if not spec.adapts_to_input and input_size[0] != spec.input_size[0]:
        raise ValueError(f"model {name!r} needs {spec.input_size[0]} input channels, got {input_size[0]}")
    channels = input_size[0]
    if mean is None or std is None:
        mean, std = spec.mean, spec.std
        if len(mean) != channels:  # e.g. lenet (grey) built for RGB input
            mean, std = (mean[0],) * channels, (std[0],) * channels
    return MODELS.get(name).build(arch=name, num_classes=num_classes, input_size=input_size, mean=mean, std=std,
                                  **kwargs)
