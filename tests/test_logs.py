"""stdlib logging: the library is quiet by default; the ``adv`` command and the jobs print its lines on stderr."""

import json
import logging
from pathlib import Path

import pytest

from adv.cli import main
from adv.logs import StderrLines
from jobs.common import logger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_adv_logger():
    """The ``adv`` logger as a new process has it (importing a job module, as this session did, configures it)."""
    lg = logging.getLogger("adv")
    saved = list(lg.handlers), lg.level, lg.propagate
    lg.handlers[:] = []
    lg.setLevel(logging.NOTSET)
    lg.propagate = True
    yield lg
    lg.handlers[:] = saved[0]
    lg.setLevel(saved[1])
    lg.propagate = saved[2]


def test_the_library_is_quiet_until_an_entrypoint_asks(fresh_adv_logger, capsys):
    logging.getLogger("adv.train.loop").info("an epoch")
    assert capsys.readouterr().err == ""


def test_adv_train_prints_one_json_line_per_epoch_and_restores_logging(fresh_adv_logger, capsys, tmp_path):
    code = main(["train", "--dataset", "digits", "--model", "lenet", "--epochs", "1", "--n", "200",
                 "--out", str(tmp_path / "run"), "--quiet"])
    epochs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert code == 0 and [e["epoch"] for e in epochs] == [1] and "train_acc" in epochs[0]
    assert fresh_adv_logger.handlers == [] and fresh_adv_logger.propagate  # as main() found it


def test_a_job_prints_stage_lines_and_the_librarys_plain_lines(capsys):
    logger("tune")("3 trials")
    logging.getLogger("adv.train.loop").info('{"epoch": 1}')
    assert capsys.readouterr().err.splitlines()[-2:] == ["[tune] 3 trials", '{"epoch": 1}']
    assert sum(isinstance(h, StderrLines) for h in logging.getLogger("jobs").handlers) == 1  # once, however often


def test_no_library_module_prints_to_stderr_itself():
    printing = [p.relative_to(ROOT).as_posix() for p in (ROOT / "adv").rglob("*.py")
                if "file=sys.stderr" in p.read_text() and "cli" not in p.parts]
    assert printing == []
