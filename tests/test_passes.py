"""Cache-sized passes on a CPU (adv.evaluate.passes): sizing, exactness, use in robust_accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adv.evaluate import fast_model, robust_accuracy
from adv.evaluate import passes
from adv.evaluate.passes import in_passes, largest_activation, rows_per_pass
from tests.attack_helpers import synthetic

pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py

#: The tiny CNN's largest activation per image: its first convolution, 8 x 12 x 12 floats.
TINY_LARGEST = 8 * 12 * 12 * 4


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=3)


class Counting(nn.Module):
    """Records each forward pass's batch size in ``sizes`` (a list the evaluation's copy of the modules shares)."""

    def __init__(self, net, sizes: list):
        super().__init__()
        self.net, self.record = net, sizes.append

    def forward(self, x):
        self.record(len(x))
        return self.net(x)


class Dropping(nn.Module):
    """A randomized model: dropout kept on at inference, so a probe that drew numbers would shift later draws."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(nn.functional.dropout(x, 0.2, training=True))


def test_the_largest_activation_is_measured_without_drawing_random_numbers_or_leaving_hooks(model, data):
    x = data[0]
    assert largest_activation(model, x[:1]) == TINY_LARGEST
    assert largest_activation(model, x[:4]) == TINY_LARGEST  # per image, whatever the probe's size
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    largest_activation(Dropping(model), x[:1])
    assert torch.equal(torch.rand(3), expected)
    assert not any(m._forward_hooks for m in model.modules())


def test_rows_per_pass_fill_the_budget_per_thread_and_never_go_below_the_minimum(model, data, monkeypatch):
    x = data[0][:1]
    monkeypatch.setattr(passes, "BUDGET", 100 * TINY_LARGEST)
    assert rows_per_pass(model, x, threads=1) == 100 and rows_per_pass(model, x, threads=2) == 200
    monkeypatch.setattr(passes, "BUDGET", TINY_LARGEST)
    assert rows_per_pass(model, x, threads=1) == passes.MIN_ROWS


def test_passes_give_the_outputs_and_input_gradients_of_one_pass(model, data):
    x = data[0].clone().requires_grad_(True)
    whole = model(x)
    (g_whole,) = torch.autograd.grad(whole.logsumexp(1).sum(), x)
    split = in_passes(model, x, 16)
    (g_split,) = torch.autograd.grad(split.logsumexp(1).sum(), x)
    assert torch.allclose(split, whole, atol=1e-5) and torch.allclose(g_split, g_whole, atol=1e-6)
    sizes: list = []
    in_passes(Counting(model, sizes), x, 16)
    assert sizes == [14, 13, 13]  # 40 rows in three equal passes, not 16 + 16 + 8
    with pytest.raises(ValueError, match="rows must be a positive"):
        fast_model(model, rows=0)


def test_the_cpu_evaluation_runs_in_passes_with_the_same_per_example_results(model, data, monkeypatch):
    """The suite's members on passes of 16 rows: the same verdicts and, up to rounding, the same adversarials as
    in one pass; the evaluation's model never sees more than 16 images at a time."""
    runs = [("apgd_ce", {"steps": 10}), ("fab_t", {"steps": 10, "n_target_classes": 3}),
            ("square", {"queries": 200})]

    def evaluate(budget):
        monkeypatch.setattr(passes, "BUDGET", budget)
        sizes: list = []
        res = robust_accuracy(Counting(model, sizes), data, runs, eps=0.08, progress=False, checks=(),
                              return_adversarials=True)
        return res, sizes

    (split, split_sizes), (whole, whole_sizes) = evaluate(TINY_LARGEST), evaluate(1 << 40)
    assert max(split_sizes[1:]) == 16 and max(whole_sizes) == 40  # [0]: the input check's probe
    assert 0 < split.robust_acc < split.clean_acc
    mine, theirs = split.per_example, whole.per_example
    assert torch.equal(mine.robust, theirs.robust)
    assert all(torch.equal(mine.fooled[k], theirs.fooled[k]) for k in theirs.fooled)  # the same attack broke it
    assert ((mine.x_adv - theirs.x_adv).abs() > 1e-4).float().mean() < 0.01
