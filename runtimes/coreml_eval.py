"""Run a saved Core ML ML program (.mlpackage) with numpy, on Linux, where Core ML itself cannot run.

Core ML execution (`MLModel.predict`) is macOS-only. This evaluator loads the MIL program from the saved
package exactly as it will ship (fp16 or quantized weights included) and walks its ops in order:

  * `const` and `constexpr_*` ops (quantized / palettized / sparse weights) through coremltools' own
    `materialized_val_inference()`, computed once per program;
  * most ops through their own `value_inference()` (the constant-folding code of coremltools), with the
    runtime values bound to the op's input variables;
  * small numpy kernels (`KERNELS`) for the ops that lack it (convolutions, normalizations, silu, ...),
    and for `cast`, whose `value_inference` would round to float16.

Arithmetic is float32: float16 weights are widened on use and casts to float16 inside the program are
evaluated as float32, so the result is what an exact-float32 device would compute from the stored
weights. With `emulate_fp16=True`, every op output the program declares float16 is rounded to float16
(values, not arithmetic: products and sums inside one op stay float32), which reproduces what float16
storage does to a program: overflow above 65504, and the rounding of large angles or ids. Neither mode
reproduces a device's float16 accumulation order; that needs macOS.

An op it cannot evaluate raises `UnsupportedOpError` naming the op type and op name; nothing is skipped.
Other failures (an integer cast that would overflow, a result of the wrong shape) raise RuntimeError,
also naming the op. `trace(inputs)` returns every intermediate value by variable name.
This relies on coremltools internals (the milproto loader, `Var._sym_val`): coremltools is pinned to 9.0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .quiet import quiet

with quiet():  # coremltools logs on import that torch 2.13 is untested and, off macOS, that its native Core ML library is absent
    import coremltools as ct
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.var import Var


class UnsupportedOpError(NotImplementedError):
    """The program contains an op this evaluator cannot compute."""


class _Bound:
    """Stands in for coremltools' builtin value object behind `Var.val`: holds a raw numpy value,
    so a float32 array bound to a float16 variable is not rounded by the builtin's setter."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


def _load_program(path: Path):
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path}: not an ML program (type {spec.WhichOneof('Type')})")
    return spec, load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def is_constant(op) -> bool:
    """A stored value: `const`, or a `constexpr_*` op that decompresses stored weights."""
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def input_vars(op) -> list[Var]:
    """The variables an op reads, list inputs (concat, ...) flattened."""
    found = []
    for value in op.inputs.values():
        found.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


def _nptype(var: Var):
    dtype = var.dtype
    if types.is_float(dtype):
        return np.float32
    return types.nptype_from_builtin(dtype)


def _float32_type(sym_type):
    if types.is_tensor(sym_type) and sym_type.get_primitive() == types.fp16:
        return types.tensor(types.fp32, sym_type.get_shape())
    return types.fp32 if sym_type == types.fp16 else sym_type


def _compute_value(value):
    """float16 -> float32 (we compute in float32); 0-d bools -> bool (numpy 2 refuses np.bool_ flags)."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, (np.bool_,)) or (isinstance(value, np.ndarray) and value.dtype == bool and value.ndim == 0):
        return bool(value)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


class CoreMLProgram:
    """A saved `.mlpackage`, callable on a dict of numpy inputs -> dict of numpy outputs."""

    def __init__(self, path: str | Path, emulate_fp16: bool = False, function: str = "main"):
        self.path = Path(path)
        self.emulate_fp16 = emulate_fp16
        self.spec, self.program = _load_program(self.path)
        self.function = self.program.functions[function]
        self.operations = list(self.function.operations)
        self.inputs = dict(self.function.inputs)  # name -> Var
        self.output_names = [var.name for var in self.function.outputs]
        # Weights, materialized once and kept as stored (float16 stays float16 until used).
        self._constants: dict[str, object] = {}
        self._run([op for op in self.operations if is_constant(op)], self._constants)

    def constants(self) -> dict[str, np.ndarray]:
        """Every constant by name, compressed weights (constexpr ops) materialised, as float32."""
        return {name: np.asarray(value, dtype=np.float32) for name, value in self._constants.items() if np.asarray(value).dtype.kind == "f"}

    def op_types(self) -> list[str]:
        return sorted({op.op_type for op in self.operations})

    def unsupported_op_types(self) -> list[str]:
        """Op types that have neither a kernel here nor a value_inference in coremltools (best effort:
        a value_inference may still refuse some inputs at run time)."""
        from coremltools.converters.mil.mil.operation import Operation

        return sorted(
            {
                op.op_type
                for op in self.operations
                if not is_constant(op) and op.op_type not in KERNELS and type(op).value_inference is Operation.value_inference
            }
        )

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._evaluate(inputs, keep=False)
        return {name: np.asarray(values[name]) for name in self.output_names}

    def trace(self, inputs: dict[str, np.ndarray]) -> dict[str, object]:
        """Every variable's value (inputs, weights, intermediates, outputs) by name; for debugging."""
        return self._evaluate(inputs, keep=True)

    def _evaluate(self, inputs: dict[str, np.ndarray], keep: bool) -> dict[str, object]:
        values = dict(self._constants)
        for name, var in self.inputs.items():
            if name not in inputs:
                raise ValueError(f"{self.path.name}: missing input {name!r}")
            values[name] = self._feed(name, var, inputs[name])
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise ValueError(f"{self.path.name}: unknown input(s) {sorted(unknown)}; expected {list(self.inputs)}")
        self._run([op for op in self.operations if not is_constant(op)], values, keep)
        return values

    def _run(self, operations, values: dict, keep: bool = True) -> None:
        """Evaluate `operations` in order into `values`, binding each op's inputs to their values for the
        op's own evaluation (and restoring them after: the program stays as loaded). `keep=False` drops
        every intermediate after its last use: a 1B chunk kept whole holds ~5 GB of activations at 1024 px."""
        last_use = {} if keep else {var.name: i for i, op in enumerate(operations) for var in input_vars(op)}
        kept = set(self.output_names) | set(self._constants)
        for i, op in enumerate(operations):
            inputs = input_vars(op) if op.op_type != "const" else []
            saved = [(var, var._sym_val, var._sym_type) for var in inputs]
            try:
                for var in inputs:
                    # value_inference code casts some results to the input's dtype: say float32
                    var._sym_type = _float32_type(var._sym_type)
                    var._sym_val = _Bound(_compute_value(values[var.name]))
                self._evaluate_into(op, values)
            finally:
                for var, value, sym_type in reversed(saved):  # reversed: an input named twice gets its original
                    var._sym_val, var._sym_type = value, sym_type
            for var in inputs if not keep else ():
                if last_use[var.name] == i and var.name not in kept:
                    values.pop(var.name, None)

    def _feed(self, name: str, var: Var, value) -> np.ndarray:
        value = np.asarray(value)
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{self.path.name}: input {name!r} has shape {value.shape}, the program expects {tuple(var.shape)}")
        dtype = _nptype(var)
        if np.issubdtype(dtype, np.integer) and value.size and np.issubdtype(value.dtype, np.integer):
            info = np.iinfo(dtype)
            if value.min() < info.min or value.max() > info.max:
                raise ValueError(f"{self.path.name}: input {name!r} does not fit {np.dtype(dtype).name}")
        return value.astype(dtype, copy=False)

    def _evaluate_into(self, op, values: dict) -> None:
        try:
            if op.op_type in KERNELS:
                results = KERNELS[op.op_type](op, lambda key, default=None: _arg(op, key, default))
            elif op.op_type == "const":
                results = op.outputs[0].val
            elif is_constant(op):
                if not hasattr(op, "materialized_val_inference"):
                    raise UnsupportedOpError(f"cannot evaluate op type '{op.op_type}' (op '{op.name}'): no materialized_val_inference")
                results = op.materialized_val_inference()
            else:
                try:
                    results = op.value_inference()
                except NotImplementedError as error:
                    raise UnsupportedOpError(
                        f"cannot evaluate op type '{op.op_type}' (op '{op.name}'): no numpy kernel and no usable "
                        f"value_inference ({error or 'not implemented'})"
                    ) from None
        except UnsupportedOpError:
            raise
        except Exception as error:
            raise RuntimeError(f"evaluating op type '{op.op_type}' (op '{op.name}') failed: {error}") from error
        if results is None:
            raise UnsupportedOpError(f"cannot evaluate op type '{op.op_type}' (op '{op.name}'): value_inference gave no value")
        results = results if isinstance(results, (tuple, list)) and len(op.outputs) > 1 else (results,)
        if len(results) != len(op.outputs):
            raise RuntimeError(f"op '{op.name}' ({op.op_type}) gave {len(results)} values for {len(op.outputs)} outputs")
        for var, result in zip(op.outputs, results):
            values[var.name] = self._conform(var, result, op)

    def _conform(self, var: Var, result, op):
        """Give a result its declared dtype (floats as float32) and check its declared shape."""
        if isinstance(result, str) or (not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type)):
            return result
        if is_constant(op):  # stored weights stay compact; widened where used
            return result
        array = np.asarray(result, dtype=_nptype(var))
        if self.emulate_fp16 and var.dtype == types.fp16:
            with np.errstate(over="ignore"):  # overflow to inf is what float16 storage does
                array = array.astype(np.float16).astype(np.float32)
        if types.is_tensor(var.sym_type) and tuple(array.shape) != tuple(var.shape):
            raise RuntimeError(f"op '{op.name}' ({op.op_type}) gave shape {array.shape}, the program declares {tuple(var.shape)}")
        return array


def _arg(op, key: str, default=None):
    """The value bound to an op's input `key` (float32 for floats), or `default` if the input is absent."""
    var = op.inputs.get(key)
    if var is None:
        return default
    value = var.val
    if value is None:
        raise RuntimeError(f"op '{op.name}' ({op.op_type}): input {key!r} has no value")
    return value


# ---- kernels for ops without value_inference ---------------------------------------------------


def _cast(op, arg):
    target = op.dtype.val
    x = np.asarray(arg("x"))
    if target in ("fp16", "fp32"):
        return x.astype(np.float32)  # float16 casts are float32 here (rounded later if emulating)
    dtype = types.nptype_from_builtin(types.string_to_builtin(target))
    if np.issubdtype(dtype, np.integer) and x.size:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise RuntimeError(f"op '{op.name}' (cast to {target}): non-finite values")
        info = np.iinfo(dtype)
        if x.min() < info.min or x.max() > info.max:  # a device would wrap or saturate: say so
            raise RuntimeError(f"op '{op.name}' (cast to {target}): values {x.min()}..{x.max()} do not fit")
    return x.astype(dtype)


def _silu(op, arg):
    x = arg("x")
    return x / (1.0 + np.exp(-np.clip(x, -80, 80)))


def _pads(op, arg, spatial_in, kernel, strides, dilations):
    """[(before, after)] per spatial dim, from pad_type / pad as conv defines them."""
    pad_type = arg("pad_type", "valid")
    n = len(kernel)
    if pad_type == "custom":
        pad = list(arg("pad"))
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(n)]
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise UnsupportedOpError(f"op '{op.name}' ({op.op_type}): pad_type {pad_type!r}")


def _window(offset, dilations, strides, sizes) -> tuple:
    """The input positions kernel tap `offset` meets, one per output position (or the reverse)."""
    return tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, s, n in zip(offset, dilations, strides, sizes))


def _conv(op, arg):
    """Cross-correlation over 1-3 spatial dims with groups: one matmul per kernel offset."""
    x, w, bias = arg("x"), arg("weight"), arg("bias")
    n, cin, spatial = x.shape[0], x.shape[1], x.shape[2:]
    cout, kernel = w.shape[0], w.shape[2:]
    strides = [int(s) for s in arg("strides", [1] * len(kernel))]
    dilations = [int(d) for d in arg("dilations", [1] * len(kernel))]
    groups = int(arg("groups", 1))
    pads = _pads(op, arg, spatial, kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    out_spatial = [(x.shape[2 + i] - (k - 1) * d - 1) // s + 1 for i, (k, s, d) in enumerate(zip(kernel, strides, dilations))]
    xg = x.reshape(n, groups, cin // groups, *x.shape[2:])
    wg = w.reshape(groups, cout // groups, cin // groups, *kernel)
    positions = int(np.prod(out_spatial))
    out = np.zeros((n, groups, cout // groups, positions), np.float32)
    for offset in np.ndindex(*kernel):
        window = _window(offset, dilations, strides, out_spatial)
        patch = xg[(slice(None),) * 3 + window].reshape(n, groups, cin // groups, positions)
        out += wg[(slice(None),) * 3 + offset] @ patch  # [g, cout/g, cin/g] @ [n, g, cin/g, P]
    out = out.reshape(n, cout, *out_spatial)
    return out if bias is None else out + bias.reshape(1, -1, *[1] * len(out_spatial))


def _conv_transpose(op, arg):
    """Scatter-add of each kernel offset's contribution into the full output, then the padding cropped."""
    x, w, bias = arg("x"), arg("weight"), arg("bias")
    n, cin, spatial = x.shape[0], x.shape[1], x.shape[2:]
    kernel, groups = w.shape[2:], int(arg("groups", 1))
    cout = w.shape[1] * groups
    strides = [int(s) for s in arg("strides", [1] * len(kernel))]
    dilations = [int(d) for d in arg("dilations", [1] * len(kernel))]
    full = [(size - 1) * s + (k - 1) * d + 1 for size, k, s, d in zip(spatial, kernel, strides, dilations)]
    xg = x.reshape(n, groups, cin // groups, *spatial)
    wg = w.reshape(groups, cin // groups, cout // groups, *kernel)
    out = np.zeros((n, groups, cout // groups, *full), np.float32)
    columns = xg.reshape(n, groups, cin // groups, -1)
    for offset in np.ndindex(*kernel):
        window = _window(offset, dilations, strides, spatial)
        contribution = np.swapaxes(wg[(slice(None),) * 3 + offset], -1, -2) @ columns  # [g, cout/g, cin/g] @ [n, g, cin/g, P]
        out[(slice(None),) * 3 + window] += contribution.reshape(n, groups, cout // groups, *spatial)
    out = out.reshape(n, cout, *full)
    target = op.outputs[0].shape[2:]
    pad_type = arg("pad_type", "valid")
    if pad_type == "custom":
        pad = [int(p) for p in arg("pad")]
        before = pad[0::2]
    elif pad_type in ("valid", "same"):
        before = [0 if pad_type == "valid" else (f - t) // 2 for f, t in zip(full, target)]
    else:
        raise UnsupportedOpError(f"op '{op.name}' ({op.op_type}): pad_type {pad_type!r}")
    out = out[(slice(None), slice(None)) + tuple(slice(b, b + t) for b, t in zip(before, target))]
    return out if bias is None else out + bias.reshape(1, -1, *[1] * len(target))


def _channel_shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def _batch_norm(op, arg):
    x = arg("x")
    shape = _channel_shape(x)
    scale = 1.0 / np.sqrt(arg("variance").reshape(shape) + np.float32(arg("epsilon", 1e-5)))
    out = (x - arg("mean").reshape(shape)) * scale
    gamma, beta = arg("gamma"), arg("beta")
    out = out if gamma is None else out * gamma.reshape(shape)
    return out if beta is None else out + beta.reshape(shape)


def _instance_norm(op, arg):
    x = arg("x")
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = ((x - mean) / np.sqrt(var + arg("epsilon", 1e-5))).astype(np.float32)
    gamma, beta, shape = arg("gamma"), arg("beta"), _channel_shape(x)
    out = out if gamma is None else out * gamma.reshape(shape)
    return out if beta is None else out + beta.reshape(shape)


def _upsample_nearest_neighbor(op, arg):
    x = arg("x")
    out_h, out_w = op.outputs[0].shape[-2:]
    rows = np.minimum((np.arange(out_h) / np.float32(arg("scale_factor_height", 1))).astype(np.int64), x.shape[-2] - 1)
    cols = np.minimum((np.arange(out_w) / np.float32(arg("scale_factor_width", 1))).astype(np.int64), x.shape[-1] - 1)
    return x[..., rows[:, None], cols[None, :]]


def _gather_nd(op, arg):
    x, indices, batch_dims = arg("x"), np.asarray(arg("indices")).astype(np.int64), int(arg("batch_dims", 0))
    if batch_dims:
        raise UnsupportedOpError(f"op '{op.name}' (gather_nd): batch_dims={batch_dims}")
    indices = np.where(indices < 0, indices + np.array(x.shape[: indices.shape[-1]]), indices)
    return x[tuple(np.moveaxis(indices, -1, 0))]


KERNELS = {
    "cast": _cast,
    "silu": _silu,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "batch_norm": _batch_norm,
    "instance_norm": _instance_norm,
    "upsample_nearest_neighbor": _upsample_nearest_neighbor,
    "gather_nd": _gather_nd,
}
