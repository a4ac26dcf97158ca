"""Resumable evaluation state as JSON (after AutoAttack's ``state.py``).

The state is written atomically after every batch. It records a fingerprint
of the configuration (attacks, budget, batch size, seed, model weights) and
a hash of every finished batch, so a resumed run refuses to mix results of a
different model, attack list or data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adv.io import atomic_write_json

VERSION = 2  # 2: per-example clean mask and attack marks


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def batch_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class EvalState:
    config: dict[str, Any]
    batch_hashes: list[str] = field(default_factory=list)
    n: int = 0
    n_clean: int = 0
    n_robust: int = 0
    #: Per attack label: running sums (attacked, fooled, time, norms, queries).
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    flags: list[dict] = field(default_factory=list)
    #: Per example, in data order: "1" still robust, "0" not.
    robust_mask: str = ""
    #: Per example: "1" correct on the clean image, "0" not.
    clean_mask: str = ""
    #: Per attack label, per example: "-" not attacked, "0" attacked and survived, "1" fooled.
    marks: dict[str, str] = field(default_factory=dict)
    done: bool = False

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, {"version": VERSION, **self.__dict__})

    @classmethod
    def load(cls, path: str | os.PathLike, config: dict[str, Any]) -> "EvalState":
        """The saved state, or a fresh one when there is none; ValueError if it belongs to another run."""
        path = Path(path)
        if not path.is_file():
            return cls(config=config)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read evaluation state {path}: {exc}") from None
        if raw.pop("version", None) != VERSION:
            raise ValueError(f"{path} is not an adv evaluation state (version {VERSION}); delete it to start over")
        state = cls(**raw)
        if json.loads(json.dumps(config, default=str)) != state.config:
            raise ValueError(f"{path} was written by a different evaluation (model, attacks, eps, batch size "
                             "or seed differ); delete it or pass another state_path")
        return state
