"""Scale tests on the released 1B configuration (random weights): `pytest -m slow`.

They need ~25 GB of disk and 12 GB of RAM and take tens of minutes on 2 cores. Set
MEISSONIC_1B_CHECKPOINT to reuse a checkpoint written by `meissonic-export make-checkpoint --preset
meissonic-1b`; otherwise one is written to a temporary folder.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint_1b(tmp_path_factory) -> Path:
    if os.environ.get("MEISSONIC_1B_CHECKPOINT"):
        return Path(os.environ["MEISSONIC_1B_CHECKPOINT"])
    from reference.presets import write_checkpoint

    return write_checkpoint("meissonic-1b", tmp_path_factory.mktemp("1b") / "checkpoint")


def _run_export(checkpoint: Path, out: Path, *arguments: str) -> dict:
    """Export in a child process, so its time and peak memory can be read; returns the manifest."""
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "meissonic_export.cli", "export", str(checkpoint), "--out", str(out), *arguments], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"\nexport {' '.join(arguments)}: {time.time() - started:.0f} s, peak RSS of the largest child so far {peak_gb:.1f} GB")
    for graph in manifest["graphs"]:
        print(f"  {graph['name']:<13} {graph['variant']:<5} {graph['bytes'] / 1e6:9.1f} MB")
    return manifest


def test_1b_onnx_export_float32(checkpoint_1b, tmp_path):
    manifest = _run_export(checkpoint_1b, tmp_path / "bundle", "--resolution", "1024")
    sizes = {g["name"]: g["bytes"] for g in manifest["graphs"]}
    assert set(sizes) == {"text_encoder", "transformer", "denoise_step", "vq_decoder", "vq_encoder"}
    assert sizes["denoise_step"] > 4.0e9  # 1,006,946,304 float32 parameters, in external data
    assert any(f.endswith(".data") for f in next(g for g in manifest["graphs"] if g["name"] == "denoise_step")["files"])


def test_1b_quantized_sizes(checkpoint_1b, tmp_path):
    manifest = _run_export(
        checkpoint_1b, tmp_path / "bundle", "--resolution", "512", "--graphs", "text_encoder,denoise_step", "--quantize", "int8,int4"
    )
    size = {(g["name"], g["variant"]): g["bytes"] for g in manifest["graphs"]}
    assert size[("denoise_step", "int4")] <= 600e6
    assert size[("denoise_step", "int8")] <= 1.1e9
