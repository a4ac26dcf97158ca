"""AutoAttack-style suites (issue 10): membership, order, worst case, EOT, clear errors."""

from __future__ import annotations

import platform
import warnings

import pytest
import torch
from torch import nn

from adv.evaluate import RobustnessWarning, robust_accuracy
from adv.evaluate.suites import describe_suite, get_suite, list_suites, suite_attacks
from tests.attack_helpers import synthetic


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=11)


def quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustnessWarning)
        return robust_accuracy(*args, progress=False, checks=(), **kw)


def test_suites_are_autoattacks_versions():
    assert list_suites() == ["l2", "rand", "standard"]
    assert [n for n, _ in get_suite("standard").attacks] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert [n for n, _ in get_suite("l2").attacks] == ["apgd_ce", "apgd_t", "fab_t", "square_l2"]
    assert dict(get_suite("standard").attacks)["square"] == {"queries": 5000}
    assert dict(get_suite("standard").attacks)["apgd_t"]["n_target_classes"] == 9
    assert get_suite("rand").eot_samples == 20 and "EOT" in describe_suite("rand")


def test_bad_suite_or_norm_fails_with_one_clear_line():
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suite_attacks("nope", "linf")
    with pytest.raises(ValueError, match="suite 'standard' is for norm linf, got 'l2'; suites for l2: l2, rand"):
        suite_attacks("standard", "l2")


def test_suite_worst_case_is_no_higher_than_any_member(model, data):
    """Listed attacks run first, then the suite in order, each on the points still standing."""
    res = quiet(model, data, ["fgsm"], suite="standard", eps=0.06)
    assert [a.attack for a in res.attacks] == ["fgsm", "apgd_ce", "apgd_t", "fab_t", "square"]
    for name, kw in get_suite("standard").attacks:
        alone = quiet(model, data, [(name, kw)], eps=0.06)
        assert res.robust_acc <= alone.robust_acc, (name, res.robust_acc, alone.robust_acc)
    assert res.robust_acc < res.clean_acc  # the budget is large enough that the suite does something
    standing = [round(res.clean_acc * res.n)] + [round(a.robust_acc_after * res.n) for a in res.attacks[:-1]]
    assert [a.n_attacked for a in res.attacks] == standing


def test_l2_suite_runs_the_l2_attacks(model, data):
    res = quiet(model, data, suite="l2", eps=0.5, norm="l2")
    assert [a.attack for a in res.attacks] == ["apgd_ce", "apgd_t", "fab_t", "square_l2"]
    first = quiet(model, data, ["apgd_ce"], eps=0.5, norm="l2")
    assert res.robust_acc <= first.robust_acc < res.clean_acc


class Noisy(nn.Module):
    """A randomized model: Gaussian input noise before the classifier; counts forward passes in ``calls`` (a
    list the evaluation's copy of the modules shares: a deep copy keeps a function as it is)."""

    def __init__(self, net, calls: list):
        super().__init__()
        self.net, self.count = net, calls.append

    def forward(self, x):
        self.count(len(x))
        return self.net((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def test_rand_suite_attacks_the_mean_of_20_draws(model, data):
    x, y = data
    calls = []
    noisy = Noisy(model, calls)
    runs = suite_attacks("rand", "linf")
    assert [r.label for r in runs] == ["apgd_ce(eot=20)", "apgd_dlr(eot=20)"]
    torch.manual_seed(0)
    res = quiet(noisy, (x, y), suite="rand", eps=0.06)
    # 2 attacks x (1 + steps) gradient evaluations x 20 draws, plus the scoring passes
    assert len(calls) >= 20 * (1 + 100)
    assert res.robust_acc < res.clean_acc
    assert [a.attack for a in res.attacks] == ["apgd_ce", "apgd_dlr"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc thresholds")
def test_a_cpu_evaluation_sets_the_malloc_thresholds_that_keep_freed_memory(model, data):
    """Issue 26: without them, attack steps page-faulted (a third system time at batch 256); mallopt refuses a
    threshold above glibc's maximum, which would leave them unset."""
    from adv.evaluate.allocator import keep_freed_memory

    keep_freed_memory.cache_clear()
    robust_accuracy(model, data, ["fgsm"], eps=0.05, progress=False, checks=())
    assert keep_freed_memory.cache_info().currsize == 1 and keep_freed_memory() is True


def test_the_allocator_setting_can_be_refused(monkeypatch):
    from adv.evaluate.allocator import keep_freed_memory

    for var, value in (("ADV_KEEP_FREED_MEMORY", "0"), ("MALLOC_TRIM_THRESHOLD_", "131072")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            keep_freed_memory.cache_clear()
            assert keep_freed_memory() is False
    keep_freed_memory.cache_clear()
