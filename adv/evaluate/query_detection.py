"""Evaluating query-attack detectors against query-based attacks, adaptive ones included.

The attack runs unchanged against a :class:`MonitoredOracle`: every query of
attacked example ``i`` goes through a :class:`QueryDetector` (the per-user
layer of Echeberria-Barrio et al. 2020, the global fingerprint index of
Li et al. 2022 "Blacklight", or both) under an attacker account, and the
attacker sees what the detector serves (after ``deceive``, another class).
Three numbers matter:

* **detection**: the fraction of attackers flagged, and after how many
  queries (over the examples the model classifies correctly: on the others
  an attack ends at its first query);
* **true success**: whether the final adversarial fools the *model* (what a
  fresh account is served), against the same attack run without the detector;
* **false positives**: the benign users flagged, on three kinds of traffic
  (:func:`benign_traffic`): distinct images, retakes of the same object,
  and a popular image uploaded by every user.

The adaptive attackers, each labelled so in ``threat_model``:

* ``accounts > 1`` (Sybil): the queries rotate over that many accounts, so each
  per-user history sees every ``accounts``-th query; the global index sees all;
* ``transform`` (Feng et al., CCS 2023): each query is randomly shifted,
  brightened and noised before it is sent, to break exact hash matches; the
  attack works on the answers to the transformed queries;
* ``interval`` (slowed down): attacker ``i`` sends its ``k``-th query at
  ``k * interval`` seconds, past the detectors' expiry when ``interval`` exceeds
  ``max_age``; ``attack_days`` is what that costs in time.

Shape:
    x: (N, C, H, W) in [0, 1]; y: (N,) int64; benign: (M, C, H, W) in [0, 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adv.attacks import get_attack
from adv.attacks.oracle import QueryOracle
from adv.detectors import DetectorConfig, QueryDetector, SimilarityConfig
from adv.models.base import eval_mode

BENIGN_KINDS = ("distinct", "retakes", "popular")


class Transform(BaseModel):
    """Random changes applied to each image independently (all off by default)."""

    model_config = ConfigDict(extra="forbid")

    #: Largest translation, pixels (a cyclic roll: these datasets have background borders).
    shift: int = Field(0, ge=0)
    #: Largest crop per side, pixels; the crop is resized back to the image size (bilinear).
    crop: int = Field(0, ge=0)
    #: Mirror left-right with probability 1/2.
    flip: bool = False
    #: Largest brightness offset, added to every pixel.
    brightness: float = Field(0.0, ge=0.0, le=1.0)
    #: Standard deviation of Gaussian pixel noise.
    noise: float = Field(0.0, ge=0.0, le=1.0)
    #: Half-width of uniform pixel noise (each pixel moves by up to this much either way).
    uniform: float = Field(0.0, ge=0.0, le=1.0)

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.model_dump().items() if v)


#: Benign retakes: the same object photographed again (mild crop, mirror, lighting).
RETAKE = Transform(crop=2, flip=True, brightness=0.1)


def perturb(x: torch.Tensor, t: Transform, gen: torch.Generator) -> torch.Tensor:
    """``x`` with the random changes of ``t`` (a new draw per image)."""
    n, _, h, w = x.shape
    out = x.clone()
    for i in range(n):
        if t.crop:
            c = int(torch.randint(1, t.crop + 1, (1,), generator=gen))
            out[i] = F.interpolate(out[i : i + 1, :, c : h - c, c : w - c], size=(h, w), mode="bilinear",
                                   align_corners=False)[0]
        if t.shift:
            dy, dx = torch.randint(-t.shift, t.shift + 1, (2,), generator=gen).tolist()
            out[i] = out[i].roll((dy, dx), dims=(1, 2))
        if t.flip and bool(torch.rand(1, generator=gen) < 0.5):
            out[i] = out[i].flip(2)
    if t.brightness:
        out += (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * t.brightness
    if t.noise:
        out += torch.randn(out.shape, generator=gen) * t.noise
    if t.uniform:
        out += (torch.rand(out.shape, generator=gen) * 2 - 1) * t.uniform
    return out.clamp(0.0, 1.0)


def as_detector_config(config: SimilarityConfig | DetectorConfig | None) -> DetectorConfig:
    """A :class:`SimilarityConfig` alone means the per-user layer alone (with its own action)."""
    if isinstance(config, SimilarityConfig):
        return DetectorConfig(per_user=config, index=None, features=None, action=config.action)
    return config if config is not None else DetectorConfig()


def detector_name(config: DetectorConfig) -> str:
    parts = (["per-user " + config.per_user.metric.upper()] if config.per_user else []) + (
        ["index"] if config.index else []) + (["features"] if config.features else [])
    return " + ".join(parts) or "none"


class MonitoredOracle(QueryOracle):
    """A query oracle answered through a :class:`QueryDetector`.

    Example ``r``'s ``k``-th query is sent as user ``f"{prefix}-{r}-{k % accounts}"`` at ``k * interval``
    seconds, after ``transform`` (when given). ``flagged_at[r]`` is the number of queries example ``r`` had
    sent when it was first flagged. A blocked answer is class -1 (labels) or uniform probabilities.
    """

    def __init__(self, model: nn.Module, detector: QueryDetector, output: str = "probs", *, accounts: int = 1,
                 prefix: str = "attacker", transform: Transform | None = None, interval: float = 0.0,
                 seed: int = 0):
        if not isinstance(accounts, int) or accounts < 1:
            raise ValueError(f"accounts must be an int >= 1, got {accounts!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        super().__init__(model, output=output)
        self.detector, self.accounts, self.prefix = detector, accounts, prefix
        self.transform, self.interval = transform, float(interval)
        self.flagged_at: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.accept(x, rows)
        sent = x.detach().cpu().float()
        if self.transform is not None:
            sent = perturb(sent, self.transform, self._gen)
        users, times = [], []
        for r in rows.tolist():
            k = self._sent.get(r, 0)
            self._sent[r] = k + 1
            users.append(f"{self.prefix}-{r}-{k % self.accounts}")
            times.append(k * self.interval)
        probs = self.model(sent.to(x.device)).softmax(1).float().cpu()
        if self.interval:  # each query at its own time
            decisions = [self.detector.observe(sent[i : i + 1], users[i : i + 1], probs[i : i + 1], now=t)[0]
                         for i, t in enumerate(times)]
        else:
            decisions = self.detector.observe(sent, users, probs, now=0.0)
        for r, d in zip(rows.tolist(), decisions):
            if d.suspicious and r not in self.flagged_at:
                self.flagged_at[r] = self._sent[r]
        if self.output == "labels":
            return torch.tensor([d.label for d in decisions], dtype=torch.long, device=x.device)
        k = probs.shape[1]
        served = [torch.from_numpy(d.probs) if len(d.probs) else torch.full((k,), 1.0 / k) for d in decisions]
        return torch.stack(served).to(x.device) if served else probs.to(x.device)


@dataclass
class QueryDetectionResult:
    attack: str
    accounts: int
    examples: int
    #: Fraction of the correctly classified examples (the ones an attack has work to do on) whose attacker
    #: was flagged.
    detection_rate: float
    #: Median queries sent before the flag, over the detected examples (None: none detected).
    median_queries_to_detection: float | None
    #: Fraction of correctly classified examples the attack turned, with and without the detector.
    true_success_with_layer: float
    true_success_without_layer: float
    mean_queries: float
    benign_users: int
    #: Fraction of benign users (distinct images) ever flagged.
    false_positive_rate: float
    config: dict = field(default_factory=dict)
    #: Marks the number as adaptive (Sybil, transforms, slowed down) or not, like every other evaluation.
    threat_model: str = ""
    #: Which detectors answered: "per-user SSIM", "index", "per-user SSIM + index".
    detector: str = ""
    #: Mean wall-clock days an attack took (slowed-down attacker; 0 otherwise).
    attack_days: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _true_success(model: nn.Module, correct: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Among the examples the model classified ``correct``ly, the fraction ``x_adv`` turns."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    return float((fooled & correct).sum() / correct.sum()) if correct.any() else float("nan")


def _threat_model(accounts: int, transform: Transform | None, interval: float) -> str:
    parts = []
    if accounts > 1:
        parts.append("queries rotated over %d accounts (Sybil)" % accounts)
    if transform is not None:
        parts.append(f"random transforms ({transform.describe()})")
    if interval:
        parts.append(f"one query every {interval / 3600:g} h")
    return "adaptive: " + "; ".join(parts) if parts else "non-adaptive: one account per attacker"


def evaluate_query_detection(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: SimilarityConfig | DetectorConfig | None = None,
    attack: str = "square",
    eps: float = 0.1,
    accounts: int = 1,
    transform: Transform | None = None,
    interval: float = 0.0,
    benign: torch.Tensor | None = None,
    benign_users: int = 10,
    seed: int = 0,
    fallback: nn.Module | None = None,
    baseline: torch.Tensor | None = None,
    **attack_params,
) -> QueryDetectionResult:
    """Run query attack ``attack`` on ``(x, y)`` through the detector and without it (``baseline``: that run's
    adversarials, when already computed); stream ``benign`` distinct images for false positives (with a fresh
    detector, so attackers and benign users do not share one). ``config``: a :class:`SimilarityConfig` alone
    is the per-user layer alone."""
    spec = get_attack(attack)
    if spec.family != "query":
        raise ValueError(f"{attack!r} is not a query-based attack; choose one of the 'query' family "
                         "(adv.attacks.list_attacks(family='query'))")
    cfg = as_detector_config(config)
    with eval_mode(model):  # the caller's model: eval mode only while it is measured
        oracle = MonitoredOracle(model, QueryDetector(cfg, fallback=fallback), output=spec.oracle,
                                 accounts=accounts, transform=transform, interval=interval, seed=seed)
        params = {**attack_params, **({"seed": seed} if spec.accepts("seed") else {})}
        x_adv, queries = spec(oracle, x, y, eps=eps, **params)
        if baseline is None:
            baseline, _ = spec(QueryOracle(model, output=spec.oracle), x, y, eps=eps, **params)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        success = _true_success(model, correct, x_adv, y), _true_success(model, correct, baseline, y)
    attacked = correct.nonzero()[:, 0].tolist()  # an attack on a misclassified image ends at its first query
    spent = [oracle.flagged_at[r] for r in attacked if r in oracle.flagged_at]
    fpr = float("nan")
    if benign is not None:
        fpr = benign_traffic(model, cfg, benign, kind="distinct", users=benign_users, fallback=fallback).users_flagged
    mean_queries = float(torch.as_tensor(queries).float().mean())
    return QueryDetectionResult(
        attack=attack, accounts=accounts, examples=len(x),
        detection_rate=len(spent) / len(attacked) if attacked else float("nan"),
        median_queries_to_detection=float(np.median(spent)) if spent else None,
        true_success_with_layer=success[0], true_success_without_layer=success[1],
        mean_queries=mean_queries, benign_users=benign_users if benign is not None else 0,
        false_positive_rate=fpr, config=cfg.model_dump(),
        threat_model=_threat_model(accounts, transform, interval), detector=detector_name(cfg),
        attack_days=max(mean_queries - 1, 0.0) * interval / 86_400,
    )


@dataclass
class BenignResult:
    """What benign traffic of one kind costs its users."""

    kind: str
    users: int
    queries: int
    #: Fraction of users with at least one flagged query.
    users_flagged: float
    queries_flagged: float
    #: Fraction of queries answered with another class than the model's, or refused: the price benign users pay
    #: (0 under ``flag``, which only reports).
    answers_changed: float
    detector: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _benign_stream(images: torch.Tensor, kind: str, users: int, copies: int, popular: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """The queries of one kind of benign traffic and their senders (user indices)."""
    if kind == "distinct":  # consecutive slices: user u sends its own images
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(np.array_split(np.arange(len(images)),
                                                                                         users))])
        return images, owner
    if kind == "retakes":  # each object photographed again ``copies`` times, by random users, in random order
        stream = torch.cat([images] + [perturb(images, RETAKE, gen) for _ in range(copies)])
    else:  # "popular": the first ``popular`` images, uploaded unchanged by every user
        stream = images[:popular].repeat(users, 1, 1, 1)
    order = torch.randperm(len(stream), generator=gen)
    owner = (torch.arange(len(stream)) % users if kind == "popular" else
             torch.randint(0, users, (len(stream),), generator=gen))
    return stream[order], owner[order].numpy()


def benign_traffic(model: nn.Module, config: SimilarityConfig | DetectorConfig | None, images: torch.Tensor, *,
                   kind: str = "distinct", users: int = 10, copies: int = 2, popular: int = 5, seed: int = 0,
                   fallback: nn.Module | None = None, batch_size: int = 256) -> BenignResult:
    """Stream benign traffic of ``kind`` (:data:`BENIGN_KINDS`) from ``users`` users through a fresh detector."""
    if kind not in BENIGN_KINDS:
        raise ValueError(f"kind must be one of {BENIGN_KINDS}, got {kind!r}")
    if users < 1 or (kind == "distinct" and len(images) < users):
        raise ValueError(f"need 1 <= users <= {len(images)} benign images, got users={users}")
    cfg = as_detector_config(config)
    stream, owner = _benign_stream(images, kind, users, copies, popular, torch.Generator().manual_seed(seed))
    detector = QueryDetector(cfg, fallback=fallback)
    flagged_users: set[int] = set()
    flagged = changed = 0
    for start in range(0, len(stream), batch_size):
        part, who = stream[start : start + batch_size], owner[start : start + batch_size]
        with torch.no_grad(), eval_mode(model):
            probs = model(part).softmax(1)
        for u, d in zip(who, detector.observe(part, [f"benign-{u}" for u in who], probs, now=0.0)):
            flagged += d.suspicious
            changed += d.label != d.predicted
            if d.suspicious:
                flagged_users.add(int(u))
    n = len(stream)
    return BenignResult(kind=kind, users=users, queries=n, users_flagged=len(flagged_users) / users,
                        queries_flagged=flagged / n, answers_changed=changed / n, detector=detector_name(cfg))
