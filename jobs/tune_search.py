"""Ray Tune's side of a sweep config: the search algorithm, the ASHA scheduler, and one log line per trial."""

from __future__ import annotations

from typing import Any

from adv.tuning.space import SearchSpace
from jobs.tune_config import AshaConfig, SearchConfig


def search_setup(search: SearchConfig, space: SearchSpace) -> tuple[dict, Any, int, str]:
    """``(param_space, search_alg, num_samples, description)``: grid search, or Optuna over tune domains."""
    from ray import tune

    algorithm = search.algorithm
    if algorithm == "auto":
        algorithm = "grid" if space.discrete else "optuna"
    if algorithm == "grid":
        grid = space.grid()
        grid_space = {"candidate": tune.grid_search(grid)}  # the Candidate objects: Tune pickles them
        return grid_space, None, 1, f"grid ({len(grid)} configurations)"
    from ray.tune.search.optuna import OptunaSearch

    domains = {}
    for key, dim in space.choices().items():
        if dim.kind in ("choice", "fixed"):
            domains[key] = tune.choice(list(dim.values))  # OptunaSearch refuses grid_search (Ray 2.60)
        elif dim.kind == "randint":
            domains[key] = tune.randint(int(dim.low), int(dim.high))
        else:
            domains[key] = getattr(tune, dim.kind)(dim.low, dim.high)
    return domains, OptunaSearch(seed=search.seed), search.num_samples, \
        f"Optuna (TPE), {search.num_samples} samples"


def asha(cfg: AshaConfig, resource: str, max_t: int, grace: int):
    from ray.tune.schedulers import ASHAScheduler

    if not cfg.enabled:
        return None, "none"
    grace = min(grace, max_t)  # a validation subset smaller than the first rung: one rung, not Ray's assertion
    sched = ASHAScheduler(time_attr=resource, max_t=max_t, grace_period=grace,
                          reduction_factor=cfg.reduction_factor)  # metric/mode come from TuneConfig
    return sched, f"ASHA on {resource} (grace {grace}, reduction factor {cfg.reduction_factor}, max {max_t})"


def trial_lines(phase: str, log):
    """A Tune callback writing one line when a trial finishes or fails: a log file's progress of the sweep."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            objective = (trial.last_result or {}).get("objective")
            shown = "-" if objective is None else f"{objective:.3f}"
            log(f"{phase}: trial {trial.trial_id} finished ({self.done} so far), objective {shown}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"{phase}: trial {trial.trial_id} failed ({self.done} so far); see its error.txt")

    return TrialLines()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # the default name embeds the whole candidate
