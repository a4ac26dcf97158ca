"""The evaluated model of ``adv eval --defense ... [--adaptive] [--detector ...]``, and its threat model.

Two threat models, always named in reports:

* ``non-adaptive`` – the papers' protocol (Kaminskyi, DWT study Tables 2.x, Echeberria-Barrio et al. 2020
  "initial adversarials"): adversarials are crafted on the *undefended*
  model, then fed through the defense;
* ``adaptive`` – adversarials are crafted on the defended pipeline itself
  (BPDA/EOT for non-differentiable/randomized stages, and a joint loss when
  a detector is present; see :mod:`adv.evaluate.adaptive`).
"""

from __future__ import annotations

import copy

import functools
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from adv.defenses.compose import Defended, build_defended
from adv.train.registry import checkpoint_defenses
from adv.specs import StageSpec


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

    def joint(self, name: str) -> bool:
        """Whether ``name`` runs on the joint classifier + detector loss (adaptive, with a detector)."""
        from adv.attacks import get_attack

        return self.threat == "adaptive" and self.defended.detector is not None and get_attack(name).detector_aware

    def on_target(self, name: str) -> bool:
        """Whether :meth:`craft` runs ``name`` on ``attack_target`` itself (adaptive, no joint loss), so a
        caller that scores ``attack_target`` may run it there directly."""
        return self.threat == "adaptive" and not self.joint(name)

    def craft(self, name: str, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adversarials of registered attack ``name`` under this threat model: ``(x_adv, queries or None)``.

        The one threat-model dispatch: white-box attacks run on the
        detector-aware loss where :meth:`joint` says so, else on
        ``attack_target``; query attacks query the model that answers (the
        undefended source, or the defended pipeline when adaptive).
        Keywords the joint loss does not take are dropped for it.

        Shape: x (N, C, H, W) in [0, 1], y (N,) -> x_adv like x, queries (N,)
        """
        from adv.attacks import get_attack
        from adv.evaluate.adaptive import detector_aware_attack

        if self.joint(name):
            kw = {k: v for k, v in kwargs.items() if k in _joint_keywords()}
            return detector_aware_attack(self.defended, x, y, attack=name, **kw), None
        spec = get_attack(name)
        answers = self.defended if spec.family == "query" and self.threat == "adaptive" else self.attack_target
        return spec.run(answers, x, y, **kwargs)

    def attack(self, name: str, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """The adversarials of :meth:`craft`.

        Shape: x (N, C, H, W) in [0, 1], y (N,) -> x_adv like x
        """
        return self.craft(name, x, y, **kwargs)[0]

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


@functools.cache
def _joint_keywords() -> frozenset[str]:
    """What the joint loss takes, read from its signature (as the registry reads the attacks' defaults)."""
    import inspect

    from adv.evaluate.adaptive import detector_aware_attack

    params = inspect.signature(detector_aware_attack).parameters.values()
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "attack")


def eval_mode(model: nn.Module) -> nn.Module:
    """``model`` when all its modules are in eval mode, else an eval-mode copy: an evaluation must not switch
    dropout/batch-norm off in the caller's own object (callers' objects are never changed)."""
    if not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def evaluated_model(defended: Defended, *, adaptive: bool, source: nn.Module | None = None, eot_samples: int = 8,
                    notes: Iterable[str] = ()) -> EvaluatedModel:
    """``defended`` under a threat model: adaptive (attack the BPDA/EOT pipeline) or non-adaptive (attack
    ``source``, default the defended model's classifier)."""
    notes = list(notes)
    defended = eval_mode(defended)
    if adaptive:
        from adv.evaluate.adaptive import adaptive_model

        target = adaptive_model(defended, eot_samples=eot_samples)
        if not defended.differentiable:
            notes.append("non-differentiable stages attacked with BPDA (straight-through)")
        if defended.randomized:
            notes.append(f"randomized stages attacked with EOT over {eot_samples} samples")
        return EvaluatedModel(defended, target, "adaptive", eot_samples, notes)
    return EvaluatedModel(defended, eval_mode(source or defended.classifier), "non-adaptive", eot_samples, notes)


def build_evaluated_model(
    classifier: nn.Module,
    defense_specs: Iterable[str | StageSpec] = (),
    *,
    adaptive: bool = False,
    detector: str | StageSpec | None = None,
    data=None,
    checkpoint_meta: dict | None = None,
    source: nn.Module | None = None,
    eot_samples: int = 8,
) -> EvaluatedModel:
    """Compose the defended model from stage specs (strings, or parsed) and pick the attack target.

    ``checkpoint_meta`` (from ``load_checkpoint``) adds the inference-time
    defenses a proactively trained classifier was saved with (``adv train
    --defense dwt:...``) in front of ``defense_specs``. ``source`` is the
    model non-adaptive adversarials are crafted on (default: ``classifier``;
    Kaminskyi, DWT study uses the standard network for every defended one). ``data``
    trains learned stages that have no ``checkpoint=``.
    """
    specs = list(defense_specs)
    notes = []
    for spec in reversed(checkpoint_defenses(checkpoint_meta or {})):
        if spec not in map(str, specs):
            specs.insert(0, spec)
            notes.append(f"{spec} re-created from the checkpoint's training defense")
    classifier = eval_mode(classifier)
    defended = build_defended(classifier, specs, detector=detector, data=data).eval()  # the stages are ours
    return evaluated_model(defended, adaptive=adaptive, source=source or classifier, eot_samples=eot_samples,
                           notes=notes)


# --- adv eval integration --------------------------------------------------------------------
class ThreatAttack:
    """A registered attack crafted under ``ev``'s threat model (:meth:`EvaluatedModel.craft`), whatever
    model the ``robust_accuracy`` loop passes: the non-adaptive protocol (craft on the undefended
    source, score the defended model) and the detector-aware loss inside the loop.
    """

    def __init__(self, ev: EvaluatedModel, name: str):
        from adv.attacks import get_attack

        self.ev, self.name = ev, name
        self.randomized = get_attack(name).randomized  # the loop then gives it per-example streams
        self.__name__ = f"{name}@{'undefended' if ev.threat == 'non-adaptive' else 'detector-aware'}"

    def __call__(self, model, x, y, **kwargs):
        x_adv, queries = self.ev.craft(self.name, x, y, **kwargs)
        return x_adv if queries is None else (x_adv, queries)  # the family's return, as the loop expects


def robust_accuracy_inputs(ev: EvaluatedModel, attacks: list[tuple[str, dict]]):
    """``(model, attacks)`` for :func:`adv.evaluate.robust_accuracy` under ``ev``'s threat model.

    Non-adaptive: score the defended model, craft on the source. Adaptive:
    attack and score the BPDA/EOT pipeline (its forward is the defended
    forward); with a detector, FGSM/BIM/PGD use the detector-aware loss.
    Attacks :meth:`EvaluatedModel.on_target` keep their names; the others
    run as :class:`ThreatAttack` entries of their own family (query attacks
    report their queries). The loop seeds both kinds per example.
    """
    from adv.evaluate.adaptive import bpda_pipeline
    from adv.evaluate.runs import AttackRun
    from adv.attacks import get_attack

    out = []
    for name, kw in attacks:
        if ev.on_target(name):
            out.append((name, kw))
            continue
        fn = ThreatAttack(ev, name)
        out.append(AttackRun(fn.__name__, fn.__name__, get_attack(name).family, fn, dict(kw)))
    if ev.threat == "adaptive":
        return ev.attack_target, out
    # same forward as the defended model, but differentiable, so the loop's gradient checks can run
    return bpda_pipeline(ev.defended), out


@torch.no_grad()
def detection_summary(defended: Defended, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict:
    """Detector quality on one set of adversarials.

    ``tpr``: flagged fraction of the *successful* adversarials (points
    classified correctly on ``x`` and wrongly on ``x_adv``); ``fpr``: flagged
    fraction of the clean inputs; ``auroc``: clean vs successful adversarial
    scores; ``undetected_success``: the attacker's success against classifier
    and detector together (correct, then fooled and not flagged), over all points.

    Shape: x, x_adv (N, C, H, W) in [0, 1]; y (N,)
    """
    from adv.metrics import detection_metrics

    fooled = (defended(x).argmax(1) == y) & (defended(x_adv).argmax(1) != y)
    flags_adv, flags_clean = defended.detect(x_adv), defended.detect(x)
    scores = torch.cat([defended.detect_score(x), defended.detect_score(x_adv)[fooled]]).cpu().numpy()
    is_adv = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(int(fooled.sum()), dtype=torch.bool)])
    flags = torch.cat([flags_clean, flags_adv[fooled]]).cpu().numpy()
    return {**detection_metrics(scores, is_adv.numpy(), flags), "n": len(x),
            "n_successful_adversarials": int(fooled.sum()),
            "undetected_success": (fooled & ~flags_adv).float().mean().item()}


def detection_report(
    ev: EvaluatedModel, data, attacks: list[tuple[str, dict]], *, eps: float, norm: str = "linf",
    batch_size: int = 256, seed: int = 0,
) -> dict[str, dict]:
    """:func:`detection_summary` per attack, on adversarials crafted under ``ev``'s threat model.

    A randomized attack draws per example (streams from ``seed``, its name and the example's index, as in
    :func:`adv.evaluate.robust_accuracy`), so the report does not depend on ``batch_size``.

    Shape: data images (N, C, H, W) in [0, 1]
    """
    from adv.attacks.seeding import example_seeds

    out = {}
    for name, kw in attacks:
        xs, advs, ys = [], [], []
        for x, y in data.batches(batch_size):
            index = range(sum(map(len, xs)), sum(map(len, xs)) + len(x))
            kwargs = {"seed": example_seeds(seed, name, index, x.device), **kw} if _takes_seed(name) else dict(kw)
            advs.append(ev.attack(name, x, y, eps=eps, norm=norm, **kwargs))
            xs.append(x)
            ys.append(y)
        out[name] = detection_summary(ev.defended, torch.cat(xs), torch.cat(advs), torch.cat(ys))
    return out


def _takes_seed(name: str) -> bool:
    from adv.attacks import get_attack

    return get_attack(name).randomized


def evaluation_setup(
    classifier: nn.Module, defenses: Iterable[str | StageSpec] = (), *, adaptive: bool = False,
    detector: str | StageSpec | None = None, checkpoint: str | None = None, device: torch.device | str | None = None,
) -> EvaluatedModel | None:
    """``adv eval``'s ``--defense/--adaptive/--detector`` (plus a checkpoint's training defense), or None.

    None means "evaluate the classifier as it is": no option given and the
    checkpoint records no defense.
    """
    from adv.errors import ConfigError
    from adv.models import load_checkpoint

    defenses = list(defenses or [])
    meta = load_checkpoint(checkpoint)[1] if checkpoint else {}
    if not (defenses or detector or checkpoint_defenses(meta)):
        if adaptive:
            raise ConfigError("--adaptive attacks a defended model: add --defense NAME:k=v,... or --detector")
        return None
    ev = build_evaluated_model(classifier, defenses, adaptive=adaptive, detector=detector, checkpoint_meta=meta)
    if device is not None:
        ev.defended.to(device)
    return ev


def defense_report(ev: EvaluatedModel, data, attacks, *, eps: float, norm: str = "linf", batch_size: int = 256,
                   seed: int = 0) -> dict:
    """What ``adv eval`` adds to its report: the threat model, the stages, and detector metrics if any."""
    out = {"defense": ev.describe()}
    if ev.defended.detector is not None:
        out["detection"] = detection_report(ev, data, attacks, eps=eps, norm=norm, batch_size=batch_size, seed=seed)
    return out
