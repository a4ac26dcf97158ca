"""Training: the loop (:mod:`adv.train.loop`) and the registry of training-time defenses.

    >>> from adv.train import TrainConfig, fit, training_loss
    >>> loss = training_loss("dwt:wavelet=haar")
    >>> fit(model, train, test, TrainConfig(), loss_fn=loss.loss_fn, extra_meta=loss.checkpoint_meta())
"""

from adv.train.loop import (
    BatchLoss, LossOutput, TrainConfig, TrainingStallWarning, cross_entropy_loss, evaluate_accuracy, fit,
    seed_everything,
)
from adv.train.registry import (
    checkpoint_defenses, checkpoint_training, get_loss, list_losses, loss_schema, register_loss, training_loss,
)

__all__ = [
    "BatchLoss", "LossOutput", "TrainConfig", "TrainingStallWarning", "checkpoint_defenses", "checkpoint_training", "cross_entropy_loss",
    "evaluate_accuracy", "fit", "get_loss", "list_losses", "loss_schema", "register_loss", "seed_everything",
    "training_loss",
]
