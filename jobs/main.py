"""The README's main job: train the default model if needed, then evaluate it.

    make main        (== .venv/bin/python -m jobs.main)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adv.data import load_dataset
from adv.errors import AdvError
from adv.models import create_model, load_checkpoint
from adv.train import TrainConfig, evaluate_accuracy, fit

DEFAULT_RUN = Path("runs/main")


def train_default(run_dir: Path, data_dir: str | None, download: bool) -> Path:
    """Train ``lenet`` on Fashion-MNIST for 2 epochs unless a checkpoint exists."""
    ckpt = run_dir / "fashion-mnist-lenet" / "model.pt"
    if ckpt.is_file():
        print(f"[main] using existing checkpoint {ckpt}", file=sys.stderr)
        return ckpt
    train = load_dataset("fashion-mnist", split="train", root=data_dir, download=download)
    test = load_dataset("fashion-mnist", split="test", root=data_dir, download=download)
    model = create_model("lenet", num_classes=train.num_classes, input_size=train.input_size)
    print(f"[main] training lenet on Fashion-MNIST ({len(train)} images, 2 epochs)", file=sys.stderr)
    fit(model, train, test, TrainConfig(epochs=2), out_dir=ckpt.parent)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true", help="allow torchvision downloads")
    args = parser.parse_args(argv)
    try:
        ckpt = train_default(Path(args.run_dir), args.data_dir, args.download)
        model, meta = load_checkpoint(ckpt)
        test = load_dataset("fashion-mnist", split="test", root=args.data_dir, download=args.download)
        acc = evaluate_accuracy(model, test)
    except AdvError as exc:
        print(f"main: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(ckpt), "test_acc": acc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
