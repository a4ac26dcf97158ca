"""Training losses, one module each; importing the package registers them (:mod:`adv.train.registry`)."""

from adv.train.losses import aad, alp, at, dwt, ensemble_at, finetune_at, trades  # noqa: F401
