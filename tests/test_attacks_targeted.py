"""APGD-T, FAB-T, Square L2 and targeted HopSkipJump (issue 10) on a tiny trained CNN."""

from __future__ import annotations

import pytest
import torch

from adv.attacks import apgd_t, fab_t, get_attack, hopskipjump, pgd, square_l2
from adv.attacks.fab import hyperplane_step
from tests.attack_helpers import NUM_CLASSES, synthetic


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=7)


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_apgd_t_and_fab_t_hit_a_given_target(model, data):
    x, y = data
    target = (y + 2) % NUM_CLASSES
    for attack in (apgd_t, fab_t):
        x_adv = attack(model, x, y, eps=0.5, targeted=True, y_target=target, steps=30)
        assert (x_adv - x).abs().amax() <= 0.5 + 1e-6
        assert (predict(model, x_adv) == target).float().mean() >= 0.95, attack.__name__


def test_top_class_cycle_is_no_weaker_than_its_first_target(model, data):
    """Untargeted APGD-T/FAB-T try the likeliest wrong classes in turn: more targets never fool fewer points."""
    x, y = data
    for attack, kw in ((apgd_t, {"seed": 0}), (fab_t, {})):
        one = (predict(model, attack(model, x, y, eps=0.08, steps=20, n_target_classes=1, **kw)) != y).sum()
        all_ = (predict(model, attack(model, x, y, eps=0.08, steps=20, n_target_classes=9, **kw)) != y).sum()
        assert all_ >= one and all_ > 0, (attack.__name__, one, all_)


def test_fab_t_finds_smaller_perturbations_than_pgd_needs(model, data):
    """FAB is a minimal-perturbation attack: with eps=inf its L∞ size is below the PGD budget that fools all."""
    x, y = data
    x_adv = fab_t(model, x, y, norm="linf", steps=50)
    fooled = predict(model, x_adv) != y
    assert fooled.float().mean() >= 0.95
    sizes = (x_adv - x).flatten(1).abs().amax(1)[fooled]
    x_pgd = pgd(model, x, y, eps=sizes.median().item(), steps=20, seed=0)
    # at FAB's median size, PGD fools roughly half the points or fewer, never (almost) all
    assert (predict(model, x_pgd) != y).float().mean() < 0.9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_step_is_the_smallest_box_feasible_step(norm):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1, 4, 4, generator=g)
    x = torch.rand(64, 1, 4, 4, generator=g)
    c = torch.rand(64, generator=g)
    d = hyperplane_step(w, c, -x, 1 - x, norm)
    reach = (w * d).flatten(1).sum(1)
    assert ((x + d) >= -1e-6).all() and ((x + d) <= 1 + 1e-6).all()
    assert torch.allclose(reach, c, atol=1e-4)  # reachable here: the full box gives more than c
    if norm == "l2":  # without the box, the minimiser is c w / ||w||^2: the box can only make it longer
        free = c / w.flatten(1).pow(2).sum(1)
        assert (d.flatten(1).norm(dim=1) >= (free * w.flatten(1).norm(dim=1)) - 1e-5).all()
    assert torch.equal(hyperplane_step(w, -c, -x, 1 - x, norm), torch.zeros_like(w))


@pytest.mark.parametrize("eps", [0.3, 1.0, 3.0])
def test_square_l2_stays_inside_its_ball(model, data, eps):
    x, y = data
    x_adv, queries = square_l2(model, x, y, eps=eps, queries=200, seed=0)
    assert (x_adv.flatten(1) - x.flatten(1)).norm(dim=1).max() <= eps * (1 + 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and queries.max() <= 200
    if eps == 3.0:
        assert (predict(model, x_adv) != y).float().mean() >= 0.8


def test_targeted_hopskipjump_from_x_init_hits_the_target_and_shrinks(model, data):
    x, y = data
    target = (y + 1) % NUM_CLASSES
    pool, pool_y = synthetic(200, seed=3)
    pred = predict(model, pool)
    x_init = torch.stack([pool[(pred == t).nonzero()[0, 0]] for t in target.tolist()])
    x_adv, queries = hopskipjump(model, x, y, targeted=True, y_target=target, x_init=x_init, steps=8,
                                 init_evals=30, max_evals=200, seed=0)
    assert (predict(model, x_adv) == target).all()
    start = (x_init - x).flatten(1).norm(dim=1)
    end = (x_adv - x).flatten(1).norm(dim=1)
    assert (end < start).all() and end.mean() < 0.6 * start.mean()
    assert (queries > 0).all()


def test_targeted_hopskipjump_checks_x_init(model, data):
    x, y = data
    with pytest.raises(ValueError, match="x_init"):
        hopskipjump(model, x, y, targeted=True, y_target=y, x_init=x[:3])
    assert get_attack("hopskipjump").targeted and "x_init" in get_attack("hopskipjump").defaults
