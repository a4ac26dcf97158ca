"""A user's own architecture for the model-factory tests (``tests.byom_nets:make_net``): a plain nn.Sequential."""

from torch import nn


def make_net() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
