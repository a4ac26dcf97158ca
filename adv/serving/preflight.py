"""What the deploying driver checks before anything reaches Ray, Ray-free: the config, the keys, the bundle and
the detector config, each wrong one a single line (``ConfigError``), and the replicas' detector config.

The Serve builder (``jobs.serve_app.build``) validates the config once and binds the typed objects; the replicas
hand a typed ``DetectorConfig`` to the state owners, which never validate it again.
"""

from __future__ import annotations

import os

from adv.serving.config import ServeConfig
from adv.serving.keys import KeyRing, env_entries
from adv.validation import validate_mapping


def parse_config(args: dict) -> ServeConfig:
    return validate_mapping(ServeConfig, args, "serve config")


def detector_config(cfg: ServeConfig, bundle):
    """The query detector's config, validated: the serve config's, else the bundle's, else the defaults."""
    from adv.detectors import DetectorConfig

    raw = cfg.detector if cfg.detector is not None else (bundle.query_detector or {})
    return validate_mapping(DetectorConfig, raw, "query detector config")


def check_local_bundle(location: str) -> None:
    """Verify a bundle this machine can read before deploying it (paths inside it, hashes), so a bad one is
    one line here rather than replicas failing to start; a URI or a path only the cluster sees is checked
    by each replica as it loads."""
    from pathlib import Path

    from adv.bundle import MANIFEST, load_bundle

    if "://" not in location and (Path(location) / MANIFEST).is_file():
        load_bundle(location)


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


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for local Serve in tests, benchmarks and the main job)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
