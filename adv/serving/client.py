"""Talking to the endpoint: an HTTP client, and the counted HTTP oracle the red-team harness attacks through.

:class:`HttpOracle` is a :class:`adv.attacks.oracle.QueryOracle` whose model is
the live endpoint, so the library's query attacks run against it unchanged
and every query is counted. It rotates requests, or each image's queries,
over the attacker's accounts (``keys``; more than one is the Sybil attacker),
can transform every query at random (noise, shift, brightness) and adapt
that to refusals (:class:`Oars`), and learns nothing from the answers but
labels and scores. Against the default label-only endpoint a
score-based attack gets a proxy: the top-1 confidence on the returned class
and the rest spread evenly over the other classes (what the caller can infer).

Shape: oracle(x (n, C, H, W) in [0, 1]) -> probs (n, K) or labels (n,)
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from pydantic import BaseModel, ConfigDict, Field

from adv.attacks.oracle import QueryOracle
from adv.errors import AdvError
from adv.evaluate.query_detection import perturb

#: How an attacker spreads its queries over its accounts.
ROTATIONS = ("request", "query")


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


class Oars(BaseModel):
    """The adaptive attacker of Feng et al., CCS 2023 (OARS, "oracle-guided adaptive rejection sampling"):
    when a query is refused it is sent again with a fresh random transform at a larger scale, and the scale
    it learned carries over to later queries (shrinking back while queries pass). Its only signal is a
    refusal (``block``); under ``flag``/``deceive`` answers look alike and it adapts to nothing."""

    model_config = ConfigDict(extra="forbid")

    #: Scale factor applied to the transform after a refusal, and its decay (toward 1) after an answer.
    grow: float = Field(1.5, gt=1.0)
    decay: float = Field(0.9, gt=0.0, lt=1.0)
    #: Largest scale of the transform's magnitudes.
    max_scale: float = Field(4.0, ge=1.0)
    #: Resends of one refused query before its refusal is accepted as the answer.
    retries: int = Field(3, ge=0, le=20)


class HttpOracle(QueryOracle):
    """Queries go to ``endpoint`` as batches of at most ``max_images`` under the attacker's accounts ``keys``.

    ``rotation="request"`` sends request ``i`` under ``keys[i % K]`` (a batch rides one key);
    ``rotation="query"`` spreads each image's queries over the accounts (example ``r``'s ``k``-th query under
    ``keys[(r + k) % K]``), grouping one call's queries by account. ``transform`` (an
    :class:`adv.evaluate.query_detection.Transform`) changes every query at random before it is sent (a new
    draw per query); ``oars`` adapts its scale to refusals (:class:`Oars`).

    ``log`` records, per request, the attacker's query count after it and the account used, so the flag
    times the admin endpoint reports per account map back onto the attacker's own query count.
    """

    def __init__(self, endpoint: Endpoint, keys: list[str], *, output: str, classes: int, max_images: int = 16,
                 rotation: str = "request", transform=None, oars: Oars | None = None, seed: int = 0):
        super().__init__(model=None, output=output)
        if not keys:
            raise ValueError("HttpOracle needs at least one API key")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if oars is not None and transform is None:
            raise ValueError("an OARS attacker adapts a transform: give one")
        self.endpoint, self.keys, self.classes, self.max_images = endpoint, list(keys), classes, max_images
        self.rotation, self.transform, self.oars = rotation, transform, oars
        self.scale = 1.0  # the OARS attacker's current transform scale
        self.requests = 0
        self.blocked = 0
        self.resent = 0  # OARS resends after a refusal (counted in ``total`` too)
        #: per request: (attacker's queries so far, account index, that account's queries so far)
        self.log: list[tuple[int, int, int]] = []
        self._mine: dict[int, int] = {}
        self._sent: dict[int, int] = {}  # example -> its queries so far (per-query rotation)
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.accept(x, rows)
        x = x.detach().cpu().float()
        probs = self._ask(x, rows)
        if self.oars is not None:
            probs = self._adapt(x, rows, probs)
        if self.output == "probs":
            return probs.to(x.device)
        labels = probs.argmax(1)
        labels[probs.max(1).values <= 1.0 / self.classes + 1e-9] = -1  # blocked: no class
        return labels

    def _accounts(self, rows: torch.Tensor) -> list[int]:
        if self.rotation == "request":
            return [self.requests % len(self.keys)] * len(rows)
        out = []
        for r in rows.tolist():
            k = self._sent.get(r, 0)
            self._sent[r] = k + 1
            out.append((r + k) % len(self.keys))
        return out

    def _ask(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Send ``x`` (transformed when asked) and return what each query was answered, (n, K)."""
        sent = x
        if self.transform is not None:
            t = self.transform if self.scale == 1.0 else scaled(self.transform, self.scale)
            sent = perturb(x, t, self._gen)
        probs = torch.zeros(len(x), self.classes)
        if self.rotation == "request":
            for start in range(0, len(x), self.max_images):
                part = torch.arange(start, min(start + self.max_images, len(x)))
                probs[part] = self._request(sent[part], self.requests % len(self.keys))
            return probs
        accounts = torch.tensor(self._accounts(rows))
        for account in accounts.unique().tolist():
            mine = (accounts == account).nonzero().flatten()
            for part in mine.split(self.max_images):
                probs[part] = self._request(sent[part], account)
        return probs

    def _request(self, chunk: torch.Tensor, account: int) -> torch.Tensor:
        preds = self.endpoint.predict(chunk.numpy(), self.keys[account])
        self.requests += 1
        self._mine[account] = self._mine.get(account, 0) + len(chunk)
        self.log.append((sum(self._mine.values()), account, self._mine[account]))
        self.blocked += sum(bool(p.get("blocked")) for p in preds)
        return torch.from_numpy(np.stack([scores(p, self.classes) for p in preds]))

    def _adapt(self, x: torch.Tensor, rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """OARS: resend refused queries with a larger transform until answered (or ``retries`` run out)."""
        cfg = self.oars
        for _ in range(cfg.retries + 1):
            refused = (probs.max(1).values <= 1.0 / self.classes + 1e-9).nonzero().flatten()
            if not len(refused):
                self.scale = max(1.0, self.scale * cfg.decay)
                break
            self.scale = min(cfg.max_scale, self.scale * cfg.grow)
            if _ == cfg.retries:
                break
            self.accept(x[refused], rows[refused])  # a resend is a query like any other
            self.resent += len(refused)
            probs[refused] = self._ask(x[refused], rows[refused])
        return probs

    @property
    def accounts_used(self) -> list[int]:
        """The accounts that sent at least one query."""
        return sorted(self._mine)

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


def scaled(transform, factor: float):
    """``transform`` with its magnitudes (noise, brightness, shift, crop) multiplied by ``factor``."""
    update = {k: min(1.0, v * factor) for k in ("noise", "uniform", "brightness") if (v := getattr(transform, k))}
    update.update({k: int(round(v * factor)) for k in ("shift", "crop") if (v := getattr(transform, k))})
    return transform.model_copy(update=update)
