"""Gradient-masking flags over the aggregated entries (AutoAttack-style checks, offline)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


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
    n = max((e["n"] for e in entries), default=1)
    shape = tuple(input_shape) if input_shape else (10**6,)  # unknown: eps_not_to_zero never fires
    return [*_sweep_flags(entries, n, shape), *_step_flags(entries, n),
            *_budget_flags(entries, rows, margin), *_adaptive_flags(entries)]


def _series(entries: list[dict], key) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for e in entries:
        if (k := key(e)) is not None:
            out.setdefault(k, []).append(e)
    return out


def _sweep_flags(entries: list[dict], n: int, shape: tuple) -> list[dict[str, str]]:
    """Per attack, robust accuracy over its finite ε values (checks.check_sweep)."""
    from adv.evaluate.checks import check_sweep

    flags = []
    series = _series(entries, lambda e: (e["defense"], e["track"], e["attack"], e["norm"], e["steps"])
                     if math.isfinite(e["eps"]) else None)
    for (defense, track, attack, norm, _steps), s in series.items():
        s = sorted(s, key=lambda e: e["eps"])
        for f in check_sweep([e["eps"] for e in s], [e["robust_accuracy"] for e in s], norm, shape, n):
            flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm}", f.message))
    return flags


def _step_flags(entries: list[dict], n: int) -> list[dict[str, str]]:
    """Per attack and ε, robust accuracy over its step budgets (checks.check_steps)."""
    from adv.evaluate.checks import check_steps

    flags = []
    budgets = _series(entries, lambda e: (e["defense"], e["track"], e["attack"], e["norm"], e["eps"])
                      if e["steps"] > 0 else None)
    for (defense, track, attack, norm, eps), s in budgets.items():
        s = sorted(s, key=lambda e: e["steps"])
        for few, many in zip(s, s[1:]):
            for f in check_steps(few["robust_accuracy"], many["robust_accuracy"], few["steps"], many["steps"], n):
                flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm} eps={eps:g}", f.message))
    return flags


def _budget_flags(entries: list[dict], rows, margin: float) -> list[dict[str, str]]:
    """Per defense, track and budget: one-step vs iterative, unbounded attacks, query vs white-box."""
    from adv.attacks import get_attack
    from adv.evaluate.checks import check_query_beats_whitebox

    flags = []
    for (defense, track, norm, eps), group in _series(
            entries, lambda e: (e["defense"], e["track"], e["norm"], e["eps"])).items():
        where = f"{defense} ({track}), {norm} eps={eps:g}"
        white = [e for e in group if get_attack(e["attack"]).family == "whitebox"]
        iterative = [e for e in white if get_attack(e["attack"]).iterative]
        for o in (e for e in white if e["steps"] < 0 and not get_attack(e["attack"]).iterative):
            for it in iterative:
                if o["robust_accuracy"] + margin < it["robust_accuracy"]:
                    flags.append(_flag("one_step_beats_iterative", where,
                                       f"{o['attack_key']}: {o['robust_accuracy']:.1%} < "
                                       f"{it['attack_key']}: {it['robust_accuracy']:.1%}"))
        for e in group:
            if math.isinf(e["eps"]) and e["robust_accuracy"] > margin:
                flags.append(_flag("unbounded_not_zero", where, f"{e['attack_key']}: {e['robust_accuracy']:.1%}"))
        if rows is not None and white and len(white) < len(group):
            for f in check_query_beats_whitebox(_query_beats_whitebox(rows, group, white)):
                flags.append(_flag(f.code, where, f.message))
    return flags


def _adaptive_flags(entries: list[dict]) -> list[dict[str, str]]:
    """The same grid point much weaker adaptively: the non-adaptive number overstates the defense."""
    flags = []
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


def _query_beats_whitebox(rows, group: list[dict], white: list[dict]) -> dict[str, tuple[int, int]]:
    """Per query attack of ``group`` (one defense, track, norm and ε): the examples it fooled although
    every white-box attack of the group failed on them (checks.beats_whitebox), and how many such
    white-box survivors it ran on."""
    from adv.evaluate.checks import beats_whitebox

    e0 = group[0]
    sel = ((rows["defense"] == e0["defense"]) & (rows["track"] == e0["track"]) & (rows["norm"] == e0["norm"])
           & (rows["eps"] == e0["eps"]))
    n = int(rows["index"].max()) + 1

    def examples(grids, fooled: bool = True) -> np.ndarray:
        r = sel & np.isin(rows["grid"], list(grids)) & (rows["success"] if fooled else True)
        mask = np.zeros(n, bool)
        mask[rows["index"][r]] = True
        return mask

    white_grids = {e["grid"] for e in white}
    tried, fooled = examples(white_grids, fooled=False), examples(white_grids)
    ok = np.zeros(n, bool)  # correct on the clean input: the only points an attack can win
    clean = (rows["track"] == "clean") & (rows["defense"] == e0["defense"]) & rows["robust"]
    ok[rows["index"][clean]] = True
    return {e["attack_key"]: (int(beats_whitebox(examples([e["grid"]]), fooled, tried).sum()),
                              int((examples([e["grid"]], fooled=False) & tried & ~fooled & ok).sum()))
            for e in group if e["grid"] not in white_grids}
