"""GraphSpec -> Core ML ML program (.mlpackage), through coremltools' torch.export frontend.

Path: `torch.export.export(module, args).run_decompositions({})` -> `ct.convert(convert_to="mlprogram")`
(coremltools refuses the TRAINING dialect without `run_decompositions`; its `torch.jit.trace` path
fails under numpy 2.4). Shapes are static: one package per resolution, traced at the example inputs'
shapes. Inputs and outputs keep the spec's names; token ids are int32 (Core ML has no int64 I/O);
floats are float32 at the interface whatever the compute precision.

coremltools 9.0 gets four things wrong on this path, silently or not; `_converter_fixes` corrects them
for the duration of one conversion (the process-wide converter registry is restored afterwards):
  * `gelu`: the converter reads `approximate` only as a positional argument, but torch.export passes it
    as a keyword, so `F.gelu(x, approximate="tanh")` silently became exact GELU. "tanh" now maps to
    MIL's TANH_APPROXIMATION (checked numerically in the tests).
  * `sum` of a bool tensor (the categorical draw counts CDF entries <= u) was cast to float32, so the
    drawn ids were floats (float16 under FLOAT16: ids above 2048 would round) and `gather` refused
    them. Counts are int32, as torch's are integers.
  * `clamp` of an integer tensor by constants promoted it to float32 for the same reason.
  * `alias` (transformers' CLIP slices a buffer) and `where.ScalarOther` (its causal mask) had no
    converter: the identity, and `where`'s own converter.
and one optimization pass miscompiles (`pass_pipeline`): `common::fuse_matmul_weight_bias` rewrites
`c - x @ W` as `x @ W - c` (it negates the bias but ignores which side of the `sub` the matmul is on).
The VQ encoder's distance `|e|^2 - 2 z.e` on [B,H,W,C] latents is that pattern (at rank <= 3 the
frontend emits `linear`, whose fusion is right): argmin picked the farthest code, 0% of ids right even
in float32. nn.Linear exports as `aten.linear`, which that pass never sees, so nothing is lost.

Float16 compute (precision "fp16") keeps three kinds of op in float32 (`FP32_REGIONS`, chosen from the
program's dataflow by `fp32_op_names`):
  * "angles": sin/cos and every non-constant op feeding them (the sinusoidal embeddings). micro_conds
    (1024 px) and timestep * 1000 make angles up to ~5e4 rad; float16 holds 7000 to within 4 and its
    frequency table to 5e-4 relative, so the embedding would be noise (measured with float16 storage:
    cos/sin off by up to 1.3; kept float32: 4.5e-4). The rotary tables depend only on the static grid:
    they fold into float32 constants before the float16 pass runs.
  * "sampling": everything after the network's last weight-bearing op plus the inputs only it reads:
    in denoise_step the guidance, softmax over the codebook, CDF, draw, log-probability and the
    uniforms (float16 would round a uniform by up to 2.4e-4, and a float16 CDF over 8192 codes has
    steps of 5e-4 near 1, coarser than most probabilities); in vq_encoder the argmin side.
  * "norm_statistics": every reduce_mean/reduce_sum, the square feeding it and the per-row ops after it
    up to the rsqrt (RMSNorm, the VQ group norms). A float16 square overflows for |x| > 256 and the
    norm collapses (the VQ group norm at |x| ~ 500: error 4.2 of 4.2 without, 5e-3 with); the reference
    computes RMSNorm in float32. layer_norm ops stay float16: one op
    whose statistics Core ML computes internally.
Each float32 region costs casts at its borders and, on the Neural Engine (float16 only), a hop to
GPU/CPU; "norm_statistics" is the expensive one (a few ops per norm). Pass `fp32_regions=` to trade.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference.transformer import TEXT_POSITIONS, MeissonicTransformer
from runtimes.coreml_backend import run_chunks
from runtimes.coreml_eval import input_vars, is_constant
from runtimes.quiet import quiet

from .graphs import DenoiseStepGraph, GraphSpec, TensorSpec, draw, guided_probabilities

with quiet():  # coremltools logs on import that torch 2.13 is untested and, off macOS, that its native Core ML library is absent
    import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch import ops as torch_ops
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from coremltools.converters.mil.mil import types

PRECISIONS = ("fp16", "fp32")
TARGETS = {"iOS17": ct.target.iOS17, "iOS18": ct.target.iOS18, "macOS14": ct.target.macOS14, "macOS15": ct.target.macOS15}
FP32_REGIONS = ("angles", "sampling", "norm_statistics")
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
    args = tuple(torch.from_numpy(np.ascontiguousarray(example_inputs[name])) for name in spec.input_names())
    # Fresh TensorTypes on every call: ct.convert mutates the ones it is given.
    inputs = [ct.TensorType(name=t.name, shape=example_inputs[t.name].shape, dtype=COREML_DTYPES[t.dtype]) for t in spec.inputs]
    outputs = [ct.TensorType(name=t.name, dtype=COREML_DTYPES[t.dtype]) for t in spec.outputs]
    if precision == "fp16":
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=Fp32Regions(fp32_regions))
    else:
        compute_precision = ct.precision.FLOAT32
    with quiet() as log, _converter_fixes():
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


# ---- converter fixes -----------------------------------------------------------------------------


def _gelu(context, node):
    """`aten.gelu` honouring `approximate` positionally (TorchScript) or as a keyword (torch.export).
    The keyword is read from the node: binding the string "tanh" through the context would resolve to
    a variable if the graph had a node named "tanh"."""
    inputs = torch_ops._get_inputs(context, node, expected=[1, 2])
    approximate = inputs[1].val if len(inputs) == 2 else (node.kwinputs or {}).get("approximate", ("none",))[0]
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu {node.name}: unknown approximate={approximate!r}")
    mode = "TANH_APPROXIMATION" if approximate == "tanh" else "EXACT"
    context.add(mb.gelu(x=inputs[0], mode=mode, name=node.name))


def _sum(original):
    def convert(context, node):
        x = torch_ops._get_inputs(context, node, min_expected=1)[0]
        if x.dtype == types.bool:  # hand coremltools' converter an int32 copy to reduce
            counted = f"{node.inputs[0]}__as_int32"
            context.add(mb.cast(x=x, dtype="int32", name=counted), counted)
            node.inputs = [counted, *node.inputs[1:]]
        return original(context, node)

    return convert


def _clamp(original):
    def convert(context, node):
        inputs = torch_ops._get_inputs(context, node, expected=[1, 2, 3])
        if not types.is_int(inputs[0].dtype):
            return original(context, node)
        result, low, high = inputs[0], *(list(inputs[1:]) + [None, None])[:2]
        if any(b is not None and (b.val is None or not float(b.val).is_integer()) for b in (low, high)):
            return original(context, node)  # non-constant or fractional bounds: torch promotes to float
        for bound, op in ((high, mb.minimum), (low, mb.maximum)):
            if bound is not None:
                result = op(x=result, y=np.int32(bound.val))
        context.add(mb.identity(x=result, name=node.name) if result is inputs[0] else result, node.name)

    return convert


def _alias(context, node):
    context.add(mb.identity(x=torch_ops._get_inputs(context, node, expected=1)[0], name=node.name))


@contextlib.contextmanager
def _converter_fixes():
    """Install the fixed converters for one conversion; restore coremltools' registry afterwards.

    A torch op is looked up by its sanitized kind ("sum", "sum.dim_intlist"): every kind registered to
    the original converter is overridden, but not other ops sharing that function (mean shares sum's).
    Nesting is harmless: the outer exit restores the original registry.
    """
    registry = _TORCH_OPS_REGISTRY.name_to_func_mapping
    saved = dict(registry)
    fixes = {"gelu": lambda original: _gelu, "sum": _sum, "clamp": _clamp}
    try:
        for op, make in fixes.items():
            original = saved[op]
            fixed = make(original)
            for kind, func in saved.items():
                if func is original and kind.split(".")[0] == op:
                    _TORCH_OPS_REGISTRY.set_func_by_name(fixed, kind)
        _TORCH_OPS_REGISTRY.set_func_by_name(_alias, "alias")
        _TORCH_OPS_REGISTRY.set_func_by_name(saved["where"], "where.scalarother")
        yield
    finally:
        registry.clear()
        registry.update(saved)


# ---- float16 policy ------------------------------------------------------------------------------


def _producers(op) -> list:
    return [var.op for var in input_vars(op) if var.op is not None]


def _consumers(op) -> list:
    return [child for out in op.outputs for child in out.child_ops]


def _closure(start, step, stop=frozenset()) -> list:
    """`start` and every op reachable from it through `step` (producers or consumers), not entering `stop`."""
    seen, stack = {}, list(start)
    while stack:
        op = stack.pop()
        if op.name not in seen and op.name not in stop:
            seen[op.name] = op
            stack.extend(step(op))
    return list(seen.values())


def _weight_bearing(op) -> bool:
    """An op applying a learned tensor: linear/conv/matmul/gather with a constant of rank >= 2."""
    return op.op_type in ("linear", "conv", "conv_transpose", "matmul", "gather") and any(
        is_constant(p) and p.outputs[0].rank >= 2 for p in _producers(op)
    )


_NORM_FOLLOWERS = {"add", "sub", "mul", "real_div", "maximum", "rsqrt", "sqrt", "inverse"}


def fp32_op_names(block, regions: Iterable[str] = FP32_REGIONS) -> set[str]:
    """Names of the ops of `block` that float16 conversion must leave in float32 (see module doc)."""
    regions, ops, keep = _checked_regions(regions), list(block.operations), set()
    if "angles" in regions:
        keep |= {op.name for op in _closure([op for op in ops if op.op_type in ("sin", "cos")], _producers) if not is_constant(op)}
    if "sampling" in regions:
        last = max((i for i, op in enumerate(ops) if _weight_bearing(op)), default=None)
        if last is not None:
            network = {op.name for op in _closure([ops[last]], _producers)}
            tail = _closure(_consumers(ops[last]), _consumers)
            side = _closure([p for op in tail for p in _producers(op)], _producers, stop=network)
            keep |= {op.name for op in [*tail, *side] if not is_constant(op)}
    if "norm_statistics" in regions:
        for op in ops:
            if op.op_type not in ("reduce_mean", "reduce_sum"):
                continue
            keep.add(op.name)
            for producer in _producers(op):  # the square: x * x or x ** 2
                if producer.op_type == "pow" or (producer.op_type == "mul" and producer.x is producer.y):
                    keep.add(producer.name)
            stack = _consumers(op)  # + eps, rsqrt: the ops on the reduced (per-row) shape
            while stack:
                follower = stack.pop()
                per_row = follower.outputs[0].shape == op.outputs[0].shape
                if follower.op_type in _NORM_FOLLOWERS and per_row and follower.name not in keep:
                    keep.add(follower.name)
                    if follower.op_type not in ("rsqrt", "sqrt", "inverse"):
                        stack.extend(_consumers(follower))
    return keep


def _checked_regions(regions: Iterable[str]) -> tuple[str, ...]:
    regions = tuple(regions)
    unknown = set(regions) - set(FP32_REGIONS)
    if unknown:
        raise ValueError(f"unknown float32 region(s) {sorted(unknown)}; known: {FP32_REGIONS}")
    return regions


class Fp32Regions:
    """op_selector for `ct.transform.FP16ComputePrecision` (True = cast the op to float16).

    coremltools asks one op at a time; the regions come from the whole block's dataflow, computed on
    the first question about a block. `kept` collects the names left in float32."""

    def __init__(self, regions: Iterable[str] = FP32_REGIONS):
        self.regions = _checked_regions(regions)
        self._blocks: dict[int, set[str]] = {}
        self.kept: set[str] = set()

    def __call__(self, op) -> bool:
        block = op.enclosing_block
        if id(block) not in self._blocks:
            self._blocks[id(block)] = fp32_op_names(block, self.regions)
            self.kept |= self._blocks[id(block)]
        return op.name not in self._blocks[id(block)]


# ---- denoise_step in chunks ----------------------------------------------------------------------
#
# A 1B transformer is one 2 GB (float16) package; devices load large packages slowly or not at all on
# the Neural Engine. `--chunks N` splits denoise_step into N packages run in sequence:
#   chunk 0:   tokens + conditioning -> embeddings (temb, text and image streams) -> first blocks
#   middle:    hidden states -> a range of blocks -> hidden states
#   last:      remaining blocks -> head -> guidance, softmax, draw (the spec's outputs)
# The 14 + 28 blocks are numbered in order and split where the weight bytes balance (a dual-stream block
# holds 2.4x the weights of a single-stream one, so equal block counts would give the 1B model a 1.3 GB
# first half and a 0.7 GB second). Intermediate tensors are named inputs and outputs: `temb` [2B, D]
# (made by chunk 0, read by all others); `image_hidden_K` [2B, h*w, D] and `text_hidden_K` [2B, 77, D]
# inside the dual-stream blocks, `joint_hidden_K` [2B, 77 + h*w, D] (text first) in the single-stream
# ones, K the index of the block they enter (Core ML refuses a name that is both input and output, as
# a chunk within the dual-stream blocks would have); h x w is the compressed grid (height/2 x width/2).
# The rotary tables depend only on the grid and fold into constants in every chunk that needs them.

_HIDDEN = {
    "temb": TensorSpec("temb", "float32", ("2*batch", "D"), doc="timestep + text conditioning vector"),
    "image_hidden": TensorSpec("image_hidden", "float32", ("2*batch", "height*width/4", "D"), doc="image stream"),
    "text_hidden": TensorSpec("text_hidden", "float32", ("2*batch", TEXT_POSITIONS, "D"), doc="text stream"),
    "joint_hidden": TensorSpec("joint_hidden", "float32", ("2*batch", f"{TEXT_POSITIONS}+height*width/4", "D"), doc="text, image"),
}


_EMBEDDING_MODULES = (
    "time_text_embed", "cond_embed", "context_embedder", "encoder_proj_layer_norm", "embed", "down_block",
    "project_to_hidden_norm", "project_to_hidden",
)  # fmt: skip
_HEAD_MODULES = ("project_from_hidden_norm", "project_from_hidden", "up_block", "mlm_layer")
_TRANSFORMER_INPUTS = ("tokens", "encoder_hidden_states", "pooled_projections", "micro_conds", "timestep")


def _state(block_index: int, dual_blocks: int) -> tuple[str, ...]:
    """The names of the hidden tensors between blocks `block_index - 1` and `block_index`."""
    streams = ("image_hidden", "text_hidden") if block_index <= dual_blocks else ("joint_hidden",)
    return (*(f"{stream}_{block_index}" for stream in streams), "temb")


def _stream(name: str) -> str:
    """`image_hidden_8` -> `image_hidden`; every other name is its own."""
    stem, _, index = name.rpartition("_")
    return stem if index.isdigit() and stem in _HIDDEN else name


class DenoiseChunk(MeissonicTransformer):
    """Blocks [start, stop) of a DenoiseStepGraph, with the embeddings if first and the head if last.

    A partial MeissonicTransformer: it registers only the modules it runs (a package holds its own
    weights and no others) and inherits the transformer's `embed_inputs`, `rotary` and `head`, so it
    computes the whole graph's operations, cut between blocks (the tests check that chained chunks equal
    the whole graph bit for bit). Its arguments are `input_names` in order; it returns `output_names`."""

    def __init__(self, step: DenoiseStepGraph, start: int, stop: int, grid: tuple[int, int], spec: GraphSpec):
        nn.Module.__init__(self)  # not MeissonicTransformer.__init__: share the step's modules, build none
        t = step.transformer
        self.config, self.grid, self.start, self.stop = t.config, grid, start, stop
        self.dual_blocks = len(t.transformer_blocks)
        blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
        self.blocks = nn.ModuleList(blocks[start:stop])
        self.first, self.last = start == 0, stop == len(blocks)
        shared = (_EMBEDDING_MODULES if self.first else ()) + (_HEAD_MODULES if self.last else ())
        for name in shared:
            if hasattr(t, name):  # down_block and up_block exist only in downsampling models
                setattr(self, name, getattr(t, name))
        self.input_names, self.output_names = spec.input_names(), spec.output_names()

    def forward(self, *args):
        values = {_stream(name): value for name, value in zip(self.input_names, args)}
        factor = 2 if self.config.downsample else 1
        h, w = self.grid[0] // factor, self.grid[1] // factor
        if self.first:  # [negative, positive] rows, as DenoiseStepGraph does
            tokens, *conditioning = (values[n] for n in _TRANSFORMER_INPUTS)
            values["image_hidden"], values["text_hidden"], values["temb"], _ = self.embed_inputs(torch.cat([tokens, tokens]), *conditioning)
        temb = values["temb"]
        rotary = self.rotary(h, w, temb.device)
        for index, block in zip(range(self.start, self.stop), self.blocks):
            if index < self.dual_blocks:
                values["image_hidden"], values["text_hidden"] = block(values["image_hidden"], values["text_hidden"], temb, rotary)
            else:
                if "joint_hidden" not in values:
                    values["joint_hidden"] = torch.cat([values["text_hidden"], values["image_hidden"]], dim=1)
                values["joint_hidden"] = block(values["joint_hidden"], temb, rotary)
        if self.last:
            x = values["joint_hidden"][:, TEXT_POSITIONS:] if "joint_hidden" in values else values["image_hidden"]
            logits = self.head(x, h, w)
            probs = guided_probabilities(logits, values["guidance_scale"], logits.shape[0] // 2)
            values["sampled_tokens"], values["log_probs"] = draw(probs, values["uniforms"])
        return tuple(values[_stream(name)] for name in self.output_names)


@dataclass
class Chunk:
    spec: GraphSpec  # name "denoise_step.chunkI", inputs/outputs as described above
    module: DenoiseChunk


def split_denoise_step(spec: GraphSpec, module: DenoiseStepGraph, chunks: int, grid: tuple[int, int]) -> list[Chunk]:
    """Split a DenoiseStepGraph (`spec` is GRAPHS["denoise_step"]) into `chunks` sequential modules for
    the token grid `grid` = (height, width). Blocks are shared with `module`, not copied."""
    transformer = module.transformer
    dual = len(transformer.transformer_blocks)
    total = dual + len(transformer.single_transformer_blocks)
    if not 1 <= chunks <= total:
        raise ValueError(f"chunks={chunks}: must be between 1 and the number of blocks ({total})")
    sizes = [_parameters(block) for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    head = sum(_parameters(getattr(transformer, name, nn.Identity())) for name in _HEAD_MODULES)
    sizes[-1] += head  # the last chunk carries the head, the first the embeddings
    sizes[0] += _parameters(transformer) - sum(sizes)
    bounds = balanced_bounds(sizes, chunks)
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    tail_inputs = ("guidance_scale", "uniforms")
    result = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        inputs = [n for n in spec.input_names() if n not in tail_inputs] if start == 0 else list(_state(start, dual))
        if stop == total:
            inputs += list(tail_inputs)
        # temb is made by chunk 0 and read by every later chunk (run_chunks keeps all values)
        outputs = spec.output_names() if stop == total else [n for n in _state(stop, dual) if start == 0 or n != "temb"]
        chunk_spec = GraphSpec(
            f"{spec.name}.chunk{i}", spec.component, DenoiseChunk,
            inputs=tuple(by_name.get(n) or dataclasses.replace(_HIDDEN[_stream(n)], name=n) for n in inputs),
            outputs=tuple(by_name.get(n) or dataclasses.replace(_HIDDEN[_stream(n)], name=n) for n in outputs),
            description=f"{spec.description}; chunk {i + 1} of {chunks}: blocks {start}-{stop - 1}",
            sample=spec.sample, weights_prefix=spec.weights_prefix, quantizable=spec.quantizable,
        )  # fmt: skip
        result.append(Chunk(chunk_spec, DenoiseChunk(module, start, stop, grid, chunk_spec).eval()))
    return result


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_bounds(sizes: list[int], chunks: int) -> list[int]:
    """Indices 0 = b0 < b1 < ... < b_chunks = len(sizes) that cut `sizes` into `chunks` runs of nearly
    equal sum: each cut is the one closest to its share of the total, kept strictly increasing."""
    cumulative = np.cumsum([0, *sizes])
    bounds = [0]
    for i in range(1, chunks):
        closest = int(np.abs(cumulative - cumulative[-1] * i / chunks).argmin())
        bounds.append(min(max(closest, bounds[-1] + 1), len(sizes) - (chunks - i)))
    return [*bounds, len(sizes)]


def torch_runner(chunk: Chunk) -> Callable[[dict], dict]:
    def run(feed: dict) -> dict:
        with torch.no_grad():
            out = chunk.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in chunk.spec.input_names()))
        return {name: value.numpy() for name, value in zip(chunk.spec.output_names(), out)}

    return run


def convert_denoise_chunks(
    spec: GraphSpec,
    module: DenoiseStepGraph,
    example_inputs: dict[str, np.ndarray],
    chunks: int,
    precision: str,
    minimum_target: str = "iOS17",
    fp32_regions: Iterable[str] = FP32_REGIONS,
) -> Iterator[tuple[Chunk, ct.models.MLModel]]:
    """Split denoise_step into `chunks` and convert each at the example inputs' shapes (the
    intermediate example values come from running the torch chunks on them). One chunk at a time: a
    caller that saves each before taking the next holds one chunk's weights, not the model's."""
    grid = tuple(example_inputs["tokens"].shape[1:])
    parts = split_denoise_step(spec, module, chunks, grid)
    values = run_chunks([torch_runner(c) for c in parts[:-1]], example_inputs, [c.spec.input_names() for c in parts[:-1]])
    for chunk in parts:
        yield chunk, convert_graph(chunk.spec, chunk.module, values, precision, minimum_target, fp32_regions)
