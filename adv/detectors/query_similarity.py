"""The prediction-similarity layer (Echeberria-Barrio et al. 2020 §2.3, §4.3, Fig. 9): a stateful detector of
query-based attacks.

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
of the user, none older than ``max_age`` seconds), so an old burst ages out.

What is kept, and for how long: per user, up to ``history`` images (average-
pooled by ``downscale`` when it is above 1, so no full-resolution copy is
kept), their probabilities, alarm flags and times. A query older than
``max_age`` is deleted when that user's next query arrives (and at every
``QueryDetector.save``); without ``max_age`` it stays until ``history``
newer queries of the same user replace it. Threat model: one attacker, one
account. An attacker who spreads queries over many accounts (Sybil) or
spaces them beyond ``history`` evades it; :func:`evaluate_query_detection`
measures that adaptive attack next to the non-adaptive one.

Shape:
    x: (N, C, H, W) in [0, 1]; users: N strings; probabilities: (N, K)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from skimage.metrics import structural_similarity
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
    #: Seconds a query stays in its user's history; None: until ``history`` newer ones replace it.
    max_age: float | None = Field(None, gt=0)
    #: Keep and compare images average-pooled by this factor (less memory, no full-resolution copy kept).
    downscale: int = Field(1, ge=1)

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
    near_duplicate: bool = False  # this query raised the distance alarm count
    walked: bool = False  # ... and the prediction alarm count


def stored_image(image: torch.Tensor, downscale: int = 1) -> torch.Tensor:
    """What a history keeps of one (C, H, W) image: (C, h, w) float32 on the CPU, average-pooled by ``downscale``."""
    image = image.detach().cpu().float()
    if downscale > 1:
        image = F.avg_pool2d(image[None], downscale, ceil_mode=True)[0]
    return image


def _ssim(image: torch.Tensor, earlier: np.ndarray) -> np.ndarray:
    """SSIM of one (C, h, w) image against (k, C, h, w) earlier ones, with :func:`adv.metrics.image_quality`'s
    window; called directly because image_quality also computes MSE and PSNR, 3x the cost on the serving path."""
    a = image.permute(1, 2, 0).numpy()
    win = min(7, a.shape[0], a.shape[1])
    win -= 1 - win % 2
    return np.array([structural_similarity(a, b.transpose(1, 2, 0), data_range=1.0, channel_axis=2, win_size=win)
                     for b in earlier])


def _check_queries(x: torch.Tensor, users: list[str]) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if len(users) != len(x):
        raise ValueError(f"{len(users)} users for {len(x)} images")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError("images must lie in [0, 1]")


def serve(action: str, probs: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities answered under ``action`` ("none" and "flag": the truth); ``fallback``: its model's."""
    if action in ("none", "flag"):
        return probs
    if action == "block":  # no information: uniform scores, no class
        return torch.full_like(probs, 1.0 / len(probs))
    if action == "fallback":
        return fallback
    # deceive: swap the top two classes, so the caller sees "another class" with a plausible confidence
    top2 = probs.topk(2).indices
    out = probs.clone()
    out[top2[0]], out[top2[1]] = probs[top2[1]], probs[top2[0]]
    return out


class _UserHistory:
    """A ring buffer of one user's queries: flattened images, probabilities and alarm flags.

    It starts with room for 4 queries and doubles up to ``capacity``: a Sybil attacker opens thousands of
    accounts with one query each, and a full ring per account (3 MB at 1000 x 28x28) would exhaust memory.
    """

    FIELDS = ("images", "probs", "distance", "prediction", "times")

    def __init__(self, capacity: int, dim: int, classes: int, allocated: int | None = None):
        self.capacity = capacity
        n = min(capacity, 4) if allocated is None else allocated
        self.images = np.zeros((n, dim), np.float32)
        self.probs = np.zeros((n, classes), np.float32)
        self.distance = np.zeros(n, bool)
        self.prediction = np.zeros(n, bool)
        self.times = np.zeros(n, np.float64)
        self.size = 0
        self.next = 0

    def _grow(self) -> None:
        """Double the room (at most ``capacity``), oldest query first."""
        order, n = self.order(), min(2 * len(self.images), self.capacity)
        for k in self.FIELDS:
            old = getattr(self, k)
            new = np.zeros((n, *old.shape[1:]), old.dtype)
            new[: self.size] = old[order]
            setattr(self, k, new)
        self.next = self.size

    def add(self, image: np.ndarray, probs: np.ndarray, distance: bool, prediction: bool, at: float = 0.0) -> None:
        if self.size == len(self.images) < self.capacity:
            self._grow()
        i = self.next
        self.images[i], self.probs[i], self.distance[i], self.prediction[i] = image, probs, distance, prediction
        self.times[i] = at
        self.next = (i + 1) % len(self.images)
        self.size = min(self.size + 1, len(self.images))

    def order(self) -> np.ndarray:
        """Ring positions of the retained queries, oldest first."""
        return (self.next - self.size + np.arange(self.size)) % len(self.images)

    def expire(self, oldest: float) -> None:
        """Delete (zero) the leading run of queries older than ``oldest``."""
        order = self.order()
        gone = order[: int(np.argmax(np.append(self.times[order] >= oldest, True)))]
        self.images[gone], self.probs[gone], self.distance[gone], self.prediction[gone] = 0, 0, False, False
        self.size -= len(gone)


class QueryHistory:
    """Per-user histories, created on a user's first query. One process owns it (a serving
    deployment puts it in a single actor so every replica sees the same history)."""

    def __init__(self, capacity: int, max_age: float | None = None):
        self.capacity, self.max_age = int(capacity), max_age
        self._users: dict[str, _UserHistory] = {}

    def get(self, user: str, dim: int, classes: int) -> _UserHistory:
        h = self._users.get(user)
        if h is None:
            h = self._users[user] = _UserHistory(self.capacity, dim, classes)
        elif h.images.shape[1] != dim or h.probs.shape[1] != classes:
            raise ValueError(f"user {user!r}: query of {dim} values and {classes} classes, but the history holds "
                             f"{h.images.shape[1]} and {h.probs.shape[1]}")
        return h

    def add(self, user: str, image: np.ndarray, probs: np.ndarray, distance: bool, prediction: bool,
            at: float = 0.0) -> None:
        """Record one query (after dropping the user's expired ones), as the layer does when it observes it."""
        h = self.get(user, image.size, probs.size)
        if self.max_age is not None:
            h.expire(at - self.max_age)
        h.add(image, probs, distance, prediction, at)

    def expire(self, now: float) -> None:
        """Delete every user's queries older than ``max_age`` before ``now``, and users left with none."""
        if self.max_age is None:
            return
        for user, h in list(self._users.items()):
            h.expire(now - self.max_age)
            if h.size == 0:
                del self._users[user]

    def stored(self, user: str) -> int:
        h = self._users.get(user)
        return h.size if h is not None else 0

    def users(self) -> list[str]:
        return list(self._users)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every user's retained queries, oldest first, as named arrays; :meth:`restore` inverts it exactly."""
        hs = list(self._users.values())
        if len({(h.images.shape[1], h.probs.shape[1]) for h in hs}) > 1:
            raise ValueError("users' stored queries differ in size; one history serves one input shape")
        dim, classes = (hs[0].images.shape[1], hs[0].probs.shape[1]) if hs else (0, 0)
        cols = {k: [getattr(h, k)[h.order()] for h in hs] for k in _UserHistory.FIELDS}
        empty = {"images": (0, dim), "probs": (0, classes)}
        out = {k: np.concatenate(v) if v else np.zeros(empty.get(k, 0), getattr(_UserHistory(1, 1, 1), k).dtype)
               for k, v in cols.items()}
        out["names"] = np.frombuffer(json.dumps(list(self._users)).encode(), np.uint8)
        out["sizes"] = np.array([h.size for h in hs], np.int64)
        out["next"] = np.array([h.next for h in hs], np.int64)
        out["allocated"] = np.array([len(h.images) for h in hs], np.int64)
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the histories with those of :meth:`arrays` (ring positions included)."""
        names = json.loads(arrays["names"].tobytes().decode() or "[]")
        ends = np.cumsum(arrays["sizes"])
        self._users = {}
        for user, end, size, nxt, n in zip(names, ends, arrays["sizes"], arrays["next"], arrays["allocated"]):
            h = self._users[user] = _UserHistory(self.capacity, arrays["images"].shape[1], arrays["probs"].shape[1],
                                                 allocated=int(n))
            h.size, h.next = int(size), int(nxt)
            rows = slice(int(end - size), int(end))
            for k in _UserHistory.FIELDS:
                getattr(h, k)[h.order()] = arrays[k][rows]

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def __len__(self) -> int:
        return len(self._users)


class PredictionSimilarityLayer:
    """``layer(x, users) -> (served probabilities (N, K), decisions)``; queries are taken in order.

    ``model`` maps (N, C, H, W) in [0, 1] to logits; ``fallback`` (for
    ``action="fallback"``) is a second such model. A caller that has the
    probabilities already (:class:`adv.detectors.QueryDetector`) passes
    ``model=None`` and uses :meth:`observe`.
    """

    def __init__(self, model: nn.Module | None, config: SimilarityConfig | None = None, *,
                 fallback: nn.Module | None = None, history: QueryHistory | None = None):
        self.config = config or SimilarityConfig()
        if self.config.action == "fallback" and fallback is None and model is not None:
            raise ValueError("action 'fallback' needs a fallback model")
        self.model, self.fallback = model, fallback
        self.history = history or QueryHistory(self.config.history, self.config.max_age)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, users: list[str], now: float | None = None
                 ) -> tuple[torch.Tensor, list[QueryDecision]]:
        _check_queries(x, users)
        probs = self.model(x).softmax(1).float()
        served = probs.clone()
        decisions = []
        for i, decision in enumerate(self.observe(x, users, probs, now)):
            if decision.action != "none":
                served[i] = self._act(decision, x[i : i + 1], probs[i])
                decision = replace(decision, returned=-1 if decision.action == "block" else int(served[i].argmax()))
            decisions.append(decision)
        return served, decisions

    def observe(self, x: torch.Tensor, users: list[str], probs: torch.Tensor, now: float | None = None
                ) -> list[QueryDecision]:
        """Record the queries in order and decide each, without serving (``now``: seconds, default the clock)."""
        _check_queries(x, users)
        now = time.time() if now is None else float(now)
        return [self._observe(x[i], probs[i], str(user), now) for i, user in enumerate(users)]

    def _observe(self, image: torch.Tensor, probs: torch.Tensor, user: str, now: float) -> QueryDecision:
        cfg = self.config
        image = stored_image(image, cfg.downscale)  # compared at the resolution kept
        flat = image.flatten().numpy()
        p = probs.detach().cpu().float().numpy()
        h = self.history.get(user, flat.size, p.size)
        if cfg.max_age is not None:
            h.expire(now - cfg.max_age)
        nearest, near_dup, walked = None, False, False
        if h.size:
            live = h.order() if h.size < len(h.images) else np.arange(h.size)  # expiry may have moved the start
            mse = ((h.images[live] - flat) ** 2).mean(1)
            k = min(cfg.candidates, h.size)
            idx = live[np.argpartition(mse, k - 1)[:k]]
            if cfg.metric == "mse":
                values = ((h.images[idx] - flat) ** 2).mean(1)
            elif cfg.metric == "ssim":
                values = _ssim(image, h.images[idx].reshape(k, *image.shape))
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
        h.add(flat, p, near_dup, walked, now)
        d_alarms, p_alarms = int(h.distance.sum()), int(h.prediction.sum())  # expired and empty slots hold False
        hits = (d_alarms >= cfg.distance_alarm_limit, p_alarms >= cfg.prediction_alarm_limit)
        suspicious = any(hits) if cfg.rule == "any" else all(hits)
        predicted = int(p.argmax())
        return QueryDecision(user=user, predicted=predicted, probability=float(p[predicted]), returned=predicted,
                             nearest=nearest, distance_alarms=d_alarms, prediction_alarms=p_alarms,
                             score=d_alarms / h.size, suspicious=suspicious,
                             action=cfg.action if suspicious else "none", near_duplicate=near_dup, walked=walked)

    def _act(self, decision: QueryDecision, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The probabilities served to a suspicious user (the decision's ``returned`` is their argmax)."""
        fallback = self.fallback(x).softmax(1)[0].float() if decision.action == "fallback" else None
        return serve(decision.action, probs, fallback)
