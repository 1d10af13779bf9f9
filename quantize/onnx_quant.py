"""Weight quantization of exported ONNX graphs with onnxruntime's quantization tools.

- int4 (and int8 layers of a mixed recipe): `MatMulNBitsQuantizer`, block-wise, weight-only; the CPU
  kernel dequantizes blocks on the fly (accuracy_level 4: int8 activations inside the kernel).
- int8: per-output-channel uint8 weights through `quantize_dynamic` (MatMulInteger with
  DynamicQuantizeLinear activations), measured faster on CPU than weight-only int8 (see README).
  U8U8, not U8S8: on x86 CPUs without VNNI (AVX2) onnxruntime's U8S8 kernel uses VPMADDUBSW, whose
  16-bit sums saturate; the tiny CLIP's text embeddings fell to 13.9 dB SQNR there (33 dB with U8U8).
- Conv, ConvTranspose and Gather (embedding) weights, which those tools quantize only together with
  calibrated activations: int8 per-output-channel weight-only, as `DequantizeLinear(int8 W, scale)`
  in front of the op, the form ONNX's QDQ format defines (written here: ~20 lines, no tool does it).

Layers are named by their checkpoint names (e.g. `transformer_blocks.3.attn.to_q`), read from the
module scopes the torch exporter records on every node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from meissonic.runtimes.quiet import quiet

from . import graph_files

WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
# The input index that holds the weight, per op type.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


@dataclass
class Layer:
    """A constant weight of the graph and the checkpoint layer it comes from."""

    name: str  # checkpoint layer name, e.g. "transformer_blocks.0.attn.to_q"
    op: str  # MatMul, Conv, ConvTranspose, Gather
    node: str  # ONNX node name
    weight: str  # initializer name
    shape: tuple[int, ...]  # as stored in the graph (MatMul: [in, out])

    @property
    def reduction_dim(self) -> int:
        """The dimension a quantization block runs along (MatMul: input features)."""
        return self.shape[0] if self.op == "MatMul" else int(np.prod(self.shape[1:]))


def _scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = json.loads(prop.value.replace("'", '"'))
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def layers(model: onnx.ModelProto, prefix: str) -> list[Layer]:
    """Every op of WEIGHT_OPS whose weight is an initializer, named by module path minus `prefix`."""
    initializers = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        weight = node.input[WEIGHT_INPUT[node.op_type]]
        scope = _scope(node)
        if weight not in initializers or scope is None:
            continue
        name = scope.removeprefix(prefix)
        found.append(Layer(name, node.op_type, node.name, weight, tuple(initializers[weight].dims)))
    return found


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite constant-weight Gemm (2-D linear layers: AdaLN, embedders) as MatMul + Add, in place.

    The weight-only quantizers only look at MatMul; Gemm with transB=1 holds W as [out, in], MatMul
    wants [in, out]. The node keeps its name and metadata, so layer naming still works.
    """
    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" else None
        if weight is None or attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        if attributes.get("transB", 0):
            transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), weight.name + "_t")
            model.graph.initializer.append(transposed)
            weight_name = transposed.name
        else:
            weight_name = weight.name
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], weight_name], [product], name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return model


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """In place: rebuilding the list would copy every kept tensor (4 GB more at 1B)."""
    used = {name for node in model.graph.node for name in node.input}
    for index in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[index].name not in used:
            del model.graph.initializer[index]


def int8_weight_only(model: onnx.ModelProto, selected: list[Layer]) -> None:
    """Store the weights of `selected` (Conv/ConvTranspose/Gather) as int8 per output channel,
    symmetric, dequantized by a DequantizeLinear node in front of the op. In place."""
    initializers = {i.name: i for i in model.graph.initializer}
    replaced = {}
    for layer in selected:
        weight = numpy_helper.to_array(initializers[layer.weight]).astype(np.float32)
        axis = 1 if layer.op == "ConvTranspose" else 0  # output channels (ConvTranspose: [in, out, kh, kw])
        reduce = tuple(d for d in range(weight.ndim) if d != axis)
        scale = np.maximum(np.abs(weight).max(axis=reduce), 1e-12) / 127.0
        shape = [1] * weight.ndim
        shape[axis] = -1
        quantized = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        q_name, s_name = layer.weight + "_int8", layer.weight + "_scale"
        model.graph.initializer.extend([numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(scale.astype(np.float32), s_name)])
        replaced[layer.weight] = helper.make_node(
            "DequantizeLinear", [q_name, s_name], [layer.weight + "_dequantized"], name=layer.node + "_dequantize", axis=axis
        )
    nodes = [replaced[w] for w in replaced]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replaced:
                node.input[i] = replaced[name].output[0]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)


def quantize_graph(fp32_path: Path, out_dir: Path, prefix: str, plan: dict[str, int], recipe) -> tuple[Path, list[Layer]]:
    """Apply a recipe's plan (layer -> bits) to an exported float32 graph; returns the new model's path
    and the graph's weight layers (named, for the bits table)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    large = sum(f.stat().st_size for f in graph_files.onnx_files(fp32_path)) > graph_files.EXTERNAL_DATA_BYTES
    model = gemm_to_matmul(onnx.load(str(fp32_path)))
    graph_layers = layers(model, prefix)
    unknown = sorted({layer.name for layer in graph_layers} - set(plan))
    if unknown:
        raise AssertionError(f"{fp32_path}: layers {unknown[:5]} are in the graph but not in the plan")
    select = lambda op_types, bits: [l for l in graph_layers if l.op in op_types and plan[l.name] == bits]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    with quiet():
        if recipe.scheme == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16
            from onnxruntime.transformers.onnx_model import OnnxModel

            keep = [l.node for l in graph_layers if plan[l.name] == 32]
            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True, node_block_list=keep)
            OnnxModel(model).topological_sort()  # the converter appends its input casts last
        else:
            int4 = select(("MatMul",), 4)
            if int4:
                # nodes_to_include only adds to the op-type filter (every MatMul); exclusion selects.
                others = [l.node for l in graph_layers if l.op == "MatMul" and plan[l.name] != 4]
                quantizer = MatMulNBitsQuantizer(
                    model, bits=4, block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                    accuracy_level=recipe.accuracy_level, nodes_to_exclude=others,
                )  # fmt: skip
                quantizer.process()
                model = quantizer.model.model
            int8_weight_only(model, select(("Conv", "ConvTranspose", "Gather"), 8))
            int8_matmul = select(("MatMul",), 8)
            if int8_matmul:
                with tempfile.TemporaryDirectory() as scratch:
                    source = Path(scratch) / "model.onnx"
                    onnx.save(model, str(source), save_as_external_data=large, location="model.onnx.data")
                    del model  # quantize_dynamic loads its own copy: two would not fit beside the 1B exporter
                    quantize_dynamic(
                        source, out, per_channel=True, weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=[l.node for l in int8_matmul], use_external_data_format=large,
                        extra_options={"MatMulConstBOnly": True},
                    )  # fmt: skip
                    model = onnx.load(str(out))
        _drop_unused_initializers(model)
        # onnx appends external data to an existing file: quantize_dynamic's own model.onnx.data would
        # stay in front of ours (the 1B int4 graph measured 1.16 GB instead of 0.58). The model is in memory.
        for stale in graph_files.onnx_files(out) if out.exists() else []:
            stale.unlink()
        onnx.save(model, str(out), save_as_external_data=large, location="model.onnx.data")
    for path in graph_files.onnx_files(out):
        path.chmod(0o644)  # onnx writes external data owner-only (0600): a shipped bundle must be readable
    onnx.checker.check_model(str(out), full_check=True)
    return out, graph_layers


def dequantized_weights(model_path: Path, graph_layers: list[Layer]) -> dict[str, np.ndarray]:
    """The weights the quantized graph computes with, as float32 in checkpoint orientation
    ([out, in] for linear layers), recovered from whichever format holds them."""
    model = onnx.load(str(model_path))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    attributes = {
        n.input[1]: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"
    }
    weights = {}
    for layer in graph_layers:
        w = layer.weight
        if w + "_quantized" in values:  # quantize_dynamic: uint8 [in, out], per-column scale and zero point
            q = values[w + "_quantized"].astype(np.float32) - values[w + "_zero_point"].astype(np.float32)
            weights[layer.name] = (q * values[w + "_scale"]).T
        elif (packed := next((n for n in (w + "_Q4", w + "_Q8") if n in values), None)) is not None:  # MatMulNBits
            a = attributes[packed]
            weights[layer.name] = _unpack_nbits(values[packed], values[w + "_scales"], values.get(w + "_zp"), a["bits"], a["K"], a["N"], a["block_size"])
        elif w + "_int8" in values:  # our DequantizeLinear
            q, scale = values[w + "_int8"].astype(np.float32), values[w + "_scale"]
            axis = 1 if layer.op == "ConvTranspose" else 0
            shape = [1] * q.ndim
            shape[axis] = -1
            weights[layer.name] = q * scale.reshape(shape)
        elif w in values:  # left in float (or float16)
            weights[layer.name] = values[w].astype(np.float32).T if layer.op == "MatMul" else values[w].astype(np.float32)
    return weights


def _unpack_nbits(packed, scales, zero_points, bits, k, n, block) -> np.ndarray:
    """MatMulNBits storage -> float [N, K]: per output row, blocks of `block` values, low bits first."""
    blocks = packed.shape[1]
    raw = packed.reshape(n, blocks, -1)
    if bits == 4:
        q = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, blocks, block)
    else:
        q = raw.reshape(n, blocks, block)
    if zero_points is None:
        zero = np.float32(2 ** (bits - 1))
    else:
        zp = zero_points.reshape(n, -1)
        zero = (np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks] if bits == 4 else zp[:, :blocks]).astype(np.float32)[..., None]
    values = (q.astype(np.float32) - zero) * scales.reshape(n, blocks)[..., None]
    return values.reshape(n, blocks * block)[:, :k]
