"""GraphSpec -> ONNX file, with torch.onnx's dynamo (torch.export) exporter.

Why not optimum: optimum 2.x moved its exporter to `optimum-onnx`, whose only release requires
transformers < 4.58, which cannot be installed beside the transformers 5 this project uses; and four of
our five graphs are custom modules optimum has no configs for. We follow its conventions instead: a
declarative spec per graph (graphs.py) and one validation routine.

Opset 18: the dynamo exporter cannot reach 17 (down-conversion from 18 fails) and 18 is the broadest
opset it emits; onnxruntime's optimizer fuses the decomposed GELU/LayerNorm patterns back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnxscript import optimizer as onnx_optimizer
from onnxscript.rewriter import onnx_fusions
from torch.export import Dim

from meissonic.quantize import graph_files
from meissonic.runtimes.quiet import quiet

from .graphs import GraphSpec, SymbolicDim

OPSET = 18
MAX_GRID_HALF = 128  # token grids up to 256 x 256 (4096 px)


def _dynamic_shapes(spec: GraphSpec, shapes: dict[str, tuple]) -> dict:
    """torch.export dims for the symbolic shape expressions of the spec's inputs.

    Grids are even (the transformer halves them), so height = 2 h; height*width is a product torch.export
    cannot name and is left for it to infer (Dim.AUTO).
    """
    batch = Dim("batch", min=1, max=1024)
    half = {"height": Dim("h", min=1, max=MAX_GRID_HALF), "width": Dim("w", min=1, max=MAX_GRID_HALF)}

    def dim(expr):
        if isinstance(expr, int):
            return None
        d = SymbolicDim.parse(expr)
        if (d.divisor, d.offset) == (1, 0) and d.names == ("height", "width"):
            return Dim.AUTO
        if (d.divisor, d.offset) != (1, 0) or len(d.names) != 1 or d.names[0] not in ("batch", "height", "width"):
            raise ValueError(f"{spec.name}: cannot express dim {expr!r} for torch.export")
        return d.factor * batch if d.names == ("batch",) else 2 * d.factor * half[d.names[0]]

    dynamic = {}
    for tensor in spec.inputs:
        dims = {axis: dim(expr) for axis, expr in enumerate(shapes[tensor.name])}
        dynamic[tensor.name] = {axis: d for axis, d in dims.items() if d is not None} or None
    return dynamic


def trace_inputs(spec: GraphSpec, info, rng: np.random.Generator, grid: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Example inputs for tracing, with sizes chosen so that no two symbolic dims coincide
    (torch.export would otherwise unify them: batch 3 -> 6 rows, grid 10 x 14 -> 5 x 7 halves);
    at `grid` where the graph is exported for that grid alone."""
    return spec.sample(info, {"batch": 3, **(grid or {"height": 10, "width": 14})}, rng)


def export_onnx(spec: GraphSpec, module: torch.nn.Module, example: dict[str, np.ndarray], out_dir: Path, shapes: dict) -> Path:
    """Export `module` (the spec's torch implementation) to `out_dir/model.onnx`; returns the path.

    `shapes` (from `spec.shapes(info, grid)`) gives each input and output its shape with the checkpoint's
    constants filled in; the symbolic names become the ONNX dim names, so the graph documents itself, and
    the sizes given as numbers are fixed in the graph.
    """
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names())
    with quiet() as log:
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(spec, shapes),
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                opset_version=OPSET,
                verbose=False,
                optimize=False,  # optimized once, below, with a larger constant-folding limit
            )
        except Exception as error:
            raise RuntimeError(f"torch.onnx.export failed for {spec.name}: {error}\n{log.getvalue()}") from error
        _optimize(program, module)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > graph_files.EXTERNAL_DATA_BYTES)
    del program
    _name_dims(path, shapes)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _optimize(program, module: torch.nn.Module) -> None:
    """The exporter's own optimization (onnxscript's optimizer, then its ONNX fusions), run here once with
    the constant-folding size limit raised to the largest weight: the exporter's pass skips constants above
    8192 elements, which left the codebook head's weight view ([K, D, 1, 1] -> [D, K], for the head run as
    a MatMul) unfolded, and onnxruntime's quantizers only quantize a MatMul whose weight is an initializer.
    One pass instead of the exporter's plus a second: the same graph (op for op), and the shapes step's
    export took 40.0 s instead of 44.7 (the decoder's, with no large constant to fold, 33 s either way)."""
    largest = max((p.numel() for p in module.parameters()), default=0)
    onnx_optimizer.optimize(program.model, input_size_limit=largest, output_size_limit=largest)
    onnx_fusions.fuse(program.model)


def _name_dims(path: Path, shapes: dict) -> None:
    """Replace the exporter's symbol names (s12, 4*s3*s7) with the spec's (batch, height*width)."""
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shape = shapes[value.name]
        if len(dims) != len(shape):
            raise AssertionError(f"{path}: {value.name} has rank {len(dims)}, the spec says {len(shape)}")
        for d, expr in zip(dims, shape):
            if isinstance(expr, str):
                d.dim_param = expr
            elif d.dim_value != expr:
                raise AssertionError(f"{path}: {value.name} has dim {d.dim_value or d.dim_param}, the spec says {expr}")
    onnx.save(model, str(path))
