"""APGD, FAB-T and Square after their speed-up (issue 26): the same per-example results as the code before it.

``fixtures/fab_square_before_speedup.pt`` holds a tiny CNN's weights, the images, and what APGD, FAB-T and
Square returned for them with the code of commit 3d3f9e8 (before the speed-up), made by running this module as a
script with that commit's ``adv`` package. The weights are stored rather than retrained, so only the attacks can
change the outputs.

The comparison is per example: the same verdict (fooled or not) and the same query counts exactly, the same
adversarial to within 1e-3 per pixel. Not bit for bit: oneDNN picks its convolution kernels by the CPU's
instruction set (AVX2, AVX-512, AMX), their sums round differently, and FAB's projections and APGD-L2's
normalisation carry that rounding into the adversarial (up to 2e-4 seen between two Xeons). A changed algorithm
moves adversarials by a step of the attack (eps is 0.06 to 0.6 here), far past 1e-3.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from adv.attacks import fab_t, get_attack
from adv.attacks.seeding import example_seeds
from tests.attack_helpers import NUM_CLASSES, TinyCNN, one_thread, synthetic, train_tiny

FIXTURE = Path(__file__).parent / "fixtures" / "fab_square_before_speedup.pt"

pytestmark = pytest.mark.usefixtures("single_threaded")


def outputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each setting returns: APGD-CE/DLR/T (restarts, L2), FAB-T as the suite runs it, minimal, targeted
    and L2; Square with per-example streams (the suite's seeding) and with one joint generator."""
    square, seeds = get_attack("square"), lambda name: example_seeds(0, name, range(len(x)))
    apgd = {f"apgd_{k}": get_attack(name)(model, x, y, seed=seeds(name), **kw) for k, name, kw in (
        ("ce", "apgd_ce", dict(eps=0.06, steps=25)), ("dlr", "apgd_dlr", dict(eps=0.06, steps=25, restarts=2)),
        ("l2", "apgd_ce", dict(eps=0.5, norm="l2", steps=25)), ("t", "apgd_t", dict(eps=0.06, steps=20)))}
    sq_rows, q_rows = square.run(model, x, y, eps=0.08, queries=300, seed=seeds("square"))
    sq_joint, q_joint = square.run(model, x, y, eps=0.08, queries=150, seed=5)
    return {
        **apgd,
        "fab_suite": fab_t(model, x, y, eps=0.06, steps=30, n_target_classes=9),
        "fab_minimal": fab_t(model, x, y, eps=math.inf, steps=20, n_target_classes=2),
        "fab_targeted": fab_t(model, x, y, eps=0.3, targeted=True, y_target=(y + 2) % NUM_CLASSES, steps=20),
        "fab_l2": fab_t(model, x, y, eps=0.6, norm="l2", steps=20, n_target_classes=3),
        "square_rows": sq_rows, "square_rows_queries": q_rows,
        "square_joint": sq_joint, "square_joint_queries": q_joint,
    }


@pytest.fixture(scope="module")
def before():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def tiny(before):
    model = TinyCNN()
    model.load_state_dict(before["weights"])
    return model.eval()


@pytest.fixture(scope="module")
def after(before, tiny):
    return outputs(tiny, before["x"], before["y"])


@pytest.mark.parametrize("key", ["apgd_ce", "apgd_dlr", "apgd_l2", "apgd_t", "fab_suite", "fab_minimal", "fab_targeted",
                                 "fab_l2", "square_rows",
                                 "square_rows_queries", "square_joint", "square_joint_queries"])
def test_the_same_per_example_results_as_before_the_speed_up(before, tiny, after, key):
    new, old = after[key], before[key]
    assert new.shape == old.shape and new.dtype == old.dtype
    if not new.is_floating_point():  # query counts
        assert torch.equal(new, old), (key, (new != old).nonzero())
        return
    moved = (new - old).abs().flatten(1).amax(1)
    assert (moved <= 1e-3).all(), (key, moved.max().item(), (moved > 1e-3).nonzero().flatten().tolist())
    with torch.no_grad():
        fooled_new, fooled_old = tiny(new).argmax(1) != before["y"], tiny(old).argmax(1) != before["y"]
    assert torch.equal(fooled_new, fooled_old), (key, (fooled_new != fooled_old).nonzero().flatten().tolist())


def test_fab_early_stop_breaks_the_same_points_and_leaves_the_others_as_they_were(before, tiny):
    """The protocol's early exit (a point stops once it has an adversarial within eps) changes which adversarial
    a broken point gets, never whether it is broken, nor anything for the points that stand."""
    x, y = before["x"], before["y"]
    full = fab_t(tiny, x, y, eps=0.06, steps=30)
    early = fab_t(tiny, x, y, eps=0.06, steps=30, early_stop=True)
    with torch.no_grad():
        broken, broken_early = tiny(full).argmax(1) != y, tiny(early).argmax(1) != y
    assert torch.equal(broken, broken_early) and 0 < int(broken.sum()) < len(x)
    assert torch.equal(full[~broken], early[~broken])
    assert (early - x).abs().flatten(1).amax(1).max() <= 0.06 + 1e-6


def _make() -> None:
    with one_thread():
        if FIXTURE.is_file():  # keep the stored weights and images
            old = torch.load(FIXTURE, weights_only=True)
            model, x, y = TinyCNN(), old["x"], old["y"]
            model.load_state_dict(old["weights"])
            model.eval()
        else:
            model, (x, y) = train_tiny(), synthetic(40, seed=7)
        out = outputs(model, x, y)
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save({"weights": model.state_dict(), "x": x, "y": y, **out}, FIXTURE)
    for k, v in out.items():
        if v.is_floating_point():
            print(k, "fooled", int((model(v).argmax(1) != y).sum()))


if __name__ == "__main__":  # regenerate, only ever with the code the fixture describes
    sys.exit(_make())
