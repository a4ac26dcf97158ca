"""Dataset registry: every loader returns an ``ImageData`` of [0, 1] images and int labels."""

from adv.data import digits, filter, imagefolder, vision  # noqa: F401  (register the datasets)
from adv.data.base import ImageData, describe_dataset, list_datasets, load_dataset, register_dataset
from adv.data.imagefolder import logit_mask, mask_logits, subset_to_1k

__all__ = [
    "ImageData",
    "describe_dataset",
    "list_datasets",
    "load_dataset",
    "logit_mask",
    "mask_logits",
    "register_dataset",
    "subset_to_1k",
]
