"""README snippets run as written (issue 21), and what the README says about ``ImageData`` holds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    """The README's one ```python block that contains ``containing``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {containing!r}"
    return blocks[0]


def test_the_query_detector_snippet_runs_as_written(tmp_path, monkeypatch, single_threaded):
    monkeypatch.chdir(tmp_path)  # it saves to runs/detector
    namespace: dict = {}
    exec(compile(python_block("QueryDetector(DetectorConfig())"), "README.md", "exec"), namespace)
    decisions = namespace["decisions"]
    assert len(decisions) == 4 and decisions[0].response()["status"]
    assert (tmp_path / "runs" / "detector").is_dir() and namespace["det2"] is not None


def test_the_readme_says_what_image_data_holds():
    from adv.data import load_dataset

    text = README.read_text()
    assert "ImageData: float [0,1]" not in text
    assert "uint8 for the decoded datasets" in text and "float32 in [0, 1] for computed ones (`digits`)" in text
    digits = load_dataset("digits", n=4)
    assert digits.images.dtype == torch.float32
    x, _ = digits.tensors()
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1


def test_decoded_datasets_keep_uint8_images_and_serve_floats():
    import pytest

    from adv.data import load_dataset
    from tests.helpers import SHARED_DATA

    if not (SHARED_DATA / "cifar10").is_dir():
        pytest.skip(f"{SHARED_DATA / 'cifar10'} absent")
    data = load_dataset("cifar10", root=SHARED_DATA / "cifar10", n=4)
    assert data.images.dtype == torch.uint8
    x, _ = next(data.batches(4))
    assert x.dtype == torch.float32 and float(x.max()) <= 1 and torch.equal(x, data.images.float() / 255)
