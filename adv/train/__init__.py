"""Training: the loop (:mod:`adv.train.loop`) and the registry of training-time defenses (:mod:`adv.train.losses`).

    >>> from adv.train import TrainConfig, fit
    >>> from adv.train.losses import training_loss
    >>> loss = training_loss("dwt:wavelet=haar")
    >>> fit(model, train, test, TrainConfig(), loss_fn=loss.loss_fn, extra_meta=loss.checkpoint_meta())
"""

from adv.train.loop import (
    BatchLoss, LossOutput, TrainConfig, TrainingStallWarning, cross_entropy_loss, evaluate_accuracy, fit,
    seed_everything,
)
from adv.train.registry import checkpoint_defenses, checkpoint_training, register_loss

#: The loss lookups, still reachable as ``adv.train.NAME``; they live in :mod:`adv.train.losses` because the losses
#: build on the defenses, which import :mod:`adv.train.loop` (this package must not import its losses).
_LOSS_LOOKUPS = ("get_loss", "list_losses", "loss_schema", "training_loss")


def __getattr__(name: str):
    if name in _LOSS_LOOKUPS:
        from adv.train import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'adv.train' has no attribute {name!r}")


__all__ = [
    "BatchLoss", "LossOutput", "TrainConfig", "TrainingStallWarning", "checkpoint_defenses", "checkpoint_training",
    "cross_entropy_loss", "evaluate_accuracy", "fit", "get_loss", "list_losses", "loss_schema", "register_loss",
    "seed_everything",
    "training_loss",
]
