"""Checks and conversions for a user's own model, data and budget, before an evaluation starts.

The mistakes researchers actually make each get one line that names the fix
(``InputError``), instead of a traceback from deep inside an attack:

* numpy arrays are converted (``torch.from_numpy``); integer labels of any
  dtype become int64;
* uint8 images, images in [0, 255], channels-last (N, H, W, C) images and
  normalized-space inputs are rejected, with the conversion to apply;
* a model that returns a tuple or dict is rejected with the
  :class:`adv.models.SelectOutput` wrapper to use;
* an L∞ budget above 1 on [0, 1] images ("did you mean 8/255?") is rejected.

Accepted data: an :class:`adv.data.ImageData`, an ``(x, y)`` pair of tensors
or arrays, a ``DataLoader`` (not shuffling) or any iterable of ``(x, y)``
batches, or a map-style ``Dataset`` of ``(image, label)`` pairs.
docs/byom.md lists every message.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from adv.errors import InputError

#: Channel counts of images; a last dimension like these after a larger second one means NHWC.
CHANNELS = (1, 3, 4)
#: Examples the model is tried on before the evaluation starts.
PROBE = 8


def check_budget(eps: Any, norm: str) -> None:
    """A finite eps >= 0; an L∞ eps above 1 exceeds the whole [0, 1] range, so it is a unit mistake."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm == "linf" and eps > 1:
        raise InputError(f"eps={eps:g} under L-inf exceeds the [0, 1] image range (every point would be reachable); "
                         f"did you mean {eps:g}/255 = {eps / 255:.4g}?")


def as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise InputError(f"{what} must be a torch tensor or a numpy array, got {type(a).__name__}")


def check_images(x: Any) -> torch.Tensor:
    """Float NCHW in [0, 1] (numpy converted); everything else is an InputError naming the conversion."""
    x = as_tensor(x, "images")
    if x.dtype == torch.uint8:
        raise InputError("images must be float in [0, 1]; divide uint8 by 255 (x.float() / 255)")
    if not x.is_floating_point():
        raise InputError(f"images must be float in [0, 1], got dtype {x.dtype}")
    if x.ndim == 3:
        raise InputError(f"images must be (N, C, H, W), got {tuple(x.shape)}; add the channel axis with x[:, None]")
    if x.ndim != 4:
        raise InputError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] in CHANNELS and x.shape[1] > max(CHANNELS):
        raise InputError(f"images look channels-last (N, H, W, C) = {tuple(x.shape)}; pass (N, C, H, W): "
                         "x.permute(0, 3, 1, 2) (numpy: x.transpose(0, 3, 1, 2))")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError("images contain NaN or infinite values")
        if lo >= 0 and 1 < hi <= 255:
            raise InputError(f"images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; divide by 255")
        if lo < 0 or hi > 1:
            raise InputError(f"images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}] (normalized inputs?); pass "
                             "[0, 1] images and put the normalization inside the model: "
                             "nn.Sequential(adv.models.Normalize(mean, std), model)")
    return x


def check_labels(y: Any, n: int) -> torch.Tensor:
    """Integer class indices of shape (n,), as int64."""
    y = as_tensor(y, "labels")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        hint = "; one-hot labels? pass y.argmax(1)" if y.ndim == 2 else _float_label_hint(y)
        raise InputError(f"labels must be integer class indices, got dtype {y.dtype}{hint}")
    if y.ndim == 2 and y.shape[1] > 1:
        raise InputError(f"labels must be class indices of shape (N,), got {tuple(y.shape)}; one-hot? pass "
                         "y.argmax(1)")
    y = y.reshape(-1).long()
    if len(y) != n:
        raise InputError(f"{n} images but {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise InputError(f"labels must be class indices >= 0, got {int(y.min())}")
    return y


def _float_label_hint(y: torch.Tensor) -> str:
    """What to do with 1-D non-integer labels: whole numbers are class indices stored as floats."""
    if y.ndim != 1 or y.dtype == torch.bool or y.is_complex():
        return "; pass y.long()" if y.dtype == torch.bool else ""
    if y.numel() and bool(torch.all(torch.isfinite(y) & (y == y.round()))):
        return "; they hold whole numbers: pass y.long()"
    return "; they are not whole numbers (probabilities? pass the class index, e.g. y.argmax(1) of the 2-D scores)"


def check_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        raise InputError(f"batches must be (images, labels) pairs, got a dict with keys {sorted(batch)}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(f"batches must be (images, labels) pairs, got {type(batch).__name__}"
                         + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x = check_images(batch[0])
    return x, check_labels(batch[1], len(x))


def check_data(data: Any) -> Any:
    """Data the protocol can iterate: ImageData as is, checked tensor pairs, or a lazily checked stream."""
    if hasattr(data, "batches") and hasattr(data, "__len__"):  # adv.data.ImageData: validated when built
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        return check_batch(data)
    if isinstance(data, torch.utils.data.DataLoader):
        if isinstance(data.sampler, torch.utils.data.RandomSampler):
            raise InputError("the DataLoader shuffles (shuffle=True): an example's index, seeds and resume state "
                             "would change from run to run; pass shuffle=False")
        return _checked(data)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _checked(torch.utils.data.DataLoader(data, batch_size=256, shuffle=False))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InputError(f"data must be ImageData, an (x, y) pair of tensors or arrays, a DataLoader or an "
                         f"iterable of (x, y) batches, got {type(data).__name__}")
    return _checked(data)


def _checked(batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        yield check_batch(batch)


def first_examples(data: Any, k: int = PROBE) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(data, first k examples)``; a stream is peeked and chained back so nothing is lost."""
    if hasattr(data, "batches") and hasattr(data, "__len__"):
        return data, next(iter(data.batches(k)), None)
    if isinstance(data, tuple):
        return data, (data[0][:k], data[1][:k])
    it = iter(data)
    first = next(it, None)
    if first is None:
        return iter(()), None
    return itertools.chain([first], it), (first[0][:k], first[1][:k])


@torch.no_grad()
def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The model maps the images to one (N, classes) logits tensor that covers every label."""
    out = model(x)
    if isinstance(out, (tuple, list, dict)) or not isinstance(out, torch.Tensor):
        raise InputError(_several_outputs(out, len(x)))
    if out.ndim != 2 or out.shape[0] != len(x):
        raise InputError(f"the model must return (N, num_classes) logits, got shape {tuple(out.shape)} for "
                         f"{len(x)} images")
    if len(y) and int(y.max()) >= out.shape[1]:
        raise InputError(f"label {int(y.max())} is out of range for a model with {out.shape[1]} outputs")


def _several_outputs(out: Any, n: int) -> str:
    if isinstance(out, dict):
        key = "logits" if "logits" in out else next(iter(out), "KEY")
        return (f"the model returns a dict with keys {sorted(out)}, not a logits tensor; select the logits with "
                f"adv.models.SelectOutput(model, {key!r})")
    if not isinstance(out, (tuple, list)):
        if isinstance(getattr(out, "logits", None), torch.Tensor):
            return ("the model returns an object with .logits, not a tensor; select them with "
                    "adv.models.SelectOutput(model, 'logits')")
        return f"the model must return a logits tensor, got {type(out).__name__}"
    shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out]
    guess = next((i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.ndim == 2 and len(o) == n), 0)
    return (f"the model returns a {type(out).__name__} of {len(out)} outputs {shapes}, not a logits tensor; select "
            f"the logits with adv.models.SelectOutput(model, {guess})")


def prepare(model: nn.Module, data: Any, eps: Any, norm: str, device: torch.device
            ) -> tuple[Any, torch.Tensor | None]:
    """Check the budget, the data (converting numpy and integer labels) and the model; returns the data and
    its first images on ``device`` (None for empty data)."""
    check_budget(eps, norm)
    data = check_data(data)
    data, probe = first_examples(data)
    if probe is None:
        return data, None
    x = probe[0].to(device)
    check_model(model, x, probe[1].to(device))
    return data, x


#: Input normalizations networks are commonly trained with: (name, mean, std); the hint tries each.
COMMON_NORMALIZATIONS = (
    ("ImageNet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("CIFAR-10", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    ("MNIST", (0.1307,), (0.3081,)),
    ("[-1, 1]", (0.5,), (0.5,)),
)
#: Examples the normalization hint looks at, and the accuracy gain (fraction) that makes it speak.
HINT_EXAMPLES, HINT_GAIN = 256, 0.15


@torch.no_grad()
def normalization_hint(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """One line when ``model`` is much more accurate on ``x`` behind a common normalization than without one
    (a factory that forgot ``Normalize``); else None.

    A model that already normalizes only loses accuracy when normalized twice, so the check cannot fire on
    a correct model; it needs a gain of :data:`HINT_GAIN` and at least 10 more correct examples.
    """
    from adv.models.base import Normalize, eval_mode

    x, y = x[:HINT_EXAMPLES], y[:HINT_EXAMPLES]
    if not len(y):
        return None
    with eval_mode(model):
        out = model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:  # check_model names that mistake
            return None
        plain = int((out.argmax(1) == y).sum())
        best = None
        for name, mean, std in COMMON_NORMALIZATIONS:
            if len(mean) not in (1, x.shape[1]):
                continue
            norm = Normalize(mean * x.shape[1] if len(mean) == 1 else mean, std * x.shape[1] if len(std) == 1
                             else std).to(x.device)
            correct = int((model(norm(x)).argmax(1) == y).sum())
            if best is None or correct > best[0]:
                best = (correct, name, mean, std)
    if best is None or best[0] - plain < max(10, HINT_GAIN * len(y)):
        return None
    correct, name, mean, std = best
    return (f"normalization is probably missing: clean accuracy {plain / len(y):.0%} on the first {len(y)} images, "
            f"{correct / len(y):.0%} with the {name} normalization in front; return "
            f"nn.Sequential(adv.models.Normalize(mean={list(mean)}, std={list(std)}), net) from the factory "
            f"(or your training statistics)")
