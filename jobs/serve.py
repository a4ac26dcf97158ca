"""Ray Serve: the defended model of a bundle behind an authenticated HTTP endpoint, with the query detector.

    python -m jobs.serve --bundle DIR [--host 127.0.0.1] [--port 8000] [--keys keys.yaml] [--config serve.yaml]
    serve run cluster/serve-config.yaml          # or: serve deploy, or KubeRay's RayService

Locally it starts an embedded Ray, serves until SIGINT/SIGTERM, then shuts
Serve down. With ``--address`` or ``$RAY_ADDRESS`` it deploys on that
cluster and exits; ``--shutdown --address ...`` removes Serve and the state
owner(s) (``serve shutdown`` leaves the detached owner running). Before
deploying, the driver checks the keys, the bundle and the detector config
(``adv.serving.preflight``: one line, exit 2) and hands ``$ADV_SERVE_KEYS`` to
the replicas hashed, since a cluster's replicas never see the deploying
shell's environment. The application is ``jobs.serve_app`` (one ingress
deployment); the detector state owners are ``jobs.serve_state``.
"""


import argparse
import contextlib
import os
import re
import signal
import sys
import threading

from ray import serve

from adv.errors import ConfigError
from adv.retry import wait_until
from adv.serving.config import ServeConfig, owner_name
from adv.serving.preflight import check_driver, check_local_bundle, detector_config as typed_detector, driver_keys
from adv.serving.preflight import free_port, parse_config
from jobs import common
from jobs.common import guarded, init_ray, logger
from jobs.serve_app import build
from jobs.serve_state import NAMESPACE, kill_named, kill_owner

__all__ = ["build", "check_driver", "deploy", "detector_config", "free_port", "kill_owner", "main", "parse_config",
           "undeploy"]
log = logger("serve")


def detector_config(cfg: ServeConfig, bundle) -> dict:
    """The query detector config the endpoint runs, as a plain mapping (the red-team report reads its action)."""
    return typed_detector(cfg, bundle).model_dump(mode="json")


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


def _wait_healthy(cfg: ServeConfig, url: str, wait_s: float, check_http: bool) -> None:
    import httpx

    def healthy() -> bool:
        app = serve.status().applications.get(cfg.name)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise ConfigError(deploy_failure(cfg))
        try:
            return app is not None and app.status == "RUNNING" and (
                not check_http or httpx.get(f"{url}/healthz", timeout=20).status_code == 200)
        except httpx.HTTPError:
            return False

    if not wait_until(healthy, wait_s):
        raise ConfigError(f"the endpoint at {url} did not become healthy within {wait_s:.0f} s")


def deploy_failure(cfg: ServeConfig) -> str:
    """One line for a failed deployment: the last line of the first failing deployment's message (the replica's
    exception), not the traceback Serve keeps."""
    app = serve.status().applications.get(cfg.name)
    deployments = app.deployments.values() if app else ()
    messages = [d.message for d in deployments if d.message] + [app.message if app else ""]
    lines = [line.strip() for m in messages for line in str(m).strip().splitlines()[-1:] if line.strip()]
    return f"deploying {cfg.name!r} failed: {lines[0] if lines else 'see the Serve logs'}"


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
