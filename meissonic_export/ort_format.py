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

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime import GraphOptimizationLevel
from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
from onnxruntime.tools.mobile_helpers.usability_checker import check_coreml_partitions, check_nnapi_partitions
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, make_dim_param_fixed, optimize_model
from onnxruntime.tools.ort_format_model.utils import create_config_from_models

from runtimes.quiet import quiet

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


def phone_graph(onnx_path: Path, out_dir: Path, dims: dict[str, int]) -> Path:
    """A copy of an ONNX graph for phone accelerators, `out_dir/model.onnx`: every symbolic dimension
    fixed from `dims` (batch 1 and one resolution: NNAPI and the Core ML EP take static shapes only),
    shape arithmetic folded away by onnxruntime's basic optimizer, and the operators that split the
    graph between accelerator and CPU rewritten into ones the accelerators take (`_rewrite_for_accelerators`)."""
    model = onnx.load(str(onnx_path))
    del model.graph.value_info[:]  # the exporter's symbolic intermediate shapes; inferred again from the fixed inputs
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                make_dim_param_fixed(model.graph, dim.dim_param, _dimension(dim.dim_param, dims))
    out_dir.mkdir(parents=True, exist_ok=True)
    fixed, path = out_dir / "fixed.onnx", out_dir / "model.onnx"
    onnx.save(model, str(fixed))
    with quiet():
        optimize_model(fixed, path, level=GraphOptimizationLevel.ORT_ENABLE_BASIC)
    fixed.unlink()
    model = onnx.load(str(path))
    _rewrite_for_accelerators(model)
    onnx.save(model, str(path))
    return path


def _dimension(name: str, dims: dict[str, int]) -> int:
    """A dimension name as the exporter writes them ("batch", "2*batch", "height*width", "16*height")."""
    return math.prod(int(factor) if factor.isdigit() else dims[factor] for factor in name.split("*"))


def _rewrite_for_accelerators(model: onnx.ModelProto) -> None:
    """Operators that split a phone graph between the accelerator and the CPU, rewritten into ones both
    NNAPI and the Core ML EP take, with the same results:
    - Reciprocal(x) -> Div(1, x), the same IEEE result: NNAPI has no Reciprocal, and every group norm of
      the VQ-VAE has one (1/sqrt(var + eps)); in the 256-px decoder they cut NNAPI's share into 30 partitions.
    - Resize, nearest, 2x (asymmetric, floor: each pixel duplicated) -> Unsqueeze, Concat and Reshape: the
      VQ decoder upsamples once per level, and neither provider takes Resize as exported."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)})
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    added: dict[str, np.ndarray] = {}

    def constant(name: str, value) -> str:
        added[name] = np.asarray(value, dtype=np.float32 if isinstance(value, float) else np.int64)
        return name

    nodes = []
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Reciprocal" and node.domain in ("", "ai.onnx"):
            nodes.append(onnx.helper.make_node("Div", [constant("phone_one", 1.0), node.input[0]], list(node.output), name=node.name))
        elif _is_nearest_2x(node, constants) and len(shapes.get(node.input[0], [])) == 4:
            n, c, h, w = shapes[node.input[0]]
            x, y, tag = node.input[0], node.output[0], f"{node.name or index}_2x"
            nodes += [
                onnx.helper.make_node("Unsqueeze", [x, constant("phone_axis4", [4])], [f"{tag}_u1"]),
                onnx.helper.make_node("Concat", [f"{tag}_u1", f"{tag}_u1"], [f"{tag}_c1"], axis=4),  # [n,c,h,w,2]
                onnx.helper.make_node("Reshape", [f"{tag}_c1", constant(f"{tag}_s1", [n, c, h, 2 * w])], [f"{tag}_r1"]),
                onnx.helper.make_node("Unsqueeze", [f"{tag}_r1", constant("phone_axis3", [3])], [f"{tag}_u2"]),
                onnx.helper.make_node("Concat", [f"{tag}_u2", f"{tag}_u2"], [f"{tag}_c2"], axis=3),  # [n,c,h,2,2w]
                onnx.helper.make_node("Reshape", [f"{tag}_c2", constant(f"{tag}_s2", [n, c, 2 * h, 2 * w])], [y], name=node.name),
            ]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in added.items())


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
