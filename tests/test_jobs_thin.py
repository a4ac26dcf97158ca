"""The Ray entrypoints stay thin (issue 23): no job module over 350 lines, and none imports a private name of
another module (Ray-free logic lives in ``adv/`` behind public names)."""

from __future__ import annotations

import ast

from tests.pipeline_helpers import REPO

def test_no_job_module_is_over_350_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "jobs").glob("*.py")}
    assert len(sizes) > 8
    assert {name: n for name, n in sizes.items() if n > 350} == {}


def test_no_job_module_imports_a_private_name_of_another_module():
    found = []
    for path in sorted((REPO / "jobs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("adv", "jobs")):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []
