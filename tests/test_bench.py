"""The benchmark runs end to end on the tiny bundle and writes what it promises (no timing asserts:
timings are measured by the benchmark, not judged by tests)."""
from __future__ import annotations

import json

import pytest

from meissonic_export.bench import (
    PRESET_STEP_VARIANTS,
    BenchOptions,
    export_options,
    markdown,
    matrix_product_share,
    one_step_of_preset,
    one_step_table,
    run_bench,
    write,
)

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
    assert all(0 < matrix_product_share(per_op) < 1 for per_op in results.profile.values())
    table = markdown(results)
    assert "| int4 |" in table and "speed-up" in table
    paths = write(results, tmp_path)
    assert json.loads(paths[0].read_text())["settings"]["threads"] == "2"
    assert all(p.stat().st_size > 0 for p in paths) and paths[2].read_bytes()[:4] == b"\x89PNG"


def test_bench_exports_every_grid_it_times():
    """An export for one resolution fixes its token grid; the benchmark times the step at several grids,
    so its bundle carries a resolution per grid (with one, `bench` failed at the first other grid)."""
    options = BenchOptions(grid=32, scaling_grids=(16, 32, 64), variants=("fp32", "int8"))
    export = export_options(options)
    assert export.resolutions == ((512, 512), (256, 256), (1024, 1024)) and export.quantize == ("int8",)


@pytest.mark.slow  # a minute of exports and child processes: the default suite stays under 15 minutes
def test_one_step_of_a_preset_times_float32_int8_and_int4(tmp_path):
    """The benchmark's 1B measurement, on the tiny preset: the step is exported, quantized to int8 and int4
    in child processes (where the 1B's quantization has the memory it needs), and each variant is timed
    in pairs with PyTorch."""
    options = BenchOptions(repeats=2, warmup=0, block_size=32, progress=False)
    one = one_step_of_preset("tiny", 8, options, tmp_path)
    assert one["grid"] == 8
    for variant in PRESET_STEP_VARIANTS:
        assert one[variant].pairs == 2 and one[variant].candidate_ms > 0 and one[variant].reference_ms > 0
    assert one["int4_bytes"] < one["int8_bytes"] < one["fp32_bytes"]
    # Each side profiled: the matrix products ran in every one, and something else did too.
    assert set(one["profile"]) == {"pytorch", *PRESET_STEP_VARIANTS}
    assert all(0 < matrix_product_share(per_op) < 1 for per_op in one["profile"].values())
    assert any(op.startswith("MatMul") for op in one["profile"]["int4"]) and one["flops"] > 0 and one["gemm_gflops"] > 0
    table = "\n".join(one_step_table(one))
    assert "matrix products' share" in table and table.count("| int8 |") == 2  # the ratio row and the profile row
