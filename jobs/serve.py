"""Ray Serve: the defended model of a bundle behind an authenticated HTTP endpoint, with the query detector.

    python -m jobs.serve --bundle DIR [--host 127.0.0.1] [--port 8000] [--keys keys.yaml] [--config serve.yaml]
    serve run cluster/serve-config.yaml          # or: serve deploy, or KubeRay's RayService

Locally it starts an embedded Ray, serves until SIGINT/SIGTERM, then shuts
Serve down. With ``--address`` or ``$RAY_ADDRESS`` it deploys on that
cluster and exits; ``--shutdown --address ...`` removes Serve and the state
owner(s) (``serve shutdown`` leaves the detached owner running). Before
deploying, the driver checks the keys, the bundle and the detector config
(one line, exit 2) and hands ``$ADV_SERVE_KEYS`` to the replicas hashed, since
a cluster's replicas never see the deploying shell's environment. The
application (``build``) has three parts:

* ``Gateway`` (FastAPI ingress): keys, limits, decoding, response shaping
  (``adv.serving``); never answers 500: client errors are 4xx with one line,
  an unreachable backend (or a model output that is not finite) is 503 with
  ``Retry-After``. Bodies are decoded on a small thread pool, never on the
  event loop; rate limits and quotas are charged per image, by the owner, in
  the same call as the detector update (a refused user is then refused by
  the gateway itself until its ``Retry-After``).
  ``/healthz`` is the deep check (model and owner), cached for
  ``health_cache_s``; ``/livez`` is the cheap liveness route.
* ``DefendedModel``: the bundle's stages and classifier under ``@serve.batch``,
  inference in a worker thread so the event loop never blocks; then **one**
  owner call per batch (``step``: admission, detector update, durable).
* the **state owner**: one named, detached actor (``adv-detector-<name>``)
  holding the detector and the per-key ledger (``adv.serving.owner``). A
  named actor rather than a Serve ``deployment_actors`` entry because it must
  outlive any replica (no fate-sharing with the replica that created it) and
  restart by itself (``max_restarts=-1``), reloading from its durable state;
  replicas refresh their handle and retry while it restarts. It is a threaded
  actor: concurrent batches decide in turn and share one log write and one
  fsync (group commit, ``adv.serving.owner``). With ``shards: N`` there are N
  such actors (``StateShard``, ``adv.serving.shards``): users by user, the
  indexes by hash; the replica drives three parallel rounds per batch and
  merges (docs/serving.md).
"""


import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from adv.errors import ConfigError
from adv.serving.config import ServeConfig, autoscaling_config, owner_name
from adv.serving.decode import RequestError, decode
from adv.serving.keys import KeyEntry, KeyRing, env_entries
from adv.serving.ledger import largest_request
from adv.serving.respond import BLOCKED, body as response_body
from jobs import common
from jobs.common import guarded, init_ray, logger
from adv.validation import validate_mapping

NAMESPACE = "adv-serve"
log = logger("serve")


#: Threads of an owner actor: concurrent steps decide one at a time and share one log write (group commit).
OWNER_THREADS = 16


class OwnerUnavailable(Exception):
    """The state owner did not answer within ``owner_timeout_s`` (it may be restarting)."""


def parse_config(args: dict) -> ServeConfig:
    return validate_mapping(ServeConfig, args, "serve config")


def detector_config(cfg: ServeConfig, bundle) -> dict:
    """The query detector's config: the serve config's, else the bundle's, else the defaults."""
    from adv.detectors import DetectorConfig

    raw = cfg.detector if cfg.detector is not None else (bundle.query_detector or {})
    return validate_mapping(DetectorConfig, raw, "query detector config").model_dump(mode="json")


# ---- the state owner --------------------------------------------------------------------------------------

class DetectorMetrics:
    """Alarms and actions as Prometheus counters, counted where the decision is made: the single owner, or
    with shards the replica that merges."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.alarms = Counter("adv_serve_alarms", "detector alarms raised, by kind", tag_keys=("alarm",))
        self.actions = Counter("adv_serve_actions", "detector actions taken on suspicious queries",
                               tag_keys=("action",))

    def count(self, answers: list[dict]) -> None:
        for a in answers:
            for alarm in a["alarms"]:
                self.alarms.inc(tags={"alarm": alarm})
            if a["action"] != "none":
                self.actions.inc(tags={"action": a["action"]})


class StateOwner:
    """The Ray actor around :class:`adv.serving.owner.DetectorOwner`; counts alarms and actions as metrics."""

    def __init__(self, config: dict, detector: dict):
        from adv.detectors import DetectorConfig
        from adv.serving.owner import DetectorOwner

        self.owner = DetectorOwner(ServeConfig.model_validate(config), DetectorConfig.model_validate(detector))
        self.metrics = DetectorMetrics()

    def step(self, x: np.ndarray, requests: list[tuple[str, dict | None, int]], probs: np.ndarray) -> list[dict]:
        """One call per batch: admission and the detector update, durable before returning (group commit)."""
        from adv.serving.owner import Request

        outcomes = self.owner.step(x, [Request(*r) for r in requests], probs)
        self.metrics.count([a for o in outcomes for a in o.get("answers", ())])
        return outcomes

    def observe(self, x: np.ndarray, users: list[str], probs: np.ndarray) -> list[dict]:
        answers = self.owner.observe(x, users, probs)
        self.metrics.count(answers)
        return answers

    def stats(self, user: str) -> dict:
        return self.owner.stats(user)

    def totals(self) -> dict:
        return self.owner.totals()

    def ping(self) -> bool:
        return True


class StateShard:
    """The Ray actor around shard ``shard`` of :class:`adv.serving.shards.Shard` (``shards`` > 1): its rounds
    of a batch (``admit``, ``lookup``, ``commit``), its users' stats, its totals."""

    def __init__(self, config: dict, detector: dict, shard: int):
        from adv.detectors import DetectorConfig
        from adv.serving.shards import Shard

        self.shard = Shard(ServeConfig.model_validate(config), DetectorConfig.model_validate(detector), shard)

    def admit(self, *args):
        return self.shard.admit(*args)

    def lookup(self, *args):
        return self.shard.lookup(*args)

    def commit(self, *args):
        return self.shard.commit(*args)

    def detector_config(self) -> dict:
        """The detector config this shard's state was made with (the replicas decide with it)."""
        return self.shard.detector.model_dump(mode="json")

    def stats(self, user: str) -> dict:
        return self.shard.stats(user)

    def totals(self) -> dict:
        return self.shard.totals()

    def ping(self) -> bool:
        return True


def get_owner(config: dict, detector: dict, shard: int = 0):
    """The application's owner actor (or shard ``shard`` of several), created on first use (by whichever
    replica asks first)."""
    import ray

    cfg = ServeConfig.model_validate(config)
    cls, args = (StateOwner, (config, detector)) if cfg.shards == 1 else (StateShard, (config, detector, shard))
    actor = ray.remote(cls).options(
        name=owner_name(cfg, shard), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
        num_cpus=cfg.owner_num_cpus, max_concurrency=OWNER_THREADS)
    return actor.remote(*args)


def kill_owner(cfg: ServeConfig, *, restart: bool = False, shard: int = 0) -> bool:
    """Kill the owner actor, or shard ``shard`` of several (``restart``: let Ray restart it, as a crash
    would); False when there is none."""
    return _kill_named(owner_name(cfg, shard), restart=restart)


def _kill_named(name: str, *, restart: bool = False) -> bool:
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=not restart)
    return True


class OwnerClient:
    """A replica's handle on the owner: refreshed and retried (with backoff) while the owner restarts."""

    def __init__(self, config: dict, detector: dict, timeout_s: float, shard: int = 0):
        self.config, self.detector, self.timeout_s, self.shard = config, detector, timeout_s, shard
        self._handle = None

    async def call(self, method: str, *args, timeout_s: float | None = None):
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            try:
                if self._handle is None:
                    self._handle = await asyncio.to_thread(get_owner, self.config, self.detector, self.shard)
                left = max(0.1, deadline - time.monotonic())
                return await asyncio.wait_for(getattr(self._handle, method).remote(*args), left)
            # only an unreachable owner is retried; its own errors (a failed write) give the request a 503
            except (RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError, asyncio.TimeoutError):
                self._handle = None  # stale: the actor died or is restarting; look it up again
                if time.monotonic() + delay > deadline:
                    raise OwnerUnavailable(f"detector state owner unreachable for {timeout_s:.0f} s") from None
                await asyncio.sleep(delay)
                # a short cap: a call to a restarting owner fails within ~2 s anyway, and a longer sleep only
                # delays the first answer after it is back (Ray's restart, not this loop, is the wait)
                delay = min(2 * delay, 0.25)


# ---- the defended model -----------------------------------------------------------------------------------

#: What ``DefendedModel.predict`` returns for a request whose model output was not finite (NaN or inf).
NON_FINITE = "non-finite model output"


def finite_items(sizes: list[int], probs: np.ndarray) -> tuple[list[bool], np.ndarray]:
    """Per request of a batch (``sizes`` images each), whether all its outputs are finite, and the row mask of
    the finite requests: one bad image fails its own request, never the batch."""
    rows = np.isfinite(probs).all(axis=1)
    ok, start = [], 0
    for n in sizes:
        ok.append(bool(rows[start : start + n].all()))
        start += n
    return ok, np.repeat(np.array(ok, bool), sizes)


@serve.deployment
class DefendedModel:
    """The bundle's stages plus classifier, batched; each batch is decided by the owner before answering."""

    def __init__(self, config: dict):
        import torch

        from adv.bundle import load_bundle

        torch.set_num_threads(1)  # replicas get a fraction of a core; more threads only contend
        cfg = ServeConfig.model_validate(config)
        bundle = load_bundle(cfg.bundle)
        self.model = bundle.build(device=cfg.device)
        self.device = next(self.model.parameters()).device
        self.info_ = {"shape": tuple(bundle.manifest["classifier"]["input_size"]),
                      "classes": int(bundle.manifest["classifier"]["num_classes"]),
                      "manifest": bundle.public_manifest()}
        detector = detector_config(cfg, bundle)
        self.owners = [OwnerClient(config, detector, cfg.owner_timeout_s, s) for s in range(cfg.shards)]
        self.owner = self.owners[0]
        self._detector = None  # the shards' detector config (asked once): the merge in this replica uses it
        self.metrics = DetectorMetrics() if cfg.shards > 1 else None
        c, h, w = self.info_["shape"]  # a fixed textured probe for health checks (a blank image is degenerate)
        self._probe = np.random.default_rng(0).random((1, c, h, w), dtype=np.float32)
        self._predict.set_max_batch_size(cfg.scaling.max_batch_size)
        self._predict.set_batch_wait_timeout_s(cfg.scaling.batch_wait_timeout_s)

    def info(self) -> dict:
        return self.info_

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x).to(self.device)).softmax(1).float().cpu().numpy()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict(self, items: list[tuple[np.ndarray, str, dict | None]]) -> list[dict | str]:
        x = np.concatenate([im for im, *_ in items])
        probs = await asyncio.to_thread(self._infer, x)  # off the event loop
        ok, keep = finite_items([len(im) for im, *_ in items], probs)
        outcomes = iter([])
        if keep.any():  # one owner call: admission, then the detector records only what is answered
            requests = [(user, limits, len(im)) for (im, user, limits), good in zip(items, ok) if good]
            if len(self.owners) == 1:
                outcomes = iter(await self.owner.call("step", x[keep], requests, probs[keep]))
            else:
                outcomes = iter(await self._sharded_step(x[keep], requests, probs[keep]))
        out = []
        for good in ok:  # only what the gateway needs: never the alarms
            if not good:  # this request only: the rest of the batch is answered
                out.append(NON_FINITE)
                continue
            o = next(outcomes)
            out.append({k: v for k, v in o.items() if k != "answers"} if "answers" not in o else
                       {"answers": [{"probs": a["probs"], "blocked": a["blocked"]} for a in o["answers"]]})
        return out

    async def predict(self, x: np.ndarray, user: str, limits: dict | None = None) -> dict | str:
        """One request's outcome: ``{"answers": [...]}``, ``{"wait": s}`` (rate limit or quota),
        ``{"too_large": reason}``, or :data:`NON_FINITE` when the model's output was not finite."""
        return await self._predict((x, user, limits or None))

    async def _sharded_step(self, x: np.ndarray, requests: list[tuple], probs: np.ndarray) -> list[dict]:
        """:func:`adv.serving.shards.protocol` with each round's calls in parallel, one per shard; the merge
        runs here, in the replica, so the shards only look up and store."""
        from adv.detectors import DetectorConfig
        from adv.serving.owner import Request
        from adv.serving.shards import protocol

        if self._detector is None:
            self._detector = DetectorConfig.model_validate(await self.owner.call("detector_config"))
        gen = protocol(self._detector, len(self.owners), x, [Request(*r) for r in requests], probs)
        # the generator's work (fingerprints, the merge) runs off the event loop; a StopIteration cannot cross
        # a thread's future, so each step says whether the protocol is done
        done, value = await asyncio.to_thread(_advance, gen, None)
        while not done:
            results = await asyncio.gather(*(self.owners[c.shard].call(c.method, *c.args) for c in value))
            done, value = await asyncio.to_thread(_advance, gen, list(results))
        outcomes = value
        self.metrics.count([a for o in outcomes for a in o.get("answers", ())])
        return outcomes

    async def owner_call(self, method: str, *args, timeout_s: float | None = None):
        """An admin read: a user's stats (from their shard), the totals (summed over shards), or a ping."""
        from adv.serving.shards import totals, user_shard

        if len(self.owners) == 1:
            return await self.owner.call(method, *args, timeout_s=timeout_s)
        if method == "stats":
            return await self.owners[user_shard(args[0], len(self.owners))].call(method, *args, timeout_s=timeout_s)
        parts = await asyncio.gather(*(o.call(method, *args, timeout_s=timeout_s) for o in self.owners))
        return totals(list(parts)) if method == "totals" else all(parts)

    async def health(self) -> bool:
        """A real check: the model answers on a textured probe and the state owner is reachable."""
        await asyncio.to_thread(self._infer, self._probe)
        return await self.owner_call("ping", timeout_s=5.0)

    def check_health(self) -> None:
        self._infer(self._probe)


def _advance(gen, value) -> tuple[bool, object]:
    """Resume the generator ``gen`` with ``value``: (False, what it yields) or (True, what it returns)."""
    try:
        return False, (next(gen) if value is None else gen.send(value))
    except StopIteration as done:
        return True, done.value


# ---- the ingress ------------------------------------------------------------------------------------------

api = FastAPI(title="adv defended model", docs_url=None, redoc_url=None, openapi_url=None)


def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
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


@serve.deployment
@serve.ingress(api)
class Gateway:
    """Authentication, per-key limits (held by the owner), decoding, and response shaping."""

    def __init__(self, model, config: dict, env_keys: list[dict] | None = None):
        from ray.util.metrics import Counter, Histogram

        self.model = model
        self.cfg = ServeConfig.model_validate(config)
        # env_keys: the deploying driver's $ADV_SERVE_KEYS, hashed (a remote replica's environment lacks it)
        self.keys = (KeyRing(self.cfg.keys, self.cfg.keys_env, on_error=self.cfg.keys_on_error) if env_keys is None
                     else KeyRing(self.cfg.keys, None, entries=tuple(KeyEntry(**e) for e in env_keys),
                                  on_error=self.cfg.keys_on_error))
        self._info: dict | None = None
        self._decoder = ThreadPoolExecutor(self.cfg.limits.decode_workers, thread_name_prefix="adv-decode")
        self._health: tuple[float, str | None] = (-float("inf"), None)  # (checked at, failure or None)
        self._health_lock = asyncio.Lock()
        self._refused: dict[str, float] = {}  # user -> monotonic time until which the owner said to wait
        self.requests = Counter("adv_serve_requests", "HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("adv_serve_latency_s", "request latency in seconds",
                                 boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                                 tag_keys=("route",))

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    def _identify(self, request: Request):
        """The caller's identity, or the 401/403 answer."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None, error(401, "missing API key: send Authorization: Bearer KEY",
                               {"WWW-Authenticate": "Bearer"})
        who = self.keys.lookup(key.strip())
        if who is None:
            return None, error(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
        if who.revoked:
            return None, error(403, "this API key is revoked")
        return who, None

    def _refuse(self, user: str, wait: float) -> JSONResponse:
        """429 with ``Retry-After``; until then this replica refuses the user itself. The model runs before
        the owner admits (one owner call per batch), so this keeps a client that ignores Retry-After from
        costing a model run per request; it never admits anyone the owner would refuse."""
        wait = max(1, math.ceil(wait))
        now = time.monotonic()
        if len(self._refused) > 10_000:  # bounded: forget the waits already over
            self._refused = {u: t for u, t in self._refused.items() if t > now}
        self._refused[user] = max(self._refused.get(user, 0.0), now + wait)
        return error(429, f"rate limit or quota exceeded; retry in {wait} s", {"Retry-After": str(wait)})

    def _done(self, route: str, t0: float, response: JSONResponse) -> JSONResponse:
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.latency.observe(time.perf_counter() - t0, tags={"route": route})
        return response

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        t0 = time.perf_counter()
        return self._done("predict", t0, await self._predict(request))

    async def _predict(self, request: Request) -> JSONResponse:
        who, refusal = self._identify(request)
        if refusal is not None:
            return refusal
        waited = self._refused.get(who.user, 0.0) - time.monotonic()
        if waited > 0:  # told to wait and not waited out: refused here, without running the model again
            return self._refuse(who.user, waited)
        unavailable = error(503, "temporarily unavailable; retry", {"Retry-After": "2"})
        try:
            raw = await read_body(request, self.cfg.limits.max_body_bytes)
            info = await self.info()
            x = await asyncio.get_running_loop().run_in_executor(  # off the event loop, on a bounded pool
                self._decoder, decode, raw, request.headers.get("content-type"), info["shape"], self.cfg.limits)
            if len(x) > largest_request(self.cfg.rate_limit, dict(who.limits)):
                raise RequestError(413, f"{len(x)} images exceed this key's per-request limit of "
                                        f"{largest_request(self.cfg.rate_limit, dict(who.limits))}")
            result = await self.model.predict.remote(x, who.user, dict(who.limits))  # admitted by the owner
            if result == NON_FINITE:
                log(f"predict for user {who.user}: {NON_FINITE}; answered 503")
                return unavailable
            if "too_large" in result:
                raise RequestError(413, result["too_large"])
            if "wait" in result:
                return self._refuse(who.user, result["wait"])
            answers = result["answers"]
            if any(a["blocked"] for a in answers):
                return error(*BLOCKED)
            return JSONResponse(response_body(answers, self.cfg.output, self.cfg.top_k))
        except RequestError as e:
            return error(e.status, e.reason)
        except Exception as e:  # the backend, not the client: 503 with a retry hint, never a 500
            log(f"predict failed for user {who.user}: {type(e).__name__}")  # no key, no image
            return unavailable

    @api.get("/v1/model")
    async def manifest(self, request: Request):
        t0 = time.perf_counter()
        who, refusal = self._identify(request)
        if refusal is not None:
            return self._done("model", t0, refusal)
        try:
            info = await self.info()
        except Exception as e:
            log(f"model info failed: {type(e).__name__}")
            return self._done("model", t0, error(503, "model not ready; retry", {"Retry-After": "2"}))
        return self._done("model", t0, JSONResponse({**info["manifest"], "output": self.cfg.output,
                                                    "max_images": self.cfg.limits.max_images}))

    @api.get("/healthz")
    async def healthz(self):
        """The deep check (the model answers, the owner is reachable), run at most once per
        ``health_cache_s`` per gateway replica however many callers ask; concurrent callers share one run."""
        t0 = time.perf_counter()
        failure = await self._deep_check()
        if failure is not None:
            return self._done("healthz", t0, error(503, f"unhealthy: {failure}", {"Retry-After": "2"}))
        return self._done("healthz", t0, JSONResponse({"status": "ok"}))

    async def _deep_check(self) -> str | None:
        async with self._health_lock:
            checked, failure = self._health
            if time.monotonic() - checked < self.cfg.health_cache_s:
                return failure
            try:
                await asyncio.wait_for(self.model.health.remote(), 15.0)
                failure = None
            except Exception as e:
                failure = type(e).__name__
            self._health = (time.monotonic(), failure)
            return failure

    @api.get("/livez")
    async def livez(self):
        """Liveness only: this gateway's event loop answers (no model run, no owner call)."""
        return JSONResponse({"status": "alive"})

    @api.get("/v1/admin/users/{user}")
    async def user_stats(self, user: str, request: Request):
        t0 = time.perf_counter()
        who, refusal = self._identify(request)
        if refusal is None and who.role != "admin":
            refusal = error(403, "admin key required")
        if refusal is not None:
            return self._done("admin", t0, refusal)
        try:
            stats = await self.model.owner_call.remote("stats", user)
        except Exception as e:
            log(f"admin stats failed: {type(e).__name__}")
            return self._done("admin", t0, error(503, "state owner unavailable; retry", {"Retry-After": "2"}))
        return self._done("admin", t0, JSONResponse(stats))

    @api.get("/v1/admin/totals")
    async def totals(self, request: Request):
        who, refusal = self._identify(request)
        if refusal is None and who.role != "admin":
            refusal = error(403, "admin key required")
        if refusal is not None:
            return refusal
        try:
            return JSONResponse(await self.model.owner_call.remote("totals"))
        except Exception as e:
            log(f"admin totals failed: {type(e).__name__}")
            return error(503, "state owner unavailable; retry", {"Retry-After": "2"})


# ---- the application --------------------------------------------------------------------------------------

def build(args: dict, env_keys: list[dict] | None = None):
    """The Serve application (``import_path: jobs.serve:build``); ``args`` is a :class:`ServeConfig`.

    ``env_keys`` (hashed key entries, from :func:`driver_keys`) replace the replicas' own ``$ADV_SERVE_KEYS``.
    """
    cfg = parse_config(args)
    config = cfg.model_dump(mode="json")
    s = cfg.scaling
    auto = autoscaling_config(s)
    replicas = {"num_replicas": s.min_replicas} if auto is None else {"autoscaling_config": auto}
    model = DefendedModel.options(
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        max_ongoing_requests=max(s.max_ongoing_requests, s.max_batch_size), **replicas).bind(config)
    return Gateway.options(ray_actor_options={"num_cpus": min(s.num_cpus, 0.25)},
                           max_ongoing_requests=max(100, s.max_ongoing_requests)).bind(model, config, env_keys)


def deploy(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, *, wait_s: float = 180.0,
           check_http: bool = True, access_log: bool = True) -> str:
    """Start Serve on ``host:port`` (when not running), deploy the application and wait until Serve reports
    it running and (``check_http``, when this machine reaches the proxy) ``/healthz`` answers 200; the URL.

    ``access_log=False`` drops Serve's per-request lines (proxy and replicas), which a scripted client such as
    the red team would otherwise write into the driver's log by the hundred."""
    from ray.serve.schema import LoggingConfig

    check_local_bundle(cfg.bundle)
    env_keys = driver_keys(cfg)
    logging_config = LoggingConfig(enable_access_log=access_log)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    url = f"http://{host}:{port}"
    try:
        try:
            serve.run(build(cfg.model_dump(mode="json"), env_keys), name=cfg.name, route_prefix="/", blocking=False,
                      logging_config=logging_config)
        except RuntimeError as exc:  # serve.run waits for the application; its error names no cause
            if "Deploying application" not in str(exc):
                raise
            raise ConfigError(deploy_failure(cfg)) from None
        _wait_healthy(cfg, url, wait_s, check_http)
    except BaseException:
        with contextlib.suppress(Exception):  # a failed deployment must not keep holding the cluster's CPUs
            undeploy(cfg, shutdown=False)
        raise
    return url


def check_local_bundle(location: str) -> None:
    """Verify a bundle this machine can read before deploying it (paths inside it, hashes), so a bad one is
    one line here rather than replicas failing to start; a URI or a path only the cluster sees is checked
    by each replica as it loads."""
    from pathlib import Path

    from adv.bundle import MANIFEST, load_bundle

    if "://" not in location and (Path(location) / MANIFEST).is_file():
        load_bundle(location)


def _wait_healthy(cfg: ServeConfig, url: str, wait_s: float, check_http: bool) -> None:
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        app = serve.status().applications.get(cfg.name)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise ConfigError(deploy_failure(cfg))
        try:
            if app is not None and app.status == "RUNNING" and (
                    not check_http or httpx.get(f"{url}/healthz", timeout=20).status_code == 200):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"the endpoint at {url} did not become healthy within {wait_s:.0f} s")
        time.sleep(0.5)


def deploy_failure(cfg: ServeConfig) -> str:
    """One line for a failed deployment: the last line of the first failing deployment's message (the replica's
    exception), not the traceback Serve keeps."""
    app = serve.status().applications.get(cfg.name)
    deployments = app.deployments.values() if app else ()
    messages = [d.message for d in deployments if d.message] + [app.message if app else ""]
    lines = [line.strip() for m in messages for line in str(m).strip().splitlines()[-1:] if line.strip()]
    return f"deploying {cfg.name!r} failed: {lines[0] if lines else 'see the Serve logs'}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for local Serve in tests, benchmarks and the main job)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def undeploy(cfg: ServeConfig, *, shutdown: bool = True) -> None:
    """Delete the application (and Serve with ``shutdown``), then the state owner or shards (the state stays
    on disk)."""
    if shutdown:
        serve.shutdown()
    else:
        serve.delete(cfg.name)
    for shard in range(cfg.shards):
        kill_owner(cfg, shard=shard)


def load_args(args: argparse.Namespace) -> ServeConfig:
    from jobs.config import read_yaml

    raw = {}
    if args.config:
        raw = read_yaml(args.config)  # a missing or broken file: one line naming it
        raw = raw.get("args", raw) if isinstance(raw, dict) else raw  # a Serve application entry's args
        if not isinstance(raw, dict):
            raise ConfigError(f"{args.config}: expected a mapping of ServeConfig fields")
    overrides = {"bundle": args.bundle, "keys": args.keys, "state": args.state, "output": args.output}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw)


def driver_keys(cfg: ServeConfig) -> list[dict]:
    """``$<keys_env>`` of this process as hashed entries for the replicas, whose environment (on a cluster
    started elsewhere) lacks it; the key file must be readable where the replicas run."""
    return [e.model_dump(exclude_none=True) for e in env_entries(cfg.keys_env)]


def check_driver(cfg: ServeConfig) -> ServeConfig:
    """Everything the replicas would fail on, checked here before deploying (one line, exit 2): the keys, the
    bundle and the detector config. Local paths come back absolute: replicas do not share this folder."""
    from adv.bundle import load_bundle

    KeyRing(cfg.keys, cfg.keys_env)  # no keys, or a broken key file / variable: ConfigError
    detector_config(cfg, load_bundle(cfg.bundle))
    absolute = {k: os.path.abspath(v) for k in ("bundle", "keys", "state")
                if (v := getattr(cfg, k)) is not None and "://" not in v}
    return cfg.model_copy(update=absolute)


def shutdown(name: str | None) -> None:
    """Remove the application ``name`` (all of Serve when None) and its detector state owner(s), which
    ``serve shutdown`` leaves running (a detached actor); the detector state stays in its storage."""
    import ray

    # the namespace holds only state owners (get_owner names the owner, or the shards, of each application)
    owners = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    if name is not None:
        mine = owner_name(parse_config({"bundle": "-", "name": name}))
        owners = [o for o in owners if o == mine or re.fullmatch(re.escape(mine) + r"-\d+-of-\d+", o)]
        apps = serve.status().applications if _serve_running() else {}
        if name in apps:
            serve.delete(name)
        log(f"removed application {name!r}" if name in apps else f"no application {name!r} was running")
    else:
        serve.shutdown()
        log("Serve shut down")
    for owner in owners:
        _kill_named(owner)
    log(f"removed detector state owner(s): {', '.join(owners) or 'none running'}")


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="defense bundle: a folder or a pyarrow URI")
    parser.add_argument("--config", help="YAML with ServeConfig fields (or a Serve config's application args)")
    parser.add_argument("--keys", help="API key file (YAML; see adv/serving/keys.py); also $ADV_SERVE_KEYS")
    parser.add_argument("--state", help="detector state location (default runs/serve-state)")
    parser.add_argument("--output", choices=["label", "topk", "probs"], help="what /v1/predict returns")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="deploy on this Ray cluster and exit (default $RAY_ADDRESS; none: embedded Ray)")
    parser.add_argument("--shutdown", action="store_true",
                        help="remove the deployment from --address: Serve (or only --name) and the detector "
                             "state owner(s) `serve shutdown` leaves running; the state stays on disk")
    parser.add_argument("--name", help="with --shutdown: only this application (ServeConfig name, default all)")
    common.add_base_dir(parser, "jobs.serve")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.shutdown:
            if not args.address:
                raise ConfigError("--shutdown needs the cluster: --address ADDRESS (or $RAY_ADDRESS; "
                                  "--address auto for one started on this machine)")
            init_ray(args.address)
            shutdown(args.name)
            return 0
        with common.run_from(args.base_dir):
            cfg = load_args(args)
            if args.base_dir is None:  # a submitted job's folder is a temporary copy of its working dir
                common.check_job_paths({"bundle": cfg.bundle, "keys": cfg.keys}, {"state": cfg.state})
            cfg = check_driver(cfg)
        init_ray(args.address)
        url = deploy(cfg, args.host, args.port, check_http=not args.address)  # a remote proxy may be unreachable
        if args.address:
            log(f"deployed {cfg.name!r} at {url} on {args.address}; remove it with "
                f"`python -m jobs.serve --shutdown --address {args.address}`")
            return 0
        log(f"serving {cfg.bundle} at {url} (Ctrl-C or SIGTERM stops)")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        log("shutting down Serve")
        undeploy(cfg)
        return 0

    return guarded("serve", body, "Serve was shut down with the embedded Ray")


if __name__ == "__main__":
    sys.exit(main())
