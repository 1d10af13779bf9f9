"""ORT-format models for apps: each ONNX graph variant converted with onnxruntime's own mobile tool, and
the operator list a reduced onnxruntime build needs for all of them.

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

from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
from onnxruntime.tools.mobile_helpers.usability_checker import check_coreml_partitions, check_nnapi_partitions
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model
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
