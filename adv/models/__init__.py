"""Classifier registry: ``create_model``, ``list_models``, checkpoints."""

from adv.models import cifar, imagenet, small  # noqa: F401  (register the architectures)
from adv.models.base import ImageClassifier, Normalize, eval_mode
from adv.models.checkpoint import load_checkpoint, load_external, save_checkpoint
from adv.models.device import resolve_device
from adv.models.registry import ModelSpec, create_model, get_spec, list_models, register_model
from adv.models.wrap import SelectOutput

__all__ = [
    "ImageClassifier",
    "ModelSpec",
    "Normalize",
    "create_model",
    "eval_mode",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "load_external",
    "register_model",
    "resolve_device",
    "save_checkpoint",
    "SelectOutput",
]
