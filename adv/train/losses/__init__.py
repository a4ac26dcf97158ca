"""Training losses, one module each; importing the package registers them (:mod:`adv.train.registry`)."""

from adv.train.losses import dwt  # noqa: F401
