"""The Ray-free half of the Serve stage: decoding, keys, limits, the state owner's durability, response shape."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import time

import numpy as np
import pytest

from adv.errors import ConfigError
from adv.serving import KeyRing, Ledger, Limits, RateLimit, RequestError, ServeConfig, decode, hash_key
from adv.serving.client import scores
from adv.serving.respond import body
from tests.serve_helpers import KEYS, SHAPE, npy, png, write_keys

LIMITS = Limits(max_body_bytes=64 * 1024, max_images=4, max_pixels=64 * 64)
IMG = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)


def _status(body_bytes: bytes, content_type: str | None, limits: Limits = LIMITS) -> int:
    try:
        decode(body_bytes, content_type, SHAPE, limits)
    except RequestError as e:
        assert "\n" not in e.reason and len(e.reason) < 200
        return e.status
    return 200


def test_decode_accepts_png_npy_and_json_batches():
    x = decode(png(IMG[0]), "image/png", SHAPE, LIMITS)
    assert x.shape == (1, *SHAPE) and x.dtype == np.float32 and np.abs(x - IMG).max() <= 0.5 / 255 + 1e-6
    assert decode(npy(IMG), "application/x-npy", SHAPE, LIMITS).shape == (1, *SHAPE)
    doc = {"images": [base64.b64encode(png(IMG[0])).decode(), base64.b64encode(npy(IMG[0])).decode()]}
    assert decode(json.dumps(doc).encode(), "application/json; charset=utf-8", SHAPE, LIMITS).shape == (2, *SHAPE)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((IMG[0, 0] * 255).astype(np.uint8)).convert("RGB").save(buf, "JPEG", quality=95)
    jpeg = decode(buf.getvalue(), "image/jpeg", SHAPE, LIMITS)  # RGB converted to the model's grey channel
    assert jpeg.shape == (1, *SHAPE) and np.abs(jpeg - IMG).mean() < 0.1
    u8 = decode(npy((IMG[0, 0] * 255).astype(np.uint8)), "application/x-npy", SHAPE, LIMITS)
    assert u8.shape == (1, *SHAPE) and u8.max() <= 1


def test_every_class_of_malformed_body_gets_its_4xx():
    nan = IMG.copy()
    nan[0, 0, 0, 0] = np.nan
    assert _status(png(IMG[0])[:40], "image/png") == 400  # truncated image
    assert _status(b"not json", "application/json") == 400
    assert _status(b'{"images": ["@@@"]}', "application/json") == 400  # bad base64
    assert _status(pickle.dumps(IMG), "application/x-npy") == 400  # pickles are never loaded
    assert _status(npy(IMG), "text/plain") == 415
    assert _status(npy(IMG), None) == 415
    assert _status(json.dumps({"images": [base64.b64encode(b"GIF89a....").decode()]}).encode(),
                   "application/json") == 415
    assert _status(npy(np.zeros((1, 3, 28, 28), np.float32)), "application/x-npy") == 422  # wrong dimensions
    assert _status(npy(nan), "application/x-npy") == 422
    assert _status(npy(IMG * 3), "application/x-npy") == 422
    assert _status(npy(np.array(["a"])), "application/x-npy") == 422
    assert _status(b'{"pictures": []}', "application/json") == 422
    assert _status(npy(np.zeros((5, *SHAPE), np.float32)), "application/x-npy") == 413  # too many images
    assert _status(b"\0" * (LIMITS.max_body_bytes + 1), "image/png") == 413
    big = np.zeros((100, 100), np.float32)
    assert _status(png(big.reshape(-1)[: 28 * 28]), "image/png") == 200
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (200, 200)).save(buf, "PNG")  # 40,000 pixels > max_pixels: refused before decoding
    assert _status(buf.getvalue(), "image/png") == 413


def test_keys_are_hashed_reloaded_on_change_and_revocable(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_TEST_KEYS", "carol=carol-key-123,admin:root=root-key-9999")
    path = write_keys(tmp_path / "keys.yaml")
    ring = KeyRing(str(path), "ADV_TEST_KEYS", check_every=0.0)
    assert ring.lookup(KEYS["alice"]).user == "alice" and ring.lookup(KEYS["ops"]).role == "admin"
    assert ring.lookup("carol-key-123").user == "carol" and ring.lookup("root-key-9999").role == "admin"
    assert ring.lookup("wrong-key-000") is None
    assert KEYS["alice"] not in repr(ring._ids) and hash_key(KEYS["alice"]) in ring._ids  # hashes only
    time.sleep(0.01)
    write_keys(path, revoked=("alice",), extra={"dave": "dave-key-0005"})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a visibly new mtime on coarse filesystems
    assert ring.lookup(KEYS["alice"]).revoked and ring.lookup("dave-key-0005").user == "dave"
    path.write_text("keys: [{user: x}]")  # a broken edit keeps the previous keys
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert ring.lookup("dave-key-0005").user == "dave"
    with pytest.raises(ConfigError, match="no API keys"):
        KeyRing(None, "ADV_TEST_NO_SUCH_VAR")


@pytest.mark.parametrize("policy", ["keep", "refuse"])
def test_a_broken_or_deleted_key_file_is_logged_once_and_follows_the_policy(tmp_path, monkeypatch, caplog, policy):
    monkeypatch.setenv("ADV_TEST_KEYS", "carol=carol-key-123")
    path = write_keys(tmp_path / "keys.yaml")
    ring = KeyRing(str(path), "ADV_TEST_KEYS", check_every=0.0, on_error=policy)
    caplog.set_level("WARNING", logger="adv.serving.keys")
    for broken in ("keys: [{user: x}]", None):  # an invalid edit, then the file deleted
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        for _ in range(5):
            alice = ring.lookup(KEYS["alice"])
            assert (alice is not None and alice.user == "alice") == (policy == "keep")
            assert ring.lookup("carol-key-123").user == "carol"  # the variable's keys are not the file's
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once per problem, not per request
    assert "not a valid key file" in warnings[0] and "cannot read the key file" in warnings[1]
    assert all(f"keys_on_error={policy}" in w and "alice-key" not in w for w in warnings)
    write_keys(path)
    assert ring.lookup(KEYS["alice"]).user == "alice" and ring.problem is None
    assert "valid again" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError, match="on_error"):
        KeyRing(str(path), on_error="ignore")


def test_rate_limit_and_quota_answer_with_retry_after():
    ledger = Ledger(RateLimit(rate=1.0, burst=2, quota=3, quota_window_s=100.0))
    assert ledger.admit("a", 0.0) is None and ledger.admit("a", 0.0) is None
    assert ledger.admit("a", 0.0) == 1  # bucket empty: one token per second
    assert ledger.admit("b", 0.0) is None  # another key has its own bucket
    assert ledger.admit("a", 1.0) is None  # refilled; third request of the window
    assert ledger.admit("a", 50.0) == 50  # quota of 3 spent until the window ends at t=100
    assert ledger.admit("a", 100.0) is None


def test_rate_limits_and_quotas_count_images_not_requests():
    """Issue 25: a 16-image request costs 16, so batching buys no extra queries."""
    from adv.serving.ledger import TooLarge, largest_request

    ledger = Ledger(RateLimit(rate=2.0, burst=16, quota=40, quota_window_s=100.0))
    assert ledger.admit("a", 0.0, cost=16) is None
    assert ledger.admit("a", 0.0, cost=1) == 1  # the bucket is empty after one 16-image request
    assert ledger.admit("a", 8.0, cost=16) is None  # refilled at 2 images/s
    assert ledger.admit("a", 100.0 - 1, cost=16) == 1  # quota: 32 of 40 spent, 16 more do not fit
    assert ledger.admit("a", 99.0, cost=8) is None and ledger.users["a"].window_requests == 40
    assert largest_request(RateLimit(burst=40)) == 40 and largest_request(RateLimit(), {"burst": 5}) == 5
    with pytest.raises(TooLarge, match="17 images in one request exceed this key's limit of 16"):
        ledger.admit("b", 0.0, cost=17)


def test_blank_empty_nested_and_foreign_bodies_are_client_errors():
    """Issue 25: empty and deeply nested JSON were 503s; a GIF/TIFF/WEBP/BMP under an image type is 415."""
    from PIL import Image

    assert _status(b'{"images": []}', "application/json") == 422
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _status(deep, "application/json", Limits(max_body_bytes=2**20)) == 400
    assert _status(b"[" * 50 + b"]" * 50, "application/json") == 422  # shallow nesting: parsed, then refused
    for fmt in ("GIF", "TIFF", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("L", SHAPE[1:]).save(buf, fmt)
        for kind in ("image/png", "image/jpeg"):
            assert _status(buf.getvalue(), kind) == 415, (fmt, kind)
    buf = io.BytesIO()
    Image.new("L", SHAPE[1:]).save(buf, "JPEG")
    assert _status(buf.getvalue(), "image/png") == 415 and _status(buf.getvalue(), "image/jpeg") == 200
    assert _status(png(IMG[0]), "image/jpeg") == 415
    assert _status(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png") == 400  # broken, not foreign
    blank = decode(png(np.zeros(SHAPE, np.float32)), "image/png", SHAPE, LIMITS)
    assert blank.shape == (1, *SHAPE) and not blank.any()


def test_owner_is_durable_before_answering_and_reloads(tmp_path):
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner

    cfg = ServeConfig(bundle="unused", state=str(tmp_path / "state"))
    small = DetectorConfig.model_validate({"index": {"capacity": 2000}})  # quick snapshots
    owner = DetectorOwner(cfg, small)
    rng = np.random.default_rng(1)
    x = np.repeat(rng.random((1, *SHAPE), dtype=np.float32), 12, axis=0)  # one image, again and again
    probs = np.full((12, 10), 0.1, np.float32)
    answers = [owner.observe(x[i : i + 1], ["eve"], probs[i : i + 1])[0] for i in range(12)]
    owner.observe(rng.random((2, *SHAPE), dtype=np.float32), ["frank", "frank"], probs[:2])
    stats = owner.stats("eve")
    assert stats["queries"] == 12 and stats["suspicious"] >= 1 and stats["first_flagged_query"] is not None
    assert owner.stats("frank")["queries"] == 2 and owner.stats("frank")["suspicious"] == 0  # isolation
    # a new owner on the same state (what a restart after a kill does) has every acknowledged update
    again = DetectorOwner(cfg, small)
    assert again.stats("eve") == stats and again.totals()["queries"] == 14 and len(again.detector) == 14
    flagged = [a for a in answers if a["alarms"]]
    clean = [a for a in answers if not a["alarms"]]
    shapes = {json.dumps(body([a], "label", 3)["predictions"][0], sort_keys=True).count(":") for a in answers}
    assert flagged and clean and len(shapes) == 1


@pytest.mark.parametrize("output", ["label", "topk", "probs"])
def test_response_fields_do_not_depend_on_the_decision_and_scores_invert_them(output):
    p = np.array([0.1, 0.6, 0.3], np.float32)
    deceived = p[[0, 2, 1]]  # what deceive serves: top two swapped
    a, b = body([{"probs": p}], output, 2)["predictions"][0], body([{"probs": deceived}], output, 2)["predictions"][0]
    assert a.keys() == b.keys() and {type(v) for v in a.values()} == {type(v) for v in b.values()}
    assert a["label"] == 1 and b["label"] == 2
    s = scores(a, 3)
    assert s.argmax() == 1 and abs(float(s.sum()) - 1) < 1e-5


def test_block_is_an_open_refusal_with_the_documented_status(tmp_path):
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner
    from adv.serving.respond import BLOCKED

    cfg = ServeConfig(bundle="unused", state=str(tmp_path / "state"))
    owner = DetectorOwner(cfg, DetectorConfig.model_validate({"index": {"capacity": 2000}, "action": "block"}))
    x = np.random.default_rng(2).random((1, *SHAPE), dtype=np.float32)
    answers = [owner.observe(x, ["gil"], np.full((1, 10), 0.1, np.float32))[0] for _ in range(14)]
    assert not answers[0]["blocked"] and any(a["blocked"] for a in answers)
    assert BLOCKED[0] == 403 and BLOCKED[1].startswith("refused")


def test_red_team_without_the_model_judges_by_the_answers_asked_around_the_attack(monkeypatch):
    """No bundle: clean labels are asked before the admin read, adversarial ones after it; success counts only
    images the endpoint classified right, and a refusal is no success."""
    import torch

    import adv.serving.redteam as rt

    calls = []

    class FakeEndpoint:  # answers "class 1 when the image is bright", refuses images brighter than 0.9
        rate_limited = 0

        def predict(self, x, key):
            calls.append("predict")
            return [{"blocked": True} if m > 0.9 else {"label": int(m > 0.5), "confidence": 0.9}
                    for m in x.reshape(len(x), -1).mean(1)]

        def get(self, path, key=None):
            calls.append("admin")
            return {"first_flagged_query": None, "queries": 0, "suspicious": 0}

    class Shift:  # an "attack" that brightens every image by eps after one query
        oracle = "labels"

        def __call__(self, oracle, x, y, *, eps, **params):
            oracle(x)
            return x + eps, torch.ones(len(x), dtype=torch.long)

    monkeypatch.setattr(rt, "get_attack", lambda name: Shift())
    x = torch.tensor([0.45, 0.45, 0.1, 0.85]).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 1, 0, 0])  # right, wrong, right, wrong (already class 1: not counted)
    row = rt.red_team(FakeEndpoint(), ["k"], ["u"], "admin", None, x, y, attack="square", eps=0.1, queries=10,
                      classes=2, output="label")
    # fooled among the right ones: 0.45 -> 0.55 yes, 0.1 -> 0.2 no; 0.85 -> 0.95 is refused, and was wrong anyway
    assert row["success_as_answered"] == 0.5 and row["judge_queries"] == 8 and row["queries"] == 4
    assert row["success_endpoint"] is None and row["in_process"] == rt.NO_BUNDLE
    assert calls == ["predict", "admin", "predict", "admin", "predict"]  # clean, before, attack, after, adversarial
    refused = rt.red_team(FakeEndpoint(), ["k"], ["u"], "admin", None, x, torch.tensor([0, 1, 0, 1]),
                          attack="square", eps=0.1, queries=10, classes=2, output="label")
    assert abs(refused["success_as_answered"] - 1 / 3) < 1e-6  # 0.85 is right now, its adversarial refused


class _Refusing:
    """An endpoint stand-in that refuses queries whose noise is small (as a detector tuned to it would)."""

    def __init__(self, clean: np.ndarray, limit: float):
        self.clean, self.limit, self.sent = clean, limit, []
        self.rate_limited = 0

    def predict(self, x: np.ndarray, key: str) -> list[dict]:
        self.sent.append((key, len(x)))
        moved = np.abs(x - self.clean[: len(x)]).reshape(len(x), -1).max(1)
        return [{"blocked": True} if m < self.limit else {"label": 1, "confidence": 0.9} for m in moved]


def test_per_query_rotation_spreads_every_images_queries_and_oars_grows_its_transform_on_refusals():
    import torch

    from adv.evaluate.query_detection import Transform
    from adv.serving.client import HttpOracle, Oars

    x = torch.full((4, *SHAPE), 0.5)
    spread = HttpOracle(_Refusing(x.numpy(), 0.0), [f"k{i}" for i in range(5)], output="labels", classes=10,
                        max_images=16, rotation="query")
    for _ in range(5):
        spread(x)
    assert spread.accounts_used == [0, 1, 2, 3, 4] and spread.total == 20
    assert sorted(spread._mine.values()) == [4] * 5  # each account saw 4 of the 20 queries
    by_request = HttpOracle(_Refusing(x.numpy(), 0.0), [f"k{i}" for i in range(5)], output="labels", classes=10)
    by_request(x)
    assert by_request.accounts_used == [0]  # the old rotation: a batch rides one key
    endpoint = _Refusing(x.numpy(), 0.09)  # refuses noise under 0.09: the OARS attacker must grow past it
    oars = HttpOracle(endpoint, ["a", "b"], output="labels", classes=10, rotation="query",
                      transform=Transform(uniform=0.05), oars=Oars(grow=2.0, retries=3))
    labels = oars(x)
    assert (labels == 1).all() and oars.resent >= 4 and oars.scale > 1.5 and oars.total == 4 + oars.resent
    plain = HttpOracle(_Refusing(x.numpy(), 0.09), ["a"], output="labels", classes=10,
                       transform=Transform(uniform=0.05))
    assert (plain(x) == -1).all()  # without OARS the same noise stays refused
    with pytest.raises(ValueError, match="adapts a transform"):
        HttpOracle(endpoint, ["a"], output="labels", classes=10, oars=Oars())
