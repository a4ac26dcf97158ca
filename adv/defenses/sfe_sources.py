"""Where the SFE's adversarial training examples come from (``sfe:source=...``).

* ``attack``: any registered attack crafts them on the fly against the frozen
  classifier, from the benign training images (pairs);
* ``stored``: clean/adversarial pairs stored by ``jobs.evaluate`` (pairs);
* ``natural``: a natural-adversarial image set, ImageNet-A or the output of
  ``adv data filter`` (no counterparts: the class-wise set objective).

Shape: every function returns a :class:`FeatureSet` of (N, D) features. The SFE (:mod:`adv.defenses.sfe`)
trains on them; this module does not import it (the params are read, never built, here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from adv.errors import ConfigError
from adv.progress import progress

if TYPE_CHECKING:
    from adv.defenses.sfe import SFEParams


# --- training data in feature space -------------------------------------------------------------
@dataclass
class FeatureSet:
    """Benign features, adversarial features and the SF target of each adversarial example.

    Shape: benign (N, D), benign_labels (N,), adv (M, D), adv_labels (M,), target (M, D)
    """

    benign: torch.Tensor
    benign_labels: torch.Tensor
    adv: torch.Tensor
    adv_labels: torch.Tensor
    target: torch.Tensor
    paired: bool


@torch.no_grad()
def extract_features(classifier: nn.Module, x: torch.Tensor, batch_size: int = 256, desc: str = "") -> torch.Tensor:
    """``classifier.features`` over ``x`` in batches, on the classifier's device, returned on the CPU."""
    device = next(classifier.parameters()).device
    chunks = range(0, len(x), batch_size)
    return torch.cat([classifier.features(x[i:i + batch_size].to(device)).cpu()
                      for i in progress(chunks, desc=desc or "features", total=len(chunks))])


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature vector per class (zeros for classes with no example).

    Shape: (N, D), (N,) -> (num_classes, D)
    """
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def set_features(benign: torch.Tensor, benign_labels: torch.Tensor, adv: torch.Tensor, adv_labels: torch.Tensor,
                 num_classes: int) -> FeatureSet:
    """Natural adversarials (no counterparts): the SF target is the benign mean of the labelled class."""
    missing = sorted(set(adv_labels.tolist()) - set(benign_labels.tolist()))
    if missing:
        raise ConfigError(f"natural adversarial classes {missing[:5]} have no benign training example; "
                          "the class-wise set objective needs some")
    target = class_means(benign, benign_labels, num_classes)[adv_labels]
    return FeatureSet(benign, benign_labels, adv, adv_labels, target, paired=False)


def training_features(classifier: nn.Module, data, p: SFEParams) -> FeatureSet:
    """The :class:`FeatureSet` for ``p.source``; ``data`` holds the benign training images."""
    x, y = data.tensors()
    if p.source == "natural":
        return natural_features(classifier, x, y, p)
    if p.source == "stored":
        from adv.runs.stored import read_stored_pairs

        x, x_adv, y = read_stored_pairs(p.stored, p.stored_attack)
    else:
        x_adv = craft(classifier, x, y, p)
    return pair_features(classifier, x, x_adv, y, p.batch_size)


def craft(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, p: SFEParams) -> torch.Tensor:
    """``p.attack`` at ``p.eps`` against the frozen classifier, batch by batch (seeded)."""
    from adv.attacks import get_attack

    spec = get_attack(p.attack)
    kw = {"eps": p.eps}
    if "steps" in spec.defaults:
        kw["steps"] = p.attack_steps
    device = next(classifier.parameters()).device
    out = []
    starts = range(0, len(x), p.batch_size)
    for i, s in enumerate(progress(starts, desc=f"crafting {p.attack} adversarials", total=len(starts))):
        extra = {"seed": p.seed * 1_000_003 + i} if spec.randomized else {}
        out.append(spec(classifier, x[s:s + p.batch_size].to(device), y[s:s + p.batch_size].to(device),
                        **kw, **extra).detach().cpu())
    return torch.cat(out)


@torch.no_grad()
def pair_features(classifier: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  batch_size: int = 256) -> FeatureSet:
    """Features of every benign image and of the adversarials that fooled a correct prediction.

    Shape: x, x_adv (N, C, H, W); y (N,)
    """
    fb = extract_features(classifier, x, batch_size, "benign features")
    fa = extract_features(classifier, x_adv, batch_size, "adversarial features")
    ok = classifier.head(fb.to(_device(classifier))).argmax(1).cpu() == y
    fooled = classifier.head(fa.to(_device(classifier))).argmax(1).cpu() != y
    keep = ok & fooled
    if not keep.any():
        raise ConfigError("no successful adversarial example to train the SFE on: raise eps or attack_steps, "
                          "or check the classifier's clean accuracy")
    return FeatureSet(fb, y, fa[keep], y[keep], fb[keep], paired=True)


def natural_features(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, p: SFEParams) -> FeatureSet:
    """Benign training features against a natural-adversarial set's features, class by class."""
    from adv.data.filter import load_natural_set

    nat = load_natural_set(p.natural, label_space=p.label_space, input_size=classifier.input_size)
    fb = extract_features(classifier, x, p.batch_size, "benign features")
    fa = extract_features(classifier, nat.tensors()[0], p.batch_size, "natural-adversarial features")
    return set_features(fb, y, fa, nat.labels, classifier.num_classes)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
