"""Shared fixtures. Golden data comes from $MEISSONIC_GOLDEN (default: the copy in tests/data/golden)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN = Path(os.environ.get("MEISSONIC_GOLDEN", DATA / "golden"))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share two cores: one torch thread each (and in the CLIs they start), not 2 x 2 threads
        # contending; torch reads this when it is first imported, after this hook.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# Square and non-square; 512 px gives 1312 validated token positions in all (1024 + 96 + two images
# of 96), enough to state "fewer than 0.1% of positions at a tie" (one tie in 512 would be 0.2%).
EXPORT_RESOLUTIONS = ((512, 512), (192, 128))


QUANTIZED_VARIANTS = ("fp16", "int8", "int4")


def check_whole_run_report(report: dict, base: str, variants) -> None:
    """The manifest's whole-sampling-run figures of each variant against the target's base precision.

    Every variant decodes with the same VQ decoder as the base (the VQ graphs are never quantized), so
    the images are identical exactly when the tokens are: a small model can legitimately reproduce
    every token (int8 on the tiny model does), and then PSNR is infinite.
    """
    assert report["against"] == base
    for variant in variants:
        figures = report[variant]
        assert 0 <= figures["token_agreement"] <= 1, (variant, figures)
        identical_tokens, identical_images = figures["token_agreement"] == 1.0, figures["image_psnr_db"] == "inf"
        assert identical_tokens == identical_images, (variant, figures)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, golden_checkpoint) -> Path:
    """The golden checkpoint exported once per test run: ONNX (and its ORT-format twins), every graph in float32, and the
    quantized variants (int4 in blocks of 32: the tiny model is only 64 wide). Test workers share one
    copy, read-only: the first to need it exports it under a file lock, the others wait and reuse it
    (the export writes its manifest last, atomically, so a manifest means a complete bundle)."""
    from filelock import FileLock

    from meissonic.runtimes.bundle import MANIFEST
    from meissonic_export.export import ExportOptions, export_bundle
    from meissonic_export.options import GRAPH_NAMES

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above each worker's
    out = shared / "tiny-bundle"
    with FileLock(str(shared / "tiny-bundle.lock")):
        if not (out / MANIFEST).is_file():
            # jobs=1 here and in the other tests' exports: the test run keeps both cores busy already (two
            # xdist workers), and export workers would only add their start-up (torch imported again).
            options = ExportOptions(targets=("onnx", "ort"), resolutions=EXPORT_RESOLUTIONS, graphs=GRAPH_NAMES, quantize=QUANTIZED_VARIANTS, block_size=32, jobs=1, progress=False)
            export_bundle(golden_checkpoint, out, options)
    return out


@pytest.fixture(scope="session")
def golden_pipeline(golden_checkpoint):
    """The PyTorch reference pipeline on the golden checkpoint."""
    from meissonic.reference.pipeline import MeissonicPipeline

    return MeissonicPipeline.from_pretrained(golden_checkpoint)


@pytest.fixture(scope="session")
def golden_components(golden_checkpoint):
    from meissonic.reference.checkpoint import COMPONENTS, load_component

    return {name: load_component(golden_checkpoint, name) for name in COMPONENTS}


@pytest.fixture(scope="session")
def manifest(tiny_bundle):
    """The session bundle's manifest, read through the runtime's reader."""
    from meissonic.runtimes.bundle import read_manifest

    return read_manifest(tiny_bundle)


@pytest.fixture(scope="session")
def info(golden_components):
    from meissonic_export.graphs import model_facts

    return model_facts(golden_components)
