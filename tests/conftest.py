"""Shared fixtures. Golden data comes from $MEISSONIC_GOLDEN (default: the copy in tests/data/golden)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN = Path(os.environ.get("MEISSONIC_GOLDEN", DATA / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((GOLDEN / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden():
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_checkpoint() -> Path:
    return GOLDEN / "checkpoint"
