"""Fixes to coremltools 9.0's torch converter, installed for the duration of one conversion.

coremltools 9.0 gets four things wrong on this path, silently or not; `converter_fixes` corrects them
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
and one optimization pass miscompiles (`coreml_convert.pass_pipeline` leaves it out): `common::fuse_matmul_weight_bias` rewrites
`c - x @ W` as `x @ W - c` (it negates the bias but ignores which side of the `sub` the matmul is on).
The VQ encoder's distance `|e|^2 - 2 z.e` on [B,H,W,C] latents is that pattern (at rank <= 3 the
frontend emits `linear`, whose fusion is right): argmin picked the farthest code, 0% of ids right even
in float32. nn.Linear exports as `aten.linear`, which that pass never sees, so nothing is lost.
"""
from __future__ import annotations

import contextlib

import numpy as np

from meissonic.runtimes.quiet import quiet

with quiet():  # coremltools logs on import that torch 2.13 is untested and, off macOS, that its native Core ML library is absent
    from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch import ops as torch_ops
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from coremltools.converters.mil.mil import types


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
def converter_fixes():
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
