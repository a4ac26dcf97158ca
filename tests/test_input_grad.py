"""The cheap input gradient of first-layer convolutions (adv.evaluate.input_grad)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adv.attacks import get_attack
from adv.evaluate import fast_model, robust_accuracy
from adv.evaluate.input_grad import FewChannelConv2d, _ConvInputGrad, cheap_input_grad, eligible
from tests.attack_helpers import synthetic

pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=7)


@pytest.mark.parametrize("c, o, k, p", [(1, 4, 3, 1), (3, 4, 5, 2), (2, 3, (3, 5), (0, 1)), (1, 2, 1, 0)])
def test_the_input_gradient_and_its_derivative_are_the_convolutions(c, o, k, p):
    conv = nn.Conv2d(c, o, k, padding=p).double().requires_grad_(False)
    x = torch.rand(2, c, 6, 7, dtype=torch.double, requires_grad=True)
    cheap = lambda t: _ConvInputGrad.apply(t, conv.weight, conv.bias, conv.padding)  # noqa: E731
    assert torch.equal(cheap(x), conv(x))
    assert torch.autograd.gradcheck(cheap, (x,))
    assert torch.autograd.gradgradcheck(lambda t: cheap(t) ** 2, (x,))  # what create_graph callers need


def test_only_plain_few_channel_convolutions_are_swapped_and_the_callers_model_is_kept(model, data):
    assert eligible(nn.Conv2d(3, 8, 3, padding=1)) and eligible(nn.Conv2d(1, 8, 5))
    for conv in (nn.Conv2d(4, 8, 3), nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(3, 8, 3, dilation=2),
                 nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 3, padding="same"),
                 nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")):
        assert not eligible(conv), conv
    net = cheap_input_grad(model)
    swapped = [m for m in net.modules() if isinstance(m, FewChannelConv2d)]
    assert len(swapped) == 1 and not any(isinstance(m, FewChannelConv2d) for m in model.modules())
    assert swapped[0].weight is model.conv1.weight  # shared, not a second copy in memory
    assert torch.equal(net(data[0]), model(data[0]))
    assert fast_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), input_grad=True).__class__ is nn.Sequential


def test_attacks_on_the_swapped_model_give_the_same_adversarials(model, data):
    """Same gradient up to rounding: PGD's and APGD's sign steps land on the same images, bar a pixel whose
    gradient is within rounding of 0 (its sign may flip on another CPU's kernels), and fool the same points."""
    x, y = data
    net = fast_model(model, input_grad=True)
    for name, kw in (("pgd", dict(steps=10)), ("apgd_ce", dict(steps=20))):
        mine, theirs = (get_attack(name)(m, x, y, eps=0.1, seed=0, **kw) for m in (net, model))
        assert ((mine - theirs).abs() > 1e-4).float().mean() < 0.01, name
        with torch.no_grad():
            assert torch.equal(model(mine).argmax(1), model(theirs).argmax(1)), name


def test_training_keeps_pytorchs_path_and_gets_weight_gradients(model, data):
    x, y = data
    net = cheap_input_grad(copy.deepcopy(model)).requires_grad_(True)
    conv = next(m for m in net.modules() if isinstance(m, FewChannelConv2d))
    nn.functional.cross_entropy(net(x), y).backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


class _PlainConv(nn.Conv2d):
    """A subclass the swap leaves alone: the evaluation then takes PyTorch's own input gradient."""


def test_the_evaluation_gives_the_same_verdicts_with_the_cheap_gradient(model, data):
    x, y = data
    plain = copy.deepcopy(model)
    plain.conv1 = _PlainConv(1, 8, 3, padding=1)
    plain.conv1.load_state_dict(model.conv1.state_dict())
    runs = [("apgd_ce", {"steps": 20}), ("fab_t", {"steps": 10, "n_target_classes": 3})]
    cheap, native = (robust_accuracy(m, (x, y), runs, eps=0.06, progress=False, checks=()) for m in (model, plain))
    assert 0 < cheap.robust_acc < 1
    assert torch.equal(cheap.per_example.robust, native.per_example.robust)
    assert all(p.requires_grad for p in model.parameters()) and type(model.conv1) is nn.Conv2d  # left as it was
