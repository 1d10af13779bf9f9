"""ORT-format models for apps: each ONNX graph variant converted with onnxruntime's own mobile tool, the
fixed-shape phone graphs that NNAPI and the Core ML execution provider can take, and the operator list
a reduced onnxruntime build needs for all of them.

ORT format is what onnxruntime's mobile packages and minimal builds load (flatbuffers, no protobuf), and
what `--include_ops_by_config` reduces a custom build with. Conversion is `convert_onnx_models_to_ort`
with its "Fixed" optimization style for ARM: the graph is optimized once at conversion (all levels but
the x86-only NCHWc layout), so the phone runs it without re-optimizing. The ONNX files stay beside
their ORT twins: the mobile usability checker and onnxruntime's full builds read `.onnx`.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.helper import make_node
from onnxruntime import GraphOptimizationLevel
from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
from onnxruntime.tools.mobile_helpers.usability_checker import check_coreml_partitions, check_nnapi_partitions
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, make_dim_param_fixed, optimize_model
from onnxruntime.tools.ort_format_model.utils import create_config_from_models

from meissonic.runtimes.onnx_backend import PHONE_POOLING_INPUT, PHONE_STEP_OUTPUT
from meissonic.runtimes.quiet import quiet

from .graphs import SymbolicDim

ORT_FORMAT_LIMIT = 2**31 - 1  # flatbuffers: one ORT-format file holds at most 2 GB, weights included
OPERATORS_CONFIG = "required_operators_and_types.config"


def convert_to_ort(onnx_path: Path) -> Path:
    """Write `<graph>.ort` beside `onnx_path` and return it."""
    with quiet() as log:
        try:
            convert_onnx_models_to_ort(onnx_path, optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
        except Exception as error:  # noqa: BLE001 (onnxruntime raises its own types); the caller names the graph
            raise RuntimeError(f"{onnx_path.name}: ORT conversion failed ({error}); {log.getvalue()[-500:]}") from None
    for side_file in onnx_path.parent.glob("*required_operators*.config"):  # the tool's per-graph list; the bundle has one
        side_file.unlink()
    return onnx_path.with_suffix(".ort")


PHONE_GRAPHS = ("text_encoder", "denoise_step", "vq_decoder", "vq_encoder")  # what an app runs; the raw transformer stays desktop-only
PHONE_APP_SIDE = {"denoise_step": "draw", "text_encoder": "pooling"}  # see phone_graph


def phone_graph(onnx_path: Path, out_dir: Path, dims: dict[str, int], app_side: str | None = None) -> Path:
    """A copy of an ONNX graph for phone accelerators, `out_dir/model.onnx`: every symbolic dimension
    fixed from `dims` (batch 1 and one resolution: NNAPI and the Core ML EP take static shapes only),
    shape arithmetic folded away by onnxruntime's basic optimizer, and the operators that split the
    graph between accelerator and CPU rewritten into ones the accelerators take (`rewrite_for_accelerators`).
    `app_side`: what the app does instead of the graph, for the graphs whose last operators no accelerator
    takes: "draw" (the denoising step's categorical draw) or "pooling" (the text encoder's EOS position)."""
    model = onnx.load(str(onnx_path))
    del model.graph.value_info[:]  # the exporter's symbolic intermediate shapes; inferred again from the fixed inputs
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                make_dim_param_fixed(model.graph, dim.dim_param, SymbolicDim.parse(dim.dim_param).value(dims))
    out_dir.mkdir(parents=True, exist_ok=True)
    fixed, path = out_dir / "fixed.onnx", out_dir / "model.onnx"
    onnx.save(model, str(fixed))
    with quiet():
        optimize_model(fixed, path, level=GraphOptimizationLevel.ORT_ENABLE_BASIC)
    fixed.unlink()
    model = onnx.load(str(path))
    if any(node.name.startswith(CPU_CAST_PREFIX) for node in model.graph.node):
        # float16: the optimizer computed it for this CPU, inserting float32 casts around the float16 operators
        # its CPU provider has no kernel for (275 in the step); a rewrite that adds a consumer of a cast's
        # input makes onnxruntime insert a second cast of the same name. Only the two rewrites that replace
        # a node by one node apply; apps use the float32 graphs with the providers' own float16 modes.
        rewrite_for_accelerators(model, ("Reciprocal", "Resize"))
    else:
        rewrite_for_accelerators(model)
        if app_side == "draw":
            _leave_the_draw_to_the_app(model)
        elif app_side == "pooling":
            _pool_in_app(model)
    onnx.save(model, str(path))
    return path



CPU_CAST_PREFIX = "InsertedPrecisionFreeCast_"


def _leave_the_draw_to_the_app(model: onnx.ModelProto) -> None:
    """The phone step ends at the guided probabilities [1, H*W, codebook]; the app draws from them
    (`runtimes.sampler.categorical_draw`, the rule the desktop graph computes). The draw is a scan over the
    codebook (two CumSum levels, LessOrEqual, ReduceSum, GatherElements, Log) that neither accelerator
    takes; in the graph it split NNAPI's share into 14 partitions, and it is ~0.1% of the step's arithmetic.
    The probabilities are the step's last Softmax (the codebook's; attention's come before the head).
    Guidance is applied unconditionally: the graph's `guidance_scale > 1` switch (Greater, Where) goes,
    and for a scale <= 1 the app feeds the positive conditioning as the negative rows too, which makes
    u + g (c - u) exactly c, the official pipeline's unguided logits."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    switches = [
        node for node in graph.node
        if node.op_type == "Where" and producers.get(node.input[0]) is not None
        and producers[node.input[0]].op_type == "Greater" and "guidance_scale" in producers[node.input[0]].input
    ]  # fmt: skip
    if not softmaxes or len(switches) != 1:
        raise ValueError(f"expected a codebook Softmax and one guidance switch, found {len(softmaxes)} and {len(switches)}")
    probs = softmaxes[-1].output[0]
    renamed = {switches[0].output[0]: switches[0].input[1], probs: PHONE_STEP_OUTPUT}  # the switch is bypassed
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [PHONE_STEP_OUTPUT if name == probs else name for name in node.output]
    del graph.output[:], graph.value_info[:]
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    graph.output.append(inferred[PHONE_STEP_OUTPUT])
    _prune(model)


def _pool_in_app(model: onnx.ModelProto) -> None:
    """The phone text encoder takes the pooling position as an input, `eos_onehot` [1, 77] (1.0 at the
    first end-of-text token, as transformers' CLIP pools; the app knows it from its tokenizer), and pools
    with MatMul(eos_onehot, hidden states): the same values (one product by 1, the rest by 0). As exported,
    the position is found with Equal, ArgMax and GatherND, none of which NNAPI takes, at the graph's end."""
    graph = model.graph
    gathers = [node for node in graph.node if node.op_type == "GatherND"]
    if len(gathers) != 1:
        raise ValueError(f"expected one GatherND pooling the text encoder, found {len(gathers)}")
    gather, ctx = gathers[0], _Rewriter(model)
    batch, positions, width = ctx.shapes[gather.input[0]]
    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ctx.dtypes[gather.input[0]]))  # float16 in float16 graphs
    graph.input.append(onnx.helper.make_tensor_value_info(PHONE_POOLING_INPUT, dtype, [batch, positions]))
    pooled = [
        make_node("MatMul", [PHONE_POOLING_INPUT, gather.input[0]], ["phone_pooled"]),  # [1,77] x [1,77,D] -> [1,1,D]
        make_node("Reshape", ["phone_pooled", ctx.constant("phone_pooled_shape", [batch, width])], list(gather.output), name=gather.name),
    ]
    nodes = [replacement for node in graph.node for replacement in (pooled if node is gather else [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in ctx.added.items())
    _prune(model)


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes, inputs and initializers the graph's outputs no longer need."""
    graph = model.graph
    needed, kept = {value.name for value in graph.output}, []
    for node in reversed(graph.node):  # nodes are in topological order: walk back from the outputs
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inputs = [value for value in graph.input if value.name in needed]
    initializers = [value for value in graph.initializer if value.name in needed]
    del graph.input[:], graph.initializer[:]
    graph.input.extend(inputs)
    graph.initializer.extend(initializers)


class _Rewriter:
    """What one graph's rewrites share: inferred static shapes, constant values, and the constants added."""

    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model).graph
        values = (*inferred.value_info, *model.graph.input, *model.graph.output)
        self.shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
        self.dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in values if v.type.tensor_type.elem_type}
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.added: dict[str, np.ndarray] = {}

    def constant(self, name: str, value, dtype=None) -> str:
        if name not in self.constants:
            self.added[name] = self.constants[name] = np.asarray(value, dtype=dtype or (np.float32 if isinstance(value, float) else np.int64))
        return name

    def scalar(self, value: float, like: str) -> str:
        """A float constant of the element type of tensor `like` (float16 graphs take float16 operands)."""
        dtype = np.dtype(self.dtypes.get(like, np.float32))
        return self.constant(f"phone_{value:g}_{dtype.name}", value, dtype)


def _reciprocal(node, ctx: _Rewriter, tag: str):
    """Div(1, x): the same IEEE result. NNAPI has no Reciprocal, and every group norm of the VQ-VAE has one
    (1/sqrt(var + eps)); in the 256-px decoder they cut NNAPI's share into 30 partitions."""
    return [make_node("Div", [ctx.scalar(1.0, node.input[0]), node.input[0]], list(node.output), name=node.name)]


def _nearest_2x(node, ctx: _Rewriter, tag: str):
    """Nearest 2x (asymmetric, floor: each pixel duplicated) -> Unsqueeze, Concat, Reshape, the same values:
    the VQ decoder upsamples once per level, and neither provider takes Resize as exported."""
    if not _is_nearest_2x(node, ctx.constants) or len(ctx.shapes.get(node.input[0], [])) != 4:
        return None
    n, c, h, w = ctx.shapes[node.input[0]]
    return [
        make_node("Unsqueeze", [node.input[0], ctx.constant("phone_axis4", [4])], [f"{tag}_u1"]),
        make_node("Concat", [f"{tag}_u1", f"{tag}_u1"], [f"{tag}_c1"], axis=4),  # [n,c,h,w,2]
        make_node("Reshape", [f"{tag}_c1", ctx.constant(f"{tag}_s1", [n, c, h, 2 * w])], [f"{tag}_r1"]),
        make_node("Unsqueeze", [f"{tag}_r1", ctx.constant("phone_axis3", [3])], [f"{tag}_u2"]),
        make_node("Concat", [f"{tag}_u2", f"{tag}_u2"], [f"{tag}_c2"], axis=3),  # [n,c,h,2,2w]
        make_node("Reshape", [f"{tag}_c2", ctx.constant(f"{tag}_s2", [n, c, 2 * h, 2 * w])], list(node.output), name=node.name),
    ]


def _negate(node, ctx: _Rewriter, tag: str):
    """Mul(x, -1), the same IEEE result (signed zeros included): the Core ML EP has no Neg, and the rotary
    embedding negates half of every query and key."""
    return [make_node("Mul", [node.input[0], ctx.scalar(-1.0, node.input[0])], list(node.output), name=node.name)]


def _select(node, ctx: _Rewriter, tag: str):
    """Gather of one constant index (`x[..., k]`) -> Slice and Squeeze, the same values: the Core ML EP
    takes no Gather, and the rotary embedding selects the two halves of each pair this way (24 in the step)."""
    index = ctx.constants.get(node.input[1])
    if index is None or index.ndim != 0 or int(index) < 0:
        return None
    k, axis = int(index), _attributes(node).get("axis", 0)
    at = lambda i: ctx.constant(f"phone_index{i}", [i])
    return [
        make_node("Slice", [node.input[0], at(k), at(k + 1), at(axis)], [f"{tag}_slice"]),
        make_node("Squeeze", [f"{tag}_slice", at(axis)], list(node.output), name=node.name),
    ]


def _cosine(node, ctx: _Rewriter, tag: str):
    """cos x = 1 - 2 sin^2(x/2): NNAPI has Sin but no Cos (the timestep and micro-condition embeddings).
    x/2 is exact and the identity has no cancellation near cos x = 0, so the result is within ~2e-7 of
    cos x absolute, where sin(x + pi/2) would carry the rounding of x + pi/2 (3e-5 at x = 256)."""
    return [
        make_node("Mul", [node.input[0], ctx.scalar(0.5, node.input[0])], [f"{tag}_half"]),
        make_node("Sin", [f"{tag}_half"], [f"{tag}_sin"]),
        make_node("Mul", [f"{tag}_sin", f"{tag}_sin"], [f"{tag}_square"]),
        make_node("Mul", [f"{tag}_square", ctx.scalar(2.0, node.input[0])], [f"{tag}_twice"]),
        make_node("Sub", [ctx.scalar(1.0, node.input[0]), f"{tag}_twice"], list(node.output), name=node.name),
    ]


def _layer_norm(node, ctx: _Rewriter, tag: str):
    """LayerNormalization over the last axis -> ReduceMean, Sub, Mul, Sqrt, Div (and the affine Mul, Add):
    NNAPI has no LayerNormalization (12 in the step). Float32 rounding differs from onnxruntime's fused
    kernel in the last bits; the phone graph's validation holds it to the same budget."""
    attributes = _attributes(node)
    if attributes.get("axis", -1) != -1 or len(node.output) > 1 and any(node.output[1:]):
        return None
    last = ctx.constant("phone_index-1", [-1])
    x, scale, bias = (list(node.input) + ["", ""])[:3]
    normed = f"{tag}_normed" if scale or bias else node.output[0]
    nodes = [
        make_node("ReduceMean", [x, last], [f"{tag}_mean"], keepdims=1),
        make_node("Sub", [x, f"{tag}_mean"], [f"{tag}_centred"]),
        make_node("Mul", [f"{tag}_centred", f"{tag}_centred"], [f"{tag}_squares"]),
        make_node("ReduceMean", [f"{tag}_squares", last], [f"{tag}_variance"], keepdims=1),
        make_node("Add", [f"{tag}_variance", ctx.scalar(float(attributes.get("epsilon", 1e-5)), x)], [f"{tag}_shifted"]),
        make_node("Sqrt", [f"{tag}_shifted"], [f"{tag}_std"]),
        make_node("Div", [f"{tag}_centred", f"{tag}_std"], [normed]),
    ]
    if scale:
        nodes.append(make_node("Mul", [normed, scale], [f"{tag}_scaled" if bias else node.output[0]]))
    if bias:
        nodes.append(make_node("Add", [f"{tag}_scaled" if scale else normed, bias], [node.output[0]]))
    return nodes


def _transposed_conv_2x(node, ctx: _Rewriter, tag: str):
    """ConvTranspose with a 2x2 kernel and stride 2 (the transformer's upsampling, as released): the
    output pixels do not overlap, so it is a 1x1 Conv to 4x the channels and DepthToSpace (DCR: channel
    (a*2 + b)*C_out + o goes to pixel offset (a, b)). NNAPI's provider has no ConvTranspose."""
    attributes = _attributes(node)
    weight = ctx.constants.get(node.input[1])
    plain = attributes.get("group", 1) == 1 and not any(attributes.get("pads", [])) and not any(attributes.get("output_padding", []))
    if weight is None or attributes.get("kernel_shape") != [2, 2] or attributes.get("strides") != [2, 2] or not plain:
        return None
    channels_out = weight.shape[1]
    inputs = [node.input[0], ctx.constant(f"{tag}_weight", weight.transpose(2, 3, 1, 0).reshape(4 * channels_out, -1, 1, 1), weight.dtype)]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(ctx.constant(f"{tag}_bias", np.tile(ctx.constants[node.input[2]], 4), weight.dtype))
    return [
        make_node("Conv", inputs, [f"{tag}_pixels"], kernel_shape=[1, 1]),
        make_node("DepthToSpace", [f"{tag}_pixels"], list(node.output), blocksize=2, mode="DCR", name=node.name),
    ]


_ERF_P, _ERF_A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(node, ctx: _Rewriter, tag: str):
    """erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7; 5.3e-7 evaluated in float32 over [-6, 6]): NNAPI has
    no Erf, and every exact GELU of the text encoder has one (one partition boundary per layer).
    erf(|x|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2), t = 1 / (1 + p |x|); the sign is
    x / max(|x|, 1e-30), exactly +-1 (and 0 at 0), because NNAPI has no Sign either. The Core ML EP takes
    Erf but none of this is lost on it: it takes every operator used here."""
    x, scalar = node.input[0], lambda value: ctx.scalar(value, node.input[0])
    nodes = [
        make_node("Mul", [x, scalar(-1.0)], [f"{tag}_neg"]),
        make_node("Max", [x, f"{tag}_neg"], [f"{tag}_abs"]),  # |x|: the Core ML EP has no Abs
        make_node("Mul", [f"{tag}_abs", scalar(_ERF_P)], [f"{tag}_px"]),
        make_node("Add", [f"{tag}_px", scalar(1.0)], [f"{tag}_1px"]),
        make_node("Div", [scalar(1.0), f"{tag}_1px"], [f"{tag}_t"]),
    ]
    poly = scalar(_ERF_A[-1])
    for i, coefficient in enumerate(reversed(_ERF_A[:-1])):  # Horner: a1 + t (a2 + t (a3 + ...))
        nodes += [make_node("Mul", [poly, f"{tag}_t"], [f"{tag}_h{i}"]), make_node("Add", [f"{tag}_h{i}", scalar(coefficient)], [f"{tag}_p{i}"])]
        poly = f"{tag}_p{i}"
    return nodes + [
        make_node("Mul", [poly, f"{tag}_t"], [f"{tag}_tail"]),
        make_node("Mul", [x, x], [f"{tag}_square"]),
        make_node("Mul", [f"{tag}_square", scalar(-1.0)], [f"{tag}_negsquare"]),
        make_node("Exp", [f"{tag}_negsquare"], [f"{tag}_exp"]),
        make_node("Mul", [f"{tag}_tail", f"{tag}_exp"], [f"{tag}_complement"]),
        make_node("Sub", [scalar(1.0), f"{tag}_complement"], [f"{tag}_erfabs"]),
        make_node("Max", [f"{tag}_abs", scalar(1e-30)], [f"{tag}_safe"]),
        make_node("Div", [x, f"{tag}_safe"], [f"{tag}_sign"]),
        make_node("Mul", [f"{tag}_erfabs", f"{tag}_sign"], list(node.output), name=node.name),
    ]


# Operators that split a phone graph between the accelerator and the CPU (found with the mobile usability
# checker), each rewritten into ones NNAPI and the Core ML EP (ML Program) both take.
_REWRITES = {
    "Reciprocal": _reciprocal, "Resize": _nearest_2x, "Neg": _negate, "Gather": _select, "Cos": _cosine,
    "LayerNormalization": _layer_norm, "ConvTranspose": _transposed_conv_2x, "Erf": _erf,
}  # fmt: skip


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def rewrite_for_accelerators(model: onnx.ModelProto, operators=tuple(_REWRITES)) -> None:
    ctx, nodes = _Rewriter(model), []
    for index, node in enumerate(model.graph.node):
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") and node.op_type in operators else None
        nodes += (rewrite and rewrite(node, ctx, f"phone_{index}")) or [node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in ctx.added.items())


def _is_nearest_2x(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    if node.op_type != "Resize" or len(node.input) < 3 or node.input[2] not in constants:
        return False
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    nearest = attributes.get("mode") == b"nearest" and attributes.get("coordinate_transformation_mode") == b"asymmetric" and attributes.get("nearest_mode") == b"floor"
    return nearest and constants[node.input[2]].tolist() == [1.0, 1.0, 2.0, 2.0]


def too_large_for_ort(onnx_files: list[Path]) -> str | None:
    """The reason a graph cannot be one ORT-format file, or None."""
    size = sum(f.stat().st_size for f in onnx_files)
    if size > ORT_FORMAT_LIMIT:
        return f"{size / 1e9:.2f} GB of weights: over the ORT format's 2 GB file limit (flatbuffers); use the .onnx with its external data"
    return None


def write_operators_config(ort_files: list[Path], bundle: Path) -> Path:
    """The operators (with their types) that the bundle's ORT models use, for a reduced build
    (`build.sh --minimal_build --include_ops_by_config`). The tool's header lists absolute paths; they
    name the staging folder, so they are rewritten relative to the bundle."""
    path = bundle / OPERATORS_CONFIG
    with quiet():
        create_config_from_models(sorted(ort_files), path, enable_type_reduction=True)
    prefix = re.escape(str(bundle.resolve()) + "/")
    path.write_text(re.sub(rf"^# - (?:{prefix}|{re.escape(str(bundle) + '/')})", "# - ", path.read_text(), flags=re.MULTILINE))
    return path


def read_operators_config(path: Path) -> dict[str, set[str]]:
    """`domain;opset;Op{types},Op2,...` lines -> {domain: {Op, ...}}; the type lists are dropped (their
    JSON holds commas too, so the split skips over braces)."""
    operators: dict[str, set[str]] = {}
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _, listed = line.split(";", 2)
            operators.setdefault(domain, set()).update(re.findall(r"(?:^|,)(\w+)(?=\{|,|$)", re.sub(r"\{(?:[^{}]|\{[^{}]*\})*\}", "", listed)))
    return operators


def mobile_usability(onnx_path: Path) -> dict:
    """What onnxruntime's mobile usability checker (`python -m onnxruntime.tools.check_onnx_model_mobile_usability`)
    finds for the NNAPI and the Core ML (ML Program) execution providers, as figures: nodes each could
    take and in how many partitions, for the graph as exported and if its shapes were fixed. The same
    steps as the checker: optimize at the basic level, infer shapes, partition by the EP's op list."""
    figures = {}
    with tempfile.TemporaryDirectory() as folder, quiet():
        optimized = Path(folder) / onnx_path.name
        optimize_model(onnx_path, optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        for provider, check in MOBILE_PROVIDERS.items():
            figures[provider] = {}
            for label, require_fixed_shapes in (("as_exported", True), ("if_shapes_were_fixed", False)):
                info = check(model, require_fixed_shapes)
                figures[provider][label] = {
                    "nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions,
                    "supported_percent": round(100 * info.num_supported_nodes / max(1, info.num_nodes), 1),
                    "unsupported_ops": sorted(info.unsupported_ops),
                }  # fmt: skip
    return figures


MOBILE_PROVIDERS = {
    "nnapi": check_nnapi_partitions,
    "coreml_mlprogram": lambda model, fixed: check_coreml_partitions(model, fixed, "coreml_supported_mlprogram_ops.md"),
}
