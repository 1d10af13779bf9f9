"""The benchmark runs end to end on the tiny bundle and writes what it promises (no timing asserts:
timings are measured by the benchmark, not judged by tests)."""
from __future__ import annotations

import json

from meissonic_export.bench import BenchOptions, markdown, run_bench, write

from .conftest import QUANTIZED_VARIANTS


def test_bench_smoke(tiny_bundle, golden_checkpoint, tmp_path):
    options = BenchOptions(
        checkpoint=golden_checkpoint, bundle=tiny_bundle, grid=32, scaling_grids=(8, 16), steps=2, repeats=1, warmup=0,
        with_1b=False, out=tmp_path, progress=False,
    )  # fmt: skip
    results = run_bench(options)
    variants = ["fp32", *QUANTIZED_VARIANTS]
    assert list(results.step) == ["pytorch", *variants] and list(results.image) == ["pytorch", *variants]
    assert set(results.peak_rss_mb) == {"pytorch", *variants} and all(mb > 50 for mb in results.peak_rss_mb.values())
    assert set(results.scaling) == {8, 16} and all(set(t) == {"pytorch", *variants} for t in results.scaling.values())
    assert results.sizes_mb["int4"]["denoise_step"] < results.sizes_mb["fp32"]["denoise_step"]
    assert results.quality["int8"] > 30
    # The profile names what ran: attention and the linear layers as MatMul in every ONNX variant.
    assert set(results.profile) == {"pytorch", *variants}
    assert all(sum(per_op.values()) > 0 for per_op in results.profile.values())
    assert any(op.startswith("MatMul") for op in results.profile["fp32"])
    table = markdown(results)
    assert "| int4 |" in table and "speed-up" in table
    paths = write(results, tmp_path)
    assert json.loads(paths[0].read_text())["settings"]["threads"] == "2"
    assert all(p.stat().st_size > 0 for p in paths) and paths[2].read_bytes()[:4] == b"\x89PNG"
