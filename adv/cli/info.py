"""``adv info [SECTION]``: what datasets, models, attacks, defenses (inference stages and training losses),
suites and query detectors exist; ``adv info attacks`` shows one section."""

from __future__ import annotations

from adv.cli.common import print_json
from adv.data import describe_dataset, list_datasets
from adv.errors import ConfigError
from adv.models import get_spec, list_models

NAME = "info"
HELP = "list datasets, models, attacks, defenses, training defenses and evaluation suites"

#: Section argument -> the key of :func:`collect` it shows (one word per section on the command line).
SECTIONS = {
    "datasets": "datasets", "models": "models", "attacks": "attacks", "defenses": "defenses",
    "training-defenses": "training defenses", "suites": "suites", "query-detectors": "query detectors",
}


def add_arguments(parser) -> None:
    parser.add_argument("section", nargs="?", metavar="SECTION",
                        help=f"show one section: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict[str, dict[str, str]]:
    # imported here: `adv --help` and the other commands need not load every registry
    from adv.attacks import describe_attack, list_attacks
    from adv.defenses import describe_defense, list_defenses
    from adv.detectors import QUERY_DETECTORS
    from adv.evaluate.suites import describe_suite, list_suites
    from adv.train.losses import describe_loss, list_losses

    return {
        "datasets": {n: describe_dataset(n) for n in list_datasets()},
        "models": {n: get_spec(n).description for n in list_models()},
        "attacks": {n: describe_attack(n) for n in list_attacks()},
        "defenses": {n: describe_defense(n) for n in list_defenses()},
        "training defenses": {n: describe_loss(n) for n in list_losses()},
        "suites": {n: describe_suite(n) for n in list_suites()},
        "query detectors": dict(QUERY_DETECTORS),
    }


def section_key(name: str) -> str:
    """The :func:`collect` key of a section argument (``training_defenses`` and singulars accepted)."""
    word = name.strip().lower().replace("_", "-").replace(" ", "-")
    for candidate in (word, word + "s"):
        if candidate in SECTIONS:
            return SECTIONS[candidate]
    raise ConfigError(f"unknown info section {name!r}; choose one of {', '.join(SECTIONS)}")


def run(args) -> int:
    wanted = section_key(args.section) if args.section else None  # a typo fails before the registries load
    info = collect()
    if wanted:
        info = {wanted: info[wanted]}
    if args.json:
        print_json(info[wanted] if wanted else info)
        return 0
    for section, entries in info.items():
        print(f"{section}:")
        for name, desc in entries.items():
            print(f"  {name:<16} {desc}")
    return 0
