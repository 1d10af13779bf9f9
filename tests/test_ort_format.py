"""ORT-format models (`export --targets ort`): the session bundle carries them beside every ONNX graph
variant, they run through the runtime's `ort` backend with the same tokens as the `.onnx` files, and
the reduced-build operator config lists exactly the operators they use."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meissonic_export.ort_format import OPERATORS_CONFIG, read_operators_config, too_large_for_ort
from runtimes.bundle import verify_files
from runtimes.pipeline import MeissonicRuntime


def test_every_onnx_graph_variant_has_a_validated_ort_twin(manifest):
    onnx_graphs = {(g.name, g.variant): g for g in manifest.graphs if g.target == "onnx"}
    ort_graphs = {(g.name, g.variant): g for g in manifest.graphs if g.target == "ort"}
    assert set(ort_graphs) == set(onnx_graphs) and len(ort_graphs) >= 10
    for key, graph in ort_graphs.items():
        assert graph.path.endswith(".ort") and graph.path.rsplit(".", 1)[0] == onnx_graphs[key].path.rsplit(".", 1)[0]
        assert graph.raw["parity"] and graph.raw["parity"][0]["batch"] >= 1
    assert manifest.raw["base_variants"]["ort"] == manifest.raw["base_variants"]["onnx"]
    assert manifest.raw["ort"]["operators_config"] == OPERATORS_CONFIG and not manifest.raw["ort"]["skipped"]
    verify_files(manifest, [OPERATORS_CONFIG, *(g.path for g in ort_graphs.values())])  # listed with sha256


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int4"])
def test_ort_models_give_the_tokens_of_the_onnx_files(tiny_bundle, variant):
    runs = {}
    for backend in ("onnx", "ort"):
        runtime = MeissonicRuntime.from_bundle(tiny_bundle, backend=backend, variant=variant)
        runs[backend] = runtime.generate("a red circle", steps=6, seed=3, width=192, height=128, progress=False)
    assert np.array_equal(runs["onnx"].tokens, runs["ort"].tokens)
    assert np.abs(runs["onnx"].pixels - runs["ort"].pixels).max() < 1e-4  # float32 decoder; image scale 1


def test_operator_config_lists_exactly_what_the_ort_models_use(manifest, tmp_path):
    """Independent of onnxruntime's ORT-format reader: optimize each ONNX graph as the converter does
    (all levels but NCHWc, int8 QDQ allowed as for ARM), save it as ONNX, and read its nodes with onnx."""
    used: dict[str, set[str]] = {}
    for index, graph in enumerate(g for g in manifest.graphs if g.target == "onnx"):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp_path / f"{index}.onnx")
        options.add_session_config_entry("session.qdqisint8allowed", "1")
        ort.InferenceSession(str(manifest.root / graph.path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
        for node in onnx.load(str(tmp_path / f"{index}.onnx"), load_external_data=False).graph.node:
            used.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    assert read_operators_config(manifest.root / OPERATORS_CONFIG) == used


def test_a_graph_over_two_gigabytes_is_skipped_with_the_reason(tmp_path):
    weights = tmp_path / "model.onnx.data"
    with open(weights, "wb") as f:
        f.truncate(2**31)  # sparse: no disk used
    assert "2 GB" in too_large_for_ort([weights])
    assert too_large_for_ort([]) is None


def test_mobile_usability_figures_are_the_checkers(manifest):
    """The manifest's figures against onnxruntime's own checker, run here as a user runs it, its printed
    lines parsed: per provider, the graph as exported, then as it would be with fixed shapes."""
    graph = manifest.find("denoise_step", "ort", "fp32")
    printed = subprocess.run(
        [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(manifest.root / manifest.find("denoise_step", "onnx", "fp32").path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found: dict[str, list[tuple[int, int, int]]] = {}
    for partitions, supported, nodes, provider in re.findall(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP\.", printed.stdout + printed.stderr):
        found.setdefault(provider, []).append((int(supported), int(nodes), int(partitions)))
    for provider, name in (("nnapi", "NNAPI"), ("coreml_mlprogram", "CoreML MLProgram")):
        ours = graph.raw["mobile_usability"][provider]
        assert [(f["supported_nodes"], f["nodes"], f["partitions"]) for f in (ours["as_exported"], ours["if_shapes_were_fixed"])] == found[name]
