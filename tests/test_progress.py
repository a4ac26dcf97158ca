"""Progress in logs: whole lines, bounded in number, when stderr is not a terminal; per-attack steps."""

from __future__ import annotations

import io

import pytest
from tqdm.std import tqdm as std_tqdm

from adv.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    monkeypatch.delenv("ADV_NO_PROGRESS", raising=False)  # `make test` sets it; these tests check the output


def test_a_log_gets_about_ten_whole_lines_however_long_the_loop():
    log = io.StringIO()
    bar = progress(range(10_000), desc="epoch 1/2", file=log)
    assert isinstance(bar, LineProgress)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 10 <= len(lines) <= 11
    assert lines[0].startswith("epoch 1/2:  10% 1000/10000") and lines[-1].startswith("epoch 1/2: 100% 10000/10000")
    assert "loss=0.0001" in lines[-1]


def test_slow_work_shows_life_but_stays_bounded():
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(desc="slow", total=1000, file=log, clock=clock)
    for _ in range(1000):
        clock.t += 10.0  # 10,000 s in all: a line every 30 s would be 333 lines
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 11 <= len(lines) <= 21 and lines[0].startswith("slow:   0% 3/1000")  # the first after 30 s


def test_unknown_total_lines_grow_rarer():
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(desc="filtering", file=log, clock=clock)
    for _ in range(3600):
        clock.t += 1.0
        bar.update(1)
    bar.close()
    # after 30, 90, 210, 450, 930, 1890 s, then the end
    assert [ln.split()[1] for ln in log.getvalue().splitlines()] == ["30it", "90it", "210it", "450it", "930it",
                                                                      "1890it", "3600it"]


def test_a_terminal_gets_the_tqdm_bar_and_off_means_silent(monkeypatch):
    bar = progress(range(3), file=Terminal())
    assert isinstance(bar, std_tqdm)
    bar.close()
    monkeypatch.setenv("ADV_NO_PROGRESS", "1")
    log = io.StringIO()
    assert list(progress(range(50), desc="x", file=log)) == list(range(50)) and log.getvalue() == ""


def test_training_writes_a_readable_log(capsys):
    from adv.data import load_dataset
    from adv.models import create_model
    from adv.train import TrainConfig, fit, seed_everything

    train = load_dataset("digits", split="train", size=16, n=96)
    seed_everything(0)
    model = create_model("lenet5", input_size=(1, 16, 16))
    fit(model, train, None, TrainConfig(epochs=2, batch_size=8))  # 12 steps an epoch
    err = capsys.readouterr().err  # not a terminal, as in `make main > log 2>&1`
    epoch_lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert "\r" not in err and 2 <= len(epoch_lines) <= 22
    assert any(ln.startswith("epoch 2/2: 100%") and "acc=" in ln for ln in epoch_lines)


def test_robust_accuracy_counts_each_attack_of_one_batch(capsys, model):
    from adv.evaluate import robust_accuracy
    from tests.attack_helpers import synthetic

    attacks = ["fgsm", ("pgd", {"steps": 3}), ("bim", {"steps": 3}), ("pgd", {"steps": 4})]
    robust_accuracy(model, synthetic(16, seed=3), attacks, eps=0.03, checks=(), batch_size=64)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("robust accuracy")]
    # one batch: four steps, each attack named, instead of one bar stuck at 0/1
    assert [ln.split(" on ")[0] for ln in lines] == [
        "robust accuracy: fgsm", "robust accuracy: pgd(steps=3)", "robust accuracy: bim(steps=3)",
        "robust accuracy: pgd(steps=4)", "robust accuracy: pgd(steps=4)"]
    assert "4/4" in lines[-1] and "robust=" in lines[-1]  # the batch's result on the last line
