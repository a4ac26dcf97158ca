"""``adv info``: what datasets, models, attacks and defenses are available."""

from __future__ import annotations

import importlib

from adv.cli.common import print_json
from adv.data import describe_dataset, list_datasets
from adv.models import get_spec, list_models

NAME = "info"
HELP = "list datasets, models, attacks, defenses and evaluation suites"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _optional_registry(module: str, lister: str, describer: str) -> dict[str, str]:
    """Attacks and defenses live in modules that later components add."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return {}
    lister_fn, describe = getattr(mod, lister, None), getattr(mod, describer, None)
    if lister_fn is None:
        return {}
    return {name: (describe(name) if describe else "") for name in lister_fn()}


def collect() -> dict[str, dict[str, str]]:
    return {
        "datasets": {n: describe_dataset(n) for n in list_datasets()},
        "models": {n: get_spec(n).description for n in list_models()},
        "attacks": _optional_registry("adv.attacks", "list_attacks", "describe_attack"),
        "defenses": _optional_registry("adv.defenses", "list_defenses", "describe_defense"),
        "suites": _optional_registry("adv.evaluate.suites", "list_suites", "describe_suite"),
    }


def run(args) -> int:
    info = collect()
    if args.json:
        print_json(info)
        return 0
    for section, entries in info.items():
        print(f"{section}:")
        for name, desc in entries.items():
            print(f"  {name:<16} {desc}")
    return 0
