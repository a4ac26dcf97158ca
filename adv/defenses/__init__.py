"""Input-transformation, reconstruction and detection defenses, each an ``nn.Module`` stage.

A defended model is a composition, ``Defended(preprocess, classifier, detector)``;
every defense is registered by name with typed, validated hyperparameters and
built from a spec string ``NAME:k=v,...`` (``dwt:wavelet=haar,level=1``).

    >>> from adv.defenses import create_defense, Defended
    >>> model = Defended(create_defense("dwt:wavelet=db4"), classifier)
"""

from adv.defenses.registry import (
    create_defense, defense_schema, describe_defense, format_defense_spec, get_defense, list_defenses, load_stage,
    parse_defense_spec, register_defense, save_stage,
)
from adv.defenses.compose import Defended, build_defended
# importing the stage modules registers them; the per-input detectors (AdvD, encoder disagreement) are stages too
from adv.defenses import advd, autoencoders, disagreement, dwt, quantize, random_noise, sfe, unet  # noqa: F401,E402
from adv.defenses.dwt import select_dwt_params

__all__ = [
    "Defended", "build_defended", "create_defense", "defense_schema", "describe_defense", "format_defense_spec",
    "get_defense", "list_defenses", "load_stage", "parse_defense_spec", "register_defense", "save_stage",
    "select_dwt_params",
]
