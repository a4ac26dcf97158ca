"""The red-team round: a library query attack against the live endpoint, and the same attack in-process.

The attacker owns ``accounts`` keys and rotates over them (the Sybil attacker
when more than one): per request, or per query (each image's queries spread
over every account). It may change every query at random before sending it
(noise, shift, brightness: ``transform``) and adapt that change to refusals
(OARS, Feng et al., CCS 2023: ``oars``). It learns when it was flagged only
from the admin endpoint (an operator's view), never from the answers. With the
served bundle's model, success is measured on it in-process (what a fresh
account would be served), because under ``deceive`` the endpoint's answers to
a flagged attacker are not the truth, and the same attack runs in-process for
comparison. Without it (a red-teamer who has only the endpoint) success is
*as answered by the endpoint*: its labels for the clean images (asked before
the attack) and for the final adversarials (after it), under the attacker's
first account; a detector action can change those answers, so that number is
what the attacker is told, and the in-process comparison is not run.

* HopSkipJump (Chen et al. 2020) needs only labels.
* Square (Andriushchenko et al. 2020) needs scores: against a label-only
  endpoint it runs on the top-1 confidence (``adv.serving.client.scores``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from adv.attacks import get_attack
from adv.attacks.oracle import QueryOracle
from adv.errors import ConfigError
from adv.evaluate.query_detection import perturb
from adv.serving.client import Endpoint, HttpOracle, Oars

ATTACKS = ("square", "hopskipjump")


def attack_params(attack: str, queries: int, seed: int) -> dict:
    """The attack's budget knobs for about ``queries`` queries per example."""
    if attack == "square":
        return {"queries": queries, "seed": seed}
    # HopSkipJump spends ~init_trials + 25 per step on the boundary search plus init_evals * sqrt(t) on
    # the gradient at step t; size init_evals so the total stays near the budget
    steps = 10
    trials = max(5, min(100, queries // 10))
    evals = max(5, int((queries - trials - 25 * (steps + 1)) / sum(math.sqrt(t) for t in range(1, steps + 1))))
    return {"steps": steps, "init_evals": evals, "max_evals": 4 * evals, "init_trials": trials, "norm": "linf",
            "seed": seed}


#: What the report says where a number needs the served bundle's model.
NO_BUNDLE = "not run (no --bundle)"


def success_rate(fooled: torch.Tensor, correct: torch.Tensor) -> float:
    """The share of ``correct`` examples that are ``fooled``; NaN when none is correct."""
    return float((fooled & correct).sum() / correct.sum()) if correct.any() else float("nan")


def _success(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, correct: torch.Tensor) -> float:
    with torch.no_grad():
        return success_rate(model(x_adv).argmax(1) != y, correct)


def endpoint_labels(endpoint: Endpoint, key: str, x: torch.Tensor, *, classes: int, max_images: int) -> torch.Tensor:
    """The endpoint's labels for ``x`` under ``key`` (-1 where it refused to answer), (n,)."""
    return HttpOracle(endpoint, [key], output="labels", classes=classes, max_images=max_images)(x)


def threat_model(accounts: int, rotation: str = "request", transform=None, oars: Oars | None = None) -> str:
    """The row's threat-model label: non-adaptive only for one account sending its queries unchanged."""
    parts = []
    if accounts > 1:
        parts.append(f"Sybil, {'requests' if rotation == 'request' else 'each query'} rotated over {accounts} "
                     "accounts")
    if transform is not None:
        parts.append(f"random transforms per query ({transform.describe()})")
    if oars is not None:
        parts.append(f"OARS (Feng et al., CCS 2023): a refused query is resent with a transform up to "
                     f"{oars.max_scale:g}x larger")
    return "adaptive: " + "; ".join(parts) if parts else "non-adaptive: one account"


def red_team(endpoint: Endpoint, keys: list[str], users: list[str], admin_key: str, model: nn.Module | None,
             x: torch.Tensor, y: torch.Tensor, *, attack: str, eps: float, queries: int, classes: int,
             output: str, max_images: int = 16, seed: int = 0, rotation: str = "request", transform=None,
             oars: Oars | None = None) -> dict:
    """One round over ``keys`` (user ids ``users``); returns the report row (JSON-able).

    ``rotation``, ``transform`` and ``oars``: the adaptive attacker (see :class:`HttpOracle`).

    ``model``: the served bundle's model (true success, in-process comparison), or None to judge success
    by the endpoint's answers (see the module docstring).
    """
    if attack not in ATTACKS:
        raise ConfigError(f"attack must be one of {ATTACKS}, got {attack!r}")
    spec = get_attack(attack)
    params = attack_params(attack, queries, seed)
    judge = {"classes": classes, "max_images": max_images}
    # without the model, which images the endpoint classifies right is asked first, as an attacker would,
    # and before the admin read below, so the flag times stay the attack's own
    clean = None if model is not None else endpoint_labels(endpoint, keys[0], x, **judge)
    before = {u: endpoint.get(f"/v1/admin/users/{u}", admin_key) for u in users}
    oracle = HttpOracle(endpoint, keys, output=spec.oracle, classes=classes, max_images=max_images,
                        rotation=rotation, transform=transform, oars=oars, seed=seed)
    t0 = time.perf_counter()
    x_adv, used = spec(oracle, x, y, eps=eps, **params)
    seconds = time.perf_counter() - t0
    after = {u: endpoint.get(f"/v1/admin/users/{u}", admin_key) for u in users}
    per_account = {}
    for i, u in enumerate(users):
        first, base = after[u]["first_flagged_query"], before[u]["queries"]
        if first is not None and first > base:  # flagged during this round
            per_account[i] = first - base
    already = [u for u in users if before[u]["first_flagged_query"] is not None]
    if model is None:  # after the admin read: these answers are not the attack's queries
        adv = endpoint_labels(endpoint, keys[0], x_adv, **judge)
        compare = {"success_endpoint": None, "success_in_process": None, "mean_queries_in_process": None,
                   "success_as_answered": success_rate((adv != y) & (adv >= 0), clean == y),
                   "judged_by": f"the endpoint's labels to account {users[0]!r}: clean images before the attack, "
                                "final adversarials after it", "judge_queries": 2 * len(x), "in_process": NO_BUNDLE}
    else:
        compare = _in_process(spec, model, x, y, x_adv, eps=eps, params=params, transform=transform, seed=seed)
    return {
        "attack": attack, "accounts": len(keys), "n": len(x), "eps": eps, "budget": queries, "output": output,
        "oracle": spec.oracle + (" (from top-1 confidence)" if spec.oracle == "probs" and output == "label" else ""),
        "threat_model": threat_model(len(keys), rotation, transform, oars), "rotation": rotation,
        "transform": transform.model_dump() if transform is not None else None, "oars": oars is not None,
        **compare,
        "queries": oracle.total, "requests": oracle.requests, "mean_queries": float(used.float().mean()),
        "flagged_at_query": oracle.flagged_at(per_account),
        "accounts_flagged": len(per_account), "accounts_used": len(oracle.accounts_used),
        "already_flagged_before": already,
        "suspicious_queries": sum(after[u]["suspicious"] - before[u]["suspicious"] for u in users),
        "blocked": oracle.blocked, "resent": oracle.resent, "rate_limited": endpoint.rate_limited,
        "seconds": round(seconds, 1),
        "params": params,
    }


class _Transformed(nn.Module):
    """``model`` seeing every query after the attacker's random transform (the in-process twin of a noisy
    attacker: the same attack, the same transforms, no endpoint and no detector)."""

    def __init__(self, model: nn.Module, transform, seed: int):
        super().__init__()
        self.model, self.transform, self.gen = model, transform, torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(perturb(x, self.transform, self.gen))


def _in_process(spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, eps: float,
                params: dict, transform=None, seed: int = 0) -> dict:
    """True success of the endpoint's adversarials on ``model``, and the same attack (with the same random
    transforms of its queries, when it has them) run on it directly."""
    seen = model if transform is None else _Transformed(model, transform, seed)
    x_free, used_free = spec(QueryOracle(seen, output=spec.oracle), x, y, eps=eps, **params)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return {"success_endpoint": _success(model, x_adv, y, correct),
            "success_in_process": _success(model, x_free, y, correct),
            "mean_queries_in_process": float(used_free.float().mean()), "in_process": "run"}
