"""Sanity checks for an evaluation, after AutoAttack's ``checks.py`` (Croce & Hein 2020).

Each check returns ``Flag``s; ``warn`` also raises them as
``RobustnessWarning``. They look for the usual signs of gradient masking
(Athalye et al. 2018) and of models an attack cannot be trusted on:

* ``softmax_output`` – the model returns probabilities, not logits (CE and
  margin losses on probabilities have vanishing gradients);
* ``randomized_model`` – two forward passes disagree (use EOT, not one run);
* ``zero_gradients`` – the input gradient is exactly zero for some points;
* ``query_beats_whitebox`` – a query-based attack fooled points that a
  white-box attack did not (gradients are not informative);
* ``more_steps_weaker`` – the same attack with more steps does worse;
* ``eps_not_monotone`` / ``eps_not_to_zero`` – robust accuracy does not fall
  as the budget grows, or not towards 0 at a budget that reaches any image;
* ``out_of_ball`` – an attack returned points outside the threat model (they
  are projected back before scoring).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adv.attacks.core import perturbation_norm
from adv.evaluate.result import Flag

CHEAP = ("softmax_output", "randomized_model", "zero_gradients", "query_beats_whitebox", "out_of_ball")
EXPENSIVE = ("more_steps_weaker", "eps_sweep")
ALL = CHEAP + EXPENSIVE


class RobustnessWarning(UserWarning):
    """An evaluation result that may overstate robustness."""


#: Frames in these files are the library's: a warning is attributed to the first frame outside them.
_LIBRARY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn(flags: Sequence[Flag]) -> None:
    """Raise each flag as a RobustnessWarning attributed to the user's call (the first frame outside ``adv``),
    however deep in the library the evaluation ran (``adv.benchmark``, ``eps_sweep``, ``robust_accuracy``)."""
    level = user_stacklevel()
    for f in flags:
        warnings.warn(f"{f.code}: {f.message}", RobustnessWarning, stacklevel=level)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller point at the first frame outside ``adv``.

    Python 3.12's ``skip_file_prefixes`` does this, but the project supports 3.10, so the frames are counted.
    """
    frame, level = sys._getframe(1), 1  # the caller, which calls warnings.warn: stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY):
        frame, level = frame.f_back, level + 1
    return level


@torch.no_grad()
def check_outputs(model: nn.Module, x: torch.Tensor) -> list[Flag]:
    """Softmax outputs and randomness, from two forward passes."""
    out1, out2 = model(x), model(x)
    flags = []
    if (out1 >= 0).all() and torch.allclose(out1.sum(1), torch.ones(len(x), device=x.device), atol=1e-4):
        flags.append(Flag("softmax_output", "the model seems to output probabilities; attacks need logits"))
    diff = (out1 - out2).abs().max().item()
    if diff > 1e-5:
        flags.append(Flag("randomized_model", f"two forward passes differ by up to {diff:.3g}; "
                          "use expectation over transformation (EOT) and several runs", {"max_diff": diff}))
    return flags


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Flag]:
    from adv.attacks.core import frozen

    with frozen(model):
        xg = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        # A numpy stage (DWT, JPEG) cuts the graph: say so instead of letting autograd raise.
        grad = torch.autograd.grad(loss, xg, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:
        return [Flag("no_gradient", "the loss does not depend differentiably on the input (a non-differentiable "
                     "stage?): gradient attacks cannot run; attack it adaptively (BPDA, --adaptive)",
                     {"fraction": 1.0})]
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    if zero > 0:
        return [Flag("zero_gradients", f"the input gradient is exactly zero for {zero:.1%} of the checked points",
                     {"fraction": zero})]
    return []


def check_steps(acc_few: float, acc_many: float, steps_few: int, steps_many: int, n: int) -> list[Flag]:
    """More iterations of the same attack must not leave more points standing."""
    if acc_many > acc_few + max(1.0 / max(n, 1), 0.02):
        return [Flag("more_steps_weaker", f"robust accuracy {acc_many:.2%} with {steps_many} steps is higher than "
                     f"{acc_few:.2%} with {steps_few}", {"steps": [steps_few, steps_many],
                                                          "robust_acc": [acc_few, acc_many]})]
    return []


def max_eps(norm: str, shape: Sequence[int]) -> float:
    """The budget that reaches every image in [0, 1]^d."""
    return 1.0 if norm == "linf" else math.sqrt(math.prod(shape))


def check_sweep(eps_values: Sequence[float], accs: Sequence[float], norm: str, shape, n: int) -> list[Flag]:
    """Robust accuracy must not grow with eps, and must approach 0 at a budget that reaches any image."""
    flags = []
    tol = max(1.0 / max(n, 1), 0.02)
    rises = [(e0, e1) for (e0, a0), (e1, a1) in zip(zip(eps_values, accs), zip(eps_values[1:], accs[1:]))
             if a1 > a0 + tol]
    if rises:
        flags.append(Flag("eps_not_monotone", f"robust accuracy grows with eps between {rises[0][0]:g} and "
                          f"{rises[0][1]:g}", {"eps": list(eps_values), "robust_acc": list(accs)}))
    if eps_values and eps_values[-1] >= 0.5 * max_eps(norm, shape) and accs[-1] > 0.1:
        flags.append(Flag("eps_not_to_zero", f"robust accuracy is still {accs[-1]:.2%} at eps={eps_values[-1]:g}, "
                          "a budget that reaches almost any image", {"eps": list(eps_values),
                                                                      "robust_acc": list(accs)}))
    return flags


def worst_case_mask(alive, index, robust):
    """AutoAttack's worst case over attacks, per example: ``alive`` after every attack row.

    Example ``index[j]`` stays robust only if it was and row ``j`` (an
    attack's outcome on it) is robust. The online protocol folds each attack
    of a batch in as it runs; the report folds in stored rows.

    Shape: alive (N,) bool; index (M,) example ids; robust (M,) bool -> (N,) bool (numpy or torch, a new array)
    """
    if isinstance(alive, torch.Tensor):
        out, robust = alive.clone(), robust.bool()
    else:
        out, robust = alive.copy(), np.asarray(robust, bool)
    out[index[~robust]] = False
    return out


def beats_whitebox(query_fooled, whitebox_fooled, whitebox_tried):
    """Examples a query attack fooled although every white-box attack tried on them failed.

    Shape: three (N,) bool masks over the same examples (numpy or torch) -> (N,) bool
    """
    return query_fooled & whitebox_tried & ~whitebox_fooled


def check_query_beats_whitebox(counts: dict[str, tuple[int, int]]) -> list[Flag]:
    """``query_beats_whitebox`` from ``{query attack: (examples it won, white-box survivors it ran on)}``.

    It fires on evidence (:func:`adv.evaluate.stats.beats_whitebox_evidence`: a minimum count and a
    binomial test), never on one lucky point; the details keep every attack's raw counts.
    """
    from adv.evaluate.stats import beats_whitebox_evidence

    evidence = {k: beats_whitebox_evidence(*v) for k, v in counts.items() if v[1]}
    strong = {k: e for k, e in evidence.items() if e["fires"]}
    if not strong:
        return []
    won = ", ".join(f"{k}: {e['fooled']} of {e['survivors']} example(s), p={e['p_value']:.2g}"
                    for k, e in strong.items())
    return [Flag("query_beats_whitebox", f"a query-based attack fooled significantly many points that survived every "
                 f"white-box attack ({won}): the gradients are likely masked", evidence)]


def check_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, label: str) -> list[Flag]:
    """Points outside the eps-ball or [0, 1] (a custom attack's bug, or a loose tolerance)."""
    size = perturbation_norm(x, x_adv, norm)
    bad = (size > eps * (1 + 1e-4) + 1e-6) | (x_adv.flatten(1).amin(1) < 0) | (x_adv.flatten(1).amax(1) > 1)
    bad |= ~torch.isfinite(x_adv).flatten(1).all(1)
    if bad.any():
        return [Flag("out_of_ball", f"{label} returned {int(bad.sum())} points outside the {norm} ball of "
                     f"radius {eps:g} or [0, 1]; they were projected back", {"attack": label})]
    return []
