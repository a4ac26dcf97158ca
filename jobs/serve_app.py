"""The Serve application: one FastAPI ingress deployment, ``DefendedModel`` (``import_path: jobs.serve:build``).

A request goes Serve's HTTP proxy -> one replica -> the state owner
(``jobs.serve_state``). A replica checks the key (FastAPI's ``HTTPBearer``),
reads and decodes the body on a small thread pool (never on the event loop),
runs the bundle's stages and classifier under ``@serve.batch`` in a worker
thread, then makes **one** owner call per batch (``step``: admission counted
in images, detector update, durable by group commit) and shapes the answers
(``adv.serving.http``). Never a 500: client errors are 4xx with one line; an
unreachable owner or a model output that is not finite is 503 with
``Retry-After``. ``/healthz`` is the deep check (model and owner), cached for
``health_cache_s``; ``/livez`` is the cheap liveness route. The batch
settings arrive as the deployment's ``user_config`` (``reconfigure``), so
they change on live replicas. The keys, the decoding and the model used to be
two deployments (a gateway and the model): the handle call between them cost
more CPU per request than the model does (docs/benchmarks.md, "Serve
endpoint").
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve

from adv.detectors import DetectorConfig
from adv.serving.config import Scaling, ServeConfig, autoscaling_config
from adv.serving.decode import RequestError, decode
from adv.serving.http import (NON_FINITE, Refusals, bearer, error, finite_items, identify, outcome_response,
                              read_body, unavailable)
from adv.serving.keys import KeyEntry, KeyRing
from adv.serving.ledger import largest_request
from adv.serving.owner import Request as Step
from adv.serving.preflight import detector_config, parse_config
from adv.validation import validate_mapping
from jobs.common import logger
from jobs.serve_state import State

log = logger("serve")


class RequestMetrics:
    """A pure ASGI middleware: every request counted by route and status, its latency observed, with Ray's
    metrics (exported to Prometheus by each node's agent). Pure ASGI rather than ``@app.middleware``: that
    one re-streams every body through a task, a cost per request on the hot path."""

    def __init__(self, app):
        self.app, self._metrics = app, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            requests, latency = self._metrics or self._create()
            route = getattr(scope.get("route"), "name", "other")
            requests.inc(tags={"route": route, "status": str(status[0])})
            latency.observe(time.perf_counter() - t0, tags={"route": route})

    def _create(self):
        from ray.util.metrics import Counter, Histogram

        self._metrics = (Counter("adv_serve_requests", "HTTP requests by route and status",
                                 tag_keys=("route", "status")),
                         Histogram("adv_serve_latency_s", "request latency in seconds",
                                   boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                                   tag_keys=("route",)))
        return self._metrics


api = FastAPI(title="adv defended model", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(RequestMetrics)
Key = Depends(bearer)


@serve.deployment
@serve.ingress(api)
class DefendedModel:
    """Keys, limits (held by the owner), decoding, the bundle's stages plus classifier batched, one owner call
    per batch, and the answers."""

    def __init__(self, cfg: ServeConfig, detector: DetectorConfig | None, env_keys: list[dict] | None = None):
        import torch

        from adv.bundle import load_bundle

        torch.set_num_threads(1)  # replicas get a fraction of a core; more threads only contend
        self.cfg = cfg
        bundle = load_bundle(cfg.bundle)
        self.model = bundle.build(device=cfg.device)
        self.device = next(self.model.parameters()).device
        self.shape = tuple(bundle.manifest["classifier"]["input_size"])
        self.manifest = {**bundle.public_manifest(), "output": cfg.output, "max_images": cfg.limits.max_images}
        # detector None: the bundle's (validated once, here); the state owners get the typed object
        self.state = State(cfg, detector if detector is not None else detector_config(cfg, bundle))
        # env_keys: the deploying driver's $ADV_SERVE_KEYS, hashed (a remote replica's environment lacks it)
        self.keys = KeyRing(cfg.keys, cfg.keys_env if env_keys is None else None, on_error=cfg.keys_on_error,
                            entries=tuple(KeyEntry(**e) for e in env_keys or ()))
        self.refusals = Refusals()
        self._decoder = ThreadPoolExecutor(cfg.limits.decode_workers, thread_name_prefix="adv-decode")
        self._health: tuple[float, str | None] = (-float("inf"), None)  # (checked at, failure or None)
        self._health_lock = asyncio.Lock()
        self._probe = np.random.default_rng(0).random((1, *self.shape), dtype=np.float32)  # textured, not blank
        self.reconfigure({"max_batch_size": cfg.scaling.max_batch_size,
                          "batch_wait_timeout_s": cfg.scaling.batch_wait_timeout_s})

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config``: the batch settings, changed on live replicas without a restart; checked as
        ``scaling`` fields (a bad one fails the update with one line and the replica keeps its settings)."""
        s = validate_mapping(Scaling, {**self.cfg.scaling.model_dump(), **user_config}, "user_config")
        self._predict.set_max_batch_size(s.max_batch_size)
        self._predict.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def batch_settings(self) -> dict:
        return {"max_batch_size": self._predict._get_max_batch_size(),
                "batch_wait_timeout_s": self._predict._get_batch_wait_timeout_s()}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x).to(self.device)).softmax(1).float().cpu().numpy()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict(self, items: list[tuple[np.ndarray, str, dict | None]]) -> list[dict | str]:
        """Per request ``{"answers": [...]}``, ``{"wait": s}``, ``{"too_large": reason}`` or :data:`NON_FINITE`."""
        x = np.concatenate([im for im, *_ in items])
        probs = await asyncio.to_thread(self._infer, x)  # off the event loop
        ok, keep = finite_items([len(im) for im, *_ in items], probs)
        outcomes = iter([])
        if keep.any():  # one owner call: admission, then the detector records only what is answered
            steps = [Step(user, limits, len(im)) for (im, user, limits), good in zip(items, ok) if good]
            outcomes = iter(await self.state.step(x[keep], steps, probs[keep]))
        return [next(outcomes) if good else NON_FINITE for good in ok]  # one bad request never fails the batch

    @api.post("/v1/predict", name="predict")
    async def predict(self, request: Request, key: HTTPAuthorizationCredentials | None = Key):
        who, refusal = identify(self.keys, key)
        if refusal is not None:
            return refusal
        waited = self.refusals.waiting(who.user)
        if waited > 0:  # told to wait and not waited out: refused here, without running the model again
            return self.refusals.refuse(who.user, waited)
        try:
            raw = await read_body(request, self.cfg.limits.max_body_bytes)
            x = await asyncio.get_running_loop().run_in_executor(  # off the event loop, on a bounded pool
                self._decoder, decode, raw, request.headers.get("content-type"), self.shape, self.cfg.limits)
            largest = largest_request(self.cfg.rate_limit, dict(who.limits))
            if len(x) > largest:
                raise RequestError(413, f"{len(x)} images exceed this key's per-request limit of {largest}")
            result = await self._predict((x, who.user, dict(who.limits) or None))  # admitted by the owner
        except RequestError as e:
            return error(e.status, e.reason)
        except Exception as e:  # the backend, not the client: 503 with a retry hint, never a 500
            log(f"predict failed for user {who.user}: {type(e).__name__}")  # no key, no image
            return unavailable()
        if result == NON_FINITE:
            log(f"predict for user {who.user}: {NON_FINITE}; answered 503")
        return outcome_response(result, self.cfg, self.refusals, who.user)

    @api.get("/v1/model", name="model")
    async def model_info(self, key: HTTPAuthorizationCredentials | None = Key):
        _, refusal = identify(self.keys, key)
        return refusal or JSONResponse(self.manifest)

    @api.get("/healthz", name="healthz")
    async def healthz(self):
        """The deep check (the model answers, the owner is reachable), run at most once per
        ``health_cache_s`` per replica however many callers ask; concurrent callers share one run."""
        failure = await self._deep_check()
        if failure is not None:
            return error(503, f"unhealthy: {failure}", {"Retry-After": "2"})
        return JSONResponse({"status": "ok"})

    async def _deep_check(self) -> str | None:
        async with self._health_lock:
            checked, failure = self._health
            if time.monotonic() - checked < self.cfg.health_cache_s:
                return failure
            try:
                await asyncio.to_thread(self._infer, self._probe)
                await self.state.call("ping", timeout_s=5.0)
                failure = None
            except Exception as e:
                failure = type(e).__name__
            self._health = (time.monotonic(), failure)
            return failure

    @api.get("/livez", name="livez")
    async def livez(self):
        """Liveness only: this replica's event loop answers (no model run, no owner call)."""
        return JSONResponse({"status": "alive"})

    @api.get("/v1/admin/users/{user}", name="admin")
    async def user_stats(self, user: str, key: HTTPAuthorizationCredentials | None = Key):
        return await self._admin(key, "stats", user)

    @api.get("/v1/admin/totals", name="admin")
    async def totals(self, key: HTTPAuthorizationCredentials | None = Key):
        return await self._admin(key, "totals")

    async def _admin(self, key, method: str, *args) -> JSONResponse:
        _, refusal = identify(self.keys, key, admin=True)
        if refusal is not None:
            return refusal
        try:
            return JSONResponse(await self.state.call(method, *args))
        except Exception as e:
            log(f"admin {method} failed: {type(e).__name__}")
            return unavailable("state owner unavailable; retry")

    def check_health(self) -> None:
        self._infer(self._probe)


def build(args: dict | ServeConfig, env_keys: list[dict] | None = None):
    """The Serve application (``import_path: jobs.serve:build``); ``args`` is a :class:`ServeConfig` (its
    mapping from a Serve config file, validated here once). ``env_keys`` (hashed key entries, from
    :func:`driver_keys`) replace the replicas' own ``$ADV_SERVE_KEYS``."""
    cfg = args if isinstance(args, ServeConfig) else parse_config(args)
    detector = None if cfg.detector is None else detector_config(cfg, None)
    s = cfg.scaling
    auto = autoscaling_config(s)
    replicas = {"num_replicas": s.min_replicas} if auto is None else {"autoscaling_config": auto}
    return DefendedModel.options(
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        user_config={"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
        max_ongoing_requests=s.max_ongoing_requests, **replicas).bind(cfg, detector, env_keys)
