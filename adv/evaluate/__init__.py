"""Robust-accuracy evaluation: the AutoAttack protocol, sanity checks, eps sweeps."""

from adv.evaluate.checks import RobustnessWarning
from adv.evaluate.precision import FastModel, fast_model
from adv.evaluate.protocol import AttackRun, resolve_attacks, robust_accuracy
from adv.evaluate.result import AttackReport, EvalResult, Flag
from adv.evaluate.sweep import SweepResult, eps_sweep

__all__ = [
    "AttackReport", "AttackRun", "EvalResult", "FastModel", "Flag", "RobustnessWarning", "SweepResult",
    "eps_sweep", "fast_model", "resolve_attacks", "robust_accuracy",
]
