"""Which ops of a Core ML program stay float32 when it computes in float16.

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

from collections.abc import Iterable

from meissonic.runtimes.coreml_eval import input_vars, is_constant

FP32_REGIONS = ("angles", "sampling", "norm_statistics")


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
