"""Cache-sized passes on a CPU: a batch goes through the model in runs of rows whose activations fit a core's cache.

An attack step on a CPU streams every activation through memory several times (the layer writes it, ReLU
and pooling read and write it, the backward pass reads it again). When one layer's output for the whole
batch outgrows the core's cache, those elementwise layers run at memory speed: through the Madry LeNet5
(MNIST, 32 x 28 x 28 floats per image after the first convolution), one forward pass over 438 images took
72-87 ms on one x86 core, ReLU alone 26 ms, against 46-49 ms in passes of 32 to 128 rows (ReLU 6-7 ms).
Below about 16 rows the fully connected layers re-read their weights too often and it gets slower again.

:func:`rows_per_pass` sizes the passes from the model's largest activation per image (measured once on one
image); :class:`adv.evaluate.precision.FastModel` splits its forward pass accordingly. The split is exact:
an evaluation model's output for an image depends on that image alone (eval mode; attacks already run it on
any subset of the standing rows), so only oneDNN's choice of kernel per batch size can move the float
rounding. Autograd keeps one graph per pass, so the backward pass runs in the same cache-sized pieces.
"""

from __future__ import annotations

import torch
from torch import nn

#: Bytes of the largest activation one pass may hold, per intra-op thread: a few MiB, the size of a
#: server core's L2 cache and its share of L3 (measured best at 3-13 MiB on the LeNet above).
BUDGET = 4 << 20
#: Fewest rows per pass: fewer makes the fully connected layers re-read their weights per handful of rows.
MIN_ROWS = 16


@torch.no_grad()
def largest_activation(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes per image of the largest tensor a leaf module of ``model`` outputs on ``x`` (N >= 1 images).

    One forward pass, with the random state restored afterwards so that a seeded randomized defense
    draws the same numbers in the evaluation as it would have without this probe.
    """
    sizes: list[int] = []

    def record(_module, _inputs, out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sizes.extend(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.random.fork_rng(devices=[]):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return max(sizes + [x.numel() * x.element_size()]) // max(len(x), 1)


def rows_per_pass(model: nn.Module, x: torch.Tensor, threads: int | None = None) -> int:
    """Rows per forward pass whose largest activation fits :data:`BUDGET` per thread (at least :data:`MIN_ROWS`)."""
    threads = threads or torch.get_num_threads()
    return max(MIN_ROWS, BUDGET * threads // max(largest_activation(model, x), 1))


def in_passes(model: nn.Module, x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``model(x)``, computed in passes of at most ``rows`` images when the batch is larger (one pass when
    ``rows`` is None); the passes are of equal size, so no short tail pass falls below :data:`MIN_ROWS`."""
    if rows is None or len(x) <= rows:
        return model(x)
    return torch.cat([model(part) for part in x.tensor_split(-(-len(x) // rows))])
