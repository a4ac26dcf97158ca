"""docs/architecture.md names every module of ``adv/`` and ``jobs/`` (issue 23: the map must not fall behind).

A module counts as named when its path appears in backticks (`adv/models/registry.py`), or when its file name does
in the first cell of a table row after its folder (`adv/models/small.py`, `cifar.py`; `adv/cli/` (`eval.py`)).
Package ``__init__.py`` files that only re-export are not required; ``__main__.py`` neither.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def named_in_doc(text: str) -> set[str]:
    named = set()
    for line in text.splitlines():
        cells = line.split("|")
        first = cells[1] if line.startswith("|") and len(cells) > 2 else line
        folder = ""
        for token in re.findall(r"`([^`]+)`", first if line.startswith("|") else line):
            if "/" in token:
                named.add(token)
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
            elif token.endswith(".py") and folder and line.startswith("|"):
                named.add(folder + token)
    return named


def modules(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__main__.py" or (path.name == "__init__.py" and not _holds_code(path)):
            continue
        found.append(rel)
    return found


def _holds_code(init: Path) -> bool:
    """An ``__init__.py`` with a ``def`` or ``class`` of its own (not only re-exports, lazy ones included)."""
    return re.search(r"^(def (?!__getattr__)|class )", init.read_text(), flags=re.M) is not None


def test_the_matcher_reads_full_paths_and_names_after_a_folder():
    doc = "| `adv/models/small.py`, `cifar.py` | x |\n| `adv/cli/` (`eval.py`) | `not.py` |\nsee `jobs/main.py`"
    assert named_in_doc(doc) == {"adv/models/small.py", "adv/models/cifar.py", "adv/cli/", "adv/cli/eval.py",
                                 "jobs/main.py"}


def test_every_adv_and_jobs_module_is_in_the_architecture_doc():
    named = named_in_doc(DOC.read_text())
    missing = [m for m in modules("adv") + modules("jobs") if m not in named]
    assert len(modules("adv")) > 80 and missing == [], f"add these to docs/architecture.md: {missing}"
