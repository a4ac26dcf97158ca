"""``adv defend``: list defenses, train learned stages, choose DWT parameters.

    adv defend list
    adv defend describe unet
    adv defend train unet:width=0.5,epochs=3 --dataset fashion-mnist --n 10000 \\
        --checkpoint runs/fm-lenet/model.pt --out runs/fm-lenet/unet.pt
    adv defend select-dwt --dataset fashion-mnist --n 64 --psnr-min 30

A trained stage is used with ``adv eval --defense unet:checkpoint=runs/fm-lenet/unet.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

from adv.cli.common import add_data_args, add_model_args, load_data, load_model, positive_int, print_json
from adv.errors import ConfigError

NAME = "defend"
HELP = "defenses: list, describe, train learned stages, select DWT parameters"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    sub.add_parser("list", help="registered defenses")
    describe = sub.add_parser("describe", help="a defense's hyperparameters (JSON)")
    describe.add_argument("name")

    train = sub.add_parser("train", help="train a learned stage; writes a stage file",
                           description="train a learned stage (initial_ae, middle_ae, encoder, disagreement, unet, "
                                       "sfe, advd) on the train split; the classifier's weights are never changed")
    train.add_argument("spec", help="NAME:k=v,... e.g. unet:width=0.5,epochs=3")
    add_data_args(train, default_split="train")
    add_model_args(train)
    train.add_argument("--n-test", type=positive_int, default=1000, help="test images for the summary accuracy")
    train.add_argument("--out", required=True, help="stage file to write (e.g. runs/fm-lenet/unet.pt)")
    train.add_argument("--quiet", action="store_true")

    select = sub.add_parser("select-dwt", help="choose DWT parameters by PSNR/MSE on a sample (Kaminskyi, DWT study)")
    add_data_args(select, default_split="train")
    select.add_argument("--psnr-min", type=float, default=30.0)
    select.add_argument("--mse-max", type=float, default=1e-3)
    select.add_argument("--wavelets", default=None, help="comma-separated, default haar,db2,db4,sym4,coif1")
    select.add_argument("--levels", default=None, help="comma-separated, default 1,2,3")
    select.add_argument("--json", action="store_true", help="print the whole searched table")


def run(args) -> int:
    if args.action is None:
        raise ConfigError("adv defend needs an action: list, describe, train or select-dwt")
    return {"list": _list, "describe": _describe, "train": _train, "select-dwt": _select}[args.action](args)


def _list(args) -> int:
    from adv.defenses import describe_defense, list_defenses

    for name in list_defenses():
        print(f"{name:<14} {describe_defense(name)}")
    return 0


def _describe(args) -> int:
    from adv.defenses import defense_schema

    print_json(defense_schema(args.name))
    return 0


def _train(args) -> int:
    from adv.defenses import Defended, create_defense, get_defense, save_stage
    from adv.defenses.registry import resolve
    from adv.train import evaluate_accuracy

    name, params = resolve(args.spec)
    entry = get_defense(name)
    if not entry.learned:
        raise ConfigError(f"defense {name!r} has nothing to train; use it directly, e.g. --defense {args.spec}")
    if getattr(params, "checkpoint", None):
        raise ConfigError(f"{args.spec!r}: drop checkpoint= when training (--out names the file to write)")
    train = load_data(args)
    classifier = load_model(args, train) if (args.checkpoint or args.model) else None
    if classifier is None and entry.needs_classifier:
        raise ConfigError(f"defense {name!r} is trained against a classifier: give --checkpoint PATH")
    stage = create_defense((name, params), classifier=classifier, data=train)
    metrics = {k: v for k, v in stage.train_metrics.items() if k != "history"}
    summary = {"spec": stage.defense_spec, "out": str(args.out), "train": metrics}
    if classifier is not None:
        test = load_data(args, split="test", n=args.n_test)
        model = (Defended(None, classifier, stage) if entry.kind == "detector" else
                 Defended(stage, classifier) if entry.kind == "preprocess" else Defended(None, stage))
        summary["test_acc_clean"] = evaluate_accuracy(model, test)
    save_stage(Path(args.out), stage, meta={
        "dataset": train.name, "n": len(train), "classifier": args.checkpoint or args.model or "",
        "metrics": {k: v for k, v in summary.items() if k not in ("out", "spec")},
    })
    print(json.dumps(summary, default=str))
    return 0


def _select(args) -> int:
    from adv.defenses import format_defense_spec, select_dwt_params

    grid = {}
    if args.wavelets:
        grid["wavelet"] = [w.strip() for w in args.wavelets.split(",") if w.strip()]
    if args.levels:
        try:
            grid["level"] = [int(v) for v in args.levels.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--levels must be comma-separated integers, got {args.levels!r}") from None
    x, _ = load_data(args, n=args.n or 64).tensors()
    best, table = select_dwt_params(x, grid=grid, psnr_min=args.psnr_min, mse_max=args.mse_max)
    result = {"best": format_defense_spec("dwt", best) if best else None,
              "admissible": sum(r["admissible"] for r in table), "searched": len(table)}
    if args.json:
        result["table"] = table
    print_json(result)
    return 0 if best else 1
