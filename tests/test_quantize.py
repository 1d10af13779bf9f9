"""Quantized variants: they export, load and run; their figures are computed and meet the budgets;
the weights we report are the weights the kernels use; bad requests fail before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from meissonic.quantize.onnx_quant import Layer, dequantized_weights, quantize_graph
from meissonic.quantize.recipe import Recipe
from meissonic.runtimes.cli_common import check_report_folder
from meissonic.runtimes.onnx_backend import OnnxGraph
from meissonic.runtimes.pipeline import MeissonicRuntime
from meissonic_export.graphs import GRAPHS
from meissonic_export.sensitivity import analyse, write_report
from meissonic_export.validate import BUDGETS, failures_of, reference_outputs, sqnr_db, validate

from .conftest import QUANTIZED_VARIANTS, check_whole_run_report

QUANTIZED_GRAPHS = [name for name, spec in GRAPHS.items() if spec.quantizable]


@pytest.mark.parametrize("variant", QUANTIZED_VARIANTS)
def test_variant_runs_and_meets_its_budget_on_fresh_inputs(variant, manifest, golden_components, info):
    """Recomputed here on inputs the export never saw, against the reference, with the stated budget."""
    rng = np.random.default_rng(7)
    for name in QUANTIZED_GRAPHS:
        spec = GRAPHS[name]
        entry = manifest.find(name, "onnx", variant)
        assert entry.variant == variant
        module = spec.build(golden_components)
        dims = {"batch": 2, "height": 32, "width": 32}  # 2048 positions
        inputs = spec.sample(info, dims, rng)
        expected, actual = reference_outputs(spec, module, inputs), OnnxGraph(manifest.root / entry.path)(inputs)
        for out in spec.outputs:
            assert actual[out.name].shape == expected[out.name].shape and np.all(np.isfinite(actual[out.name]))
            if out.kind in ("float", "logits"):
                figures = {"sqnr_db": sqnr_db(expected[out.name], actual[out.name]), "max_abs": 0.0, "reference_max_abs": 1.0}
                if out.kind == "logits":
                    figures["top1_agreement"] = float((expected[out.name].argmax(1) == actual[out.name].argmax(1)).mean())
                if out.name == spec.tie_evidence:  # compared where the draws agree
                    agree = expected["sampled_tokens"] == actual["sampled_tokens"]
                    figures["sqnr_db"] = sqnr_db(expected[out.name][agree], actual[out.name][agree])
                assert not failures_of(out.kind, figures, BUDGETS[variant]), (name, out.name, figures)


def test_manifest_quality_report(manifest):
    sizes = {}
    for graph in manifest.graphs:
        assert graph.raw["parity"] and graph.raw["budget"]
        if graph.variant == "fp32":
            continue
        assert graph.name in QUANTIZED_GRAPHS  # the VQ graphs stay at the base precision
        q = graph.raw["quantization"]
        spec = GRAPHS[graph.name]
        assert q["recipe"]["scheme"] == graph.variant
        assert set(q["bits"]) and set(q["layer_weight_sqnr_db"]) == {n for n, b in q["bits"].items() if b < 32}
        floor = {"fp16": 60, "int8": 35, "int4": 20}[graph.variant]  # per-weight SQNR: 16/8/4 bits
        assert min(q["layer_weight_sqnr_db"].values()) > floor, (graph.name, graph.variant)
        for case in graph.raw["parity"]:
            for out in spec.outputs:
                assert not failures_of(out.kind, case["outputs"][out.name], BUDGETS[graph.variant])
        sizes[(graph.name, graph.variant)] = graph.raw["bytes"]
    for name in ("transformer", "denoise_step"):
        fp32 = manifest.find(name, "onnx", "fp32").raw["bytes"]
        assert sizes[(name, "int4")] < sizes[(name, "int8")] < sizes[(name, "fp16")] < fp32
    check_whole_run_report(manifest.raw["quality"]["onnx"], "fp32", QUANTIZED_VARIANTS)


def test_int4_recipe_records_its_mixed_bits(manifest):
    bits = manifest.find("denoise_step", "onnx", "int4").raw["quantization"]["bits"]
    assert bits["transformer_blocks.0.attn.to_q"] == 4 and bits["single_transformer_blocks.1.proj_out"] == 4
    assert bits["project_to_hidden"] == 8 and bits["mlm_layer.conv2"] == 8 and bits["embed.embeddings"] == 8
    text_bits = manifest.find("text_encoder", "onnx", "int4").raw["quantization"]["bits"]
    assert set(text_bits.values()) == {8}


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_the_codebook_head_computes_in_int8(variant, manifest):
    """The step graph runs the head's last 1x1 conv on rows, a MatMul, so the int8 rule quantizes it with
    dynamic int8 activations (MatMulInteger); as a Conv it only got dequantized weights (slower than float32)."""
    model = onnx.load(str(manifest.root / manifest.find("denoise_step", "onnx", variant).path), load_external_data=False)
    producer = {output: node for node in model.graph.node for output in node.output}
    node, chain = producer[[n for n in model.graph.node if n.op_type == "Softmax"][-1].input[0]], []
    while node is not None and len(chain) < 4:  # from the codebook softmax back through the head
        chain.append(node.op_type)
        node = producer.get(node.input[0])
    assert "MatMulInteger" in chain, chain


@pytest.mark.parametrize("variant", QUANTIZED_VARIANTS)
def test_runtime_generates_with_every_variant(variant, tiny_bundle):
    runtime = MeissonicRuntime.from_bundle(tiny_bundle, variant=variant)
    result = runtime.generate("a cat", steps=4, width=192, height=128, seed=1, progress=False)
    assert result.tokens.shape == (1, 8, 12) and result.pixels.shape == (1, 3, 128, 192)


def _single_matmul(path, weight):
    """y = x @ W with W [K, N], named so the layer scope resolves to 'proj'."""
    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="node_proj")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'proj', 'linear']")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), str(path))


@pytest.mark.parametrize("bits", [8, 4])
def test_reported_weights_are_what_the_kernel_computes_with(bits, tmp_path):
    """Feed the identity through the quantized MatMul: the output is the kernel's own weight matrix."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    _single_matmul(tmp_path / "fp32.onnx", weight)
    layer = [Layer("proj", "MatMul", "node_proj", "w", (64, 48))]
    recipe = Recipe(name="t", scheme=f"int{bits}", block_size=32, accuracy_level=0)
    path, _ = quantize_graph(tmp_path / "fp32.onnx", tmp_path / "q", "", {"proj": bits}, recipe)
    kernel = OnnxGraph(path)({"x": np.eye(64, dtype=np.float32)})["y"]  # [K, N] = W_kernel
    reported = dequantized_weights(path, layer)["proj"]  # [N, K] checkpoint orientation
    # int4: exact dequantized weights; int8: the identity is quantized exactly (0 and 1 -> 0 and 255)
    np.testing.assert_allclose(reported.T, kernel, rtol=1e-5, atol=1e-6)
    assert sqnr_db(weight, reported.T) > (35 if bits == 8 else 18)


@pytest.fixture(scope="module")
def external_data_step(golden_components, info, tmp_path_factory):
    """The tiny denoise step exported the way the 1B one is, weights in model.onnx.data (one export
    serves both variants below). The threshold stays lowered for the quantizations, which read it too."""
    from meissonic.quantize import graph_files
    from meissonic_export import onnx_export

    spec = GRAPHS["denoise_step"]
    module = spec.build(golden_components)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_files, "EXTERNAL_DATA_BYTES", 0)  # the tiny graph takes the 1B path
        example = onnx_export.trace_inputs(spec, info, np.random.default_rng(0))
        fp32 = onnx_export.export_onnx(spec, module, example, tmp_path_factory.mktemp("external") / "fp32", spec.shapes(info))
    return spec, module, fp32


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_external_data_holds_each_weight_once(variant, external_data_step, info, tmp_path, monkeypatch):
    """Graphs over the external-data threshold (the 1B ones) keep their weights in model.onnx.data.
    Every byte of it must be referenced once (onnx appends to an existing file: a re-save doubled the
    1B int4 graph to 1.16 GB), the file readable by others, and the graph still right."""
    from meissonic.quantize import graph_files
    from meissonic.quantize.recipe import quantizable_layers

    monkeypatch.setattr(graph_files, "EXTERNAL_DATA_BYTES", 0)
    spec, module, fp32 = external_data_step
    recipe = Recipe.load(variant, 32)
    path, _ = quantize_graph(fp32, tmp_path / variant, spec.weights_prefix, recipe.plan(quantizable_layers(spec.weights_module(module))), recipe)
    data = path.parent / "model.onnx.data"
    extents = []
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            entry = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
            extents.append((entry.get("offset", 0), entry["length"]))
    assert extents and data.stat().st_size == max(offset + length for offset, length in extents)
    assert sum(length for _, length in extents) <= data.stat().st_size < 1.1 * sum(length for _, length in extents)  # alignment only
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (path, data))
    inputs = spec.sample(info, {"batch": 1, "height": 8, "width": 12}, np.random.default_rng(5))
    report = validate(spec, module, OnnxGraph(path), inputs, BUDGETS[variant])
    assert not report["failures"], report


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--quantize", "int3"], "--quantize: unknown scheme(s) ['int3']"),
        (["--quantize", "int4", "--block-size", "128"], "block size 128 does not divide the input width of"),
        (["--quantize", "int4", "--recipe", "int9-magic"], "int9-magic: no such recipe file or built-in recipe"),
        (["--quantize", "int8", "--recipe", "int4-mixed"], "recipe 'int4-mixed' is for int4, which --quantize does not ask for"),
    ],
)
def test_bad_quantize_requests_fail_before_work(arguments, message, golden_checkpoint, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "meissonic_export.cli", "export", str(golden_checkpoint), "--out", str(tmp_path / "b"), *arguments],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not list(tmp_path.iterdir())  # refused before any graph was exported: nothing was written


def test_recipe_naming_missing_layers_fails_before_work(golden_checkpoint, tmp_path):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"name": "mine", "scheme": "int4", "layers": [{"match": ["transformer_blocks.99.*", "ff.*"], "bits": 8}]}))
    run = subprocess.run(
        [sys.executable, "-m", "meissonic_export.cli", "export", str(golden_checkpoint), "--out", str(tmp_path / "b"),
         "--quantize", "int4", "--recipe", str(recipe)], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "names layers that do not exist: ['transformer_blocks.99.*', 'ff.*']" in run.stderr, run.stderr
    assert not (tmp_path / "b").exists()


def test_sensitivity_ranks_groups_and_writes_a_report(golden_components, tmp_path):
    results = analyse(golden_components["transformer"], bits=(4, 8), block_size=32, grid=8, progress=False)
    groups = {r.group for r in results}
    assert {"adaLN modulation (dual)", "hidden projections", "codebook head"} <= groups
    for r in results:
        assert np.isfinite(r.logit_sqnr_db) and 0 <= r.top1_agreement <= 1
    linear = {"hidden projections", "adaLN modulation (dual)", "MLP (dual)", "attention q/k/v (single)"}
    by = {(r.group, r.bits): r.logit_sqnr_db for r in results}
    assert all(by[(g, 8)] > by[(g, 4)] for g in linear)  # more bits, less error
    paths = write_report(results, tmp_path, "tiny")
    assert [p.name for p in paths] == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_report_folder("--out", tmp_path, [p.name for p in paths])  # its own reports may be replaced (a user's may not: test_bad_input)
    assert write_report(results, tmp_path, "tiny") == paths
