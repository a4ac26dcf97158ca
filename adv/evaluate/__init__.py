"""Evaluation: the robust-mask protocol, threat models, adaptive attacks, the grid worker and the report.

Ray-free; ``jobs/`` runs these pieces on a cluster.
"""

from adv.evaluate.benchmark import benchmark
from adv.evaluate.checks import RobustnessWarning
from adv.evaluate.precision import FastModel, fast_model
from adv.evaluate.protocol import robust_accuracy
from adv.evaluate.runs import AttackRun, resolve_attacks
from adv.evaluate.result import AttackReport, EvalResult, Flag
from adv.evaluate.sweep import SweepResult, eps_sweep
from adv.evaluate.threat import (
    EvaluatedModel, build_evaluated_model, defense_report, detection_report, detection_summary, evaluation_setup,
    robust_accuracy_inputs,
)

__all__ = [
    "AttackReport", "AttackRun", "EvalResult", "EvaluatedModel", "FastModel", "Flag", "RobustnessWarning",
    "SweepResult", "benchmark", "build_evaluated_model", "defense_report", "detection_report", "detection_summary",
    "eps_sweep", "evaluation_setup", "fast_model", "resolve_attacks", "robust_accuracy", "robust_accuracy_inputs",
]
