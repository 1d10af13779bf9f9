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
import torch
from onnx import TensorProto, helper, numpy_helper

from meissonic.reference.scheduler import categorical_by_inverse_cdf
from meissonic.runtimes.bundle import verify_files
from meissonic.runtimes.pipeline import MeissonicRuntime
from meissonic.runtimes.sampler import categorical_draw
from meissonic_export.graphs import categorical_by_blocks
from meissonic_export.ort_format import (
    OPERATORS_CONFIG,
    PHONE_GRAPHS,
    read_operators_config,
    rewrite_for_accelerators,
    too_large_for_ort,
)

# Operators no phone graph keeps: rewritten (`_REWRITES`), or left to the app (the step's draw, the text
# encoder's pooling). Gather stays for the token embeddings (NNAPI takes it, the Core ML EP does not).
REWRITTEN = {"Reciprocal", "Resize", "Neg", "Cos", "LayerNormalization", "ConvTranspose", "Erf", "CumSum", "GatherND", "ArgMax", "Greater", "Where"}


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
                if variant == "fp32":
                    assert not {node.op_type for node in model.graph.node} & REWRITTEN, (name, variant)
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


@pytest.mark.parametrize(("name", "target"), [("vq_decoder", "ort"), ("vq_decoder", "phone"), ("denoise_step", "phone"), ("text_encoder", "phone")])
def test_mobile_usability_figures_are_the_checkers(manifest, name, target):
    """The manifest's figures against onnxruntime's own checker, run here as a user runs it on the graph's
    .onnx, its printed lines parsed: per provider, the graph as it is, then (if the checker offers it) as
    it would be with fixed shapes."""
    graph = manifest.find(name, target, "fp32", resolution=(512, 512))
    printed = subprocess.run(
        [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str((manifest.root / graph.path).with_suffix(".onnx"))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found: dict[str, list[tuple[int, int, int]]] = {}
    for partitions, supported, nodes, provider in re.findall(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP\.", printed.stdout + printed.stderr):
        found.setdefault(provider, []).append((int(supported), int(nodes), int(partitions)))
    for provider, printed_name in (("nnapi", "NNAPI"), ("coreml_mlprogram", "CoreML MLProgram")):
        ours = graph.raw["mobile_usability"][provider]
        figures = [(f["supported_nodes"], f["nodes"], f["partitions"]) for f in (ours["as_exported"], ours["if_shapes_were_fixed"])]
        assert figures[: len(found[printed_name])] == found[printed_name]


@pytest.mark.parametrize("name", ["denoise_step", "text_encoder", "vq_decoder"])
def test_float32_phone_graphs_fit_the_accelerators(manifest, name):
    """The target of issue 14, on the checker's figures (checked against its CLI above): NNAPI and the
    Core ML EP (ML Program) each take at least 95% of the nodes in at most 3 partitions."""
    for graph in (g for g in manifest.graphs if (g.name, g.target, g.variant) == (name, "phone", "fp32")):
        for provider, figures in graph.raw["mobile_usability"].items():
            assert figures["as_exported"]["supported_percent"] >= 95 and figures["as_exported"]["partitions"] <= 3, (name, provider, figures)


def _single_op(op: str, shape: list[int], initializers=(), out_shape=None, **attributes) -> onnx.ModelProto:
    inputs = ["x", *(i.name for i in initializers)]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attributes)], op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], list(initializers),
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("model", "x", "tolerance"),
    [
        (_single_op("Neg", [4096]), np.r_[np.float32([0.0, -0.0, np.inf]), np.random.default_rng(0).standard_normal(4093).astype(np.float32)], 0.0),
        (_single_op("Gather", [2, 3, 2], [numpy_helper.from_array(np.array(1, np.int64), "k")], axis=2), np.arange(12, dtype=np.float32).reshape(2, 3, 2), 0.0),
        (_single_op("Cos", [20001]), np.linspace(-300, 300, 20001, dtype=np.float32), 3e-7),  # the docstring's bound, float32
        (_single_op("Erf", [20001]), np.linspace(-6, 6, 20001, dtype=np.float32), 6e-7),  # A&S 7.1.26 (1.5e-7) + float32 rounding
        (_single_op("Reciprocal", [1000]), np.linspace(0.01, 100, 1000, dtype=np.float32), 0.0),
        (
            _single_op("LayerNormalization", [2, 7, 64], [numpy_helper.from_array(np.linspace(0.5, 2, 64, dtype=np.float32), "scale"),
                                                           numpy_helper.from_array(np.linspace(-1, 1, 64, dtype=np.float32), "bias")], epsilon=1e-6),
            np.random.default_rng(1).standard_normal((2, 7, 64)).astype(np.float32) * 3 + 1, 1e-5,  # output scale ~2: rounding of a sum of 64
        ),
        (
            _single_op("ConvTranspose", [1, 8, 5, 6], [numpy_helper.from_array(np.random.default_rng(2).standard_normal((8, 4, 2, 2)).astype(np.float32), "w"),
                                                         numpy_helper.from_array(np.float32([0.5, -1, 2, 0]), "b")], kernel_shape=[2, 2], strides=[2, 2]),
            np.random.default_rng(3).standard_normal((1, 8, 5, 6)).astype(np.float32), 2e-6,  # sums of 8 products, reordered
        ),
    ],
    ids=["Neg", "Gather", "Cos", "Erf", "Reciprocal", "LayerNormalization", "ConvTranspose"],
)  # fmt: skip
def test_each_accelerator_rewrite_computes_the_operator_it_replaces(model, x, tolerance):
    """Each rewrite against onnxruntime's own kernel for the operator, on one-operator graphs: exact where
    the rewrite is exact (the same IEEE operations or a copy), within float32 rounding otherwise."""
    op = model.graph.node[0].op_type
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rewrite_for_accelerators(model)
    assert op not in {node.op_type for node in model.graph.node}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == expected.shape
    if tolerance == 0.0:
        assert np.array_equal(got, expected) and np.array_equal(np.signbit(got), np.signbit(expected))  # signed zeros too
    else:
        assert np.abs(got.astype(np.float64) - expected).max() <= tolerance


def _the_reference_draw_away_from_ties(draw_ids, codes: int, seed: int) -> None:
    """`draw_ids(probs, uniforms)` against the reference's inverse CDF on peaked and flat distributions:
    the same ids except for uniforms within 1e-6 of a CDF boundary (the tie window of every draw
    comparison: cumulative sums differ in the last bits between libraries and summation orders)."""
    rng = np.random.default_rng(seed)
    for concentration in (0.05, 1.0, 20.0):
        probs = rng.dirichlet(np.full(codes, concentration), size=(3, 400)).astype(np.float32)
        uniforms = rng.random((3, 400), dtype=np.float32)
        ids = draw_ids(probs, uniforms)
        expected = categorical_by_inverse_cdf(torch.from_numpy(probs), torch.from_numpy(uniforms)).numpy()
        cdf = np.cumsum(probs.astype(np.float64), -1)
        margin = np.abs(cdf - uniforms[..., None].astype(np.float64)).min(-1)
        assert (margin > 1e-6).mean() > 0.95
        assert np.array_equal(ids[margin > 1e-6], expected[margin > 1e-6])
    # A total below the uniform (rounding; here all mass missing) takes the last index, as the reference.
    assert (draw_ids(np.zeros((1, 2, codes), np.float32), np.float32([[0.5, 0.9]])) == codes - 1).all()


def test_the_apps_draw_is_the_reference_draw():
    """`categorical_draw` (numpy): what the phone step leaves to the app."""
    def draw_ids(probs, uniforms):
        ids, log_probs = categorical_draw(probs, uniforms)
        assert np.allclose(log_probs, np.log(np.maximum(np.take_along_axis(probs, ids[..., None], -1)[..., 0], 1e-20)))
        return ids

    _the_reference_draw_away_from_ties(draw_ids, 512, seed=4)


@pytest.mark.parametrize("codes", [8192, 256, 1000, 7])
def test_the_graphs_blocked_draw_is_the_reference_draw(codes):
    """`categorical_by_blocks` (the desktop step graph's two-level draw) with blocks of 64, 16, 8
    (1000 = 8 x 125) and 1 (a prime codebook)."""
    draw_ids = lambda probs, uniforms: categorical_by_blocks(torch.from_numpy(probs), torch.from_numpy(uniforms)).numpy()
    _the_reference_draw_away_from_ties(draw_ids, codes, seed=codes)


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5])
def test_phone_step_without_guidance_gives_the_tokens_of_the_onnx_files(tiny_bundle, guidance_scale):
    """At a scale <= 1 the official pipeline uses the positive rows alone; the phone step, which always
    guides, gets the positive rows as the negative ones too, and gives the same tokens."""
    runs = [
        MeissonicRuntime.from_bundle(tiny_bundle, backend=backend).generate("a red circle", steps=5, seed=8, guidance_scale=guidance_scale, width=192, height=128, progress=False)
        for backend in ("onnx", "phone")
    ]  # fmt: skip
    assert np.array_equal(runs[0].tokens, runs[1].tokens)
