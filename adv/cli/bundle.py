"""``adv bundle``: make a defense bundle without a sweep, or show one.

    adv bundle create --checkpoint runs/fm-lenet/model.pt --defense dwt:wavelet=db2 \\
        --dataset fashion-mnist --n 300 --attack fgsm --attack pgd --eps 0.1 --steps 10 --out bundles/dwt
    adv bundle create --model-factory mypkg.nets:make_net --weights net.pt --defense dwt:wavelet=haar \\
        --dataset cifar10 --eps 8/255 --out bundles/mine      # your own architecture (importable where served)
    adv bundle show bundles/dwt            # the manifest (verified); --public: what Serve shows clients

``create`` measures the clean, non-adaptive and adaptive accuracies (each with
a Wilson 95% interval) on a seeded test subset with the evaluation job's grid
worker, and records that subset so ``adv eval --bundle DIR`` re-evaluates on it.
``--out`` may be a local folder or a pyarrow URI (``s3://bucket/bundles/dwt``).
"""

from __future__ import annotations

import json
import os
import tempfile

from adv.cli.common import add_data_args, add_model_args, budget, factory_on_path, load_data, load_model, positive_int
from adv.errors import ConfigError

NAME = "bundle"
HELP = "defense bundles: create one from a classifier and stages (with measured numbers), or show one"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    create = sub.add_parser("create", help="measure a defended model on a test subset and write a bundle")
    add_model_args(create, factory=True)
    create.add_argument("--defense", action="append", default=[], metavar="NAME:k=v,...",
                        help="stage in front of the classifier (repeat to compose); learned ones with checkpoint=")
    create.add_argument("--detector", metavar="NAME:k=v,...", help="per-input detector, e.g. disagreement:checkpoint=F")
    create.add_argument("--query-detector", metavar="JSON_FILE",
                        help="query-attack detector config (a DetectorConfig as JSON) to ship with the bundle")
    add_data_args(create)
    create.set_defaults(n=300)
    create.add_argument("--attack", action="append", default=[], metavar="NAME",
                        help="attack of the grid (repeat; default: fgsm and pgd)")
    create.add_argument("--eps", type=budget, required=True, help="perturbation budget: a number or a fraction (8/255)")
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
    from adv.defenses.compose import build_defended
    from adv.tuning.trials import Setting, measure

    grid = grid_points(args.attack, args.eps, args.norm, args.steps)
    query = None
    if args.query_detector:
        try:
            with open(args.query_detector) as f:
                query = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--query-detector: cannot read {args.query_detector}: {exc}") from None
    if not (args.checkpoint or args.model or args.model_factory):
        raise ConfigError("give --checkpoint PATH, --model NAME --weights PATH or --model-factory MODULE:FUNCTION")
    if args.model_factory:
        factory_on_path(args.model_factory)  # a typo fails before the data loads
    elif args.model and not (args.weights or args.pretrained):
        raise ConfigError("--model needs --weights PATH (or --pretrained): a bundle ships a trained classifier")
    # a checkpoint or factory loads, and the stages compose, before the (slow) data loading; only a registry
    # model needs the data first (its classes and input size)
    data = load_data(args) if args.model else None
    classifier = load_model(args, data)
    build_defended(classifier, args.defense, detector=args.detector)
    if data is None:
        data = load_data(args)
    subset = f"{args.dataset} {args.split}[n={len(data)},seed={args.seed}]"
    with tempfile.TemporaryDirectory(prefix="adv-bundle-create-") as tmp:
        checkpoint, factory = _classifier_file(args, classifier, data, tmp)
        numbers = measure(_loader(args, checkpoint), data, Setting(grid, 1.0, subset, args.seed, args.batch_size))
        bundle = write_bundle(
            args.out, checkpoint=checkpoint, stages=args.defense, detector=args.detector, query_detector=query,
            numbers=numbers, provenance={**provenance_defaults(), "made_by": "adv bundle create"}, factory=factory,
            evaluation={"dataset": args.dataset, "split": args.split, "n": len(data), "seed": args.seed,
                        "eps": args.eps, "norm": args.norm, "attacks": [gp.key for gp in grid]})
    for track, num in numbers.items():
        lo, hi = num.ci95
        print(f"{track}: {num.value:.4f} [{lo:.4f}, {hi:.4f}] (n={num.n}, {subset})")
    print(bundle.location)
    return 0


def _classifier_file(args, classifier, data, tmp: str) -> tuple[str, dict | None]:
    """``(file the bundle ships as classifier.pt, factory entry or None)``.

    An adv checkpoint ships as it is; a registry model with foreign weights becomes an adv checkpoint; a
    factory's module ships as the state_dict it loaded (prefixes already aligned), rebuilt by the factory.
    """
    from adv.bundle import save_factory_classifier
    from adv.models import save_checkpoint

    if args.checkpoint:
        return args.checkpoint, None
    path = os.path.join(tmp, "classifier.pt")
    if not args.model_factory:
        save_checkpoint(path, classifier, dataset=data.name, extra={"weights": str(args.weights or "pretrained")})
        return path, None
    return path, save_factory_classifier(classifier, args.model_factory, path, data)


def _loader(args, checkpoint: str):
    """The grid worker's loader of the defended classifier (a factory is rebuilt from the shipped state_dict)."""
    from adv.tuning.trials import stage_loader

    if not args.model_factory:
        return stage_loader(checkpoint, args.defense, args.detector)
    return stage_loader(None, args.defense, args.detector, factory=args.model_factory, weights=checkpoint)


def _show(args) -> int:
    from adv.bundle import load_bundle

    b = load_bundle(args.bundle)
    print(json.dumps(b.public_manifest() if args.public else b.manifest, indent=2, default=str))
    return 0
