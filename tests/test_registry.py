"""One registry class for the five kinds of named components, with one error policy and one rename mechanism."""

import pytest

from adv.attacks import get_attack
from adv.attacks.registry import ATTACKS
from adv.data import load_dataset
from adv.data.base import DATASETS
from adv.defenses import get_defense
from adv.defenses.registry import DEFENSES, validate_params
from adv.errors import ConfigError
from adv.models import create_model
from adv.models.registry import MODELS
from adv.registry import Registry, check_renamed, closest
from adv.specs import parse_spec
from adv.train.losses import get_loss
from adv.train.registry import LOSSES


def test_the_five_registries_are_one_class_and_full_after_import():
    for registry, name in ((MODELS, "lenet"), (DATASETS, "digits"), (ATTACKS, "pgd"), (DEFENSES, "advd"),
                           (LOSSES, "trades")):
        assert isinstance(registry, Registry) and name in registry and len(registry) >= 2


@pytest.mark.parametrize("lookup,typo,message", [
    (get_attack, "pgdd", "unknown attack 'pgdd'; did you mean 'pgd'?; known: "),
    (create_model, "lenett", "unknown model 'lenett'; did you mean 'lenet'?; known: "),
    (load_dataset, "digitz", "unknown dataset 'digitz'; did you mean 'digits'?; known: "),
    (get_defense, "dwtt", "unknown defense 'dwtt'; did you mean 'dwt'?; known: "),
    (get_loss, "trade", "unknown training defense 'trade'; did you mean 'trades'?; `adv train --defense` takes "),
])
def test_an_unknown_name_is_a_config_error_with_the_nearest_name(lookup, typo, message):
    with pytest.raises(ConfigError) as info:
        lookup(typo)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_no_suggestion_when_nothing_is_near():
    with pytest.raises(ConfigError, match=r"^unknown attack 'zzzzzz'; known: .*fgsm"):
        get_attack("zzzzzz")
    assert closest("zzzzzz", ["fgsm", "pgd"]) is None


def test_a_renamed_name_names_its_new_name_and_registering_twice_fails():
    reg: Registry[int] = Registry("widget", renamed={"old": "new"})
    reg.add("new", 1)
    assert reg.get("new") == 1 and reg.names() == ["new"] and list(reg) == ["new"]
    with pytest.raises(ConfigError, match="^widget 'old' was renamed to 'new'$"):
        reg.get("old")
    with pytest.raises(ValueError, match="widget 'new' registered twice"):
        reg.add("new", 2)
    assert reg.names("n*", where=lambda v: v > 1) == []


def test_one_rename_check_for_attack_and_defense_hyperparameters():
    with pytest.raises(ConfigError, match=r"^attack 'cw': 'kappa' was renamed to 'confidence'$"):
        ATTACKS.get("cw").check_renamed(["kappa", "steps"])
    name, params = parse_spec("dwt:sigma=0.1")
    with pytest.raises(ConfigError, match=r"^defense 'dwt': 'sigma' was renamed to 'noise_sigma'$"):
        validate_params(name, params)
    with pytest.raises(ConfigError, match="'a' was renamed to 'b', 'c' was renamed to 'd'"):
        check_renamed({"a": "b", "c": "d"}, ["c", "a"], "x")
