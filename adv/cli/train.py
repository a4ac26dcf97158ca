"""``adv train``: train a registered classifier and write a checkpoint plus metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from adv.cli.common import add_data_args, add_model_args, load_data, load_model, nonneg_float, positive_int
from adv.errors import ConfigError
from adv.train.loop import TrainConfig, cross_entropy_loss, fit, seed_everything

NAME = "train"
HELP = "train a classifier; writes OUT/model.pt and OUT/metrics.json"


def add_arguments(parser) -> None:
    add_data_args(parser, default_split="train")
    add_model_args(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=2)
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--optimizer", choices=["adam", "sgd", "adamw"], default="adam")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=["constant", "cosine", "step"], default="constant")
    g.add_argument("--n-test", type=positive_int, default=None, help="evaluate on a subset of the test split")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<model>)")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT has a train_state.pt")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--defense", default=None, metavar="SPEC",
                   help="training-time defense NAME:k=v,... (see `adv info`): at, trades, alp, aad, ensemble_at, "
                        "finetune_at, dwt; e.g. at:steps=7,step_size=0.05,eps_ramp=1. Recorded in the checkpoint")
    s = parser.add_argument_group("checkpoint selection (robust overfitting)")
    s.add_argument("--select-best", action="store_true",
                   help="hold out --val-n training images, score every epoch with PGD on them and keep the best "
                        "epoch as OUT/best.pt")
    s.add_argument("--val-n", type=positive_int, default=500, help="held-out validation images")
    s.add_argument("--val-eps", type=nonneg_float, default=None,
                   help="validation PGD budget (default: the defense's eps)")
    s.add_argument("--val-steps", type=positive_int, default=10, help="validation PGD steps")


def run(args) -> int:
    try:
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
            weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed, device=args.device,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}") from None
    loss_fn, extra = cross_entropy_loss, {"command": "adv train"}
    if args.defense:  # before the (slow) data loading, so a bad spec fails at once
        from adv.train.losses import training_loss

        loss = training_loss(args.defense)
        loss_fn = loss.loss_fn
        extra.update(loss.checkpoint_meta())
    train = load_data(args, split="train")
    test = load_data(args, split="test", n=args.n_test)
    seed_everything(args.seed)  # before building the model, so its initialization is seeded too
    model = load_model(args, train)
    out = Path(args.out or f"runs/{args.dataset}-{model.arch}")
    train, validate = _validation(args, train, loss_fn)
    metrics = fit(
        model, train, test, config, loss_fn=loss_fn, out_dir=out, resume=not args.no_resume,
        show_progress=not args.quiet, extra_meta=extra, validate=validate,
        select="val_robust_acc" if validate else None,
    )
    summary = {k: v for k, v in metrics.items() if k != "history"}
    summary.update({k: v for k, v in extra.items() if k != "command"})
    summary["checkpoint"] = str(out / "model.pt")
    print(json.dumps(summary))
    return 0


def _validation(args, train, loss_fn):
    """``(training data, validate)``: with ``--select-best``, the last ``--val-n`` training images are held out."""
    if not args.select_best:
        return train, None
    from adv.train.selection import RobustValidation, holdout

    eps = args.val_eps if args.val_eps is not None else getattr(getattr(loss_fn, "params", None), "eps", None)
    if eps is None:
        raise ConfigError("--select-best needs --val-eps: this training defense has no eps of its own")
    train, val = holdout(train, args.val_n)
    return train, RobustValidation(val, eps=eps, steps=args.val_steps)
