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
# importing the stage modules registers them
from adv.defenses import autoencoders, detectors, dwt, dwt_training, quantize, random_noise, unet  # noqa: F401,E402
from adv.defenses.dwt import select_dwt_params
from adv.defenses.dwt_training import DWTAugmentedLoss, checkpoint_defenses, training_loss
from adv.defenses.evaluation import (
    THREATS, EvaluatedModel, build_evaluated_model, defense_report, detection_report, detection_summary,
    evaluation_setup,
    robust_accuracy_inputs,
)

__all__ = [
    "DWTAugmentedLoss", "Defended", "EvaluatedModel", "THREATS", "build_defended", "build_evaluated_model",
    "checkpoint_defenses", "create_defense", "defense_schema", "describe_defense", "format_defense_spec", "get_defense",
    "list_defenses", "load_stage", "parse_defense_spec", "register_defense", "save_stage",
    "select_dwt_params", "training_loss", "defense_report", "detection_report", "detection_summary", "evaluation_setup",
    "robust_accuracy_inputs",
]
