"""ORT-format models (`export --targets ort`): the session bundle carries them beside every ONNX graph
variant, with fixed-shape phone graphs per resolution; they run through the runtime's `ort` and `phone`
backends with the same tokens as the `.onnx` files, the reduced-build operator config lists exactly
the operators they use, and the usability figures are the checker's."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meissonic_export.ort_format import OPERATORS_CONFIG, PHONE_GRAPHS, read_operators_config, too_large_for_ort
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


def test_phone_graphs_are_fixed_shape_per_resolution_and_validated(manifest):
    onnx_variants = {g.variant for g in manifest.graphs if g.target == "onnx"}
    for name in PHONE_GRAPHS:
        for variant in onnx_variants:
            wanted = manifest.find(name, "onnx", variant).variant
            phones = [g for g in manifest.graphs if (g.name, g.target, g.variant) == (name, "phone", wanted)]
            sizes = sorted(tuple(g.raw["resolution"]) for g in phones if "resolution" in g.raw)
            assert sizes == (sorted(manifest.resolutions) if name != "text_encoder" else []) and len(phones) == max(1, len(sizes))
            for graph in phones:
                assert graph.raw["static_shapes"]["batch"] == 1 and graph.raw["parity"]
                model = onnx.load(str(manifest.root / graph.raw["files"][1]), load_external_data=False)
                assert all(d.dim_value > 0 for v in (*model.graph.input, *model.graph.output) for d in v.type.tensor_type.shape.dim)
                assert not any(node.op_type in ("Reciprocal", "Resize") for node in model.graph.node)  # rewritten for the accelerators
    assert not any(g.target == "phone" and g.name == "transformer" for g in manifest.graphs)


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_ort_and_phone_graphs_give_the_tokens_of_the_onnx_files(tiny_bundle, variant):
    """One image: the phone graphs run the same rows as the desktop graph. (fp16 is left to the export's
    per-graph validation: the re-optimized phone graph rounds differently in float16 and flipped 1 of 96
    draws here, a tie, which the sampler then carries on. With two images the int8 and int4 desktop graphs
    quantize activations over both images' rows at once, so their draws depend on the batch; the phone
    graphs, one image at a time, do not.)"""
    runs = {}
    for backend in ("onnx", "ort", "phone"):
        runtime = MeissonicRuntime.from_bundle(tiny_bundle, backend=backend, variant=variant)
        runs[backend] = runtime.generate("a red circle", steps=6, seed=3, width=192, height=128, progress=False)
    for backend in ("ort", "phone"):
        assert np.array_equal(runs["onnx"].tokens, runs[backend].tokens), backend
        assert np.abs(runs["onnx"].pixels - runs[backend].pixels).max() < 1e-4  # float32 decoder; image scale 1


def test_phone_graphs_run_a_batch_image_by_image(tiny_bundle):
    runs = [
        MeissonicRuntime.from_bundle(tiny_bundle, backend=backend).generate(["a red circle", "a cat"], steps=4, seed=5, width=512, height=512, num_images=2, progress=False)
        for backend in ("onnx", "phone")
    ]  # fmt: skip
    assert runs[1].tokens.shape[0] == 4 and np.array_equal(runs[0].tokens, runs[1].tokens)


def test_operator_config_lists_exactly_what_the_ort_models_use(manifest, tmp_path):
    """Independent of onnxruntime's ORT-format reader: optimize each ONNX graph as the converter does
    (all levels but NCHWc, int8 QDQ allowed as for ARM), save it as ONNX, and read its nodes with onnx."""
    used: dict[str, set[str]] = {}
    for index, graph in enumerate(g for g in manifest.graphs if g.target in ("ort", "phone")):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp_path / f"{index}.onnx")
        options.add_session_config_entry("session.qdqisint8allowed", "1")
        source = (manifest.root / graph.path).with_suffix(".onnx")  # what the ORT model was converted from
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
        for node in onnx.load(str(tmp_path / f"{index}.onnx"), load_external_data=False).graph.node:
            used.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    assert read_operators_config(manifest.root / OPERATORS_CONFIG) == used


def test_a_graph_over_two_gigabytes_is_skipped_with_the_reason(tmp_path):
    weights = tmp_path / "model.onnx.data"
    with open(weights, "wb") as f:
        f.truncate(2**31)  # sparse: no disk used
    assert "2 GB" in too_large_for_ort([weights])
    assert too_large_for_ort([]) is None


@pytest.mark.parametrize("target", ["ort", "phone"])
def test_mobile_usability_figures_are_the_checkers(manifest, target):
    """The manifest's figures against onnxruntime's own checker, run here as a user runs it on the graph's
    .onnx, its printed lines parsed: per provider, the graph as it is, then (if the checker offers it) as
    it would be with fixed shapes."""
    graph = manifest.find("vq_decoder", target, "fp32", resolution=(512, 512))
    printed = subprocess.run(
        [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str((manifest.root / graph.path).with_suffix(".onnx"))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found: dict[str, list[tuple[int, int, int]]] = {}
    for partitions, supported, nodes, provider in re.findall(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP\.", printed.stdout + printed.stderr):
        found.setdefault(provider, []).append((int(supported), int(nodes), int(partitions)))
    for provider, name in (("nnapi", "NNAPI"), ("coreml_mlprogram", "CoreML MLProgram")):
        ours = graph.raw["mobile_usability"][provider]
        figures = [(f["supported_nodes"], f["nodes"], f["partitions"]) for f in (ours["as_exported"], ours["if_shapes_were_fixed"])]
        assert figures[: len(found[name])] == found[name]
