"""The evaluated model of ``adv eval --defense ... [--adaptive] [--detector ...]``, and its threat model.

Two threat models, always named in reports:

* ``non-adaptive`` – the seeds' protocol (seed 001 Tables 2.x, seed 002
  "initial adversarials"): adversarials are crafted on the *undefended*
  model, then fed through the defense;
* ``adaptive`` – adversarials are crafted on the defended pipeline itself
  (BPDA/EOT for non-differentiable/randomized stages, and a joint loss when
  a detector is present; see :mod:`adv.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from adv.defenses.compose import Defended, build_defended
from adv.defenses.dwt_training import checkpoint_defenses

THREATS = ("non-adaptive", "adaptive")


@dataclass
class EvaluatedModel:
    """What an evaluation attacks and what it scores.

    ``defended`` answers every query (predictions, detector flags);
    ``attack_target`` is what the attacker differentiates: the undefended
    ``source`` model (non-adaptive) or ``adaptive_model(defended)``.
    """

    defended: Defended
    attack_target: nn.Module
    threat: str
    eot_samples: int = 8
    notes: list[str] = field(default_factory=list)

    def attack(self, name: str, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run a registered white-box attack under this threat model.

        Shape: x (N, C, H, W) in [0, 1], y (N,) -> x_adv like x
        """
        from adv.adaptive import JOINT_ATTACKS, detector_aware_attack
        from adv.attacks import get_attack

        if self.threat == "adaptive" and self.defended.detector is not None and name in JOINT_ATTACKS:
            allowed = {"eps", "norm", "steps", "step_size", "seed", "kappa"}
            return detector_aware_attack(self.defended, x, y, attack=name,
                                         **{k: v for k, v in kwargs.items() if k in allowed})
        return get_attack(name)(self.attack_target, x, y, **kwargs)

    def describe(self) -> dict:
        """The fields every report carries next to its numbers."""
        det = self.defended.detector
        return {
            "threat_model": self.threat,
            "defenses": [s for s in self.defended.specs if s != getattr(det, "defense_spec", None)],
            "detector": getattr(det, "defense_spec", None),
            "adversarials_crafted_on": ("undefended model" if self.threat == "non-adaptive"
                                        else "defended pipeline (BPDA/EOT"
                                        + (", detector-aware loss for fgsm/bim/pgd)" if det is not None else ")")),
            "notes": list(self.notes),
        }


def build_evaluated_model(
    classifier: nn.Module,
    defense_specs: Iterable[str] = (),
    *,
    adaptive: bool = False,
    detector: str | None = None,
    data=None,
    checkpoint_meta: dict | None = None,
    source: nn.Module | None = None,
    eot_samples: int = 8,
) -> EvaluatedModel:
    """Compose the defended model from spec strings and pick the attack target.

    ``checkpoint_meta`` (from ``load_checkpoint``) adds the inference-time
    defenses a proactively trained classifier was saved with (``adv train
    --defense dwt:...``) in front of ``defense_specs``. ``source`` is the
    model non-adaptive adversarials are crafted on (default: ``classifier``;
    seed 001 uses the standard network for every defended one). ``data``
    trains learned stages that have no ``checkpoint=``.
    """
    specs = list(defense_specs)
    notes = []
    for spec in reversed(checkpoint_defenses(checkpoint_meta or {})):
        if spec not in specs:
            specs.insert(0, spec)
            notes.append(f"{spec} re-created from the checkpoint's training defense")
    defended = build_defended(classifier, specs, detector=detector, data=data).eval()
    if adaptive:
        from adv.adaptive import adaptive_model

        target = adaptive_model(defended, eot_samples=eot_samples)
        if not defended.differentiable:
            notes.append("non-differentiable stages attacked with BPDA (straight-through)")
        if defended.randomized:
            notes.append(f"randomized stages attacked with EOT over {eot_samples} samples")
        return EvaluatedModel(defended, target, "adaptive", eot_samples, notes)
    return EvaluatedModel(defended, (source or classifier).eval(), "non-adaptive", eot_samples, notes)
