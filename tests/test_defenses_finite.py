"""Every registered defense stage gives finite output for any input in [0, 1] (issue 25: a blank image made
DWT BayesShrink emit NaN, which the endpoint answered with a 500)."""

from __future__ import annotations

import pytest
import torch

from adv.defenses import create_defense, list_defenses
from adv.models import create_model
from tests.test_defenses_helpers import one_thread  # noqa: F401

SIZES = [(1, 28, 28), (3, 32, 32)]


def _inputs(shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.rand(1, *shape, generator=g)
    mixed[:, 0] = 0.4  # one flat channel beside textured ones
    return {"black": torch.zeros(1, *shape), "white": torch.ones(1, *shape), "grey": torch.full((1, *shape), 0.5),
            "binary": (torch.rand(1, *shape, generator=g) > 0.5).float(), "random": torch.rand(1, *shape, generator=g),
            "flat channel": mixed}


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("name", list_defenses())
def test_every_stage_is_finite_on_constant_binary_and_random_images(name, shape):
    torch.manual_seed(0)
    clf = create_model("lenet5", input_size=shape).eval()
    specs = [name] + (["dwt:method=VisuShrink", "dwt:per_channel=false", "dwt:level=2,wavelet=db2"]
                      if name == "dwt" else [])
    for spec in specs:
        stage = create_defense(spec, classifier=clf).eval()
        for what, x in _inputs(shape).items():
            with torch.no_grad():
                outs = _outputs(stage(x))
            assert outs, f"{spec}: no tensor output"
            for out in outs:
                assert torch.isfinite(out).all(), f"{spec} gives non-finite output on a {what} {shape} image"
