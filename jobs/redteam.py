"""Red-team the live endpoint: query attacks through a counting HTTP oracle, one account or many (Sybil).

    python -m jobs.redteam --url http://127.0.0.1:8000 --keys attacker-keys.yaml --attack hopskipjump \\
        --accounts 4 --n 8 --dataset fashion-mnist --eps 0.1 --queries 1000 [--bundle runs/main/best]

``--keys`` is a key file (adv/serving/keys.py format) with *plain* keys: the
attacker's accounts (role user, the first ``--accounts`` are used) and one
admin key, with which the harness reads when the detector flagged each
account (GET /v1/admin/users/ID); the attack itself never sees that. With
``--bundle`` (the served bundle) the same attack also runs in-process, and
success is measured on the bundle's model (what a fresh account is served).
Without it (only the endpoint) success is as answered by the endpoint, to the
attacker's first account, which a detector action can change; the in-process
comparison is reported as not run. Writes ``redteam.json`` and
``redteam.md`` under ``--out``. No Ray needed.

The adaptive attacker: ``--rotation query`` spreads each image's queries over
all ``--accounts`` (not one request per key), ``--noise``/``--shift``/
``--brightness`` transform every query at random before it is sent (uniform
noise of that half-width, a cyclic shift of up to that many pixels, a
brightness offset), and ``--oars`` resends refused queries with a larger
transform (Feng et al., CCS 2023). The noisy Sybil of issue 25::

    python -m jobs.redteam ... --attack square --accounts 150 --rotation query --noise 0.05
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from adv.errors import ConfigError
from adv.retry import wait_until
from adv.serving.client import ROTATIONS, Endpoint, Oars
from adv.serving.keys import KeyFile
from adv.serving.redteam import ATTACKS, red_team
from adv.serving.redteam_report import markdown, plot_story
from jobs.common import guarded, logger

log = logger("redteam")


def read_keys(path: str, accounts: int, only: list[str] | None = None) -> tuple[list[str], list[str], str]:
    """(keys, users) of the first ``accounts`` user entries (or of the users ``only``), and the admin key,
    from a plain-key file."""
    try:
        entries = KeyFile.model_validate(yaml.safe_load(Path(path).read_text())).keys
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the attacker's key file ({type(e).__name__})") from None
    users = [e for e in entries if e.role == "user" and not e.revoked and e.key and (only is None or e.user in only)]
    if only is not None:
        if len(users) != len(only):
            raise ConfigError(f"{path}: no plain key for {sorted(set(only) - {e.user for e in users})}")
        accounts = len(only)
    admins = [e for e in entries if e.role == "admin" and e.key]
    if len(users) < accounts:
        raise ConfigError(f"{path}: {accounts} accounts asked, {len(users)} plain user keys given")
    if not admins:
        raise ConfigError(f"{path}: needs one admin entry with a plain key (to read when the detector flagged)")
    chosen = users[:accounts]
    return [e.key for e in chosen], [e.user for e in chosen], admins[0].key


def run(url: str, keys_file: str, *, attack: str, accounts: int, n: int, dataset: str, eps: float, queries: int,
        bundle: str | None = None, seed: int = 0, data_root: str | None = None,
        users: list[str] | None = None, rotation: str = "request", transform=None, oars=None) -> dict:
    """One red-team round against ``url`` (as ``users``, default the file's first ``accounts``); the row.

    ``bundle``: the served bundle (true success and the in-process comparison), or None: success as
    answered by the endpoint.
    """
    import numpy as np
    import torch

    from adv.bundle import load_bundle
    from adv.data import load_dataset

    keys, names, admin = read_keys(keys_file, accounts, users)
    b = load_bundle(bundle) if bundle else None
    model = b.build("cpu") if b is not None else None
    data = load_dataset(dataset, split="test", n=n, seed=seed, **({"root": data_root} if data_root else {}))
    endpoint = Endpoint(url)
    try:
        info = endpoint.get("/v1/model", keys[0])
        classes = served_classes(info, data.tensors()[0].shape[1:], dataset)
        log(f"{attack} on {n} {dataset} images, eps {eps}, ~{queries} queries each, {accounts} account(s), "
            f"endpoint output {info['output']!r}" + ("" if b else "; no --bundle: success as answered by it"))
        with torch.no_grad():
            torch.manual_seed(seed)
            x, y = data.tensors()
            row = red_team(endpoint, keys, names, admin, model, x, y, attack=attack, eps=eps,
                           queries=queries, classes=classes,
                           output=info["output"], max_images=int(info.get("max_images", 16)), seed=seed,
                           rotation=rotation, transform=transform, oars=oars)
        lat = 1000 * np.array(endpoint.latencies or [0.0])
        return {**row, "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}}
    finally:
        endpoint.close()


def served_classes(info: dict, shape, dataset: str) -> int:
    """The endpoint's class count from its manifest (GET /v1/model), after checking ``dataset``'s image shape."""
    clf = info.get("classifier") or {}
    if "num_classes" not in clf:
        raise ConfigError("the endpoint's GET /v1/model has no classifier.num_classes: is it a jobs.serve endpoint?")
    expected = clf.get("input_size")
    if expected is not None and tuple(expected) != tuple(shape):
        raise ConfigError(f"--dataset {dataset} has images of shape {tuple(shape)}, the endpoint expects "
                          f"{tuple(expected)}")
    return int(clf["num_classes"])


# ---- the main job's serving story: deploy, red-team with one account and many, report, shut down ---------

ROUNDS = (  # (endpoint output, attack, attacker: 1 account, "sybil" (requests rotated), "noisy" (issue 25))
    ("label", "hopskipjump", 1), ("label", "hopskipjump", "sybil"), ("label", "square", 1),
    ("probs", "square", 1), ("probs", "square", "sybil"), ("probs", "square", "noisy"),
)
#: The noisy Sybil: each query rotated over this many accounts, with uniform noise of this half-width.
NOISY_ACCOUNTS, NOISY_NOISE = 150, 0.05


def round_accounts(kind, accounts: int) -> int:
    return {1: 1, "sybil": accounts, "noisy": NOISY_ACCOUNTS}[kind]


def _story_keys(folder: Path, accounts: int) -> tuple[Path, Path, dict]:
    """Fresh random keys: the server's file (hashes only) and the attacker's (plain keys, mode 600)."""
    import secrets

    from adv.serving.keys import hash_key

    users = [f"attacker{r}-{j}" for r, (_, _, kind) in enumerate(ROUNDS)
             for j in range(round_accounts(kind, accounts))] + ["operator"]
    keys = {u: secrets.token_urlsafe(24) for u in users}
    role = lambda u: "admin" if u == "operator" else "user"  # noqa: E731
    server, attacker = folder / "keys.yaml", folder / "attacker-keys.yaml"
    server.write_text(yaml.safe_dump({"keys": [{"user": u, "sha256": hash_key(k), "role": role(u)}
                                               for u, k in keys.items()]}))
    attacker.touch(mode=0o600)
    attacker.write_text(yaml.safe_dump({"keys": [{"user": u, "key": k, "role": role(u)} for u, k in keys.items()]}))
    return server, attacker, keys


def story(bundle: str, out: str | Path, *, dataset: str = "fashion-mnist", n: int = 4, queries: int = 300,
          accounts: int = 4, eps: float = 0.1, data_root: str | None = None, access_log: bool = False) -> Path:
    """Deploy ``bundle`` on local Serve, red-team it (label-only and probabilities endpoints, one account and
    ``accounts``), write ``serve-report.md`` with a figure under ``out``, shut Serve down; the report's path.

    Serve's per-request access log is off unless ``access_log`` (the red team sends hundreds of requests)."""
    import shutil

    from adv.evaluate.query_detection import Transform
    from adv.serving import RateLimit, ServeConfig
    from jobs.common import init_ray
    from jobs.serve import deploy, free_port, undeploy

    folder = Path(out)
    shutil.rmtree(folder / "state", ignore_errors=True)  # a fresh detector: the story starts from no history
    folder.mkdir(parents=True, exist_ok=True)
    server_keys, attacker_keys, plain = _story_keys(folder, accounts)
    cfg = ServeConfig(bundle=str(bundle), keys=str(server_keys), keys_env="ADV_STORY_NO_KEYS",
                      state=str(folder / "state"), name="main", rate_limit=RateLimit(rate=1000, burst=1000))
    init_ray()
    rows, port = [], free_port()
    try:
        for output in ("label", "probs"):
            cfg = cfg.model_copy(update={"output": output})
            url = deploy(cfg, "127.0.0.1", port, access_log=access_log)  # the same application, updated in place
            _wait_for_output(url, plain["operator"], output)
            log(f"endpoint at {url}, output {output!r}")
            for r, (out_kind, attack, acc) in enumerate(ROUNDS):
                if out_kind != output:
                    continue
                k = round_accounts(acc, accounts)
                noisy = {"rotation": "query", "transform": Transform(uniform=NOISY_NOISE)} if acc == "noisy" else {}
                row = run(url, str(attacker_keys), attack=attack, accounts=k, n=n, dataset=dataset, eps=eps,
                          queries=queries, bundle=str(bundle), seed=r, data_root=data_root,
                          users=[f"attacker{r}-{j}" for j in range(k)], **noisy)
                rows.append(row)
    finally:
        undeploy(cfg)
    (folder / "redteam.json").write_text(json.dumps(rows, indent=2))
    return write_story(folder, rows, bundle, cfg)


def _wait_for_output(url: str, key: str, output: str, timeout_s: float = 120.0) -> None:
    """An in-place update reports RUNNING while old replicas still answer: wait for the new config."""
    endpoint = Endpoint(url)
    try:
        if not wait_until(lambda: endpoint.get("/v1/model", key)["output"] == output, timeout_s):
            raise ConfigError(f"the endpoint at {url} still answers with the old output after {timeout_s:.0f} s")
    finally:
        endpoint.close()


def write_story(folder: Path, rows: list[dict], bundle: str, cfg) -> Path:
    from adv.bundle import load_bundle
    from jobs.serve import detector_config

    loaded = load_bundle(bundle)
    manifest, action = loaded.public_manifest(), detector_config(cfg, loaded)["action"]
    plot_story(rows, folder / "serve-report.png")
    numbers = "\n".join(f"| {k} | {v['value']:.1%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}] | {v['n']} "
                        f"| {v['label']} | {v['subset']} |" for k, v in manifest["numbers"].items())
    lat = [r["latency_ms"] for r in rows]
    text = "\n".join([
        "# Serve report", "",
        f"Bundle `{bundle}` served by `jobs.serve` on local Ray Serve (127.0.0.1), detector action "
        f"`{action}`; stages {manifest['stages'] or 'none'}; endpoint output per row.", "",
        "| number | value [95% CI] | n | measured as | on |", "|---|---|---|---|---|", numbers, "",
        "## Red team through the endpoint", "",
        "Each row is one attacker (`jobs.redteam`): the library's attack through a counting HTTP oracle, "
        "rotating over its accounts; the flag time comes from the admin endpoint, never from the answers. "
        "Success is measured on the bundle's model in-process (what a fresh account is served); "
        "'in-process' is the same attack without the endpoint or its detector. Under `deceive` a flagged "
        "attacker is served plausible wrong answers: it believes it has succeeded and stops early (fewer queries "
        "than in-process) while its true success stays low; an attacker who sees that the answers disagree "
        "with a fresh account's could notice, which this harness does not try. The last row is the noisy "
        f"Sybil of issue 25: each image's queries rotated over {NOISY_ACCOUNTS} accounts with uniform noise of "
        f"±{NOISY_NOISE:g} on every query, which breaks the pixel fingerprint's exact hashes; its in-process "
        "twin sends the same noisy queries with no detector.", "",
        markdown(rows),
        "Endpoint figures per round (one request per oracle call of up to 16 images): "
        + "; ".join(f"{r['attack']}/{r['output']}/{r['accounts']} acc: {r['requests']} requests, "
                    f"p50 {ms['p50']:.0f} ms, p99 {ms['p99']:.0f} ms" for r, ms in zip(rows, lat)) + ".", "",
        "![red team](serve-report.png)", ""])
    path = folder / "serve-report.md"
    path.write_text(text)
    return path


def attacker_transform(args):
    """The per-query transform the options ask for, or None (validated: one line on a bad value)."""
    from pydantic import ValidationError

    from adv.evaluate.query_detection import Transform

    if not (args.noise or args.shift or args.brightness):
        return None
    try:
        return Transform(uniform=args.noise, shift=args.shift, brightness=args.brightness)
    except ValidationError as e:
        raise ConfigError(f"bad transform: {e.errors()[0]['loc'][0]} {e.errors()[0]['msg']}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.redteam", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--keys", required=True, help="key file with the attacker's plain keys and one admin key")
    p.add_argument("--attack", choices=ATTACKS, default="hopskipjump")
    p.add_argument("--accounts", type=int, default=1)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", help="folder to look for the dataset first")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--bundle", help="the served bundle, if you have it: true success (on its model) and the "
                   "in-process comparison; without it success is as answered by the endpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotation", choices=ROTATIONS, default="request",
                   help="over the accounts: one request per key in turn, or each query (each image's queries "
                        "spread over all accounts)")
    p.add_argument("--noise", type=float, default=0.0, help="uniform noise of this half-width on every query")
    p.add_argument("--shift", type=int, default=0, help="a random cyclic shift of up to this many pixels per query")
    p.add_argument("--brightness", type=float, default=0.0, help="a random brightness offset up to this per query")
    p.add_argument("--oars", action="store_true", help="OARS (Feng et al., CCS 2023): resend refused queries with a "
                   "larger transform, and keep the scale that passed")
    p.add_argument("--out", default="runs/redteam")
    args = p.parse_args(argv)

    def body() -> int:
        if args.accounts < 1 or args.n < 1 or args.queries < 1:
            raise ConfigError("--accounts, --n and --queries must be >= 1")
        transform = attacker_transform(args)
        if args.oars and transform is None:
            raise ConfigError("--oars adapts a transform: give --noise, --shift or --brightness too")
        row = run(args.url, args.keys, attack=args.attack, accounts=args.accounts, n=args.n, dataset=args.dataset,
                  eps=args.eps, queries=args.queries, bundle=args.bundle, seed=args.seed, data_root=args.data_dir,
                  rotation=args.rotation, transform=transform, oars=Oars() if args.oars else None)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "redteam.json").write_text(json.dumps([row], indent=2))
        (out / "redteam.md").write_text(markdown([row]))
        print(markdown([row]))
        log(f"report: {out / 'redteam.md'}")
        return 0

    return guarded("redteam", body, "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
