"""The Serve endpoint's detector state on Ray: the owner actor(s) and a replica's client of them.

The state owner is one named, detached actor (``adv-detector-<name>``)
holding the detector and the per-key ledger (``adv.serving.owner``). A named
actor rather than a Serve ``deployment_actors`` entry because it must outlive
any replica (no fate-sharing with the replica that created it) and restart by
itself (``max_restarts=-1``), reloading from its durable state; replicas
refresh their handle and retry while it restarts. It is a threaded actor:
concurrent batches decide in turn and share one log write and one fsync
(group commit). With ``shards: N`` there are N such actors (``StateShard``,
``adv.serving.shards``): users by user, the indexes by hash; the replica
drives three parallel rounds per batch and merges (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from adv.detectors import DetectorConfig
from adv.retry import delays
from adv.serving.config import ServeConfig, owner_name
from adv.serving.owner import DetectorOwner, Request
from adv.serving.shards import Shard, protocol, totals, user_shard

NAMESPACE = "adv-serve"
#: Threads of an owner actor: concurrent steps decide one at a time and share one log write (group commit).
OWNER_THREADS = 16


class OwnerUnavailable(Exception):
    """The state owner did not answer within ``owner_timeout_s`` (it may be restarting)."""


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


class _StateActor:
    """What both actor kinds answer from their ``state`` (the one owner or one shard): a user's stats, the
    totals, and a liveness ping."""

    state: DetectorOwner | Shard

    def stats(self, user: str) -> dict:
        return self.state.stats(user)

    def totals(self) -> dict:
        return self.state.totals()

    def ping(self) -> bool:
        return True


class StateOwner(_StateActor):
    """The Ray actor around :class:`adv.serving.owner.DetectorOwner`; counts alarms and actions as metrics."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig):
        self.state = DetectorOwner(config, detector)
        self.metrics = DetectorMetrics()

    def step(self, x: np.ndarray, requests: list[Request], probs: np.ndarray) -> list[dict]:
        """One call per batch: admission and the detector update, durable before returning (group commit)."""
        outcomes = self.state.step(x, requests, probs)
        self.metrics.count([a for o in outcomes for a in o.get("answers", ())])
        return outcomes


class StateShard(_StateActor):
    """The Ray actor around shard ``shard`` of :class:`adv.serving.shards.Shard` (``shards`` > 1): its rounds
    of a batch (``admit``, ``lookup``, ``commit``), and (from the base) its users' stats and its totals."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig, shard: int):
        self.state = Shard(config, detector, shard)

    def admit(self, *args):
        return self.state.admit(*args)

    def lookup(self, *args):
        return self.state.lookup(*args)

    def commit(self, *args):
        return self.state.commit(*args)

    def detector_config(self) -> DetectorConfig:
        """The detector config this shard's state was made with (the replicas decide with it)."""
        return self.state.detector


def get_owner(config: ServeConfig, detector: DetectorConfig, shard: int = 0):
    """The application's owner actor (or shard ``shard`` of several), created on first use (by whichever
    replica asks first)."""
    import ray

    cls, args = (StateOwner, (config, detector)) if config.shards == 1 else (StateShard, (config, detector, shard))
    actor = ray.remote(cls).options(
        name=owner_name(config, shard), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=config.owner_num_cpus, max_concurrency=OWNER_THREADS)
    return actor.remote(*args)


def kill_named(name: str, *, restart: bool = False) -> bool:
    """Kill the named owner actor (``restart``: let Ray restart it, as a crash would); False when there is none."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=not restart)
    return True


def kill_owner(cfg: ServeConfig, *, restart: bool = False, shard: int = 0) -> bool:
    """Kill the owner actor, or shard ``shard`` of several; False when there is none."""
    return kill_named(owner_name(cfg, shard), restart=restart)


class OwnerClient:
    """A replica's handle on one owner: refreshed and retried (with backoff) while the owner restarts."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig, shard: int = 0):
        self.config, self.detector, self.shard = config, detector, shard
        self._handle = None

    async def call(self, method: str, *args, timeout_s: float | None = None):
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

        timeout_s = timeout_s or self.config.owner_timeout_s
        deadline = time.monotonic() + timeout_s
        # a short cap: a call to a restarting owner fails within ~2 s anyway, and a longer sleep only delays the
        # first answer after it is back (Ray's restart, not this loop, is the wait)
        for delay in delays(start=0.05, cap=0.25):
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


class State:
    """A replica's view of the state: one owner, or N shards driven by :func:`adv.serving.shards.protocol`."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig):
        self.owners = [OwnerClient(config, detector, s) for s in range(config.shards)]
        self._detector: DetectorConfig | None = None  # the shards' own config (asked once): the merge uses it
        self.metrics = DetectorMetrics() if config.shards > 1 else None

    async def step(self, x: np.ndarray, requests: list[Request], probs: np.ndarray) -> list[dict]:
        """Admission and detector update of a batch, durable before returning."""
        if len(self.owners) == 1:
            return await self.owners[0].call("step", x, requests, probs)
        if self._detector is None:
            self._detector = await self.owners[0].call("detector_config")
        gen = protocol(self._detector, len(self.owners), x, requests, probs)
        # the merge runs off the event loop; a StopIteration cannot cross a thread's future, so each step
        # says whether the protocol is done
        done, value = await asyncio.to_thread(_advance, gen, None)
        while not done:
            results = await asyncio.gather(*(self.owners[c.shard].call(c.method, *c.args) for c in value))
            done, value = await asyncio.to_thread(_advance, gen, list(results))
        self.metrics.count([a for o in value for a in o.get("answers", ())])
        return value

    async def call(self, method: str, *args, timeout_s: float | None = None):
        """An admin read: a user's stats (from their shard), the totals (summed over shards), or a ping."""
        if len(self.owners) == 1:
            return await self.owners[0].call(method, *args, timeout_s=timeout_s)
        if method == "stats":
            return await self.owners[user_shard(args[0], len(self.owners))].call(method, *args, timeout_s=timeout_s)
        parts = await asyncio.gather(*(o.call(method, *args, timeout_s=timeout_s) for o in self.owners))
        return totals(list(parts)) if method == "totals" else all(parts)


def _advance(gen, value) -> tuple[bool, object]:
    """Resume the generator ``gen`` with ``value``: (False, what it yields) or (True, what it returns)."""
    try:
        return False, (next(gen) if value is None else gen.send(value))
    except StopIteration as done:
        return True, done.value
