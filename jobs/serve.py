"""Ray Serve: the defended model of a bundle behind an authenticated HTTP endpoint, with the query detector.

    python -m jobs.serve --bundle DIR [--host 127.0.0.1] [--port 8000] [--keys keys.yaml] [--config serve.yaml]
    serve run cluster/serve-config.yaml          # or: serve deploy, or KubeRay's RayService

Locally it starts an embedded Ray, serves until SIGINT/SIGTERM, then shuts
Serve down. With ``--address`` or ``$RAY_ADDRESS`` it deploys on that
cluster and exits; ``--shutdown --address ...`` removes Serve and the state
owner(s) (``serve shutdown`` leaves the detached owner running). Before
deploying, the driver checks the keys, the bundle and the detector config
(one line, exit 2) and hands ``$ADV_SERVE_KEYS`` to the replicas hashed, since
a cluster's replicas never see the deploying shell's environment.

The application (``build``) is one deployment, ``DefendedModel``, a FastAPI
ingress: a request goes Serve's HTTP proxy -> one replica -> the state owner
(``jobs.serve_state``). A replica checks the key (``HTTPBearer``), reads and
decodes the body on a small thread pool (never on the event loop), runs the
bundle's stages and classifier under ``@serve.batch`` in a worker thread,
then makes **one** owner call per batch (``step``: admission counted in
images, detector update, durable by group commit) and shapes the answers
(``adv.serving.http``). Never a 500: client errors are 4xx with one line; an
unreachable owner or a model output that is not finite is 503 with
``Retry-After``. ``/healthz`` is the deep check (model and owner), cached for
``health_cache_s``; ``/livez`` is the cheap liveness route. Batch settings
arrive as the deployment's ``user_config`` (``reconfigure``), so they change
without restarting replicas. The gateway used to be a second deployment: the
extra handle hop per request cost more CPU than the model (docs/benchmarks.md).
"""


import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve

from adv.errors import ConfigError
from adv.serving.config import ServeConfig, autoscaling_config, owner_name
from adv.serving.decode import RequestError, decode
from adv.serving.http import (NON_FINITE, Refusals, bearer, error, finite_items, identify, outcome_response,
                              read_body, unavailable)
from adv.serving.keys import KeyEntry, KeyRing, env_entries
from adv.serving.ledger import largest_request
from adv.serving.owner import Request as Step
from adv.validation import validate_mapping
from jobs import common
from jobs.common import guarded, init_ray, logger
from jobs.serve_state import NAMESPACE, State, kill_named, kill_owner

__all__ = ["build", "deploy", "detector_config", "free_port", "kill_owner", "main", "undeploy"]
log = logger("serve")


def parse_config(args: dict) -> ServeConfig:
    return validate_mapping(ServeConfig, args, "serve config")


def resolve_detector(cfg: ServeConfig, bundle):
    """The query detector's config, validated: the serve config's, else the bundle's, else the defaults."""
    from adv.detectors import DetectorConfig

    raw = cfg.detector if cfg.detector is not None else (bundle.query_detector or {})
    return validate_mapping(DetectorConfig, raw, "query detector config")


def detector_config(cfg: ServeConfig, bundle) -> dict:
    """:func:`resolve_detector` as a plain mapping (the red-team report reads its action)."""
    return resolve_detector(cfg, bundle).model_dump(mode="json")


# ---- the ingress ------------------------------------------------------------------------------------------

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

    def __init__(self, cfg: ServeConfig, detector, env_keys: list[dict] | None = None):
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
        self.state = State(cfg, detector if detector is not None else resolve_detector(cfg, bundle))
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
        """Serve's ``user_config``: the batch settings, changed on live replicas without a restart."""
        self._predict.set_max_batch_size(int(user_config["max_batch_size"]))
        self._predict.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

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


# ---- the application --------------------------------------------------------------------------------------

def build(args: dict | ServeConfig, env_keys: list[dict] | None = None):
    """The Serve application (``import_path: jobs.serve:build``); ``args`` is a :class:`ServeConfig` (its
    mapping from a Serve config file, validated here once). ``env_keys`` (hashed key entries, from
    :func:`driver_keys`) replace the replicas' own ``$ADV_SERVE_KEYS``."""
    cfg = args if isinstance(args, ServeConfig) else parse_config(args)
    detector = None if cfg.detector is None else resolve_detector(cfg, None)
    s = cfg.scaling
    auto = autoscaling_config(s)
    replicas = {"num_replicas": s.min_replicas} if auto is None else {"autoscaling_config": auto}
    return DefendedModel.options(
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        user_config={"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
        max_ongoing_requests=s.max_ongoing_requests, **replicas).bind(cfg, detector, env_keys)


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
            serve.run(build(cfg, env_keys), name=cfg.name, route_prefix="/", blocking=False,
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
    resolve_detector(cfg, load_bundle(cfg.bundle))
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
        kill_named(owner)
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
