"""Latency of ``QueryDetector.observe`` against the number of stored queries, and of the per-user SSIM layer
against one user's history (used by ``bench/query_detector.py``; not a benchmark of its own).

The stores are filled directly (random fingerprints into the index, random images into 1000 users'
histories): a lookup reads ``top_k`` buckets whatever they hold, and the per-user cost depends only on
that user's history, so realistic content would change nothing but the filling time.
"""

from __future__ import annotations

import time

import numpy as np
import torch

#: Image shapes measured, with the per-user ``downscale`` each uses (224x224 images are kept at 28x28).
SHAPES = {"28x28 gray": ((1, 28, 28), 1), "32x32 colour": ((3, 32, 32), 1), "224x224x3": ((3, 224, 224), 8)}


def _fill(det, stored: int, shape, users: int, rng: np.random.Generator) -> None:
    """Grow the detector's index to ``stored`` queries and its histories to ``stored // users`` each."""
    from adv.detectors.query_similarity import stored_image

    k = det.config.index.top_k
    for _ in range(stored - len(det)):
        det.index.insert(rng.integers(1, 2**63, k, dtype=np.uint64), int(rng.integers(1, 2**63)), 0.0, 1)
    if det.users is None:
        return
    base = stored_image(torch.rand(*shape), det.config.per_user.downscale).flatten().numpy()
    probs = np.full(10, 0.1, np.float32)
    for u in range(users):
        while det.users.history.stored(f"u{u}") < stored // users:
            det.users.history.add(f"u{u}", np.clip(base + 0.1 * rng.random(base.size, dtype=np.float32), 0, 1),
                                  probs, False, False, 0.0)


def _times(observe, shape, users: int, reps: int) -> np.ndarray:
    x, p = torch.rand(reps, *shape), torch.full((reps, 10), 0.1)
    out = []
    for i in range(reps):
        t = time.perf_counter()
        observe(x[i : i + 1], [f"u{i % users}"], p[i : i + 1])
        out.append(time.perf_counter() - t)
    return np.array(out) * 1e3


def detector_latency(stored=(10_000, 100_000), users: int = 1000, reps: int = 200, log=print) -> list[dict]:
    """p50/p90 ms of one-query ``observe`` for the combined detector and the index alone, per shape and size."""
    from adv.detectors import DetectorConfig, QueryDetector, SimilarityConfig

    rows = []
    for name, (shape, downscale) in SHAPES.items():
        per_user = SimilarityConfig(candidates=4, max_age=86_400.0, downscale=downscale)
        dets = {"combined": QueryDetector(DetectorConfig(per_user=per_user)),
                "index": QueryDetector(DetectorConfig(per_user=None, features=None))}
        rng = np.random.default_rng(0)
        for n in stored:
            row = {"image": name, "stored": n}
            for kind, det in dets.items():
                log(f"latency: {name}, {kind}, {n} stored queries")
                _fill(det, n, shape, users, rng)
                ms = _times(lambda x, u, p: det.observe(x, users=u, probs=p, now=1.0), shape, users, reps)
                row[f"{kind}_p50"], row[f"{kind}_p90"] = float(np.median(ms)), float(np.percentile(ms, 90))
            rows.append(row)
        del dets
    return rows


def per_user_latency(history=(10, 100, 1000), reps: int = 100, log=print) -> list[dict]:
    """p50 ms of the per-user SSIM layer (its own defaults: 16 candidates) against one user's history size."""
    from adv.detectors import PredictionSimilarityLayer, SimilarityConfig

    rows = []
    for name in ("28x28 gray", "32x32 colour"):
        shape = SHAPES[name][0]
        base = torch.rand(*shape).flatten().numpy()
        for h in history:
            log(f"latency: per-user SSIM layer, {name}, history {h}")
            layer = PredictionSimilarityLayer(None, SimilarityConfig(history=h))  # full ring: the size stays h
            rng = np.random.default_rng(0)
            for _ in range(h):
                layer.history.add("u0", np.clip(base + 0.1 * rng.random(base.size, dtype=np.float32), 0, 1),
                                  np.full(10, 0.1, np.float32), False, False, 0.0)
            ms = _times(lambda x, u, p: layer.observe(x, u, p, now=0.0), shape, 1, reps)
            rows.append({"image": name, "history": h, "p50": float(np.median(ms))})
    return rows
