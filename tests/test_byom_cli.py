"""Bring your own model from the CLI (issue 21): `adv info SECTION`, factory weights behind a Normalize, the
missing-normalization warning, and `adv bundle create --model-factory` with fractional eps."""

from __future__ import annotations

import json

import pytest

from adv.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- adv info SECTION ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,member", [("datasets", "mnist"), ("attacks", "pgd"), ("suites", "standard"),
                                            ("training-defenses", "trades"), ("model", "lenet")])
def test_info_shows_one_section(capsys, section, member):
    code, out, _ = run_cli(capsys, "info", section)
    assert code == 0 and f"  {member} " in out
    assert len([line for line in out.splitlines() if line.endswith(":")]) == 1  # only that section's heading
    code, out, _ = run_cli(capsys, "info", section, "--json")
    assert code == 0 and member in json.loads(out)


def test_info_unknown_section_is_one_line(capsys):
    code, _, err = run_cli(capsys, "info", "atacks")
    assert code == 2 and err.count("\n") == 1 and "datasets, models, attacks" in err
