"""One name for the data folder everywhere (issue 21): ``data_dir`` on the CLI (``--data-dir``), in Python
(``data_dir=``, also ``root=``) and in job configs (``dataset.data_dir``, also ``dataset.root``); an unknown key
gets the nearest known one."""

from __future__ import annotations

import pytest

from adv.errors import ConfigError
from jobs.config import parse_config

BASE = {"name": "names", "model": {"checkpoint": "m.pt"}, "attacks": [{"name": "fgsm", "eps": [0.1]}]}


@pytest.mark.parametrize("key", ["root", "data_dir", "data-dir"])
def test_the_evaluation_config_takes_data_dir_as_root(key):
    assert parse_config({**BASE, "dataset": {"name": "mnist", key: "/data"}}).dataset.root == "/data"


def test_the_tune_config_takes_data_dir_as_root():
    from jobs.tune_config import DataConfig

    assert DataConfig.model_validate({"name": "digits", "data_dir": "/data"}).root == "/data"


@pytest.mark.parametrize("dataset,needle", [
    ({"name": "mnist", "root": "/a", "data_dir": "/b"},
     "dataset.data_dir: unknown key ('data_dir' and 'root' are one key"),
    ({"name": "mnist", "dataroot": "/a"}, "dataset.dataroot: unknown key; did you mean 'root'?"),
    ({"name": "mnist", "datadir": "/a"}, "dataset.datadir: unknown key; did you mean 'data_dir'?"),
    ({"name": "mnist", "dir": "/a"}, "dataset.dir: unknown key (keys: name, split, n, seed, root, download"),
])
def test_a_wrong_data_folder_key_names_the_right_one(dataset, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "dataset": dataset}, "job.yaml")
    assert str(exc.value).startswith("job.yaml: ") and needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_keys_deeper_in_a_config_get_the_nearest_key():
    with pytest.raises(ConfigError, match=r"attacks\[0\].step: unknown key; did you mean 'steps'\?"):
        parse_config({**BASE, "attacks": [{"name": "pgd", "eps": [0.1], "step": 3}]})
