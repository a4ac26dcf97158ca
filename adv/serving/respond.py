"""Response bodies: the same fields and types for every answered image, flagged or not.

``label``: ``{"label", "confidence"}``; ``topk``: adds ``"top_k"`` (``[{"label", "p"}]``);
``probs``: adds ``"probabilities"`` (K floats). A decision the detector
flagged under ``flag``/``deceive``/``fallback`` is shaped by the same code
from the probabilities the detector chose, so nothing in the body or the
status tells the caller it was flagged. ``block`` is the documented
exception: 403 with ``{"error": "refused", ...}`` (see ``BLOCKED``).
"""

from __future__ import annotations

import numpy as np

BLOCKED = (403, "refused: this query pattern is not served")


def prediction(probs: np.ndarray, output: str, top_k: int) -> dict:
    p = np.asarray(probs, np.float64)
    label = int(p.argmax())
    out = {"label": label, "confidence": round(float(p[label]), 6)}
    if output == "topk":
        order = np.argsort(-p, kind="stable")[:top_k]
        out["top_k"] = [{"label": int(k), "p": round(float(p[k]), 6)} for k in order]
    elif output == "probs":
        out["probabilities"] = [round(float(v), 6) for v in p]
    return out


def body(answers: list[dict], output: str, top_k: int) -> dict:
    return {"predictions": [prediction(a["probs"], output, top_k) for a in answers]}
