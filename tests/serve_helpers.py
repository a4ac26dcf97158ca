"""Serve test helpers (Ray-free): a tiny bundle, a key file, a free port, request bodies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from adv.serving.client import npy_bytes as npy  # noqa: F401  (the tests' .npy bodies)
from adv.serving.keys import hash_key

SHAPE = (1, 28, 28)
KEYS = {"alice": "alice-key-0001", "bob": "bob-key-00002", "carol": "carol-key-003", "dave": "dave-key-0004",
        "eve": "eve-key-00005", "mallory": "mallory-key-06", "limited": "limited-key-07", "ops": "ops-admin-key-8",
        "pair": "pair-key-00012", **{f"sybil{i}": f"sybil-key-{i:04d}" for i in range(3)}}
LIMITED = {"rate": 0.05, "burst": 2}  # the "limited" key's own rate limit
#: Keys with their own limits (images per second, bucket size in images).
OWN_LIMITS = {"limited": LIMITED, "pair": {"rate": 0.01, "burst": 4}}


def make_bundle(out: Path, *, query_detector: dict | None = None, stages: tuple[str, ...] = (),
                provenance: dict | None = None) -> Path:
    """A seeded, untrained lenet5 for 1x28x28 images in a bundle (serving needs no accuracy)."""
    from adv.bundle import write_bundle
    from adv.numbers import accuracy_number
    from adv.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, input_size=SHAPE)
    ckpt = save_checkpoint(out.parent / f"{out.name}-model.pt", model, dataset="synthetic")
    numbers = {"clean": accuracy_number(50, 100, label="clean", subset="synthetic[n=100]")}
    write_bundle(out, checkpoint=ckpt, stages=list(stages), query_detector=query_detector, numbers=numbers,
                 provenance=provenance or {"made_by": "tests/serve_helpers.py"})
    return out


def write_keys(path: Path, *, revoked: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> Path:
    """A key file with hashes only (ops is the admin)."""
    keys = {**KEYS, **(extra or {})}
    entries = [{"user": u, "sha256": hash_key(k), "role": "admin" if u == "ops" else "user",
                "revoked": u in revoked, **OWN_LIMITS.get(u, {})} for u, k in keys.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"keys": entries}))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def attacker_keys(path: Path, users: list[str]) -> Path:
    """The red-team harness's key file: the attacker's plain keys and the operator's admin key."""
    entries = [{"user": u, "key": KEYS[u]} for u in users] + [{"user": "ops", "key": KEYS["ops"], "role": "admin"}]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def png(image: np.ndarray) -> bytes:
    """(H, W) or (1, H, W) in [0, 1] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray((np.asarray(image).reshape(SHAPE[1:]) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()




def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[user]}"}
