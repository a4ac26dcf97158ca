"""``adv info``: what datasets, models, attacks, defenses (inference stages and training losses) and suites exist."""

from __future__ import annotations

from adv.cli.common import print_json
from adv.data import describe_dataset, list_datasets
from adv.models import get_spec, list_models

NAME = "info"
HELP = "list datasets, models, attacks, defenses, training defenses and evaluation suites"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict[str, dict[str, str]]:
    # imported here: `adv --help` and the other commands need not load every registry
    from adv.attacks import describe_attack, list_attacks
    from adv.defenses import describe_defense, list_defenses
    from adv.detectors import QUERY_DETECTORS
    from adv.evaluate.suites import describe_suite, list_suites
    from adv.train.registry import describe_loss, list_losses

    return {
        "datasets": {n: describe_dataset(n) for n in list_datasets()},
        "models": {n: get_spec(n).description for n in list_models()},
        "attacks": {n: describe_attack(n) for n in list_attacks()},
        "defenses": {n: describe_defense(n) for n in list_defenses()},
        "training defenses": {n: describe_loss(n) for n in list_losses()},
        "suites": {n: describe_suite(n) for n in list_suites()},
        "query detectors": dict(QUERY_DETECTORS),
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
