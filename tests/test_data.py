import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from adv.data import list_datasets, load_dataset, logit_mask, mask_logits, subset_to_1k
from adv.data.vision import read_idx
from adv.errors import ConfigError, DataNotFoundError
from tests.helpers import SHARED_DATA, needs_fashion, needs_shared_data


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_registry_lists_every_dataset():
    assert set(list_datasets()) >= {"fashion-mnist", "mnist", "cifar10", "digits", "imagefolder"}


def test_unknown_dataset_and_split_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_dataset("digit")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="n must be >= 1"):
        load_dataset("digits", n=0)


def test_digits_is_float_in_unit_range_and_split_disjoint():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    x, y = test.tensors()
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert len(train) + len(test) == 1797
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_subsets_are_deterministic_by_seed():
    a = load_dataset("digits", n=50, seed=3)
    b = load_dataset("digits", n=50, seed=3)
    c = load_dataset("digits", n=50, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    assert len(a) == 50


def test_explicit_root_is_searched_first(tiny_mnist_dir, monkeypatch):
    monkeypatch.setenv("ADV_DATA_DIR", "/nonexistent-adv-data")
    data = load_dataset("mnist", split="train", root=tiny_mnist_dir)
    assert len(data) == 12 and data.source == str(tiny_mnist_dir)
    x, _ = data.tensors()
    assert x.shape == (12, 1, 28, 28)


def test_env_var_is_searched(tiny_mnist_dir, monkeypatch):
    monkeypatch.setenv("ADV_DATA_DIR", str(tiny_mnist_dir))
    monkeypatch.setenv("ADV_CACHE_DIR", str(tiny_mnist_dir / "cache"))
    assert len(load_dataset("mnist", split="test")) == 6


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fashion-mnist"])
def test_offline_and_missing_gives_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))
    import adv.data.locate as locate

    monkeypatch.setitem(locate.SYSTEM_DIRS, name, ())
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert "Searched:" in msg and str(tmp_path) in msg and "Fix:" in msg


def test_failed_download_names_the_fix(tmp_path, monkeypatch):
    """Offline: the torchvision download fails and the error says what to do instead."""
    import adv.data.locate as locate
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADV_DATA_DIR", raising=False)
    monkeypatch.setitem(locate.SYSTEM_DIRS, "mnist", ())
    with pytest.raises(DataNotFoundError, match="download .* failed .*network unreachable.*Fix:"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_missing_root_dir_is_clear(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nope")


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


@needs_fashion
def test_fashion_mnist_from_debian_package():
    data = load_dataset("fashion-mnist", split="test")
    assert len(data) == 10000 and data.classes[0] == "T-shirt/top"
    assert data.source == "/usr/share/datasets/fashion-mnist"


@needs_shared_data
def test_shared_mnist_and_cifar_sample():
    mnist = load_dataset("mnist", split="test", root=SHARED_DATA)
    assert len(mnist) == 10000 and mnist.labels[:3].tolist() == [7, 2, 1]
    cifar = load_dataset("cifar10", split="test", root=SHARED_DATA)
    assert cifar.images.shape == (100, 3, 32, 32) and cifar.classes[3] == "cat"


def _jpeg(path, color):
    Image.new("RGB", (40, 30), color).save(path, "JPEG")


def test_imagefolder_skips_and_counts_corrupt_images(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _jpeg(tmp_path / cls / f"{i}.jpg", (200, 10 * i, 0))
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_dataset("imagefolder", root=tmp_path, size=16, resize=20)
    assert len(data) == 6 and data.classes == ("cat", "dog")
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("broken.jpg")
    x, y = data.tensors()
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_csv_and_bad_header(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        _jpeg(tmp_path / "images" / f"{i}.jpg", (0, 0, 255))
    (tmp_path / "labels.csv").write_text("file,label\n0.jpg,5\n1.jpg,7\n")
    data = load_dataset("imagefolder", root=tmp_path, size=8, resize=8)
    assert data.labels.tolist() == [5, 7]
    (tmp_path / "labels.csv").write_text("path,y\n0.jpg,5\n")
    with pytest.raises(ValueError, match="'file' and 'label'"):
        load_dataset("imagefolder", root=tmp_path)


def test_imagenet_a_label_space_and_logit_mask(tmp_path):
    wnids = ["n01498041", "n12267677"]  # first and last ImageNet-A classes
    for w in wnids:
        (tmp_path / w).mkdir()
        _jpeg(tmp_path / w / "a.jpg", (10, 20, 30))
    data = load_dataset("imagefolder", root=tmp_path, size=8, resize=8, label_space="imagenet-a")
    mask = data.extras["logit_mask"]
    assert mask.shape == (1000,) and mask.sum() == 200
    assert mask[data.labels].all()
    assert len(subset_to_1k("imagenet-o")) == 200 and logit_mask("imagenet-o").sum() == 200
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 10.0  # class 0 (tench) is not an ImageNet-A class
    logits[:, data.labels] = torch.eye(2)
    assert torch.equal(mask_logits(logits, mask).argmax(1), data.labels)
    (tmp_path / "not_a_wnid").mkdir()
    _jpeg(tmp_path / "not_a_wnid" / "b.jpg", (1, 2, 3))
    with pytest.raises(ValueError, match="not imagenet-a WordNet ids"):
        load_dataset("imagefolder", root=tmp_path, label_space="imagenet-a")


@needs_shared_data
def test_real_imagenet_jpegs_via_csv():
    data = load_dataset("imagefolder", root=SHARED_DATA / "imagenet-sample", label_space="imagenet1k", n=10, size=64,
                        resize=73)
    assert len(data) == 10 and not data.skipped and len(data.classes) == 1000
