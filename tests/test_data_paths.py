"""Data paths as a new user meets them (issue 21): ``~`` expanded, ``data_dir=`` and ``root=`` one folder,
an ``n`` above the data's size said in one line, errors that name the caller's own spelling, and label hints."""

from __future__ import annotations

import warnings

import pytest
import torch

from adv.cli import main
from adv.data import load_dataset
from adv.errors import DataNotFoundError, InputError
from adv.evaluate.inputs import check_labels
from tests.helpers import SHARED_DATA, needs_shared_data


@pytest.fixture
def home_data(tmp_path, monkeypatch):
    """``~/data`` holding the CIFAR-10 sample, and no other place to find data."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "data").symlink_to(SHARED_DATA / "cifar10")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADV_DATA_DIR", raising=False)
    return tmp_path


@needs_shared_data
def test_a_tilde_data_dir_is_expanded_and_data_dir_is_root(home_data):
    assert len(load_dataset("cifar10", root="~/data")) == 100
    assert len(load_dataset("cifar10", data_dir="~/data")) == 100
    with pytest.raises(ValueError, match="give root= or data_dir="):
        load_dataset("cifar10", root="~/data", data_dir=str(home_data))


@needs_shared_data
def test_n_above_the_data_size_warns_once_and_returns_everything(home_data, capsys):
    with pytest.warns(UserWarning, match=r"n=500 is more than the 100 examples of cifar10 test .*using all 100"):
        assert len(load_dataset("cifar10", data_dir="~/data", n=500)) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset("cifar10", data_dir="~/data", n=100)) == 100  # exactly all: silent
    code = main(["eval", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", "~/data", "--n", "500",
                 "--attack", "fgsm", "--eps", "1/255", "--quiet", "--json", "--checks", "none"])
    err = capsys.readouterr().err
    assert code == 0
    assert [line for line in err.splitlines() if "n=500" in line] == [
        "adv: warning: n=500 is more than the 100 examples of cifar10 test "
        f"({SHARED_DATA / 'cifar10' / 'test_first100.npz'}); "
        "using all 100".replace(str(SHARED_DATA / "cifar10"), str(home_data / "home" / "data"))]


def test_benchmark_says_when_n_exceeds_the_tensors(model):

    import adv
    from tests.attack_helpers import synthetic

    x, y = synthetic(6)
    with pytest.warns(UserWarning, match="n=50 is more than the 6 examples passed; using all 6"):
        adv.benchmark(model.eval(), (x, y), eps=0.01, n=50, suite=None, attacks=["fgsm"], progress=False)


def test_a_missing_dataset_names_the_python_keyword_in_python_and_the_flag_on_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADV_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as exc:
        load_dataset("cifar10", root=tmp_path / "empty")
    assert "pass root=DIR (or data_dir=DIR)" in str(exc.value) and "download=True" in str(exc.value)
    assert "--data-dir" not in str(exc.value) and "--download" not in str(exc.value)
    code = main(["eval", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"),
                 "--attack", "fgsm", "--eps", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "pass --data-dir DIR holding" in err and "--download" in err and "root=" not in err
    with pytest.raises(ValueError, match=r"imagefolder needs root=DIR \(or data_dir=DIR\)"):
        load_dataset("imagefolder")


@pytest.mark.parametrize("labels,hint", [
    (torch.tensor([1.0, 0.0, 2.0]), "they hold whole numbers: pass y.long()"),
    (torch.tensor([0.2, 0.9, 0.5]), "they are not whole numbers"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), "one-hot labels? pass y.argmax(1)"),
])
def test_float_labels_get_a_hint_in_one_and_two_dimensions(labels, hint):
    with pytest.raises(InputError) as exc:
        check_labels(labels, 3)
    assert hint in str(exc.value) and "\n" not in str(exc.value)
