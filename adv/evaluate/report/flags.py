"""Gradient-masking flags over the aggregated entries (AutoAttack-style checks, offline)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# --- gradient-masking flags -----------------------------------------------------------------------------
ITERATIVE = ("pgd", "apgd", "bim", "iter_stepll", "cw", "deepfool")


def _flag(code: str, where: str, detail: str) -> dict[str, str]:
    return {"flag": code, "where": where, "detail": detail}


def masking_flags(entries: list[dict[str, Any]], rows: dict[str, np.ndarray] | None = None,
                  input_shape: Sequence[int] | None = None, margin: float = 0.02) -> list[dict[str, str]]:
    """Signs of gradient masking in the results (Athalye et al. 2018 §3.1; Carlini et al. 2019 §5).

    The checks of :mod:`adv.evaluate.checks`, applied to the stored grid:
    ``eps_not_monotone``/``eps_not_to_zero`` (per attack over its ε values),
    ``more_steps_weaker`` (per attack over its step budgets) and, per example,
    ``query_beats_whitebox``. Three more that a grid makes possible:
    ``one_step_beats_iterative``, ``unbounded_not_zero`` (an ε = inf attack
    leaves accuracy above ``margin``) and ``adaptive_much_stronger`` (the
    non-adaptive numbers overstate the defense's robustness).
    """
    from adv.attacks import get_attack
    from adv.evaluate.checks import check_steps, check_sweep

    flags: list[dict[str, str]] = []
    n = max((e["n"] for e in entries), default=1)
    shape = tuple(input_shape) if input_shape else (10**6,)  # unknown: eps_not_to_zero never fires
    series: dict[tuple, list[dict]] = {}
    for e in entries:
        if math.isfinite(e["eps"]):
            series.setdefault((e["defense"], e["track"], e["attack"], e["norm"], e["steps"]), []).append(e)
    for (defense, track, attack, norm, steps), s in series.items():
        s = sorted(s, key=lambda e: e["eps"])
        for f in check_sweep([e["eps"] for e in s], [e["robust_accuracy"] for e in s], norm, shape, n):
            flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm}", f.message))
    budgets: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["steps"] > 0:
            budgets.setdefault((e["defense"], e["track"], e["attack"], e["norm"], e["eps"]), []).append(e)
    for (defense, track, attack, norm, eps), s in budgets.items():
        s = sorted(s, key=lambda e: e["steps"])
        for few, many in zip(s, s[1:]):
            for f in check_steps(few["robust_accuracy"], many["robust_accuracy"], few["steps"], many["steps"], n):
                flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm} eps={eps:g}", f.message))
    by: dict[tuple, list[dict]] = {}
    for e in entries:
        by.setdefault((e["defense"], e["track"], e["norm"], e["eps"]), []).append(e)
    for (defense, track, norm, eps), group in by.items():
        where = f"{defense} ({track}), {norm} eps={eps:g}"
        white = [e for e in group if get_attack(e["attack"]).family == "whitebox"]
        one_step = [e for e in white if e["steps"] < 0 and e["attack"] not in ITERATIVE]
        for o in one_step:
            for it in (e for e in white if e["attack"] in ITERATIVE):
                if o["robust_accuracy"] + margin < it["robust_accuracy"]:
                    flags.append(_flag("one_step_beats_iterative", where,
                                       f"{o['attack_key']}: {o['robust_accuracy']:.1%} < "
                                       f"{it['attack_key']}: {it['robust_accuracy']:.1%}"))
        for e in group:
            if math.isinf(e["eps"]) and e["robust_accuracy"] > margin:
                flags.append(_flag("unbounded_not_zero", where, f"{e['attack_key']}: {e['robust_accuracy']:.1%}"))
        if rows is not None and white and len(white) < len(group):
            beaten = _query_beats_whitebox(rows, defense, track, norm, eps, {e["grid"] for e in white})
            if beaten:
                flags.append(_flag("query_beats_whitebox", where,
                                   f"a query-based attack fooled {beaten} example(s) that survived every white-box "
                                   "attack: the gradients may be masked"))
    pairs: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        pairs.setdefault((e["defense"], e["grid"]), {})[e["track"]] = e
    for (defense, _), p in pairs.items():
        if "adaptive" in p and "non-adaptive" in p:
            na, ad = p["non-adaptive"]["robust_accuracy"], p["adaptive"]["robust_accuracy"]
            if na - ad > 0.1:
                flags.append(_flag("adaptive_much_stronger", defense,
                                   f"{p['adaptive']['attack_key']}: non-adaptive {na:.1%} vs adaptive {ad:.1%}"))
    return flags


def _query_beats_whitebox(rows, defense, track, norm, eps, white_grids: set[int]) -> int:
    """Examples a query attack fooled although every white-box attack (same norm, ε) failed."""
    sel = ((rows["defense"] == defense) & (rows["track"] == track) & (rows["norm"] == norm)
           & (rows["eps"] == eps))
    is_white = np.isin(rows["grid"], list(white_grids))
    fooled_white = set(rows["index"][sel & is_white & rows["success"]].tolist())
    fooled_query = set(rows["index"][sel & ~is_white & rows["success"]].tolist())
    return len(fooled_query - fooled_white)
