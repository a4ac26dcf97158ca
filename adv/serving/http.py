"""The endpoint's HTTP answers, Ray-free: who is calling, how a request's outcome becomes a response.

``jobs.serve`` mounts these in its FastAPI ingress. Every client error is a
4xx with one line (``{"error": reason}``); a backend that cannot answer is 503
with ``Retry-After``; nothing here ever produces a 500.
"""

from __future__ import annotations

import math
import time

import numpy as np
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adv.serving.config import ServeConfig
from adv.serving.decode import RequestError
from adv.serving.keys import Identity, KeyRing
from adv.serving.respond import BLOCKED, body as response_body

#: The ``Authorization: Bearer KEY`` dependency; ``auto_error=False`` so a missing key gets this endpoint's own
#: 401 body (FastAPI's default is a 403 with its own wording).
bearer = HTTPBearer(auto_error=False)
#: What the model returns for a request whose output was not finite (NaN or inf): that request alone is a 503.
NON_FINITE = "non-finite model output"


def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def unavailable(reason: str = "temporarily unavailable; retry") -> JSONResponse:
    return error(503, reason, {"Retry-After": "2"})


def identify(keys: KeyRing, credentials: HTTPAuthorizationCredentials | None,
             admin: bool = False) -> tuple[Identity | None, JSONResponse | None]:
    """The caller's identity, or its 401/403 answer (``admin``: the key must have the admin role)."""
    if credentials is None or not credentials.credentials.strip():
        return None, error(401, "missing API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
    who = keys.lookup(credentials.credentials.strip())
    if who is None:
        return None, error(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
    if who.revoked:
        return None, error(403, "this API key is revoked")
    if admin and who.role != "admin":
        return None, error(403, "admin key required")
    return who, None


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (Serve itself sets no limit)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise RequestError(413, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def finite_items(sizes: list[int], probs: np.ndarray) -> tuple[list[bool], np.ndarray]:
    """Per request of a batch (``sizes`` images each), whether all its outputs are finite, and the row mask of
    the finite requests: one bad image fails its own request, never the batch."""
    rows = np.isfinite(probs).all(axis=1)
    ok, start = [], 0
    for n in sizes:
        ok.append(bool(rows[start : start + n].all()))
        start += n
    return ok, np.repeat(np.array(ok, bool), sizes)


class Refusals:
    """Per user, until when the owner said to wait. The model runs before the owner admits (one owner call per
    batch), so a replica refuses a user itself until its ``Retry-After``: a client that ignores 429s does not
    cost a model run per request. It never admits anyone the owner would refuse."""

    def __init__(self, bound: int = 10_000):
        self.bound, self._until = bound, {}

    def waiting(self, user: str) -> float:
        """Seconds ``user`` still has to wait (<= 0: none)."""
        return self._until.get(user, 0.0) - time.monotonic()

    def refuse(self, user: str, wait: float) -> JSONResponse:
        """429 with ``Retry-After``, remembered until then."""
        wait = max(1, math.ceil(wait))
        now = time.monotonic()
        if len(self._until) > self.bound:  # bounded: forget the waits already over
            self._until = {u: t for u, t in self._until.items() if t > now}
        self._until[user] = max(self._until.get(user, 0.0), now + wait)
        return error(429, f"rate limit or quota exceeded; retry in {wait} s", {"Retry-After": str(wait)})


def outcome_response(result: dict | str, cfg: ServeConfig, refusals: Refusals, user: str) -> JSONResponse:
    """One request's outcome from the batch (``{"answers"}``, ``{"wait"}``, ``{"too_large"}`` or
    :data:`NON_FINITE`) as its HTTP answer; a flagged answer looks like any other (adv.serving.respond)."""
    if result == NON_FINITE:
        return unavailable()
    if "too_large" in result:
        return error(413, result["too_large"])
    if "wait" in result:
        return refusals.refuse(user, result["wait"])
    answers = result["answers"]
    if any(a["blocked"] for a in answers):
        return error(*BLOCKED)
    return JSONResponse(response_body(answers, cfg.output, cfg.top_k))


class LostReplica:
    """ASGI middleware for Serve's HTTP proxy: a request whose replica died before answering (killed, out of
    memory, its node lost) gets 503 with ``Retry-After``, as any other backend failure here does. Serve's
    proxy sends no response then and its server answers a bare 500; the replica itself cannot answer once
    dead. Installed through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (:func:`proxy_middlewares`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, receive, tracked)
        if not started:
            await unavailable()(scope, receive, send)


def proxy_middlewares() -> list:
    """The middlewares of Serve's HTTP proxy (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names this)."""
    from starlette.middleware import Middleware

    return [Middleware(LostReplica)]
