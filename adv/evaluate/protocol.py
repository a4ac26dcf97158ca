"""Worst-case robust accuracy, following the AutoAttack protocol (Croce & Hein 2020).

Each batch keeps a per-example "still robust" mask: clean mistakes are
out from the start, and every attack, in the given order, runs only on the
points still standing. An attack's output is never trusted: it is checked
against the threat model (projected back and flagged if outside), and
re-scored with the model. Cheap attacks first makes the sequence fast: on a
weak model most points fall to FGSM and PGD only sees the rest.

Data flows batch by batch (memory-bounded on large sets); the state is saved
after each batch when ``state_path`` is given, so an interrupted run resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from adv.attacks.core import NORMS, SIZES, perturbation_norm, project
from adv.attacks.registry import AttackSpec, call_family
from adv.attacks.seeding import example_seeds
from adv.errors import InputError
from adv.evaluate.allocator import keep_freed_memory
from adv.evaluate import checks as C
from adv.evaluate.precision import fast_model
from adv.evaluate.inputs import prepare
from adv.evaluate.passes import rows_per_pass
from adv.evaluate.runs import AttackRun, resolve_attacks
from adv.evaluate.suites import suite_attacks
from adv.evaluate.result import FOOLED, NOT_ATTACKED, SURVIVED, AttackReport, EvalResult, Flag, PerExample
from adv.evaluate.stats import accuracy_ci
from adv.evaluate.state import EvalState, batch_hash, model_fingerprint

SUMS = ("attacked", "fooled", "time_s", "l0", "l2", "linf", "queries", "beats_whitebox", "whitebox_survivors")


def iter_batches(data, batch_size: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """Batches of at most ``batch_size`` from ImageData, an (x, y) pair or an iterable of pairs."""
    if hasattr(data, "batches") and hasattr(data, "__len__"):
        return data.batches(batch_size), len(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)), len(x)

    def rechunk(batches: Iterable) -> Iterator:
        for x, y in batches:
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size], y[i : i + batch_size]

    return rechunk(data), None


@dataclass(frozen=True)
class Options:
    """The settings every batch of one :func:`robust_accuracy` run reads, checked once at the boundary."""

    eps: float
    norm: str = "linf"
    batch_size: int = 256
    seed: int = 0
    early_stop: bool = True
    #: Sanity checks to run (:mod:`adv.evaluate.checks`).
    checks: tuple[str, ...] = C.CHEAP
    check_n: int = 128
    amp: str | None = None

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        eps = self.eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        unknown = set(self.checks) - set(C.ALL)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}; known: {C.ALL}")


def robust_accuracy(
    model: nn.Module,
    data,
    attacks: Sequence = (),
    *,
    eps: float,
    suite: str | None = None,
    norm: str = "linf",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    seed: int = 0,
    early_stop: bool = True,
    state_path: str | None = None,
    progress: bool = True,
    checks: Sequence[str] | str = C.CHEAP,
    check_n: int = 128,
    amp: str | None = None,
    channels_last: bool = False,
    return_adversarials: bool = False,
) -> EvalResult:
    """Worst-case robust accuracy of ``model`` on ``data`` under the attack sequence.

    ``attacks`` run in order on the points still standing; randomized
    attacks get seeds derived from ``seed``, the attack's label and each
    example's index in ``data`` (never the attack's position or the batch
    size), so results are reproducible and resumable, and appending an
    attack never changes an earlier one's results. ``data`` and ``model``
    are checked first (:mod:`adv.evaluate.inputs`: numpy converted, common
    mistakes refused in one line). ``result.per_example`` gives each
    example's fate; ``return_adversarials`` adds the images that broke
    them (one copy of the data in memory). ``early_stop`` lets attacks that support it
    stop on an example once it is fooled. ``checks`` selects sanity checks
    (``"all"`` adds the costly steps and eps-sweep checks). ``suite``
    (``"standard"``, ``"l2"``, ``"rand"``; see :mod:`adv.evaluate.suites`)
    appends an AutoAttack-style suite after ``attacks``. Pass an
    eval-mode model: the evaluation never changes its mode. On a CPU it
    keeps freed memory in the process (:mod:`adv.evaluate.allocator`), runs the
    model in cache-sized passes (:mod:`adv.evaluate.passes`) and takes first-layer
    input gradients the cheap way (:mod:`adv.evaluate.input_grad`: on a copy of
    the model's modules that shares its weights, so counters kept in module
    attributes count on the copy).

    Shape: data images (N, C, H, W) in [0, 1], labels (N,)
    """
    opts = Options(eps=eps, norm=norm, batch_size=batch_size, seed=seed, early_stop=early_stop,
                   checks=C.ALL if checks == "all" else tuple(checks or ()), check_n=check_n, amp=amp)
    runs = resolve_attacks(_with_suite(attacks, suite, norm), norm)
    device = torch.device(device) if device is not None else _model_device(model)
    data, probe = prepare(model, data, eps, norm, device)
    net = _attacked_model(model, device, amp, channels_last, probe)
    state = _start(model, runs, opts, state_path)
    if return_adversarials and state.batch_hashes:
        raise InputError(f"return_adversarials cannot resume {state_path}: the images of its finished batches were "
                         "not kept; pass another state_path")
    t0 = time.perf_counter()
    kept = _batches(net, data, runs, opts, state, device, state_path, progress, return_adversarials)
    state.done = True
    if state_path:
        state.save(state_path)
    return _result(state, runs, opts, time.perf_counter() - t0, torch.cat(kept) if kept else None)


def _attacked_model(model: nn.Module, device: torch.device, amp: str | None, channels_last: bool,
                    probe: torch.Tensor | None) -> nn.Module:
    """The model the attacks run on, with the fast paths asked for; on a CPU also the cheap first-layer input
    gradient, cache-sized forward passes (sized on the ``probe`` images) and freed memory kept in the process
    (attack steps reuse activation-sized blocks: no page faults per step)."""
    if device.type != "cpu":
        return fast_model(model, amp, channels_last)
    keep_freed_memory()
    rows = rows_per_pass(model, probe[:1]) if probe is not None else None
    return fast_model(model, amp, channels_last, input_grad=True, rows=rows)


def _batches(net, data, runs, opts: Options, state: EvalState, device, state_path, progress: bool,
             keep_adv: bool) -> list[torch.Tensor]:
    """Every batch not finished in an earlier run, through :func:`_evaluate_batch`; the kept adversarials.

    The progress bar counts (batch, attack) steps, so one batch under a long suite still shows each attack.
    """
    kept: list[torch.Tensor] = []
    batches, total = iter_batches(data, opts.batch_size)
    bar = _bar(total, opts.batch_size, len(runs), progress)
    try:
        for b, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            if b < len(state.batch_hashes):  # finished in an earlier run
                if batch_hash(x, y) != state.batch_hashes[b]:
                    raise ValueError(f"batch {b} differs from the one {state_path} recorded; the data changed")
            else:
                x_adv = _evaluate_batch(net, x, y, b, runs, opts, state, keep_adv, bar)
                if x_adv is not None:
                    kept.append(x_adv.cpu())
                if state_path:
                    state.save(state_path)
            if bar is not None:
                bar.set_postfix(robust=f"{state.n_robust / max(state.n, 1):.2%}", refresh=False)
                bar.update((b + 1) * len(runs) - bar.n)  # the attacks skipped: no point left standing
    finally:
        if bar is not None:
            bar.close()
    return kept


def _with_suite(attacks, suite: str | None, norm: str):
    """``attacks`` followed by the suite's sequence, if one is named."""
    if suite is None:
        return attacks
    return [*([attacks] if isinstance(attacks, (str, AttackSpec)) or callable(attacks) else attacks),
            *suite_attacks(suite, norm)]


def _start(model: nn.Module, runs: list[AttackRun], opts: Options, state_path: str | None) -> EvalState:
    """A fresh state, or the one ``state_path`` saved for the same configuration (to resume)."""
    config = {"attacks": [[r.label, r.kwargs] for r in runs], "eps": opts.eps, "norm": opts.norm,
              "batch_size": opts.batch_size, "seed": opts.seed, "early_stop": opts.early_stop, "amp": opts.amp,
              "model": model_fingerprint(model) if state_path else ""}  # hashing weights costs; only to resume
    state = EvalState.load(state_path, config) if state_path else EvalState(config=config)
    for r in runs:
        state.sums.setdefault(r.label, dict.fromkeys(SUMS, 0.0))
    return state


def _evaluate_batch(model, x, y, b: int, runs: list[AttackRun], opts: Options, state: EvalState,
                    keep_adv: bool = False, bar=None) -> torch.Tensor | None:
    """The protocol on batch ``b`` (sanity checks on the first), added to ``state``; the adversarials if kept."""
    flags = _first_batch_checks(model, x, y, runs, opts) if b == 0 else []
    # state.n: the batch's first example index in the data, the unit of seeding (not b, which the batch size sets)
    robust, clean, marks, x_adv = _attack_batch(model, x, y, runs, opts, state.n, state.sums, flags, keep_adv,
                                                 bar)
    state.clean_mask += "".join("1" if c else "0" for c in clean.tolist())
    for label, m in marks.items():
        state.marks[label] = state.marks.get(label, "") + m
    state.flags += [f.__dict__ for f in flags]
    state.batch_hashes.append(batch_hash(x, y))
    state.n += len(y)
    state.n_clean += int(clean.sum())
    state.n_robust += int(robust.sum())
    state.robust_mask += "".join("1" if r else "0" for r in robust.tolist())
    return x_adv


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _bar(total, batch_size, n_runs: int, progress: bool):
    """A bar over (batch, attack) steps, or None."""
    if not progress:
        return None
    from adv.progress import progress as bar

    steps = None if total is None else -(-total // batch_size) * n_runs
    return bar(None, desc="robust accuracy", total=steps, unit="attack")


def _run_kwargs(run: AttackRun, eps, norm, seed: int, index: torch.Tensor, early_stop: bool) -> dict:
    """The attack's keywords; a randomized one gets a stream per example, from its label and ``index`` in the data."""
    kw = {**run.kwargs, "eps": eps, "norm": norm}
    if run.randomized and "seed" not in kw:
        kw["seed"] = example_seeds(seed, run.label, index, index.device)
    if early_stop and run.accepts("early_stop") and "early_stop" not in kw:
        kw["early_stop"] = True
    return kw


def call_attack(run: AttackRun, model: nn.Module, x, y, kw: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_adv, queries or None)``: query attacks get a fresh counted oracle of ``model`` (:func:`call_family`)."""
    return call_family(run.fn, run.family, model, x, y, oracle=run.spec.oracle if run.spec else "probs", **kw)


def _attack_batch(model, x, y, runs, opts: Options, start: int, sums, flags, keep_adv: bool = False, bar=None):
    """Run the sequence on one batch (examples ``start`` on of the data); ``bar`` counts each attack.

    Returns the robust and clean-correct masks, each attack's per-example marks and, if kept, the adversarials.
    """
    eps, norm = opts.eps, opts.norm
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    robust = clean.clone()
    white_tried, white_fooled = torch.zeros_like(clean), torch.zeros_like(clean)
    marks = {run.label: [NOT_ATTACKED] * len(x) for run in runs}
    x_final = x.clone() if keep_adv else None
    for run in runs:
        idx = robust.nonzero()[:, 0]
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]
        if bar is not None:
            bar.set_description(f"robust accuracy: {run.label} on {len(idx)}")
        t = time.perf_counter()
        kw = _run_kwargs(run, eps, norm, opts.seed, start + idx, opts.early_stop)
        x_adv, queries = call_attack(run, model, xs, ys, kw)
        s = sums[run.label]
        s["time_s"] += time.perf_counter() - t
        x_adv = x_adv.detach().to(x.device)
        if "out_of_ball" in opts.checks:
            flags += C.check_ball(x_adv, xs, eps, norm, run.label)
        x_adv = project(torch.nan_to_num(x_adv), xs, eps, norm)
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != ys
        robust = C.worst_case_mask(robust, idx, ~fooled)
        for j, f in zip(idx.tolist(), fooled.tolist()):
            marks[run.label][j] = FOOLED if f else SURVIVED
        if x_final is not None:
            x_final[idx[fooled]] = x_adv[fooled]
        s["attacked"] += len(idx)
        s["fooled"] += int(fooled.sum())
        for k in SIZES:
            s[k] += float(perturbation_norm(xs[fooled], x_adv[fooled], k).sum())
        if queries is not None:
            s["queries"] += float(queries.sum())
            s["beats_whitebox"] += int(C.beats_whitebox(fooled, white_fooled[idx], white_tried[idx]).sum())
            s["whitebox_survivors"] += int((white_tried[idx] & ~white_fooled[idx]).sum())
        if run.family == "whitebox":
            white_tried[idx] = True
            white_fooled[idx[fooled]] = True
        if bar is not None:
            bar.update(1)
    return robust, clean, {k: "".join(v) for k, v in marks.items()}, x_final


def _first_batch_checks(model, x, y, runs, opts: Options) -> list[Flag]:
    eps, norm, checks = opts.eps, opts.norm, opts.checks
    xs, ys = x[:opts.check_n], y[:opts.check_n]
    flags: list[Flag] = []
    if {"softmax_output", "randomized_model"} & set(checks):
        flags += [f for f in C.check_outputs(model, xs) if f.code in checks]
    with torch.no_grad():
        ok = model(xs).argmax(1) == ys
    xs, ys = xs[ok], ys[ok]
    if len(ys) == 0:
        return flags
    if "zero_gradients" in checks:
        flags += C.check_zero_gradients(model, xs, ys)
    white = [r for r in runs if r.family == "whitebox" and r.spec is not None]
    stepped = [r for r in white if r.accepts("steps") and r.kwargs.get("steps", r.spec.defaults["steps"]) >= 4]
    if "more_steps_weaker" in checks and stepped:
        r = stepped[0]
        many = r.kwargs.get("steps", r.spec.defaults["steps"])
        accs = [_acc_under(model, xs, ys, r, eps, norm, opts.seed, steps=s) for s in (many // 4, many)]
        flags += C.check_steps(accs[0], accs[1], many // 4, many, len(ys))
    if "eps_sweep" in checks and white:
        top = C.max_eps(norm, x.shape[1:])
        values = [e for e in (eps, 2 * eps, 4 * eps) if 0 < e < top] + [top]
        accs = [_acc_under(model, xs, ys, white[0], e, norm, opts.seed) for e in values]
        flags += C.check_sweep(values, accs, norm, x.shape[1:], len(ys))
    return flags


def _acc_under(model, x, y, run: AttackRun, eps, norm, seed, **override) -> float:
    kw = {**_run_kwargs(run, eps, norm, seed, torch.arange(len(x), device=x.device), False), **override}
    x_adv, _ = call_attack(run, model, x, y, kw)
    with torch.no_grad():
        return (model(project(x_adv.detach(), x, eps, norm)).argmax(1) == y).float().mean().item()


def _result(state: EvalState, runs, opts: Options, elapsed: float, x_adv: torch.Tensor | None = None) -> EvalResult:
    n = max(state.n, 1)
    reports, standing = [], state.n_clean
    for r in runs:
        s = state.sums[r.label]
        standing -= int(s["fooled"])
        k = s["fooled"]
        reports.append(AttackReport(
            label=r.label, attack=r.name, family=r.family, params=dict(r.kwargs), n_attacked=int(s["attacked"]),
            n_fooled=int(k), robust_acc_after=standing / n, robust_acc_after_ci=accuracy_ci(standing, state.n),
            time_s=s["time_s"],
            mean_l0=s["l0"] / k if k else None, mean_l2=s["l2"] / k if k else None,
            mean_linf=s["linf"] / k if k else None,
            mean_queries=s["queries"] / s["attacked"] if r.family == "query" and s["attacked"] else None,
        ))
    flags = _dedupe([Flag(**f) for f in state.flags])
    if "query_beats_whitebox" in opts.checks:
        flags += C.check_query_beats_whitebox({
            r.label: (state.sums[r.label]["beats_whitebox"], state.sums[r.label]["whitebox_survivors"])
            for r in runs if r.family == "query"})
    C.warn(flags)
    return EvalResult(n=state.n, eps=opts.eps, norm=opts.norm, clean_acc=state.n_clean / n,
                      robust_acc=state.n_robust / n, attacks=reports, flags=flags, time_s=elapsed,
                      clean_acc_ci=accuracy_ci(state.n_clean, state.n),
                      robust_acc_ci=accuracy_ci(state.n_robust, state.n),
                      per_example=PerExample.from_marks(state.clean_mask, state.robust_mask, state.marks, x_adv))


def _dedupe(flags: list[Flag]) -> list[Flag]:
    seen, out = set(), []
    for f in flags:
        if (f.code, f.message) not in seen:
            seen.add((f.code, f.message))
            out.append(f)
    return out
