"""Red-team the live endpoint: query attacks through a counting HTTP oracle, one account or many (Sybil).

    python -m jobs.redteam --url http://127.0.0.1:8000 --keys attacker-keys.yaml --attack hopskipjump \\
        --accounts 4 --n 8 --dataset fashion-mnist --eps 0.1 --queries 1000 --bundle runs/main/best

``--keys`` is a key file (adv/serving/keys.py format) with *plain* keys: the
attacker's accounts (role user, the first ``--accounts`` are used) and one
admin key, with which the harness reads when the detector flagged each
account (GET /v1/admin/users/ID); the attack itself never sees that. With
``--bundle`` the same attack also runs in-process, and success is measured
on the bundle's model (what a fresh account is served). Writes
``redteam.json`` and ``redteam.md`` under ``--out``. No Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from adv.errors import ConfigError
from adv.serving.client import Endpoint
from adv.serving.keys import KeyFile
from adv.serving.redteam import ATTACKS, red_team
from jobs.common import guarded, logger

log = logger("redteam")


def read_keys(path: str, accounts: int) -> tuple[list[str], list[str], str]:
    """(keys, users) of the first ``accounts`` user entries, and the admin key, from a plain-key file."""
    try:
        entries = KeyFile.model_validate(yaml.safe_load(Path(path).read_text())).keys
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the attacker's key file ({type(e).__name__})") from None
    users = [e for e in entries if e.role == "user" and not e.revoked and e.key]
    admins = [e for e in entries if e.role == "admin" and e.key]
    if len(users) < accounts:
        raise ConfigError(f"{path}: {accounts} accounts asked, {len(users)} plain user keys given")
    if not admins:
        raise ConfigError(f"{path}: needs one admin entry with a plain key (to read when the detector flagged)")
    chosen = users[:accounts]
    return [e.key for e in chosen], [e.user for e in chosen], admins[0].key


def run(url: str, keys_file: str, *, attack: str, accounts: int, n: int, dataset: str, eps: float, queries: int,
        bundle: str, seed: int = 0, data_root: str | None = None) -> dict:
    """One red-team round against ``url``; the report row."""
    import torch

    from adv.bundle import load_bundle
    from adv.data import load_dataset

    keys, users, admin = read_keys(keys_file, accounts)
    b = load_bundle(bundle)
    model = b.build("cpu")
    data = load_dataset(dataset, split="test", n=n, seed=seed, **({"root": data_root} if data_root else {}))
    endpoint = Endpoint(url)
    try:
        info = endpoint.get("/v1/model", keys[0])
        log(f"{attack} on {n} {dataset} images, eps {eps}, ~{queries} queries each, {accounts} account(s), "
            f"endpoint output {info['output']!r}")
        with torch.no_grad():
            torch.manual_seed(seed)
            return red_team(endpoint, keys, users, admin, model, data.images, data.labels, attack=attack, eps=eps,
                            queries=queries, classes=int(b.manifest["classifier"]["num_classes"]),
                            output=info["output"], max_images=int(info.get("max_images", 16)), seed=seed)
    finally:
        endpoint.close()


def markdown(rows: list[dict]) -> str:
    lines = ["| attack | endpoint output | oracle | accounts | threat model | success via endpoint | "
             "success in-process | mean queries (endpoint / in-process) | flagged at query | accounts flagged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flagged = "never" if r["flagged_at_query"] is None else str(r["flagged_at_query"])
        lines.append(f"| {r['attack']} | {r['output']} | {r['oracle']} | {r['accounts']} | {r['threat_model']} | "
                     f"{r['success_endpoint']:.0%} | {r['success_in_process']:.0%} | "
                     f"{r['mean_queries']:.0f} / {r['mean_queries_in_process']:.0f} | {flagged} | "
                     f"{r['accounts_flagged']}/{r['accounts']} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--bundle", required=True, help="the served bundle: the in-process comparison and true success")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/redteam")
    args = p.parse_args(argv)

    def body() -> int:
        if args.accounts < 1 or args.n < 1 or args.queries < 1:
            raise ConfigError("--accounts, --n and --queries must be >= 1")
        row = run(args.url, args.keys, attack=args.attack, accounts=args.accounts, n=args.n, dataset=args.dataset,
                  eps=args.eps, queries=args.queries, bundle=args.bundle, seed=args.seed, data_root=args.data_dir)
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
