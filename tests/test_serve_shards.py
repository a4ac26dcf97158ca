"""The state owner's one call per batch (admission plus detector update), its group commit, and the sharded state.

The Ray-free tests drive :class:`adv.serving.owner.DetectorOwner` directly.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from adv.serving import RateLimit, ServeConfig
from tests.serve_helpers import SHAPE

# quick snapshots; the index flags at the first near-duplicate so short traffic raises every kind of alarm
SMALL = {"index": {"capacity": 2000, "chain_limit": 2}, "features": {"capacity": 2000}}


def _owner(tmp_path, **config):
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner

    cfg = ServeConfig(bundle="unused", state=str(tmp_path / "state"), **config)
    return DetectorOwner(cfg, DetectorConfig.model_validate(SMALL))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _probs(n: int) -> np.ndarray:
    return np.full((n, 10), 0.1, np.float32)


def test_one_step_admits_and_decides_and_a_refused_request_leaves_no_trace(tmp_path):
    from adv.serving.owner import Request

    owner = _owner(tmp_path, rate_limit=RateLimit(rate=0.01, burst=3, quota=5))
    x = _images(6)
    out = owner.step(x, [Request("ann", None, 2), Request("ann", None, 2), Request("ben", {"burst": 1}, 2)],
                     _probs(6))
    assert [sorted(o) for o in out] == [["answers"], ["wait"], ["too_large"]]
    assert len(out[0]["answers"]) == 2 and out[1]["wait"] >= 1 and "limit of 1" in out[2]["too_large"]
    assert owner.stats("ann")["queries"] == 2 and owner.stats("ben")["queries"] == 0  # refused: not observed
    assert owner.totals()["index"] == 2


def test_the_ledger_rides_in_the_detector_log_and_snapshot_quota_windows_too(tmp_path, monkeypatch):
    import adv.serving.owner as owner_mod
    from adv.serving.owner import Request

    owner = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    x = np.repeat(_images(1, seed=3), 12, axis=0)  # one image again and again: flagged
    for i in range(12):
        owner.step(x[i : i + 1], [Request("eve", None, 1)], _probs(1))
    assert not (tmp_path / "state" / "ledger.json").exists()  # no ledger rewrite per batch any more
    stats = owner.stats("eve")
    assert stats["suspicious"] >= 1 and stats["first_flagged_query"] is not None
    again = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    assert again.stats("eve") == stats and again.totals()["queries"] == 12
    out = again.step(x[:2], [Request("eve", None, 1), Request("eve", None, 1)], _probs(2))
    assert "answers" in out[0] and "wait" in out[1]  # the quota window survived the restart: 13, not 14
    monkeypatch.setattr(owner_mod, "COMPACT_EVERY", 1)  # a snapshot now: the ledger goes into it
    again.step(_images(1, seed=9), [Request("fay", None, 1)], _probs(1))
    third = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    assert third.stats("eve") == again.stats("eve") and third.stats("fay")["queries"] == 1


def test_concurrent_steps_share_one_log_write_and_nothing_acknowledged_is_lost(tmp_path, monkeypatch):
    """Group commit: while one step's write is in flight the others decide; the next write takes them all."""
    import time

    from adv.detectors.state import StateStore
    from adv.serving.owner import Request

    owner = _owner(tmp_path)
    writes = []
    real = StateStore.append_log

    def slow_append(store, batch):  # a slow disk: every write takes 50 ms
        time.sleep(0.05)
        writes.append(batch.num_rows)
        return real(store, batch)

    monkeypatch.setattr(StateStore, "append_log", slow_append)
    acked = []

    def client(i: int) -> None:
        out = owner.step(_images(1, seed=100 + i), [Request(f"u{i}", None, 1)], _probs(1))
        acked.append(len(out[0]["answers"]))  # returned: durable

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(acked) == 12 and sum(writes) == 12 and len(writes) < 12  # fewer writes than steps
    again = _owner(tmp_path)
    assert again.totals()["queries"] == 12 and again.totals()["index"] == 12


def _traffic(seed: int = 0):
    """Batches as a replica forms them: benign users with distinct images, a one-account walk (an image and
    small nudges of it), a Sybil rotating the same walk over accounts, exact repeats; several requests per
    batch, some of several images. Yields (x, [(user, images)])."""
    rng = np.random.default_rng(seed)
    benign = rng.random((40, *SHAPE), dtype=np.float32)
    base = rng.random((1, *SHAPE), dtype=np.float32)

    def walk(k: int) -> np.ndarray:
        return np.clip(base + rng.normal(0, 0.01, (k, *SHAPE)), 0, 1).astype(np.float32)

    b = 0
    for t in range(14):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            if kind == 0:
                n = int(rng.integers(1, 3))
                parts.append((f"benign{b % 5}", benign[b % 40 : b % 40 + n]))
                b += n
            elif kind == 1:
                parts.append(("walker", walk(int(rng.integers(1, 4)))))
            elif kind == 2:
                parts.append((f"sybil{t % 3}", walk(1)))
            else:
                parts.append(("fan", benign[:1]))  # a popular image, again and again
        yield np.concatenate([p for _, p in parts]), [(u, len(p)) for u, p in parts]


def _same(a: list[dict], b: list[dict]) -> bool:
    def key(o: dict) -> list:
        return ([(x["label"], x["blocked"], x["alarms"], x["action"], np.round(x["probs"], 6).tolist())
                 for x in o.get("answers", [])] + sorted((k, str(v)) for k, v in o.items() if k != "answers"))

    return [key(o) for o in a] == [key(o) for o in b]


def test_two_shards_decide_every_query_as_one_owner_and_reload_the_same(tmp_path, monkeypatch):
    """The same batches through one owner and through two shards: the same answers, alarms and actions per
    query; then both reload from disk (a restart) and go on deciding alike, snapshotting often."""
    import adv.serving.owner
    import adv.serving.shards
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner, Request
    from adv.serving.shards import Shard, protocol, run, totals, user_shard

    detector = DetectorConfig.model_validate(SMALL)
    one_cfg = ServeConfig(bundle="unused", state=str(tmp_path / "one"), rate_limit=RateLimit(rate=1e4, burst=100))
    two_cfg = one_cfg.model_copy(update={"state": str(tmp_path / "two"), "shards": 2})
    one = DetectorOwner(one_cfg, detector)
    two = [Shard(two_cfg, detector, s) for s in range(2)]
    assert {user_shard(u, 2) for u in ("walker", "fan", "sybil0", "sybil1", "benign0")} == {0, 1}  # both used
    rng = np.random.default_rng(5)
    kinds = set()
    for phase in range(3):
        for x, parts in _traffic(seed=phase):
            reqs = [Request(u, None, n) for u, n in parts]
            probs = rng.dirichlet(np.ones(10), len(x)).astype(np.float32)
            a = one.step(x, reqs, probs)
            b = run(two, protocol(detector, 2, x, reqs, probs))
            assert _same(a, b)
            kinds.update(k for o in a for q in o.get("answers", []) for k in q["alarms"])
        # a restart of every owner: state from snapshot plus log; then snapshots every few queries
        one, two = DetectorOwner(one_cfg, detector), [Shard(two_cfg, detector, s) for s in range(2)]
        for module in (adv.serving.owner, adv.serving.shards):
            monkeypatch.setattr(module, "COMPACT_EVERY", 7)
    assert kinds == {"distance", "prediction", "index", "features"}  # the comparison covers every detector's alarms
    t1, t2 = one.totals(), totals([s.totals() for s in two])
    assert t1 == t2
    for user in ("walker", "sybil1", "fan"):  # the same counts (first_flagged_at: each owner's own clock)
        a, b = one.stats(user), two[user_shard(user, 2)].stats(user)
        assert a.pop("first_flagged_at") is not None and b.pop("first_flagged_at") is not None and a == b


def test_a_shard_restarted_mid_batch_fails_the_batch_and_a_retried_round_is_applied_once(tmp_path):
    from adv.detectors import DetectorConfig
    from adv.serving.owner import Request
    from adv.serving.shards import Shard, StepLost, protocol, run, user_shard

    detector = DetectorConfig.model_validate(SMALL)
    cfg = ServeConfig(bundle="unused", state=str(tmp_path / "st"), shards=2, rate_limit=RateLimit(rate=1e4, burst=100))
    shards = [Shard(cfg, detector, s) for s in range(2)]
    user = next(u for u in (f"u{i}" for i in range(20)) if user_shard(u, 2) == 1)
    x = _images(2, seed=4)
    gen = protocol(detector, 2, x, [Request(user, None, 2)], _probs(2))
    (admit,) = next(gen)
    first = shards[1].admit(*admit.args)
    assert shards[1].admit(*admit.args) is first  # a retried round: its first result, applied once
    lookups = gen.send([first])
    found = [shards[c.shard].lookup(*c.args) for c in lookups]
    commits = gen.send(found)
    shards[1] = Shard(cfg, detector, 1)  # restarted before its commit: its lookup round was never durable
    (lost,) = [c for c in commits if c.shard == 1]
    with pytest.raises(StepLost, match="restarted during this batch"):
        shards[1].commit(*lost.args)
    acked = run(shards, protocol(detector, 2, x, [Request(user, None, 2)], _probs(2)))  # the client retries
    assert len(acked[0]["answers"]) == 2
    again = [Shard(cfg, detector, s) for s in range(2)]  # every shard restarted: nothing acknowledged lost
    assert again[1].stats(user)["queries"] == 2  # answered twice, counted twice (the failed batch: never)
    assert min(s.totals()["index"] for s in again) >= 2  # the answered images are in every shard's index


# ---- over HTTP: two model replicas, two state shards, on the shared local cluster ----------------------------

DETECTOR = {"index": {"capacity": 5000}, "features": {"capacity": 5000}, "action": "deceive"}
#: A key with a quota of 3 images (a burst that would allow more): its user lives on the other shard than "pair".
CAPPED = ("capped-key-0024", {"rate": 0.01, "burst": 10, "quota": 3})


@pytest.fixture(scope="module")
def sharded(ray_cluster, tmp_path_factory):
    import httpx

    from adv.serving import Limits, Scaling
    from adv.serving.keys import hash_key
    from jobs.serve import deploy, free_port, undeploy
    from tests.serve_helpers import make_bundle, write_keys

    tmp = tmp_path_factory.mktemp("shards")
    bundle = make_bundle(tmp / "bundle", query_detector=DETECTOR)
    keys = write_keys(tmp / "keys.yaml")
    doc = yaml.safe_load(keys.read_text())
    doc["keys"].append({"user": "capped", "sha256": hash_key(CAPPED[0]), "role": "user", **CAPPED[1]})
    keys.write_text(yaml.safe_dump(doc))
    cfg = ServeConfig(bundle=str(bundle), keys=str(keys), keys_env="ADV_TEST_NO_SUCH_VAR",
                      state=str(tmp / "state"), name="shards24", output="probs", shards=2,
                      limits=Limits(max_images=8), rate_limit=RateLimit(rate=500, burst=1000), owner_timeout_s=60.0,
                      scaling=Scaling(min_replicas=2, max_replicas=2, max_batch_size=8, max_ongoing_requests=16))
    url = deploy(cfg, "127.0.0.1", free_port())
    http = httpx.Client(base_url=url, timeout=120)
    yield SimpleNamespace(cfg=cfg, http=http, tmp=tmp, bundle=bundle)
    http.close()
    undeploy(cfg)


def _post(app, user: str, x: np.ndarray):
    from tests.serve_helpers import auth, npy

    return app.http.post("/v1/predict", content=npy(x), headers={**auth(user), "content-type": "application/x-npy"})


def _admin(app, path: str) -> dict:
    from tests.serve_helpers import auth

    r = app.http.get(path, headers=auth("ops"))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.ray
def test_two_shards_over_http_answer_every_request_as_one_owner(sharded, tmp_path):
    """A walk from one account, the same walk rotated over three accounts, a popular image, benign users:
    each answer (probabilities, which deceive alters when flagged) and each account's alarm counts equal
    what one owner decides for the same requests in the same order."""
    import torch

    from adv.bundle import load_bundle
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner, Request
    from adv.serving.respond import body
    from adv.serving.shards import user_shard

    torch.set_num_threads(1)
    model = load_bundle(str(sharded.bundle)).build("cpu")
    one = DetectorOwner(sharded.cfg.model_copy(update={"state": str(tmp_path / "one"), "shards": 1}),
                        DetectorConfig.model_validate(DETECTOR))
    rng = np.random.default_rng(24)
    base = rng.random((1, *SHAPE), dtype=np.float32)
    users = ["alice", "bob", "carol", "dave", "eve", "sybil0", "sybil1", "sybil2"]
    assert {user_shard(u, 2) for u in users} == {0, 1}
    sent = []
    for k in range(14):
        walk = np.clip(base + rng.normal(0, 0.01, (1 + k % 2, *SHAPE)), 0, 1).astype(np.float32)
        sent += [("alice", walk), (f"sybil{k % 3}", walk[:1]), (users[1 + k % 4], rng.random((1, *SHAPE),
                                                                                           dtype=np.float32))]
        sent.append(("eve", base))
    for user, x in sent:
        r = _post(sharded, user, x)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            probs = model(torch.from_numpy(x)).softmax(1).numpy()
        (want,) = one.step(x, [Request(user, None, len(x))], probs)
        expected = body(want["answers"], "probs", 3)["predictions"]
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert np.allclose([p["probabilities"] for p in got], [p["probabilities"] for p in expected], atol=2e-6)
    flagged = 0
    for user in users:
        got, want = _admin(sharded, f"/v1/admin/users/{user}"), one.stats(user)
        assert (got.pop("first_flagged_at") is None) == (want.pop("first_flagged_at") is None)
        assert got == want
        flagged += got["suspicious"]
    assert flagged >= 5 and _admin(sharded, "/v1/admin/totals")["queries"] == one.totals()["queries"]


@pytest.mark.ray
def test_a_killed_shard_loses_nothing_acknowledged(sharded):
    from adv.serving.shards import user_shard
    from jobs.serve import kill_owner

    users = [u for u in ("alice", "bob", "carol", "dave", "eve") if user_shard(u, 2) == 1][:2]
    assert users
    before = {u: _admin(sharded, f"/v1/admin/users/{u}")["queries"] for u in users}
    rng = np.random.default_rng(7)
    acked = {u: sum(_post(sharded, u, rng.random((1, *SHAPE), dtype=np.float32)).status_code == 200
                    for _ in range(4)) for u in users}
    assert acked == {u: 4 for u in users}
    assert kill_owner(sharded.cfg, restart=True, shard=1)  # as a crash would: Ray restarts it, it reloads
    for u in users:  # the admin read waits for the restarted shard
        assert _admin(sharded, f"/v1/admin/users/{u}")["queries"] == before[u] + acked[u]
    r = _post(sharded, users[0], rng.random((1, *SHAPE), dtype=np.float32))
    assert r.status_code == 200, r.text
    assert _admin(sharded, f"/v1/admin/users/{users[0]}")["queries"] == before[users[0]] + acked[users[0]] + 1


@pytest.mark.ray
def test_limits_hold_across_replicas_and_shards(sharded):
    """Concurrent requests of two limited keys spread over both model replicas, the keys' users on different
    shards: "pair" (a burst of 4) and "capped" (a quota of 3) get exactly that many answered, the rest 429 with
    Retry-After, and the owner counts only the answered."""
    from concurrent.futures import ThreadPoolExecutor

    from adv.serving.shards import user_shard
    from tests.serve_helpers import KEYS, OWN_LIMITS

    allowed = {"pair": OWN_LIMITS["pair"]["burst"], "capped": CAPPED[1]["quota"]}
    keys = {"pair": KEYS["pair"], "capped": CAPPED[0]}
    assert {user_shard(u, 2) for u in allowed} == {0, 1}
    rng = np.random.default_rng(9)
    jobs = [(u, rng.random((1, *SHAPE), dtype=np.float32)) for u in allowed for _ in range(8)]

    def post(job):
        from tests.serve_helpers import npy

        user, x = job
        return user, sharded.http.post("/v1/predict", content=npy(x), headers={
            "Authorization": f"Bearer {keys[user]}", "content-type": "application/x-npy"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, jobs))
    for user, n in allowed.items():
        codes = sorted(r.status_code for u, r in answers if u == user)
        assert codes == [200] * n + [429] * (8 - n), (user, codes)
        assert all(int(r.headers["retry-after"]) >= 1 for u, r in answers if u == user and r.status_code == 429)
        assert _admin(sharded, f"/v1/admin/users/{user}")["queries"] == n
