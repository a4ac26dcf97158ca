"""Shared test constants and helpers (Ray-free)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("ADV_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED_DATA / "models"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} absent")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="Debian dataset-fashion-mnist not installed"
)
