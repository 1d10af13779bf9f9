"""Core ML in the bundle: `export --targets coreml`, its manifest, its variants on fresh inputs, and
whole sampling runs through the runtime's Core ML backend against the ONNX backend.

On Linux the backend runs the packages in the numpy MIL evaluator; on macOS in Core ML itself
(`MLModel.predict`), under the same assertions.

Whole-run tolerance: the Core ML packages compute in float32 over float16 weights (float16 storage on
a GPU or the Neural Engine), so a draw whose uniform lies within ~1e-4 of a CDF boundary can flip, and
a flipped token changes every later step's input. The random-weight tiny model has flat distributions
(64 codes, near-uniform), which makes such flips as likely as they get. Measured over the 24 images
below: 99.4% of positions agree with ONNX float32 (single images 88.5-100%). Images whose tokens all
agree differ only by the float16 VQ decoder: 65.7-67.8 dB PSNR; an image with flipped tokens is a
different sample (29.5-52.8 dB measured) and is reported, not bounded.
Bound: >= 99% of positions pooled; every image with identical tokens >= 35 dB PSNR.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from meissonic.runtimes.bundle import verify_files
from meissonic.runtimes.coreml_backend import CoreMLBackend
from meissonic.runtimes.pipeline import MeissonicRuntime, RuntimeInputError
from meissonic_export.export import COREML_GRAPHS, ExportError, ExportOptions, check_options
from meissonic_export.graphs import GRAPHS
from meissonic_export.validate import BUDGETS, psnr_db, validate

from .conftest import EXPORT_RESOLUTIONS, check_whole_run_report

# palette6 is palette4's path with 6 bits (one argument of coremltools' palettizer): the default run keeps
# 15 minutes by exporting one palette; the slow full evaluation of `shapes` exports and judges both.
COREML_QUANTIZED = ("int8", "int4", "palette4")


@pytest.fixture(scope="session")
def coreml_bundle(tmp_path_factory, golden_checkpoint):
    """The golden checkpoint as Core ML packages: float16, every compressed variant, the denoise step
    in two chunks, the session's two resolutions."""
    from meissonic_export.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "coreml"
    options = ExportOptions(targets=("coreml",), resolutions=EXPORT_RESOLUTIONS, quantize=COREML_QUANTIZED, block_size=32, chunks=2, jobs=1, progress=False)
    export_bundle(golden_checkpoint, out, options)
    return out


@pytest.fixture(scope="session")
def coreml_manifest(coreml_bundle):
    from meissonic.runtimes.bundle import read_manifest

    return read_manifest(coreml_bundle)


def test_manifest_describes_every_package(coreml_manifest, info):
    graphs = [g for g in coreml_manifest.graphs if g.target == "coreml"]
    assert coreml_manifest.base_variant("coreml") == "fp16"
    expected = set()
    for name in COREML_GRAPHS:
        spec = GRAPHS[name]
        variants = ("fp16", *COREML_QUANTIZED) if spec.quantizable else ("fp16",)
        sizes = [tuple(r) for r in EXPORT_RESOLUTIONS] if "height" in spec.dims else [None]
        expected |= {(name, v, s) for v in variants for s in sizes}
    assert {(g.name, g.variant, tuple(g.raw["resolution"]) if "resolution" in g.raw else None) for g in graphs} == expected
    verify_files(coreml_manifest, sorted({f for g in graphs for f in g.raw["files"]}))  # sha256 of every file
    for graph in graphs:
        raw = graph.raw
        # int4 blocks and multifunction packages (two resolutions here, every variant's) need iOS 18
        shared = "resolution" in raw
        assert raw["deployment_target"] == ("iOS18" if graph.variant == "int4" or shared else "iOS17"), graph.name
        assert raw["static_shapes"]["batch"] == 1 and raw["parity"] and raw["budget"] == BUDGETS[graph.variant].to_dict()
        assert raw["bytes"] == sum(coreml_manifest.raw["files"][f]["bytes"] for f in raw["files"])
        for tensor in raw["inputs"]:
            assert tensor["dtype"] in ("float32", "int32"), (graph.name, tensor)  # Core ML takes ids as int32
        if graph.name == "denoise_step":
            chunks = raw["chunks"]
            assert len(chunks) == 2 and chunks[-1]["path"].endswith(".chunk1.mlpackage")
            assert sum(c["bytes"] for c in chunks) == raw["bytes"] and all(c["bytes"] > 0 for c in chunks)
        if graph.variant != "fp16":
            q = raw["quantization"]
            lowest = {"int8": 8, "int4": 4, "palette4": 4}[graph.variant]
            assert set(q["bits"].values()) <= {8, lowest}, (graph.name, graph.variant)  # the recipes keep sensitive layers at 8 bits
            assert graph.name == "text_encoder" or lowest in q["bits"].values()  # CLIP stays int8 (README: 11.9 dB at int4)
            assert q["weight_sqnr_db"] >= BUDGETS[graph.variant].min_sqnr_db, (graph.name, graph.variant, q["weight_sqnr_db"])
    sizes = {(g.name, g.variant): g.raw["bytes"] for g in graphs if g.raw.get("resolution", [192, 128]) == [192, 128]}
    assert sizes[("denoise_step", "int4")] < sizes[("denoise_step", "int8")] < sizes[("denoise_step", "fp16")]


def test_one_package_serves_every_resolution(coreml_manifest):
    """Per graph, variant (palettes included) and chunk one multifunction package, one function per
    resolution, each entry pointing at its own; the weights are stored once (the package is far from
    twice one resolution's)."""
    from meissonic.runtimes.coreml_eval import CoreMLProgram

    graphs = [g for g in coreml_manifest.graphs if g.target == "coreml" and "resolution" in g.raw]
    by_package: dict[str, list] = {}
    for graph in graphs:
        for part in graph.raw.get("chunks") or [graph.raw]:
            by_package.setdefault(part["path"], []).append((graph, part["function"]))
    for path, users in by_package.items():
        functions = {f"size_{g.raw['resolution'][0]}x{g.raw['resolution'][1]}" for g, _ in users}
        assert {function for _, function in users} == functions and len(functions) == len(EXPORT_RESOLUTIONS), path
        for function in functions:
            assert CoreMLProgram(coreml_manifest.root / path, function=function).output_names  # each function loads
    step = next(g for g in graphs if (g.name, g.variant) == ("denoise_step", "fp16"))
    weights = sum(w.size for w in CoreMLProgram(coreml_manifest.root / step.raw["chunks"][0]["path"], function=step.raw["chunks"][0]["function"]).constants().values())
    assert step.raw["chunks"][0]["bytes"] < 1.5 * 2 * weights  # float16: 2 bytes a weight, stored once for both sizes


@pytest.mark.parametrize("variant", ("fp16", *COREML_QUANTIZED))
def test_variant_meets_its_budget_on_fresh_inputs(variant, coreml_manifest, golden_components, info):
    """Fresh inputs (two images, so the backend's one-image-at-a-time split is exercised), through the
    runtime's Core ML graph, measured by the same validation routine as at export time."""
    backend = CoreMLBackend(coreml_manifest, variant, verify=False)
    rng = np.random.default_rng(11)
    for name in COREML_GRAPHS:
        spec = GRAPHS[name]
        module = spec.build(golden_components)
        inputs = spec.sample(info, {"batch": 2, "height": 8, "width": 12}, rng)
        own = coreml_manifest.find(name, "coreml", variant).variant  # the VQ graphs stay float16
        report = validate(spec, module, backend.graph(name), inputs, BUDGETS[own])
        assert not report["failures"], (name, own, report)


def _runs(runtime, sizes, seeds=(0, 1, 2), steps=(4, 12)):
    for width, height in sizes:
        for seed in seeds:
            for count in steps:
                yield runtime.generate(["a cat", "a dog"], steps=count, seed=seed, width=width, height=height, progress=False)


def test_whole_sampling_run_matches_the_onnx_backend(tiny_bundle, coreml_bundle):
    """Same seed, same prompts, guidance 9: Core ML float16 against ONNX float32 (see the module docstring)."""
    onnx_runtime = MeissonicRuntime.from_bundle(tiny_bundle, verify=False)
    coreml_runtime = MeissonicRuntime.from_bundle(coreml_bundle, backend="coreml", verify=False)
    assert coreml_runtime.backend.variant == "fp16"
    agree = total = identical = 0
    for ours, theirs in zip(_runs(coreml_runtime, EXPORT_RESOLUTIONS), _runs(onnx_runtime, EXPORT_RESOLUTIONS)):
        agree, total = agree + int((ours.tokens == theirs.tokens).sum()), total + ours.tokens.size
        for tokens, pixels, onnx_tokens, onnx_pixels in zip(ours.tokens, ours.pixels, theirs.tokens, theirs.pixels):
            psnr = psnr_db(onnx_pixels.astype(np.float64), pixels)
            if np.array_equal(tokens, onnx_tokens):
                identical += 1
                assert psnr >= 35, psnr
            else:
                print(f"flipped {(tokens != onnx_tokens).mean():.1%} of tokens: {psnr:.1f} dB")
    assert agree / total >= 0.99, agree / total
    assert identical > 0  # the PSNR bound was exercised


def test_quantized_whole_run_report(coreml_manifest):
    check_whole_run_report(coreml_manifest.raw["quality"]["coreml"], "fp16", COREML_QUANTIZED)


def test_generate_cli_says_which_core_ml_it_uses(coreml_bundle, tmp_path):
    out = tmp_path / "cat.png"
    run = subprocess.run(
        [sys.executable, "-m", "meissonic.runtimes.cli", str(coreml_bundle), "a cat", "--backend", "coreml", "--variant", "int4",
         "--steps", "3", "--size", "192x128", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    engine = "MLModel.predict" if sys.platform == "darwin" else "numpy MIL evaluator"
    assert f"backend: coreml ({engine}" in run.stderr and "variant: int4" in run.stderr
    assert out.stat().st_size > 0


def test_bad_requests_name_the_problem(tiny_bundle, coreml_bundle, golden_checkpoint, tmp_path):
    with pytest.raises(RuntimeInputError, match="no coreml graphs.*--targets coreml"):
        MeissonicRuntime.from_bundle(tiny_bundle, backend="coreml")
    with pytest.raises(RuntimeInputError, match="no onnx graphs"):
        MeissonicRuntime.from_bundle(coreml_bundle)
    with pytest.raises(RuntimeInputError, match="variant 'fp32' is not in"):
        MeissonicRuntime.from_bundle(coreml_bundle, backend="coreml", variant="fp32")
    with pytest.raises(ExportError, match="Core ML variants; add --targets coreml"):
        check_options(golden_checkpoint, tmp_path / "b", ExportOptions(quantize=("palette4",)))
    with pytest.raises(ExportError, match="--chunks: must be at least 1"):
        check_options(golden_checkpoint, tmp_path / "b", ExportOptions(targets=("coreml",), chunks=0))
