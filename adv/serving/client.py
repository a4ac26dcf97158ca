"""Talking to the endpoint: an HTTP client, and the counted HTTP oracle the red-team harness attacks through.

:class:`HttpOracle` is a :class:`adv.attacks.oracle.QueryOracle` whose model is
the live endpoint, so the library's query attacks run against it unchanged
and every query is counted. It rotates requests over the attacker's accounts
(``keys``; more than one is the Sybil attacker) and learns nothing from the
answers but labels and scores. Against the default label-only endpoint a
score-based attack gets a proxy: the top-1 confidence on the returned class
and the rest spread evenly over the other classes (what the caller can infer).

Shape: oracle(x (n, C, H, W) in [0, 1]) -> probs (n, K) or labels (n,)
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from adv.attacks.oracle import QueryOracle
from adv.errors import AdvError


class EndpointError(AdvError):
    """The endpoint answered with an unexpected status; the message has the status and the server's reason."""


class Endpoint:
    """``Endpoint(url).predict(x, key) -> list[dict]`` (the ``predictions`` of one request)."""

    def __init__(self, url: str, *, timeout: float = 60.0, max_waits: int = 50):
        import httpx

        self.url, self.max_waits = url.rstrip("/"), max_waits
        self.http = httpx.Client(timeout=timeout)
        self.rate_limited = 0  # 429 answers waited out
        self.latencies: list[float] = []  # seconds per answered predict request

    def close(self) -> None:
        self.http.close()

    def predict(self, x: np.ndarray, key: str) -> list[dict]:
        """One request with the batch ``x``; waits out 429s (``Retry-After``), raises on any other error."""
        body = npy_bytes(np.asarray(x, np.float32))
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}
        for _ in range(self.max_waits):
            t0 = time.perf_counter()
            r = self._send("POST", "/v1/predict", content=body, headers=headers)
            self.latencies.append(time.perf_counter() - t0)
            if r.status_code == 429:
                self.rate_limited += 1
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code == 403 and r.json().get("error", "").startswith("refused"):
                return [{"blocked": True}] * len(x)
            if r.status_code != 200:
                raise EndpointError(f"POST /v1/predict answered {r.status_code}: {_reason(r)}")
            return r.json()["predictions"]
        raise EndpointError(f"still rate-limited after {self.max_waits} waits")

    def get(self, path: str, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = self._send("GET", path, headers=headers)
        if r.status_code != 200:
            raise EndpointError(f"GET {path} answered {r.status_code}: {_reason(r)}")
        return r.json()

    def _send(self, method: str, path: str, **kwargs):
        """One HTTP request; a connection failure or a malformed URL is one line, not httpx's traceback."""
        import httpx

        try:
            return self.http.request(method, f"{self.url}{path}", **kwargs)
        except (httpx.TransportError, httpx.InvalidURL) as e:
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise EndpointError(f"cannot reach {self.url} ({method} {path}): {type(e).__name__}"
                                + (f": {detail}" if detail else "")) from None


def npy_bytes(x: np.ndarray) -> bytes:
    """An ``application/x-npy`` body (dtype kept; never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def _reason(r) -> str:
    try:
        return str(r.json().get("error", r.text))[:200]
    except ValueError:
        return r.text[:200]


def scores(pred: dict, classes: int) -> np.ndarray:
    """The probability vector a caller can reconstruct from one prediction (uniform when blocked)."""
    if pred.get("blocked"):
        return np.full(classes, 1.0 / classes, np.float32)
    if "probabilities" in pred:
        return np.asarray(pred["probabilities"], np.float32)
    p = np.zeros(classes, np.float32)
    known = pred.get("top_k") or [{"label": pred["label"], "p": pred["confidence"]}]
    for item in known:
        p[item["label"]] = item["p"]
    rest = [k for k in range(classes) if k not in {item["label"] for item in known}]
    if rest:
        p[rest] = max(0.0, 1.0 - float(p.sum())) / len(rest)
    return p


class HttpOracle(QueryOracle):
    """Queries go to ``endpoint`` as batches of at most ``max_images``, request ``i`` under ``keys[i % K]``.

    ``log`` records, per request, the attacker's query count after it and the account used, so the flag
    times the admin endpoint reports per account map back onto the attacker's own query count.
    """

    def __init__(self, endpoint: Endpoint, keys: list[str], *, output: str, classes: int, max_images: int = 16):
        super().__init__(model=None, output=output)
        if not keys:
            raise ValueError("HttpOracle needs at least one API key")
        self.endpoint, self.keys, self.classes, self.max_images = endpoint, list(keys), classes, max_images
        self.requests = 0
        self.blocked = 0
        #: per request: (attacker's queries so far, account index, that account's queries so far)
        self.log: list[tuple[int, int, int]] = []
        self._mine: dict[int, int] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        self.accept(x, rows)
        out = []
        sent = self.total - len(x)
        for chunk in x.detach().cpu().float().split(self.max_images):
            account = self.requests % len(self.keys)
            preds = self.endpoint.predict(chunk.numpy(), self.keys[account])
            self.requests += 1
            sent += len(chunk)
            self._mine[account] = self._mine.get(account, 0) + len(chunk)
            self.log.append((sent, account, self._mine[account]))
            self.blocked += sum(bool(p.get("blocked")) for p in preds)
            out.append(np.stack([scores(p, self.classes) for p in preds]))
        probs = torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, self.classes)
        if self.output == "probs":
            return probs.to(x.device)
        labels = probs.argmax(1)
        labels[probs.max(1).values <= 1.0 / self.classes + 1e-9] = -1  # blocked: no class
        return labels.to(x.device)

    def flagged_at(self, per_account: dict[int, int]) -> int | None:
        """The attacker's query count at its first flag, from each account's 1-based first-flagged query
        number in this run (``{account: n}``, from the admin endpoint); None when never flagged."""
        best = None
        for sent, account, mine in self.log:
            n = per_account.get(account)
            if n is not None and mine >= n:  # the flagged query was in this request
                at = sent - (mine - n)
                best = at if best is None else min(best, at)
        return best
