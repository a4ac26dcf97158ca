"""The typed configuration of the Serve stage, validated once at the boundary (CLI, YAML, Serve ``args``).

The output default is the label and its top-1 confidence: full probability
vectors give a score-based attack (Square, Andriushchenko et al. 2020) its
margin loss for free, while a label plus one confidence leaves it a coarse
proxy and a decision-based attack (HopSkipJump, Chen et al. 2020) its only
signal. ``output: probs`` is for trusted callers and the red-team comparison.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OUTPUTS = ("label", "topk", "probs")


class Limits(BaseModel):
    """What one request may carry. Serve sets no body limit, so the ingress enforces these."""

    model_config = ConfigDict(extra="forbid")

    #: Bytes of request body (413 beyond).
    max_body_bytes: int = Field(2 * 2**20, ge=1024, le=256 * 2**20)
    #: Images per request (413 beyond).
    max_images: int = Field(16, ge=1, le=1024)
    #: Pixels of one encoded image before decoding, so a decompression bomb is refused unopened (413).
    max_pixels: int = Field(1024 * 1024, ge=1)
    #: Threads per replica that decode bodies, off the event loop: big PNGs queue for these and
    #: never stall other callers' requests (the queue itself is bounded by the replica's ongoing requests).
    decode_workers: int = Field(2, ge=1, le=64)


class RateLimit(BaseModel):
    """Per-key limits, kept by the one state owner so they hold across every replica. They count images:
    a request of 16 images costs 16 (a request-count limit would let one request carry 16 queries)."""

    model_config = ConfigDict(extra="forbid")

    #: Sustained images per second per key (token bucket refill rate).
    rate: float = Field(20.0, gt=0)
    #: Bucket size: images a key may send at once after a pause (also the most one request may carry).
    burst: int = Field(40, ge=1)
    #: Images per key per ``quota_window_s``; None: no quota.
    quota: int | None = Field(None, ge=1)
    quota_window_s: float = Field(86_400.0, gt=0)


class Scaling(BaseModel):
    """Replica resources and autoscaling of the defended-model deployment (0 GPUs on CPU); min < max replicas
    makes it Serve's ``autoscaling_config`` (:func:`autoscaling_config`)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    #: Seconds the load must stay above (below) target before Serve adds (removes) a replica: quick to grow, slow
    #: to shrink, so a bursty attacker cannot make the deployment flap (Serve's defaults are 30 and 600).
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    #: Requests one ``@serve.batch`` call groups; ``max_ongoing_requests`` must be at least this, or a replica never
    #: holds enough requests to fill a batch (Ray Serve docs, "Dynamic Request Batching"; Serve 2.60 warns too).
    #: Both batch settings reach the replicas as ``user_config``: changing them reconfigures live replicas.
    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=1)
    max_ongoing_requests: int = Field(32, ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        return self


def autoscaling_config(s: Scaling) -> dict | None:
    """Serve's ``autoscaling_config`` for the model deployment (None: a fixed ``min_replicas``); the same
    mapping a Serve config file's ``deployments`` override holds (cluster/serve-config.yaml)."""
    if s.min_replicas == s.max_replicas:
        return None
    return {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s}


class ServeConfig(BaseModel):
    """Everything ``jobs.serve`` needs; ``ServeConfig.model_validate(args)`` is the one check."""

    model_config = ConfigDict(extra="forbid")

    #: The defense bundle: a folder or a pyarrow URI (``s3://bucket/run/best``).
    bundle: str
    #: Detector state (per-user histories, the global index, the per-user ledger): a folder or a pyarrow URI.
    state: str = "runs/serve-state"
    #: API key file (YAML); ``keys_env`` names an environment variable read as well.
    keys: str | None = None
    keys_env: str = "ADV_SERVE_KEYS"
    #: A key file that breaks while serving (deleted, invalid): ``keep`` the last good keys, or ``refuse``
    #: every key from it until it is valid again (fail closed). Logged once per problem (adv.serving.keys).
    keys_on_error: Literal["keep", "refuse"] = "keep"
    output: Literal[OUTPUTS] = "label"
    top_k: int = Field(3, ge=1)
    #: Replace the bundle's query-detector config (a ``DetectorConfig`` dump); None: the bundle's, else defaults.
    detector: dict | None = None
    limits: Limits = Field(default_factory=Limits)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    scaling: Scaling = Field(default_factory=Scaling)
    #: Seconds a replica keeps retrying an unreachable state owner (it restarts from durable state) before a 503.
    owner_timeout_s: float = Field(30.0, gt=0)
    owner_num_cpus: float = Field(0.25, ge=0)
    #: State owners (shards): 1 is one owner holding everything; n > 1 splits per-user state by user and the
    #: indexes by hash over n owners (``adv.serving.shards``; docs/serving.md). Each n has its own state folder
    #: (``<state>/shards-<n>``): changing it starts a new state, see the docs for moving one.
    shards: int = Field(1, ge=1, le=256)
    #: Seconds ``/healthz`` reuses its deep check (model plus owner), so unauthenticated callers cannot make
    #: it run the model at will; ``/livez`` answers without touching either.
    health_cache_s: float = Field(5.0, ge=0, le=300)
    device: str = "cpu"
    #: Serve application name; the state owner is the named actor ``adv-detector-<name>``.
    name: str = Field("adv", pattern=r"^[A-Za-z0-9_-]{1,40}$")


def owner_name(config: ServeConfig, shard: int = 0) -> str:
    """The named actor of the state owner (``shards: 1``), or of shard ``shard`` of several."""
    return f"adv-detector-{config.name}" + (f"-{shard}-of-{config.shards}" if config.shards > 1 else "")
