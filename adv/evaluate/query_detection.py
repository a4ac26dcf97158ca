"""Evaluating the prediction-similarity layer against query-based attacks, adaptive ones included.

The attack runs unchanged against a :class:`MonitoredOracle`: every query of
attacked example ``i`` goes through the layer under an attacker account, and
the attacker sees what the layer serves (after ``deceive``, another class).
Three numbers matter:

* **detection**: the fraction of attackers flagged, and after how many
  queries (over the examples the model classifies correctly: on the others
  an attack ends at its first query);
* **true success**: whether the final adversarial fools the *model* (what a
  fresh account is served), against the same attack run without the layer;
* **false positives**: the fraction of benign users, each sending distinct
  natural images, ever flagged.

``accounts > 1`` is the adaptive (Sybil) attack: the attacker rotates its
queries over that many accounts, so each history sees every ``accounts``-th
query. The layer keeps detecting while one account still gets
``distance_alarm_limit`` near-duplicates; beyond that it is blind, which the
numbers show rather than hide.

Shape:
    x: (N, C, H, W) in [0, 1]; y: (N,) int64; benign: (M, C, H, W) in [0, 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from adv.attacks import get_attack
from adv.attacks.oracle import QueryOracle
from adv.detectors.query_similarity import PredictionSimilarityLayer, SimilarityConfig
from adv.models.base import eval_mode


class MonitoredOracle(QueryOracle):
    """A query oracle answered by a :class:`PredictionSimilarityLayer`.

    Example ``r``'s ``k``-th query is sent as user ``f"{prefix}-{r}-{k % accounts}"``.
    ``flagged_at[r]`` is the number of queries example ``r`` had sent when its
    attacker was first flagged. A blocked answer is class -1 (labels) or
    uniform probabilities.
    """

    def __init__(self, layer: PredictionSimilarityLayer, output: str = "probs", *, accounts: int = 1,
                 prefix: str = "attacker"):
        if not isinstance(accounts, int) or accounts < 1:
            raise ValueError(f"accounts must be an int >= 1, got {accounts!r}")
        super().__init__(layer.model, output=output)
        self.layer, self.accounts, self.prefix = layer, accounts, prefix
        self.flagged_at: dict[int, int] = {}
        self._sent: dict[int, int] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.accept(x, rows)
        users = []
        for r in rows.tolist():
            k = self._sent.get(r, 0)
            self._sent[r] = k + 1
            users.append(f"{self.prefix}-{r}-{k % self.accounts}")
        served, decisions = self.layer(x, users)
        for r, d in zip(rows.tolist(), decisions):
            if d.suspicious and r not in self.flagged_at:
                self.flagged_at[r] = self._sent[r]
        if self.output == "probs":
            return served.to(x.device)
        return torch.tensor([d.returned for d in decisions], dtype=torch.long, device=x.device)


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
    #: Fraction of correctly classified examples the attack turned, with and without the layer.
    true_success_with_layer: float
    true_success_without_layer: float
    mean_queries: float
    benign_users: int
    #: Fraction of benign users ever flagged.
    false_positive_rate: float
    config: dict = field(default_factory=dict)
    #: Marks the number as adaptive (several accounts) or not, like every other evaluation.
    threat_model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _true_success(model: nn.Module, correct: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Among the examples the model classified ``correct``ly, the fraction ``x_adv`` turns."""
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    return float((fooled & correct).sum() / correct.sum()) if correct.any() else float("nan")


def benign_false_positives(layer: PredictionSimilarityLayer, benign: torch.Tensor, users: int,
                           batch_size: int = 256) -> float:
    """Stream ``benign`` through the layer as ``users`` users (consecutive slices); the fraction ever flagged."""
    if users < 1 or len(benign) < users:
        raise ValueError(f"need 1 <= users <= {len(benign)} benign images, got users={users}")
    owner = np.concatenate([np.full(len(part), i) for i, part in enumerate(np.array_split(np.arange(len(benign)),
                                                                                           users))])
    flagged: set[int] = set()
    for start in range(0, len(benign), batch_size):
        part = owner[start : start + batch_size]
        _, decisions = layer(benign[start : start + batch_size], [f"benign-{u}" for u in part])
        flagged |= {int(u) for u, d in zip(part, decisions) if d.suspicious}
    return len(flagged) / users


def evaluate_query_detection(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: SimilarityConfig | None = None,
    attack: str = "square",
    eps: float = 0.1,
    accounts: int = 1,
    benign: torch.Tensor | None = None,
    benign_users: int = 10,
    seed: int = 0,
    fallback: nn.Module | None = None,
    **attack_params,
) -> QueryDetectionResult:
    """Run query attack ``attack`` on ``(x, y)`` through the layer and without it; stream ``benign`` for
    false positives (with a fresh history, so attackers and benign users do not share one)."""
    spec = get_attack(attack)
    if spec.family != "query":
        raise ValueError(f"{attack!r} is not a query-based attack; choose one of the 'query' family "
                         "(adv.attacks.list_attacks(family='query'))")
    config = config or SimilarityConfig()
    with eval_mode(model):  # the caller's model: eval mode only while it is measured
        layer = PredictionSimilarityLayer(model, config, fallback=fallback)
        oracle = MonitoredOracle(layer, output=spec.oracle, accounts=accounts)
        params = {**attack_params, **({"seed": seed} if spec.accepts("seed") else {})}
        x_adv, queries = spec(oracle, x, y, eps=eps, **params)
        x_free, _ = spec(QueryOracle(model, output=spec.oracle), x, y, eps=eps, **params)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        attacked = correct.nonzero()[:, 0].tolist()  # an attack on a misclassified image ends at its first query
        spent = [oracle.flagged_at[r] for r in attacked if r in oracle.flagged_at]
        fpr = float("nan")
        if benign is not None:
            fresh = PredictionSimilarityLayer(model, config, fallback=fallback)
            fpr = benign_false_positives(fresh, benign, benign_users)
        return QueryDetectionResult(
            attack=attack, accounts=accounts, examples=len(x),
            detection_rate=len(spent) / len(attacked) if attacked else float("nan"),
            median_queries_to_detection=float(np.median(spent)) if spent else None,
            true_success_with_layer=_true_success(model, correct, x_adv, y),
            true_success_without_layer=_true_success(model, correct, x_free, y),
            mean_queries=float(torch.as_tensor(queries).float().mean()),
            benign_users=benign_users if benign is not None else 0, false_positive_rate=fpr,
            config=config.model_dump(),
            threat_model=("adaptive: queries rotated over %d accounts (Sybil)" % accounts) if accounts > 1
            else "non-adaptive: one account per attacker",
        )
