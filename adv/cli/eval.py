"""``adv eval``: clean and worst-case robust accuracy of a model under a sequence of attacks.

    adv eval --model lenet5 --weights mnist_lenet5_advtrained.pt --dataset mnist --n 1000 \\
        --attack fgsm --attack pgd --eps 0.3 --steps 40 --step-size 0.01 --json
    adv eval --bundle runs/tune/default/best          # a defense bundle, adaptively, on its test subset
    adv eval --model-factory mypkg.nets:make_net --weights net.pt --dataset cifar10 --suite standard --eps 8/255

Attacks run in the given order, each on the points still standing (the
AutoAttack protocol); hyperparameter flags apply to every attack that takes
them. ``--suite standard`` (or ``l2``, ``rand``) appends AutoAttack's fixed
suite after them (``adv eval --checkpoint M --suite standard --eps 0.3``).
The evaluated model is built in one place, ``build_model``, so defenses and
detectors can wrap it there.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from adv.cli.common import (
    add_data_args, add_model_args, budget, factory_on_path, load_data, load_model, nonneg_float, positive_int,
)
from adv.errors import ConfigError
from adv.models.device import resolve_device

NAME = "eval"
HELP = "robust accuracy under one or more attacks (worst case, AutoAttack protocol)"

#: CLI flag -> attack hyperparameter, applied to every attack that takes it.
HYPER_FLAGS = {"steps": "steps", "step_size": "step_size", "restarts": "restarts", "loss": "loss",
               "queries": "queries"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, factory=True)
    parser.add_argument("--bundle", metavar="DIR",
                        help="a defense bundle (folder or pyarrow URI): its classifier, stages and detector, attacked "
                             "adaptively; defaults to the manifest's test subset, eps and --suite standard")
    add_data_args(parser, dataset_required=False)
    parser.set_defaults(seed=None)  # None: the bundle's seed, else 0
    g = parser.add_argument_group("attacks")
    g.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="registered attack (repeat for a worst-case sequence); see `adv info attacks`")
    g.add_argument("--suite", choices=["standard", "l2", "rand"],
                   help="AutoAttack-style suite run after the --attack list (standard: L-inf; l2; rand: EOT)")
    g.add_argument("--eps", type=budget, help="perturbation budget: a number or a fraction (8/255); "
                                              "required unless --bundle records one")
    g.add_argument("--norm", default="linf", choices=["linf", "l2"])
    g.add_argument("--steps", type=positive_int, help="iterations, for attacks that iterate")
    g.add_argument("--step-size", type=nonneg_float, help="step size, for attacks that take one")
    g.add_argument("--restarts", type=positive_int, help="random restarts (pgd, apgd)")
    g.add_argument("--loss", choices=["ce", "cw", "dlr"], help="loss, for attacks that take one")
    g.add_argument("--queries", type=positive_int, help="query budget (square)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter (JSON value), for every attack that takes KEY")
    d = parser.add_argument_group("defenses (see `adv defend list`)")
    d.add_argument("--defense", action="append", default=[], metavar="NAME:k=v,...",
                   help="defense stage in front of the model (repeat to compose), e.g. dwt:wavelet=haar,level=1")
    d.add_argument("--adaptive", action="store_true",
                   help="craft adversarials on the defended pipeline (BPDA/EOT); default: on the undefended model")
    d.add_argument("--detector", metavar="NAME:k=v,...", help="detector in parallel, e.g. disagreement:checkpoint=F")
    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=positive_int, default=256)
    r.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    r.add_argument("--checks", default="cheap", choices=["cheap", "all", "none"],
                   help="sanity checks for gradient masking; 'all' adds step and eps sweeps")
    r.add_argument("--no-early-stop", action="store_true", help="run iterative attacks for all their steps")
    r.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (accelerators)")
    r.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    r.add_argument("--state", help="JSON file to save progress to and resume from")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from adv.evaluate.threat import defense_report, evaluation_setup, robust_accuracy_inputs
    from adv.evaluate import robust_accuracy
    from adv.evaluate.checks import ALL, CHEAP

    args = with_bundle(args) if args.bundle else argparse.Namespace(**{**vars(args), "seed": args.seed or 0})
    if args.dataset is None:
        raise ConfigError("give --dataset NAME (or --bundle DIR, whose manifest names one)")
    if args.eps is None:
        raise ConfigError("give --eps (or --bundle DIR, whose manifest records one)")
    device = resolve_device(args.device)
    if not (args.attack or args.suite):
        raise ConfigError("give --attack NAME (repeatable) and/or --suite standard|l2|rand")
    attacks = attack_list(args)
    suite = _suite_pairs(args.suite, args.norm) if args.suite else []  # checks the norm before data loading
    if args.checkpoint and (args.model or args.weights):  # before the (slow) data loading
        raise ConfigError("give either --checkpoint or --model [--weights], not both")
    if args.model_factory:  # import it before the data loads: a typo fails at once
        factory_on_path(args.model_factory)
    elif not (args.checkpoint or args.model):
        raise ConfigError("give --model NAME (with --weights PATH), --checkpoint PATH "
                          "or --model-factory MODULE:FUNCTION")
    data = load_data(args)
    model = build_model(args, data, device)
    if args.model_factory:  # a user's own module: the likeliest silent mistake is a missing Normalize
        warn_missing_normalization(model, data, device)
    # a --checkpoint (or --bundle) run names the architecture its checkpoint records; "weights" gives the file
    model_name = args.model or args.model_factory or getattr(model, "arch", None) or args.checkpoint or ""
    evaluated = evaluation_setup(model, args.defense, adaptive=args.adaptive, detector=args.detector,
                                 checkpoint=args.checkpoint, device=device)
    if evaluated is not None:  # the defended model is scored; the threat model decides what is attacked
        # the defended threat model wraps each attack; an adaptive randomized pipeline already averages draws
        model, attacks_run = robust_accuracy_inputs(evaluated, attacks + suite)
    result = robust_accuracy(
        model, data, attacks_run if evaluated else attacks, suite=None if evaluated else args.suite, eps=args.eps,
        norm=args.norm, batch_size=args.batch_size, device=device,
        seed=args.seed, early_stop=not args.no_early_stop, state_path=args.state, progress=not args.quiet,
        checks={"cheap": CHEAP, "all": ALL, "none": ()}[args.checks], amp=args.amp,
        channels_last=args.channels_last,
    )
    extra = defense_report(evaluated, data, attacks, eps=args.eps, norm=args.norm, batch_size=args.batch_size,
                           seed=args.seed) if evaluated else {}
    if args.json:
        source = args.checkpoint or args.weights or ""
        print(json.dumps({"model": model_name, "weights": source, "dataset": args.dataset,
                          "split": args.split, **result.to_dict(), **extra}, default=str))
    else:
        print(result)
        for key, value in extra.items():
            print(f"{key}: {json.dumps(value, default=str)}")
    return 0


def with_bundle(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the bundle's classifier, stages and detector, and its manifest's defaults
    (dataset, split, test subset, seed, eps; ``--suite standard`` when no --attack/--suite is given)."""
    from adv.bundle import load_bundle

    clash = [f"--{k.replace('_', '-')}"
             for k in ("checkpoint", "model", "model_factory", "weights", "defense", "detector")
             if getattr(args, k, None)]
    if clash:
        raise ConfigError(f"--bundle holds the classifier, stages and detector; drop {', '.join(clash)}")
    b = load_bundle(args.bundle)
    stages, detector = b.specs()
    ev = b.evaluation

    def pick(key: str, default=None):
        return getattr(args, key) if getattr(args, key) is not None else ev.get(key, default)

    # a user's architecture is rebuilt by its factory from the shipped state_dict; else the adv checkpoint
    model = ({"model_factory": b.factory, "weights": str(b.checkpoint), "checkpoint": None} if b.factory
             else {"checkpoint": str(b.checkpoint)})
    return argparse.Namespace(**{
        # a bundle of a trained classifier alone (a training-time defense) is attacked directly: white-box on it
        # is the adaptive attack, and there is no pipeline to wrap
        **vars(args), **model, "defense": stages, "detector": detector, "adaptive": bool(stages or detector),
        "dataset": pick("dataset"), "n": pick("n"), "eps": pick("eps"), "seed": pick("seed", 0),
        "split": args.split if args.split != "test" else ev.get("split", "test"),
        "suite": args.suite or (None if args.attack else "standard"),
    })


def build_model(args: argparse.Namespace, data, device: torch.device) -> torch.nn.Module:
    """The model under evaluation, in eval mode on ``device`` (defenses wrap it here)."""
    return load_model(args, data).to(device).eval()


def warn_missing_normalization(model: torch.nn.Module, data, device: torch.device) -> None:
    """One ``adv: warning:`` line on stderr when the model looks like it lacks its input normalization."""
    from adv.evaluate.inputs import HINT_EXAMPLES, normalization_hint

    x, y = next(data.batches(HINT_EXAMPLES))
    hint = normalization_hint(model, x.to(device), y.to(device))
    if hint:
        print(f"adv: warning: {hint}", file=sys.stderr)


def attack_list(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``[(name, hyperparameters)]``; every hyperparameter flag must be used by some attack."""
    from adv.attacks import get_attack

    specs = [get_attack(name.replace("-", "_")) for name in args.attack]
    for spec in specs:
        if args.norm not in spec.norms:
            raise ConfigError(f"--attack {spec.name} supports --norm {'/'.join(spec.norms)}, got {args.norm}")
    hyper = {key: getattr(args, flag) for flag, key in HYPER_FLAGS.items() if getattr(args, flag) is not None}
    hyper.update(_params(args.param))
    for key in hyper:
        if not any(key in spec.defaults for spec in specs):
            raise ConfigError(f"no chosen attack takes {key!r} (attacks: {', '.join(s.name for s in specs)})")
    return [(spec.name, {k: v for k, v in hyper.items() if k in spec.defaults}) for spec in specs]


def _suite_pairs(name: str, norm: str) -> list[tuple[str, dict]]:
    from adv.evaluate.suites import suite_attacks

    try:
        return suite_attacks(name, norm, eot=False)
    except ValueError as exc:
        raise ConfigError(f"--suite: {exc}") from None


def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param must be KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out
