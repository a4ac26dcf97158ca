"""The README's main job: train what the evaluation needs, evaluate on an embedded local Ray, print the report.

    make main        (== .venv/bin/python -m jobs.main)

1. train the default model (``lenet`` on Fashion-MNIST, 2 epochs) unless the
   config's ``model.checkpoint`` exists;
2. train every learned defense stage whose ``checkpoint=`` file is missing
   (on 10,000 training images, against the frozen classifier);
3. run the default sweep ``jobs.tune`` with ``jobs/configs/tune-default.yaml``
   (DWT settings and the learned stage on a validation subset disjoint from the
   evaluation's images, adaptive re-check of the best few, against fast
   adversarial training and TRADES trials with ASHA on epochs), write the
   selected defense as a bundle (``runs/tune/default/best``) and print the sweep
   report's path (``--no-tune`` skips it);
4. run ``jobs.evaluate`` with ``jobs/configs/default.yaml`` (several attacks,
   two defenses, the adaptive track) plus the sweep's selection as one more
   defense (a trained classifier answers in place of the model), so the report
   compares input transformations with the selected defense on the same images,
   and print the report's path;
5. deploy that bundle on local Ray Serve (``jobs.serve``), red-team it with one
   account and with several (``jobs.redteam``), write ``serve-report.md`` with
   its figure under the sweep's folder, ``serve/``, shut Serve down and print
   the report's path (``--no-serve`` skips it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adv.errors import ConfigError
from jobs.config import EvalConfig, load_config
from jobs.common import filter_stderr, guarded, logger
from jobs.evaluate import run

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
TUNE_CONFIG = Path(__file__).parent / "configs" / "tune-default.yaml"
STAGE_TRAIN_N = 10_000


log = logger("main")


def train_default(cfg: EvalConfig) -> Path:
    """Train ``lenet`` on the config's dataset (Fashion-MNIST) for 2 epochs unless the checkpoint exists."""
    from adv.data import load_dataset
    from adv.models import create_model
    from adv.train import TrainConfig, evaluate_accuracy, fit, seed_everything

    ckpt = Path(cfg.model.checkpoint)
    if ckpt.is_file():
        log(f"using existing checkpoint {ckpt}")
        return ckpt
    d = cfg.dataset
    train = load_dataset(d.name, split="train", root=d.root, download=d.download)
    test = load_dataset(d.name, split="test", root=d.root, download=d.download)
    config = TrainConfig(epochs=2)
    seed_everything(config.seed)  # the initial weights too, so the main job is reproducible
    model = create_model("lenet", num_classes=train.num_classes, input_size=train.input_size)
    log(f"training lenet on {d.name} ({len(train)} images, 2 epochs) -> {ckpt}")
    fit(model, train, test, config, out_dir=ckpt.parent)
    log(f"test accuracy {evaluate_accuracy(model, test):.4f}")
    return ckpt


def train_stages(cfg: EvalConfig) -> list[Path]:
    """Train each learned stage whose ``checkpoint=`` file is missing, and save it there."""
    from adv.data import load_dataset
    from adv.defenses import create_defense, get_defense, save_stage
    from adv.defenses.registry import resolve
    from adv.models import load_checkpoint

    written = []
    for defense in cfg.defenses:
        for spec in [*defense.stages, *([defense.detector] if defense.detector else [])]:
            name, params = resolve(spec)
            path = getattr(params, "checkpoint", None)
            if not get_defense(name).learned or path is None or Path(path).is_file():
                continue
            d = cfg.dataset
            train = load_dataset(d.name, split="train", n=STAGE_TRAIN_N, seed=d.seed, root=d.root,
                                 download=d.download)
            classifier, _ = load_checkpoint(cfg.model.checkpoint)
            raw = {k: v for k, v in params.model_dump().items() if k != "checkpoint"}
            log(f"training defense stage {name} on {len(train)} images -> {path}")
            stage = create_defense((name, raw), classifier=classifier, data=train)
            save_stage(path, stage, meta={"dataset": train.name, "n": len(train), "classifier": cfg.model.checkpoint})
            written.append(Path(path))
    return written


def serve_stage(bundle: str, tune_report: str, t0: float, access_log: bool = False) -> str:
    """Deploy the best bundle on local Serve, red-team it with one account and with several, write
    ``serve-report.md`` (next to the sweep's report) with its figure, shut Serve down; the report's path.
    Serve's per-request access log only with ``access_log`` (``--access-log``)."""
    from jobs.redteam import story

    local = "://" not in tune_report
    out = Path(tune_report).parent / "serve" if local else Path("runs") / "serve"
    log(f"serving {bundle} on local Ray Serve and red-teaming it -> {out}")
    report = story(bundle, out, access_log=access_log)
    log(f"serve stage done; {time.perf_counter() - t0:.0f} s in all")
    return str(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="evaluation config (default: %(default)s)")
    parser.add_argument("--out", help="run folder (default: output.path/<name>-<config hash>)")
    parser.add_argument("--tune-config", default=str(TUNE_CONFIG), help="sweep config (default: %(default)s)")
    parser.add_argument("--no-tune", action="store_true", help="stop after the evaluation")
    parser.add_argument("--no-serve", action="store_true", help="stop after the sweep (no Serve, no red team)")
    parser.add_argument("--access-log", action="store_true",
                        help="keep Serve's per-request access log (off: the red team's requests would flood the log)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    def body() -> int:
        cfg = load_config(args.config)
        if cfg.reuse_from or not cfg.model.checkpoint:
            raise ConfigError(f"{args.config}: the main job needs model.checkpoint (trained when missing)")
        train_default(cfg)
        train_stages(cfg)
        log(f"models ready after {time.perf_counter() - t0:.0f} s")
        tuned = None if args.no_tune else sweep(args.tune_config, t0)
        cfg = cfg if tuned is None else with_selected(cfg, tuned)
        log("evaluating" + (" (the sweep's selection is one more defense)" if tuned else ""))
        result = run(cfg, out=args.out)
        acc = result.summary.get("clean_acc", {})
        log(f"done in {time.perf_counter() - t0:.0f} s; clean accuracy " +
            ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
        print(result.report)
        if tuned is not None:
            print(tuned.report)
            if not args.no_serve:
                print(serve_stage(tuned.bundle, tuned.report, t0, args.access_log))
            for line in selected_lines(tuned):
                print(line)
        return 0

    return guarded("main", body, "rerun to resume (finished shards and trials are kept)")


def sweep(config: str, t0: float):
    """The default sweep after the evaluation: report, bundle (``jobs.tune``)."""
    from jobs.tune import run as tune
    from jobs.tune_config import load_tune_config

    log(f"sweeping defense settings ({config})")
    result = tune(load_tune_config(config))
    log(f"sweep done at {time.perf_counter() - t0:.0f} s; selected {result.selected.label!r}; "
        f"bundle {result.bundle}")
    return result


def with_selected(cfg: EvalConfig, tuned) -> EvalConfig:
    """The evaluation config plus the sweep's selected defense (its trained classifier from the bundle, when a
    training trial won), labelled ``selected: ...``, on the evaluation's own images and grid."""
    from jobs.config import DefenseConfig

    cand, kind = tuned.selected.candidate, tuned.selected.kind
    classifier = f"{tuned.bundle}/classifier.pt" if kind == "training" else None
    if kind == "training":
        from adv.train.losses import training_loss

        stages = training_loss(cand.loss).stages
    else:
        stages = list(cand.stages)
    label = f"selected: {tuned.selected.label}" + (" (trained)" if kind == "training" else "")
    extra = DefenseConfig(name=label, stages=stages, detector=cand.detector, classifier=classifier)
    return cfg.model_copy(update={"defenses": [*cfg.defenses, extra]})


def selected_lines(tuned) -> list[str]:
    """The last lines of the main job: what it selected and serves, with the test subset's numbers."""
    from adv.bundle import load_bundle

    sel = tuned.selected
    lines = [f"selected configuration: {sel.label} ({sel.kind or 'stored'} trial {sel.trial_id})"]
    numbers = load_bundle(tuned.bundle).manifest["numbers"]
    lines.append("test subset: " + ", ".join(
        f"{k.replace('_', '-')} {v['value']:.1%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}]" for k, v in numbers.items())
        + f" (n={numbers['clean']['n']})")
    lines.append(f"bundle: {tuned.bundle}")
    return lines


if __name__ == "__main__":
    filter_stderr()  # a log file gets no known-harmless Ray error line (jobs.common.KNOWN_RAY_NOISE); not in tests
    sys.exit(main())
