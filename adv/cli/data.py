"""``adv data``: build datasets from others.

    adv data filter --dataset fashion-mnist --split test \\
        --checkpoint runs/filter-a/model.pt --checkpoint runs/filter-b/model.pt \\
        --threshold 0.5 --out data/fashion-mnist-a

``filter`` is adversarial filtration (Hendrycks et al. 2021, how ImageNet-A was
built): it keeps the real images every given model misclassifies with
confidence at or above ``--threshold`` and writes an image folder, labels.csv
and manifest.json (models, threshold, counts). Read it back with
``--dataset filtered --data-dir OUT`` (or ``fashion-mnist-a``).
"""

from __future__ import annotations

import json

from adv.cli.common import add_data_args, load_data, positive_int
from adv.errors import ConfigError

NAME = "data"
HELP = "datasets: adversarial filtration (natural-adversarial sets such as fashion-mnist-a)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    filt = sub.add_parser("filter", help="keep the images every model misclassifies confidently",
                          description="adversarial filtration: keep the images of the pool that every model "
                                      "misclassifies with P(prediction) >= --threshold")
    add_data_args(filt, default_split="test")
    filt.add_argument("--checkpoint", action="append", default=[], metavar="MODEL.pt",
                      help="adv checkpoint of a filter model (repeat: every one must misclassify)")
    filt.add_argument("--model", action="append", default=[], metavar="NAME[=WEIGHTS]",
                      help="registered model with foreign weights, or with --pretrained (repeatable)")
    filt.add_argument("--pretrained", action="store_true", help="torchvision weights for --model (needs internet)")
    filt.add_argument("--threshold", type=float, default=0.5, help="minimum confidence of the wrong prediction")
    filt.add_argument("--batch-size", type=positive_int, default=256)
    filt.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    filt.add_argument("--out", required=True, help="new folder for images/, labels.csv, manifest.json")


def run(args) -> int:
    if args.action != "filter":
        raise ConfigError("adv data needs an action: filter")
    from adv.data.filter import filter_misclassified, write_filtered_set
    from adv.models.device import resolve_device

    if not (args.checkpoint or args.model):
        raise ConfigError("give at least one filter model: --checkpoint MODEL.pt or --model NAME=WEIGHTS")
    device = resolve_device(args.device)
    pool = load_data(args)
    names, models = _filter_models(args, pool)
    result = filter_misclassified([m.to(device).eval() for m in models], pool, args.threshold, args.batch_size)
    manifest = write_filtered_set(args.out, pool, result, models=names, threshold=args.threshold,
                                  source={"n": args.n, "seed": args.seed})
    print(json.dumps({"out": args.out, **manifest["counts"], "models": names, "threshold": args.threshold}))
    return 0


def _filter_models(args, pool):
    from adv.models import create_model, load_checkpoint, load_external

    names, models = list(args.checkpoint), [load_checkpoint(p)[0] for p in args.checkpoint]
    for item in args.model:
        name, _, weights = item.partition("=")
        kw = {"pretrained": True} if args.pretrained else {"num_classes": pool.num_classes,
                                                              "input_size": pool.input_size}
        if not weights and not args.pretrained:
            raise ConfigError(f"--model {item}: give NAME=WEIGHTS or --pretrained (random weights filter nothing)")
        models.append(load_external(name, weights, **kw) if weights else create_model(name, **kw))
        names.append(item)
    return names, models
