"""The prediction-similarity layer (Echeberria-Barrio et al. 2020 §2.3, §4.3, Fig. 9): a stateful detector of query-based attacks.

A query-based attack (Square, HopSkipJump, or the iterative attacks run
through an API) sends many near-identical images from one account. The layer
sits outside the model and keeps, per user, the history the paper lists:
the image, the prediction (class and its probability), the minimum distance
to all earlier images, and two alarms:

* **distance alarm**: the number of the user's queries that were within
  ``threshold`` of one of their earlier queries (SSIM, PSNR or MSE, from
  ``skimage.metrics``);
* **prediction alarm**: the number of those near-duplicates whose
  probability for the class predicted on the nearest earlier query was
  *smaller*, the signature of an attack walking the prediction toward the
  decision boundary.

When an alarm reaches its limit the user is *suspicious* and the layer acts:
``flag`` (answer truthfully, report), ``deceive`` (return another class, as
the paper does, so the attacker believes it has succeeded), ``block`` (no
answer), or ``fallback`` (answer with a secondary model).

The alarms count over the retained history (the last ``history`` queries
of the user), so an old burst ages out. Threat model: one attacker, one
account. An attacker who spreads queries over many accounts (Sybil) or
spaces them beyond ``history`` evades it; :func:`evaluate_query_detection`
measures that adaptive attack next to the non-adaptive one.

Shape:
    x: (N, C, H, W) in [0, 1]; users: N strings; probabilities: (N, K)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from adv.metrics import image_quality

METRICS = ("ssim", "psnr", "mse")
#: Whether a larger value of the metric means more similar images.
HIGHER_IS_SIMILAR = {"ssim": True, "psnr": True, "mse": False}
#: Defaults for 28x28 to 32x32 images in [0, 1]: an Linf step of 0.05 on a whole image is MSE 0.0025 (26 dB).
DEFAULT_THRESHOLDS = {"ssim": 0.8, "psnr": 25.0, "mse": 0.003}
ACTIONS = ("flag", "deceive", "block", "fallback")


class SimilarityConfig(BaseModel):
    """Settings of the prediction-similarity layer; validated at the boundary."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal[METRICS] = "ssim"
    #: Two images are near-duplicates when the metric is at least (SSIM, PSNR dB) or at most (MSE) this;
    #: None picks DEFAULT_THRESHOLDS[metric].
    threshold: float | None = None
    #: Queries kept per user (FIFO); the alarms count over these.
    history: int = Field(1000, ge=1)
    #: Earlier images scored with ``metric``: the nearest ones by MSE (exact for MSE and PSNR, which is
    #: monotone in MSE; a pre-filter for SSIM, which costs ~0.2 ms per pair).
    candidates: int = Field(16, ge=1)
    distance_alarm_limit: int = Field(10, ge=1)
    prediction_alarm_limit: int = Field(5, ge=1)
    #: "any": suspicious when either alarm reaches its limit; "both": when both do.
    rule: Literal["any", "both"] = "any"
    action: Literal[ACTIONS] = "deceive"

    @model_validator(mode="after")
    def _check(self):
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.metric]
        lo, hi = {"ssim": (-1.0, 1.0), "psnr": (0.0, float("inf")), "mse": (0.0, 1.0)}[self.metric]
        if not lo < self.threshold <= hi:
            raise ValueError(f"threshold for {self.metric} must lie in ({lo}, {hi}], got {self.threshold}")
        return self

    def similar(self, value: float) -> bool:
        return value >= self.threshold if HIGHER_IS_SIMILAR[self.metric] else value <= self.threshold


@dataclass(frozen=True)
class QueryDecision:
    """What the layer decided for one query (the per-query record of Fig. 9)."""

    user: str
    predicted: int  # the model's class
    probability: float  # the model's probability for it
    returned: int  # the class the caller receives; -1 when blocked
    nearest: float | None  # metric value of the most similar earlier query of this user (None: first query)
    distance_alarms: int
    prediction_alarms: int
    #: Fraction of the user's retained queries that were near-duplicates: the "adversarial probability".
    score: float
    suspicious: bool
    action: str  # "none" unless suspicious


class _UserHistory:
    """A ring buffer of one user's queries: flattened images, probabilities and alarm flags."""

    def __init__(self, capacity: int, dim: int, classes: int):
        self.images = np.zeros((capacity, dim), np.float32)
        self.probs = np.zeros((capacity, classes), np.float32)
        self.distance = np.zeros(capacity, bool)
        self.prediction = np.zeros(capacity, bool)
        self.size = 0
        self.next = 0

    def add(self, image: np.ndarray, probs: np.ndarray, distance: bool, prediction: bool) -> None:
        i = self.next
        self.images[i], self.probs[i], self.distance[i], self.prediction[i] = image, probs, distance, prediction
        self.next = (i + 1) % len(self.images)
        self.size = min(self.size + 1, len(self.images))


class QueryHistory:
    """Per-user histories, created on a user's first query. One process owns it (a serving
    deployment puts it in a single actor so every replica sees the same history)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._users: dict[str, _UserHistory] = {}

    def get(self, user: str, dim: int, classes: int) -> _UserHistory:
        h = self._users.get(user)
        if h is None:
            h = self._users[user] = _UserHistory(self.capacity, dim, classes)
        elif h.images.shape[1] != dim or h.probs.shape[1] != classes:
            raise ValueError(f"user {user!r}: query of {dim} values and {classes} classes, but the history holds "
                             f"{h.images.shape[1]} and {h.probs.shape[1]}")
        return h

    def users(self) -> list[str]:
        return list(self._users)

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def __len__(self) -> int:
        return len(self._users)


class PredictionSimilarityLayer:
    """``layer(x, users) -> (served probabilities (N, K), decisions)``; queries are taken in order.

    ``model`` maps (N, C, H, W) in [0, 1] to logits; ``fallback`` (for
    ``action="fallback"``) is a second such model.
    """

    def __init__(self, model: nn.Module, config: SimilarityConfig | None = None, *,
                 fallback: nn.Module | None = None, history: QueryHistory | None = None):
        self.config = config or SimilarityConfig()
        if self.config.action == "fallback" and fallback is None:
            raise ValueError("action 'fallback' needs a fallback model")
        self.model, self.fallback = model, fallback
        self.history = history or QueryHistory(self.config.history)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, users: list[str]) -> tuple[torch.Tensor, list[QueryDecision]]:
        if x.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        if len(users) != len(x):
            raise ValueError(f"{len(users)} users for {len(x)} images")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError("images must lie in [0, 1]")
        probs = self.model(x).softmax(1).float()
        served = probs.clone()
        decisions = []
        for i, user in enumerate(users):
            decision = self._observe(x[i], probs[i], str(user))
            if decision.action != "none":
                served[i] = self._act(decision, x[i : i + 1], probs[i])
                decision = replace(decision, returned=-1 if decision.action == "block" else int(served[i].argmax()))
            decisions.append(decision)
        return served, decisions

    def _observe(self, image: torch.Tensor, probs: torch.Tensor, user: str) -> QueryDecision:
        cfg = self.config
        image = image.detach().cpu().float()
        flat = image.flatten().numpy()
        p = probs.cpu().numpy()
        h = self.history.get(user, flat.size, p.size)
        nearest, near_dup, walked = None, False, False
        if h.size:
            mse = ((h.images[: h.size] - flat) ** 2).mean(1)
            k = min(cfg.candidates, h.size)
            idx = np.argpartition(mse, k - 1)[:k]
            if cfg.metric == "mse":
                values = mse[idx]
            else:
                earlier = torch.from_numpy(h.images[idx].reshape(k, *image.shape))
                values = image_quality(image.expand(k, *image.shape), earlier)[cfg.metric]
            best = int(np.argmax(values) if HIGHER_IS_SIMILAR[cfg.metric] else np.argmin(values))
            nearest = float(values[best])
            near_dup = cfg.similar(nearest)
            if near_dup:  # the probability of the class predicted on the nearest earlier query went down
                before = h.probs[idx[best]]
                cls = int(before.argmax())
                walked = bool(p[cls] < before[cls])
        h.add(flat, p, near_dup, walked)
        d_alarms, p_alarms = int(h.distance[: h.size].sum()), int(h.prediction[: h.size].sum())
        hits = (d_alarms >= cfg.distance_alarm_limit, p_alarms >= cfg.prediction_alarm_limit)
        suspicious = any(hits) if cfg.rule == "any" else all(hits)
        predicted = int(p.argmax())
        return QueryDecision(user=user, predicted=predicted, probability=float(p[predicted]), returned=predicted,
                             nearest=nearest, distance_alarms=d_alarms, prediction_alarms=p_alarms,
                             score=d_alarms / h.size, suspicious=suspicious,
                             action=cfg.action if suspicious else "none")

    def _act(self, decision: QueryDecision, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The probabilities served to a suspicious user (the decision's ``returned`` is their argmax)."""
        if decision.action == "flag":
            return probs
        if decision.action == "block":  # no information: uniform scores, no class
            return torch.full_like(probs, 1.0 / len(probs))
        if decision.action == "fallback":
            return self.fallback(x).softmax(1)[0].float()
        # deceive: swap the top two classes, so the caller sees "another class" with a plausible confidence
        top2 = probs.topk(2).indices
        out = probs.clone()
        out[top2[0]], out[top2[1]] = probs[top2[1]], probs[top2[0]]
        return out
