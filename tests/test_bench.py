"""The benchmark runs end to end on the tiny bundle and writes what it promises (no timing asserts:
timings are measured by the benchmark, not judged by tests)."""
from __future__ import annotations

import json

from meissonic_export.bench import BenchOptions, markdown, run_bench, write

from .conftest import QUANTIZED_VARIANTS


def test_bench_smoke(tiny_bundle, golden_checkpoint, tmp_path):
    options = BenchOptions(
        checkpoint=golden_checkpoint, bundle=tiny_bundle, grid=32, scaling_grids=(8,), steps=2, repeats=3, warmup=0,
        with_1b=False, out=tmp_path, progress=False,
    )  # fmt: skip
    results = run_bench(options)
    variants = ["fp32", *QUANTIZED_VARIANTS]
    assert list(results.step) == [32, 8] and all(list(ratios) == variants for ratios in results.step.values())
    assert list(results.image) == variants and all(r.pairs == 3 for r in results.image.values())
    for ratio in [*results.image.values(), *(r for ratios in results.step.values() for r in ratios.values())]:
        assert ratio.p25 <= ratio.median <= ratio.p75 and ratio.reference_ms > 0 and ratio.candidate_ms > 0
    assert set(results.peak_rss_mb) == {"pytorch", *variants} and all(mb > 50 for mb in results.peak_rss_mb.values())
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
