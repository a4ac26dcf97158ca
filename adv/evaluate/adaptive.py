"""Adaptive evaluation: attack the whole defended pipeline, not just the classifier behind it.

Three tools from Athalye, Carlini & Wagner (2018), "Obfuscated Gradients Give
a False Sense of Security", and one for detectors:

* **BPDA** (§4.1): a non-differentiable stage (DWT, quantisation) runs as is
  on the forward pass; the backward pass treats it as the identity
  (straight-through), which is the right approximation for stages with
  ``g(x) ≈ x``;
* **EOT** (§4.3): for randomized stages, the attacked model's output is the
  average over ``samples`` draws, so its gradient is the average gradient;
* **whole-pipeline gradients**: differentiable stages (autoencoders, U-Net)
  are simply kept in the graph;
* a **detector-aware** attack (after Carlini & Wagner 2017, "Adversarial
  Examples Are Not Easily Detected"): one loss makes the classifier wrong
  *and* keeps the disagreement detector quiet by pushing the classifier and
  the encoder variant to the same wrong class.

The non-adaptive protocol of the seeds (adversarials crafted on the
undefended model, then fed through the defense) is the other threat model;
:func:`adv.evaluate.threat.build_evaluated_model` picks between them and reports which.

Shape:
    x: (N, C, H, W) in [0, 1]; y: (N,) int64; logits: (N, num_classes)
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import check_inputs, check_positive, cw_loss, frozen, take
from adv.attacks.fgsm import fast_gradient_step
from adv.attacks.pgd import run_pgd

class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stage):
        with torch.no_grad():
            return stage(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # d stage(x) / dx ≈ I (BPDA with g(x) = x)


class BPDA(nn.Module):
    """Forward: ``stage(x)``; backward: identity (Athalye et al. 2018, §4.1).

    Shape: (N, C, H, W) -> (N, C, H, W)
    """

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, self.stage)


class EOT(nn.Module):
    """Expectation over Transformation (Athalye et al. 2018, §4.3): the mean of ``samples`` forward passes.

    The gradient of the mean is the mean of the per-draw gradients of the
    outputs (exact for losses linear in the logits, the usual approximation
    for cross-entropy). Draws are sequential, so a seeded global RNG makes
    the average reproducible.

    Shape: (N, C, H, W) -> (N, num_classes)
    """

    def __init__(self, model: nn.Module, samples: int = 8):
        super().__init__()
        check_positive(samples=samples)
        self.model = model
        self.samples = int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


def adaptive_preprocess(defended: nn.Module) -> nn.Sequential:
    """The defended model's preprocessing with every non-differentiable stage wrapped in BPDA."""
    return nn.Sequential(*[s if getattr(s, "differentiable", True) else BPDA(s) for s in defended.preprocess])


def bpda_pipeline(defended: nn.Module) -> nn.Sequential:
    """``classifier(preprocess(x))`` with BPDA around non-differentiable stages: the defended forward, with gradients.

    Shape: (N, C, H, W) in [0, 1] -> logits (N, num_classes)
    """
    if not hasattr(defended, "preprocess") or not hasattr(defended, "classifier"):
        raise ValueError(f"adaptive evaluation needs a Defended model, got {type(defended).__name__}")
    return nn.Sequential(adaptive_preprocess(defended), defended.classifier)


def adaptive_model(defended: nn.Module, eot_samples: int = 8) -> nn.Module:
    """An attackable version of a ``Defended`` model: BPDA for non-differentiable stages,
    gradients straight through differentiable ones, EOT when any stage is randomized.

    Shape: (N, C, H, W) in [0, 1] -> logits (N, num_classes)
    """
    model = bpda_pipeline(defended)
    return EOT(model, eot_samples) if getattr(defended, "randomized", False) else model


def _margin(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t - max_{j != t} z_j``: positive exactly when the model predicts ``t`` (minus the attacks' CW loss)."""
    return -cw_loss(logits, t)


def detector_aware_objective(defended: nn.Module, y: torch.Tensor, detector_margin: float = 1.0):
    """``objective(x_adv, rows) -> (values, logits)`` for the joint classifier + detector attack.

    ``t`` is the wrong class both models find likeliest together (``y``
    excluded, re-chosen every step); the attack ascends
    ``min(margin_f(t), margin_enc(t))`` capped at ``detector_margin`` (Carlini &
    Wagner 2017's margin, applied to both models): it is positive exactly when the
    classifier and the encoder variant both predict ``t``, i.e. the input is
    misclassified *and* the disagreement detector stays silent.
    """
    detector = getattr(defended, "detector", None)
    if detector is not None and hasattr(detector, "evasion_margin"):
        return _evasion_objective(defended, y, detector_margin)
    if detector is None or not hasattr(detector, "logits_pair"):
        raise ValueError("the detector-aware attack needs a Defended model with a disagreement detector "
                         "(logits_pair) or a detector with a differentiable evasion_margin (AdvD)")
    pre = adaptive_preprocess(defended)
    shared = defended.classifier is detector.classifier

    def obj(x_adv: torch.Tensor, rows: torch.Tensor | None = None):
        xp = pre(x_adv)
        z_orig, z_enc = detector.logits_pair(xp)
        z_cls = z_orig if shared else defended.classifier(xp)
        joint = (z_cls.log_softmax(1) + z_enc.log_softmax(1)).detach()
        t = joint.scatter(1, take(y, rows)[:, None], float("-inf")).argmax(1)
        return torch.minimum(_margin(z_cls, t), _margin(z_enc, t)).clamp(max=detector_margin), z_cls

    return obj


def _evasion_objective(defended: nn.Module, y: torch.Tensor, detector_margin: float):
    """The joint objective for a detector with ``evasion_margin(x)`` (> 0 exactly when not flagged, e.g. AdvD).

    Ascends ``min(margin_f(t), evasion_margin)`` capped at ``detector_margin``, ``t`` the
    defended classifier's likeliest wrong class: positive exactly when the
    input is misclassified *and* unflagged (Carlini & Wagner 2017's margin on both).
    """
    pre = adaptive_preprocess(defended)

    def obj(x_adv: torch.Tensor, rows: torch.Tensor | None = None):
        xp = pre(x_adv)
        z = defended.classifier(xp)
        t = z.detach().scatter(1, take(y, rows)[:, None], float("-inf")).argmax(1)
        return torch.minimum(_margin(z, t), defended.detector.evasion_margin(xp)).clamp(max=detector_margin), z

    return obj


def _run(obj, x, y, attack: str, eps: float, norm: str, steps: int, step_size, seed) -> torch.Tensor:
    """FGSM, BIM or PGD driven by ``obj``: the attacks' own FGM step and PGD loop."""
    if attack == "fgsm":
        return fast_gradient_step(obj, x, eps, norm).detach()
    return run_pgd(obj, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, rand_init=attack == "pgd",
                   restarts=1, early_stop=False, targeted=False, y_target=None, seed=seed)


@torch.no_grad()
def _evades(defended: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fooled = defended(x_adv).argmax(1) != y
    return fooled & ~defended.detect(x_adv), fooled


def detector_aware_attack(
    defended: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str = "pgd",
    eps: float,
    norm: str = "linf",
    detector_margin: float = 1.0,
    steps: int | None = None,
    step_size: float | None = None,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """The worst case, per example, of two attacks on a defended model with a detector (disagreement or AdvD).

    1. the joint attack on :func:`detector_aware_objective` (fool and evade);
    2. the plain attack (cross-entropy) on the BPDA-wrapped pipeline.

    Per example the first point that is misclassified *and* unflagged wins,
    else the first that is misclassified (AutoAttack's keep-the-worst
    protocol, so this is never weaker than the plain attack). Reuses the
    attacks' FGM step and PGD loop; ``steps`` defaults to the registered
    attack's default.

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> x_adv like x
    """
    from adv.attacks import get_attack, list_attacks
    from adv.attacks.core import objective

    joint = list_attacks(detector_aware=True)  # they share the FGM step and PGD loop that _run drives
    if attack not in joint:
        raise ValueError(f"attack must be one of {joint} for the detector-aware loss, got {attack!r}")
    check_inputs(x, y, eps, norm)
    if eps == 0:
        return x.clone()
    steps = steps or get_attack(attack).defaults.get("steps", 1)
    pipeline = bpda_pipeline(defended)
    with frozen(defended):
        joint = _run(detector_aware_objective(defended, y, detector_margin), x, y, attack, eps, norm, steps,
                     step_size, seed)
        plain = _run(objective(pipeline, y), x, y, attack, eps, norm, steps, step_size, seed)
    evade_j, fooled_j = _evades(defended, joint, y)
    evade_p, fooled_p = _evades(defended, plain, y)
    use_plain = (~evade_j & evade_p) | (~evade_j & ~evade_p & ~fooled_j & fooled_p)
    return torch.where(use_plain.view(-1, 1, 1, 1), plain, joint)
