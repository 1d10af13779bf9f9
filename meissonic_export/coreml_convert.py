"""GraphSpec -> Core ML ML program (.mlpackage), through coremltools' torch.export frontend.

Path: `torch.export.export(module, args).run_decompositions({})` -> `ct.convert(convert_to="mlprogram")`
(coremltools refuses the TRAINING dialect without `run_decompositions`; its `torch.jit.trace` path
fails under numpy 2.4). Shapes are static: one package per resolution, traced at the example inputs'
shapes. Inputs and outputs keep the spec's names; token ids are int32 (Core ML has no int64 I/O);
floats are float32 at the interface whatever the compute precision.

Beside this module: `coreml_fixes.py` (what coremltools 9.0 converts wrongly on this path; the
miscompiling pass is removed by `pass_pipeline` here), `coreml_fp16.py` (which ops stay float32 under
float16 compute) and `coreml_chunks.py` (denoise_step split into packages).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meissonic.runtimes.quiet import quiet

from .coreml_fixes import converter_fixes
from .coreml_fp16 import FP32_REGIONS, Fp32Regions
from .graphs import DenoiseStepGraph, GraphSpec

with quiet():  # coremltools logs on import that torch 2.13 is untested and, off macOS, that its native Core ML library is absent
    import coremltools as ct

PRECISIONS = ("fp16", "fp32")
TARGETS = {"iOS17": ct.target.iOS17, "iOS18": ct.target.iOS18, "macOS14": ct.target.macOS14, "macOS15": ct.target.macOS15}
COREML_DTYPES = {"float32": np.float32, "int64": np.int32}  # spec dtype -> Core ML interface dtype


class ConversionError(Exception):
    """torch.export or coremltools failed; the message carries what they printed."""


# ---- conversion ----------------------------------------------------------------------------------


def convert_graph(
    spec: GraphSpec,
    module: nn.Module,
    example_inputs: dict[str, np.ndarray],
    precision: str,
    minimum_target: str = "iOS17",
    fp32_regions: Iterable[str] = FP32_REGIONS,
) -> ct.models.MLModel:
    """Convert `module` (the spec's torch implementation) at the example inputs' static shapes.

    precision: "fp16" (float16 compute except `fp32_regions`, see module doc) or "fp32".
    minimum_target: "iOS17" (scaled_dot_product_attention is split into matmul/softmax) or "iOS18"
    (kept as one op; needed for int4 block quantization), or the macOS equivalents.
    Returns the in-memory model; `save_mlpackage` writes it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if minimum_target not in TARGETS:
        raise ValueError(f"minimum_target {minimum_target!r}: expected one of {sorted(TARGETS)}")
    missing = [name for name in spec.input_names() if name not in example_inputs]
    if missing:
        raise ValueError(f"{spec.name}: example inputs lack {missing}")
    if isinstance(module, DenoiseStepGraph):
        module = module.with_head_as_conv()  # see graphs.guided_probabilities
    args = tuple(torch.from_numpy(np.ascontiguousarray(example_inputs[name])) for name in spec.input_names())
    # Fresh TensorTypes on every call: ct.convert mutates the ones it is given.
    inputs = [ct.TensorType(name=t.name, shape=example_inputs[t.name].shape, dtype=COREML_DTYPES[t.dtype]) for t in spec.inputs]
    outputs = [ct.TensorType(name=t.name, dtype=COREML_DTYPES[t.dtype]) for t in spec.outputs]
    if precision == "fp16":
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=Fp32Regions(fp32_regions))
    else:
        compute_precision = ct.precision.FLOAT32
    with quiet() as log, converter_fixes():
        try:
            program = torch.export.export(module.eval(), args).run_decompositions({})
            model = ct.convert(
                program,
                inputs=inputs,
                outputs=outputs,
                convert_to="mlprogram",
                minimum_deployment_target=TARGETS[minimum_target],
                compute_precision=compute_precision,
                pass_pipeline=pass_pipeline(),
            )
        except Exception as error:
            raise ConversionError(f"Core ML conversion of {spec.name} failed: {error}\n{log.getvalue()[-4000:]}") from error
    model.short_description = spec.description
    regions = ",".join(fp32_regions) if precision == "fp16" else "all"
    model.user_defined_metadata.update({"graph": spec.name, "precision": precision, "float32_regions": regions})
    _check_interface(spec, model)
    return model


def save_mlpackage(model: ct.models.MLModel, path: str | Path) -> Path:
    """Write `model` to `path` (a `.mlpackage` directory; the suffix is added if missing); returns it."""
    path = Path(path)
    if path.suffix != ".mlpackage":
        path = path.with_name(path.name + ".mlpackage")
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():  # coremltools reports its passes on stderr
        model.save(str(path))
    return path


def save_multifunction_package(functions: dict[str, Path], path: Path) -> Path:
    """One `.mlpackage` holding the `main` function of each package in `functions` (name -> package),
    under its name; weights the functions share are stored once. The first function is the default."""
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, package in functions.items():
        descriptor.add_function(str(package), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = next(iter(functions))
    with quiet():
        ct.utils.save_multifunction(descriptor, str(path))
    return path


def pass_pipeline() -> ct.PassPipeline:
    """coremltools' default pipeline without the miscompiling matmul + bias fusion (see module doc)."""
    pipeline = ct.PassPipeline.DEFAULT  # a fresh object per access
    pipeline.remove_passes(["common::fuse_matmul_weight_bias"])
    return pipeline


def _check_interface(spec: GraphSpec, model: ct.models.MLModel) -> None:
    description = model.get_spec().description
    array = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    expected = {"float32": array.FLOAT32, "int64": array.INT32}
    for features, tensors in ((description.input, spec.inputs), (description.output, spec.outputs)):
        got = [(f.name, f.type.multiArrayType.dataType) for f in features]
        want = [(t.name, expected[t.dtype]) for t in tensors]
        if got != want:
            raise ConversionError(f"{spec.name}: Core ML interface {got} differs from the spec's {want}")
