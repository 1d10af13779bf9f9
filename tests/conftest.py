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


# Square and non-square; 512 px gives 3168 validated token positions in all, enough to state
# "fewer than 0.1% of positions at a tie" (one tie in 512 positions would already be 0.2%).
EXPORT_RESOLUTIONS = ((512, 512), (192, 128))


QUANTIZED_VARIANTS = ("fp16", "int8", "int4")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, golden_checkpoint) -> Path:
    """The golden checkpoint exported once per test session: ONNX, every graph in float32, and the
    quantized variants (int4 in blocks of 32: the tiny model is only 64 wide)."""
    from meissonic_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    options = ExportOptions(resolutions=EXPORT_RESOLUTIONS, quantize=QUANTIZED_VARIANTS, block_size=32, progress=False)
    export_bundle(golden_checkpoint, out, options)
    return out


@pytest.fixture(scope="session")
def golden_components(golden_checkpoint):
    from reference.checkpoint import COMPONENTS, load_component

    return {name: load_component(golden_checkpoint, name) for name in COMPONENTS}
