"""``adv bundle``: make a defense bundle without a sweep, or show one.

    adv bundle create --checkpoint runs/fm-lenet/model.pt --defense dwt:wavelet=db2 \\
        --dataset fashion-mnist --n 300 --attack fgsm --attack pgd --eps 0.1 --steps 10 --out bundles/dwt
    adv bundle show bundles/dwt            # the manifest (verified); --public: what Serve shows clients

``create`` measures the clean, non-adaptive and adaptive accuracies (each with
a Wilson 95% interval) on a seeded test subset with the evaluation job's grid
worker, and records that subset so ``adv eval --bundle DIR`` re-evaluates on it.
``--out`` may be a local folder or a pyarrow URI (``s3://bucket/bundles/dwt``).
"""

from __future__ import annotations

import json

from adv.cli.common import add_data_args, nonneg_float, positive_int
from adv.errors import ConfigError

NAME = "bundle"
HELP = "defense bundles: create one from a checkpoint and stages (with measured numbers), or show one"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    create = sub.add_parser("create", help="measure a defended model on a test subset and write a bundle")
    create.add_argument("--checkpoint", required=True, help="adv classifier checkpoint (model.pt)")
    create.add_argument("--defense", action="append", default=[], metavar="NAME:k=v,...",
                        help="stage in front of the classifier (repeat to compose); learned ones with checkpoint=")
    create.add_argument("--detector", metavar="NAME:k=v,...", help="per-input detector, e.g. disagreement:checkpoint=F")
    create.add_argument("--query-detector", metavar="JSON_FILE",
                        help="query-attack detector config (a DetectorConfig as JSON) to ship with the bundle")
    add_data_args(create)
    create.set_defaults(n=300)
    create.add_argument("--attack", action="append", default=[], metavar="NAME",
                        help="attack of the grid (repeat; default: fgsm and pgd)")
    create.add_argument("--eps", type=nonneg_float, required=True, help="perturbation budget")
    create.add_argument("--norm", default="linf", choices=["linf", "l2"])
    create.add_argument("--steps", type=positive_int, default=10, help="iterations, for attacks that iterate")
    create.add_argument("--batch-size", type=positive_int, default=64)
    create.add_argument("--out", required=True, help="bundle folder or pyarrow URI")
    show = sub.add_parser("show", help="print a bundle's manifest after checking every file's sha256")
    show.add_argument("bundle", help="bundle folder or pyarrow URI")
    show.add_argument("--public", action="store_true", help="only what a client may see (no detector thresholds)")


def run(args) -> int:
    if args.action is None:
        raise ConfigError("adv bundle needs an action: create or show")
    return {"create": _create, "show": _show}[args.action](args)


def grid_points(attacks: list[str], eps: float, norm: str, steps: int):
    """The attack grid of ``create``: each attack at ``eps``, iterative ones with ``steps``."""
    from adv.attacks import get_attack
    from adv.evaluate.worker import GridPoint

    out = []
    for name in attacks or ["fgsm", "pgd"]:
        spec = get_attack(name.replace("-", "_"))
        if norm not in spec.norms:
            raise ConfigError(f"--attack {spec.name} supports --norm {'/'.join(spec.norms)}, got {norm}")
        budget = next((p for p in ("steps", "queries") if p in spec.defaults), None)
        out.append(GridPoint(spec.name, eps, norm, steps if budget else None, budget))
    return tuple(out)


def _create(args) -> int:
    from adv.bundle import provenance_defaults, write_bundle
    from adv.data import load_dataset
    from adv.tuning.trials import Setting, measure, stage_loader

    grid = grid_points(args.attack, args.eps, args.norm, args.steps)
    query = None
    if args.query_detector:
        try:
            with open(args.query_detector) as f:
                query = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--query-detector: cannot read {args.query_detector}: {exc}") from None
    from adv.defenses.compose import build_defended
    from adv.models import load_checkpoint

    build_defended(load_checkpoint(args.checkpoint)[0], args.defense, detector=args.detector)  # fail before data
    data = load_dataset(args.dataset, split=args.split, n=args.n, seed=args.seed, root=args.data_dir,
                        download=args.download)
    subset = f"{args.dataset} {args.split}[n={len(data)},seed={args.seed}]"
    numbers = measure(stage_loader(args.checkpoint, args.defense, args.detector), data,
                      Setting(grid, 1.0, subset, args.seed, args.batch_size))
    bundle = write_bundle(
        args.out, checkpoint=args.checkpoint, stages=args.defense, detector=args.detector, query_detector=query,
        numbers=numbers, provenance={**provenance_defaults(), "made_by": "adv bundle create"},
        evaluation={"dataset": args.dataset, "split": args.split, "n": len(data), "seed": args.seed,
                    "eps": args.eps, "norm": args.norm, "attacks": [gp.key for gp in grid]})
    for track, num in numbers.items():
        lo, hi = num["ci95"]
        print(f"{track}: {num['value']:.4f} [{lo:.4f}, {hi:.4f}] (n={num['n']}, {subset})")
    print(bundle.location)
    return 0


def _show(args) -> int:
    from adv.bundle import load_bundle

    b = load_bundle(args.bundle)
    print(json.dumps(b.public_manifest() if args.public else b.manifest, indent=2, default=str))
    return 0
