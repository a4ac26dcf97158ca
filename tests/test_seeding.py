"""Seeds follow the example (issue 11): every random attack gives an example the same result, whatever else
shares its batch, and the streams a subset continues are that example's own."""

from __future__ import annotations

import warnings

import pytest
import torch

from adv.attacks import get_attack, list_attacks
from adv.attacks.core import make_generator
from adv.attacks.seeding import BUFFER, RowSeeds, example_seeds
from adv.evaluate import RobustnessWarning, robust_accuracy
from tests.attack_helpers import synthetic

#: Every randomized attack, with settings that leave some examples standing (so restarts, later targets and
#: later iterations run on a subset) and that take a fraction of a second.
SMALL = {
    "pgd": dict(eps=0.06, steps=3, restarts=3),
    "pgd_cw": dict(eps=0.06, steps=3, restarts=2),
    "pgd_dlr": dict(eps=0.06, steps=3, restarts=2),
    "apgd": dict(eps=0.06, steps=5, restarts=3),
    "apgd_ce": dict(eps=0.06, steps=5, restarts=2),
    "apgd_dlr": dict(eps=0.06, steps=5, restarts=2),
    "apgd_t": dict(eps=0.06, steps=4, n_target_classes=3),
    "a3": dict(eps=0.06, steps=3),
    "square": dict(eps=0.1, queries=40),
    "square_l2": dict(eps=2.0, norm="l2", queries=40),
    "hopskipjump": dict(eps=1.5, norm="l2", steps=3, init_evals=10, max_evals=30, init_trials=5),
}
ROWS = [2, 5, 9]  # the examples a preceding attack would have left standing


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(12, seed=7)


def test_every_randomized_attack_is_covered():
    assert set(SMALL) == set(list_attacks(randomized=True))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_examples_result_does_not_depend_on_the_rest_of_its_batch(model, data, name):
    x, y = data
    spec, kw = get_attack(name), SMALL[name]
    full, q_full = spec.run(model, x, y, **kw, seed=example_seeds(0, name, range(len(x))))
    fooled = model(full).argmax(1) != y
    assert 0 < int(fooled.sum()) < len(x)  # some stand, so restarts, later targets and iterations run on subsets
    part, q_part = spec.run(model, x[ROWS], y[ROWS], **kw, seed=example_seeds(0, name, ROWS))
    alone, _ = spec.run(model, x[5:6], y[5:6], **kw, seed=example_seeds(0, name, [5]))
    assert torch.equal(full[ROWS], part) and torch.equal(full[5:6], alone)
    if q_full is not None:
        assert torch.equal(q_full[ROWS], q_part)
    other, _ = spec.run(model, x, y, **kw, seed=example_seeds(1, name, range(len(x))))
    assert not torch.equal(other, full)  # the draws matter, so the equalities above could fail


@pytest.mark.parametrize("name", ["pgd", "apgd", "apgd_t", "square", "square_l2", "hopskipjump"])
def test_in_the_protocol_neither_the_batch_size_nor_an_attack_in_front_changes_an_examples_result(model, name):
    kw = dict(SMALL[name])
    eps, norm = kw.pop("eps"), kw.pop("norm", "linf")
    data = synthetic(24, seed=3)

    def marks(attacks, batch_size, seed=0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RobustnessWarning)
            res = robust_accuracy(model, data, attacks, eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                                  progress=False, checks=())
        label = res.attacks[-1].label
        return res.per_example.attacked[label], res.per_example.fooled[label]

    attacked, fooled = marks([(name, kw)], 24)
    assert torch.equal(marks([(name, kw)], 7)[1], fooled)
    front = ("bim", {"steps": 1, "step_size": eps / 3})  # a weak attack in front: it breaks only the easiest points
    behind_attacked, behind_fooled = marks([front, (name, kw)], 5)
    both = attacked & behind_attacked
    assert both.any() and torch.equal(fooled[both], behind_fooled[both])


def test_a_subset_continues_its_examples_own_streams():
    seeds = example_seeds(0, "pgd", range(4))
    first = seeds.uniform(3)
    later = seeds.take([1, 3]).uniform(2)
    fresh = example_seeds(0, "pgd", [3])
    assert torch.equal(fresh.uniform(3), first[3:4])
    assert torch.equal(fresh.uniform(2), later[1:2])  # the subset drew from example 3's stream, after its first 3
    assert torch.equal(seeds.uniform(1, torch.tensor([1]))[0], example_seeds(0, "pgd", [1]).uniform(6)[0, 5:])


def test_an_examples_uniforms_are_its_own_across_buffer_refills():
    seeds = example_seeds(3, "square", [0, 1])
    small = torch.cat([seeds.uniform(7) for _ in range(BUFFER // 7 + 3)], 1)  # crosses a refill
    assert ((small >= 0) & (small < 1)).all()
    again = example_seeds(3, "square", [1])
    assert torch.equal(torch.cat([again.uniform(7) for _ in range(BUFFER // 7 + 3)], 1)[0], small[1])
    assert not torch.equal(small[0], small[1])


def _redraw_loop(seeds, k, n, rows, accept):
    """What :meth:`RowSeeds.tries` replaces: draw ``k`` per row, redraw the rows not accepted, ``n`` draws at most."""
    u = seeds.uniform(k, rows)
    redo = torch.arange(len(rows))[~accept(u, rows)]
    for _ in range(n - 1):
        if len(redo) == 0:
            break
        u[redo] = seeds.uniform(k, rows[redo])
        redo = redo[~accept(u[redo], rows[redo])]
    return u


def test_buffered_tries_take_the_same_draws_and_leave_the_streams_where_a_redraw_loop_does():
    """Square's sign redraws (issue 26), judged at once for the rows whose draws are buffered: the same numbers and
    the same stream positions as the loop, also for a row near a refill (left to the loop) and a row never
    accepted (its last draw)."""
    k, n, rows = 3, 10, torch.arange(6)

    def accept(u, ids):  # (m, k) draws of the rows ``ids``; row 5 accepts none
        return (u.sum(-1) > 1.8) & (ids != 5)

    def make():
        seeds = example_seeds(1, "square", range(6))
        seeds.uniform(5)  # a fresh row's buffer is filled on its first draw: no row is fresh here
        seeds.uniform(BUFFER - 5 - 2 * k, torch.tensor([1]))  # row 1: too close to its buffer's end for 10 draws
        return seeds

    first = accept(make().uniform(k, rows), rows)
    assert first[:5].any() and not first[:5].all()  # some rows redraw, some do not
    loop, fast = make(), make()
    want = _redraw_loop(loop, k, n, rows, accept)
    got, fits = fast.tries(k, n, rows, lambda u, f: accept(u, rows[f][:, None]))
    assert fits.tolist() == [True, False, True, True, True, True]
    assert torch.equal(got, want[fits])
    assert torch.equal(_redraw_loop(fast, k, n, rows[~fits], accept), want[~fits])
    assert torch.equal(fast.uniform(4), loop.uniform(4))  # every stream continues at the same place


def test_streams_for_another_batch_are_refused():
    with pytest.raises(ValueError, match="streams for 3 examples, the batch has 2; pass RowSeeds.take"):
        make_generator(RowSeeds([1, 2, 3]), torch.device("cpu"), 2)
