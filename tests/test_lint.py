"""The tree passes ruff with the project's rules (``[tool.ruff]`` in pyproject.toml); ruff is a test dependency."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes_on_the_whole_tree():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert "No module named ruff" not in proc.stderr, "ruff is missing: pip install -e '.[test]'"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


#: Imported but deliberately not declared: torchattacks pins requests~=2.25, so the benchmark's optional third
#: column asks for it to be installed apart (``pip install --no-deps torchattacks``; see pyproject.toml's bench extra).
UNDECLARED_ON_PURPOSE = {"torchattacks"}


def _third_party_imports() -> set[str]:
    first_party = {"adv", "jobs", "bench", "tests", "__future__"}
    found = set()
    for folder in ("adv", "jobs", "bench", "tests", "scripts", "examples", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - first_party - set(sys.stdlib_module_names)


def test_every_imported_third_party_package_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    declared = {re.split(r"[\[<>=~! ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports() - UNDECLARED_ON_PURPOSE):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported but not in pyproject.toml (module: distributions): {missing}"
