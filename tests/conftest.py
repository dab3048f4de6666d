"""Shared test setup: the repo root on sys.path, the offline data directory, small helpers."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Datasets: $DDPM_DATA if set, else the offline copies in ../shared/data beside the checkout.
if "DDPM_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["DDPM_DATA"] = str(ROOT.parent / "shared" / "data")


@pytest.fixture
def data_dir():
    """The folder with mnist_train.npz etc.; tests that need real data skip without it."""
    path = Path(os.environ.get("DDPM_DATA", ROOT / "data"))
    if not (path / "mnist_train.npz").exists():
        pytest.skip(f"offline datasets not found in {path}; set DDPM_DATA to the folder with mnist_train.npz")
    return path
