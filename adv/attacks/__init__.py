"""Adversarial attacks: one pure function per file, registered by name.

White-box: ``attack(model, x, y, *, eps, norm="linf", targeted=False, y_target=None, **hyper) -> x_adv``.
Query-based: ``attack(oracle, x, y, *, eps, ...) -> (x_adv, n_queries)``.
Images are in [0, 1], NCHW; the model owns its normalization. See
``list_attacks()`` and ``get_attack(name)`` for the registry and metadata.
"""

from adv.attacks.registry import AttackSpec, describe_attack, get_attack, list_attacks, register_attack
from adv.attacks.oracle import QueryOracle
from adv.attacks.fgsm import fgsm
from adv.attacks.pgd import pgd
from adv.attacks.bim import bim
from adv.attacks.stepll import iter_stepll, stepll
from adv.attacks.deepfool import deepfool
from adv.attacks.cw import cw
from adv.attacks.apgd import apgd
from adv.attacks.a3 import a3
from adv.attacks.square import square
from adv.attacks.hopskipjump import hopskipjump
from adv.attacks.apgd_t import apgd_t
from adv.attacks.fab import fab_t
from adv.attacks.square_l2 import square_l2

__all__ = [
    "AttackSpec", "QueryOracle", "a3", "apgd", "apgd_t", "bim", "cw", "deepfool", "describe_attack", "fab_t", "fgsm",
    "get_attack", "hopskipjump",
    "iter_stepll", "list_attacks", "pgd", "register_attack", "square", "square_l2", "stepll",
]
