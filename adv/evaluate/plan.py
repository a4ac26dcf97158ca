"""A validated evaluation config turned into what the workers run: the attack grid, the plan, the model loader.

Ray-free: ``jobs.evaluate`` builds these on the driver and hands them to its actors; ``jobs.tune`` builds the same
grid for its trials. The arguments are the job configs' objects (``attacks`` entries with ``name``, ``eps``,
``steps``, ``norm``, ``params``; a ``model`` with ``checkpoint``/``arch``/``weights``/``factory``; ``defenses``
with ``label``, ``stages``, ``detector``, ``classifier``).
"""

from __future__ import annotations

from typing import Any, Iterable

from adv.evaluate.worker import GridPoint, ModelLoader, Plan
from adv.specs import StageSpec, absolute_path

#: The grid's ``steps`` sets whichever of these budget hyperparameters the attack has.
BUDGET_PARAMS = ("steps", "queries")


def budget_param(spec) -> str | None:
    """The iteration budget an attack (its registry entry) takes: ``steps``, ``queries`` or none."""
    return next((p for p in BUDGET_PARAMS if p in spec.defaults), None)


def build_grid(attacks: Iterable[Any]) -> tuple[GridPoint, ...]:
    """The attack grid: every attack × ε × steps, in config order."""
    from adv.attacks import get_attack

    grid = []
    for a in attacks:
        budget = budget_param(get_attack(a.name))
        for eps in a.eps:
            for steps in (a.steps or [None]):
                grid.append(GridPoint(a.name, eps, a.norm, steps, budget if steps is not None else None,
                                      tuple(sorted(a.params.items()))))
    return tuple(grid)


def build_plan(attacks: Iterable[Any], *, adaptive: bool, features: Iterable[str], store_images: bool,
               seed: int) -> Plan:
    return Plan(build_grid(attacks), adaptive=adaptive, features=tuple(features), store_images=store_images,
                seed=seed)


def rows_per_example(plan: Plan, n_defenses: int) -> int:
    """Result rows one example yields: clean and non-adaptive on every model, adaptive on every defense."""
    models = 1 + n_defenses
    return models + len(plan.grid) * models + (len(plan.grid) * n_defenses if plan.adaptive else 0)


def absolute_spec(spec: str | StageSpec | None) -> str | StageSpec | None:
    """A stage spec (a string, or parsed) with its ``checkpoint=`` made absolute; one without is returned as given."""
    if spec is None:
        return None
    parsed = StageSpec.parse(spec)
    if parsed.get("checkpoint") is None:
        return spec
    return parsed.absolute() if isinstance(spec, StageSpec) else str(parsed.absolute())


def model_loader(model, defenses: Iterable[Any]) -> ModelLoader:
    """The actors' loader of ``model`` and ``defenses``, local paths made absolute on the driver: actors need
    not share its working directory."""
    return ModelLoader(checkpoint=absolute_path(model.checkpoint), arch=model.arch,
                       weights=absolute_path(model.weights), factory=model.factory,
                       defenses=tuple((d.label, tuple(absolute_spec(s) for s in d.stages), absolute_spec(d.detector))
                                      + ((absolute_path(d.classifier),) if d.classifier else ()) for d in defenses))
