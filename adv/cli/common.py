"""Argument groups and loaders shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

from adv.data import ImageData, list_datasets, load_dataset
from adv.errors import AdvError
from adv.models import ImageClassifier, create_model, list_models, load_checkpoint, load_external


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def add_data_args(parser: argparse.ArgumentParser, default_split: str = "test", dataset_required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=dataset_required, choices=list_datasets(), help="registered dataset name")
    g.add_argument("--split", default=default_split, choices=["train", "test"])
    g.add_argument("--n", type=positive_int, default=None, help="seeded random subset of N examples")
    g.add_argument("--data-dir", default=None, help="folder searched first (then $ADV_DATA_DIR, system dirs)")
    g.add_argument("--download", action="store_true", help="allow torchvision downloads (needs internet)")
    g.add_argument("--seed", type=int, default=0)


def load_data(args: argparse.Namespace, split: str | None = None, n: int | None = None) -> ImageData:
    from adv.data.locate import spelled

    with spelled("--data-dir DIR", "--download"):  # errors name the flags, not the Python keywords
        return load_dataset(
            args.dataset, split=split or args.split, n=n if n is not None else args.n, seed=args.seed,
            root=args.data_dir, download=args.download,
        )


def add_model_args(parser: argparse.ArgumentParser, factory: bool = False) -> None:
    g = parser.add_argument_group("model (a registry name, with --weights for foreign files, or --checkpoint)")
    g.add_argument("--model", choices=list_models(), help="registered architecture")
    if factory:
        g.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                       help="your own architecture: a function that returns the nn.Module (logits of [0, 1] images), "
                            "imported from the working directory, e.g. mypkg.nets:make_net; --weights fills it")
    g.add_argument("--weights", help="foreign state_dict to load into --model (advertorch, torchvision, ...)")
    g.add_argument("--checkpoint", help="adv checkpoint (model.pt written by adv train)")
    g.add_argument("--pretrained", action="store_true", help="torchvision ImageNet weights (needs internet)")


def load_model(args: argparse.Namespace, data: ImageData | None = None) -> ImageClassifier:
    """Build the model the arguments describe; size and classes follow ``data`` for fresh models."""
    if getattr(args, "model_factory", None):
        return _factory_model(args)
    if args.checkpoint:
        if args.model or args.weights:
            raise AdvError("give either --checkpoint or --model [--weights], not both")
        return load_checkpoint(args.checkpoint)[0]
    if not args.model:
        raise AdvError("give --model NAME (with --weights PATH) or --checkpoint PATH")
    kw = {}
    if data is not None and not args.pretrained:
        kw = {"num_classes": data.num_classes, "input_size": data.input_size}
    if args.pretrained:
        kw["pretrained"] = True
    if args.weights:
        if not Path(args.weights).is_file():
            raise AdvError(f"weights file not found: {args.weights}")
        return load_external(args.model, args.weights, **kw)
    return create_model(args.model, **kw)


def factory_on_path(spec: str):
    """Import a --model-factory from the working directory: console scripts do not put it on sys.path."""
    from adv.models.factory import import_factory

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return import_factory(spec)


def _factory_model(args: argparse.Namespace):
    from adv.models.factory import build_from_factory

    if args.model or args.checkpoint or args.pretrained:
        raise AdvError("give --model-factory (with --weights), or --model/--checkpoint, not both")
    if args.weights and not Path(args.weights).is_file():
        raise AdvError(f"weights file not found: {args.weights}")
    factory_on_path(args.model_factory)
    return build_from_factory(args.model_factory, args.weights)


def budget(text: str) -> float:
    """A perturbation budget: a number or a fraction such as ``8/255``."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative budget, got {text}")
    return value


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))
