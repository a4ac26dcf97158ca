"""A defended model is a composition: ``Defended(preprocess, classifier, detector)``.

``preprocess`` stages (DWT, autoencoders, U-Net, ...) run in order as an
``nn.Sequential``; ``classifier`` may itself be a wrapped classifier (middle
autoencoder, encoder variant); an optional ``detector`` runs in parallel on
the same input the classifier sees and flags suspicious inputs (Echeberria-Barrio et al. 2020,
Fig. 8).

Shape:
    x: (N, C, H, W) in [0, 1] -> logits (N, num_classes); detect(x) -> (N,) bool
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from adv.defenses.stage import DelegatesToClassifier
from adv.errors import ConfigError
from adv.specs import StageSpec


def _stages(preprocess: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if preprocess is None:
        return []
    if isinstance(preprocess, nn.Sequential):
        return list(preprocess)
    if isinstance(preprocess, nn.Module):
        return [preprocess]
    return list(preprocess)


class Defended(DelegatesToClassifier, nn.Module):
    """``classifier(preprocess(x))`` with an optional parallel ``detector``.

    Learned stages that were never trained or loaded are refused unless
    ``allow_untrained=True`` (an evaluation of random weights is a bug).

    Shape:
        x: (N, C, H, W) in [0, 1] -> logits (N, num_classes)
    """

    def __init__(
        self,
        preprocess: nn.Module | Sequence[nn.Module] | None,
        classifier: nn.Module,
        detector: nn.Module | None = None,
        *,
        allow_untrained: bool = False,
    ):
        super().__init__()
        self.preprocess = nn.Sequential(*_stages(preprocess))
        self.classifier = classifier
        self.detector = detector
        if not allow_untrained:
            for stage in self.stages:
                if not getattr(stage, "trained", True):
                    raise ConfigError(
                        f"defense stage {getattr(stage, 'defense_spec', type(stage).__name__)!r} is untrained: "
                        "give checkpoint=PATH (from `adv defend train`) or train it on data first")

    @property
    def stages(self) -> list[nn.Module]:
        """Every defense stage: preprocessing, a wrapped classifier, the detector."""
        out = list(self.preprocess)
        if getattr(self.classifier, "defense_name", None) is not None:
            out.append(self.classifier)
        if self.detector is not None:
            out.append(self.detector)
        return out

    @property
    def specs(self) -> list[str]:
        return [getattr(s, "defense_spec", type(s).__name__) for s in self.stages]

    @property
    def differentiable(self) -> bool:
        return all(getattr(s, "differentiable", True) for s in self.preprocess)

    @property
    def randomized(self) -> bool:
        return any(getattr(s, "randomized", False) for s in self.preprocess)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x))

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Flags (N,) bool: True where the detector calls ``x`` adversarial."""
        if self.detector is None:
            raise ConfigError("this defended model has no detector; add one, e.g. --detector disagreement:...")
        return self.detector(self.preprocess(x))

    def detect_score(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous detector score (N,), higher = more suspicious (for AUROC)."""
        if self.detector is None:
            raise ConfigError("this defended model has no detector")
        return self.detector.score(self.preprocess(x))


def build_defended(
    classifier: nn.Module,
    specs: Iterable[str | StageSpec | tuple] = (),
    *,
    detector: str | StageSpec | tuple | None = None,
    data=None,
    allow_untrained: bool = False,
) -> Defended:
    """Compose ``Defended`` from specs in order (``--defense`` repeated, then ``--detector``): spec strings
    (parsed here, once), parsed :class:`adv.specs.StageSpec` objects or ``(name, params)`` pairs.

    Preprocess specs become stages; classifier specs wrap the classifier
    built so far; the detector is built on the original ``classifier``.
    """
    from adv.defenses.registry import create_defense

    stages: list[nn.Module] = []
    model = classifier
    found_detector = None
    for spec in [StageSpec.parse(s) if isinstance(s, str) else s
                 for s in [*specs, *([detector] if detector is not None else [])]]:
        stage = create_defense(spec, classifier=classifier if _kind(spec) == "detector" else model, data=data)
        if stage.defense_kind == "preprocess":
            stages.append(stage)
        elif stage.defense_kind == "classifier":
            model = stage
        else:
            if found_detector is not None:
                raise ConfigError(f"only one detector per model, got {found_detector.defense_spec!r} and "
                                  f"{stage.defense_spec!r}")
            found_detector = stage
    return Defended(stages, model, found_detector, allow_untrained=allow_untrained)


def _kind(spec: StageSpec | tuple) -> str:
    from adv.defenses.registry import get_defense, resolve

    # a (name, params) pair is validated by resolve, which also refuses anything that is not a spec
    return get_defense(spec.name if isinstance(spec, StageSpec) else resolve(spec)[0]).kind
