"""The exported graphs: their public interface, declared once, and the torch modules that implement them.

Each `GraphSpec` names its inputs and outputs with dtypes and symbolic shapes (in the manner of optimum's
`OnnxConfig`), says how to make sample inputs for validation, and how each output is compared with the
reference. The ONNX and Core ML exporters, the validation routine, the manifest and the README table
all read these declarations; nothing else restates the interface.

Symbolic dims: `batch` images, `height` x `width` the token grid (16x smaller than the image).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from meissonic.reference.transformer import TEXT_POSITIONS
from meissonic.runtimes.bundle import GenerationDefaults, ModelFacts


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" or "int64" (token ids; Core ML uses int32)
    shape: tuple  # ints and symbolic sizes (`SymbolicDim` text) of batch/height/width and the model's constants
    kind: str = "float"  # how validation compares it: "float", "logits" (float + top-1), "image", "ids"
    doc: str = ""


@dataclass(frozen=True)
class SymbolicDim:
    """A symbolic size, `offset + factor * product(names) / divisor`, written as the specs write it:
    "batch", "2*batch", "F*height", "height*width", "77+height*width/4". Parsed once here; the ONNX dim
    names, the torch.export dims (`onnx_export`) and the phone graphs' fixed sizes (`ort_format`) read it."""

    names: tuple[str, ...]
    factor: int = 1
    divisor: int = 1
    offset: int = 0

    @classmethod
    def parse(cls, text: str) -> SymbolicDim:
        offset, _, rest = text.rpartition("+")
        product, _, divisor = rest.partition("/")
        factors = product.split("*")
        names = tuple(f for f in factors if not f.isdigit())
        factor = math.prod(int(f) for f in factors if f.isdigit())
        return cls(names, factor, int(divisor or 1), int(offset or 0))

    def resolve(self, constants: dict[str, int]) -> SymbolicDim | int:
        """The checkpoint's constants folded in: "F*height" -> 16*height; "J" -> 1024."""
        names = tuple(n for n in self.names if n not in constants)
        factor = self.factor * math.prod(constants[n] for n in self.names if n in constants)
        folded = SymbolicDim(names, factor, self.divisor, self.offset)
        return folded.value({}) if not names else folded

    def value(self, dims: dict[str, int]) -> int:
        """The size for concrete `dims` (batch, height, width)."""
        return self.offset + self.factor * math.prod(dims[n] for n in self.names) // self.divisor

    def __str__(self) -> str:
        product = "*".join(([str(self.factor)] if self.factor != 1 or not self.names else []) + list(self.names))
        return (f"{self.offset}+" if self.offset else "") + product + (f"/{self.divisor}" if self.divisor != 1 else "")


def resolve_shape(shape: tuple, constants: dict[str, int]) -> tuple:
    """Fill in a checkpoint's constants: ("batch", "J") -> ("batch", 1024); "F*height" -> "16*height"."""
    resolved = (SymbolicDim.parse(expr).resolve(constants) if isinstance(expr, str) else expr for expr in shape)
    return tuple(d if isinstance(d, int) else str(d) for d in resolved)


def model_facts(components: dict[str, nn.Module], pad_token_id: int | None = None, defaults: GenerationDefaults | None = None) -> ModelFacts:
    """The checkpoint's facts (the manifest's "model"), read off its loaded components."""
    t, text = components["transformer"].config, components["text_encoder"].config
    return ModelFacts(
        codebook_size=t.codebook_size, vocab_size=t.vocab_size, mask_token_id=t.mask_token_id,
        vae_scale_factor=components["vqvae"].config.scale_factor, joint_attention_dim=text.hidden_size,
        pooled_projection_dim=t.pooled_projection_dim, text_vocab_size=text.vocab_size, pad_token_id=pad_token_id,
        trained_text_ids=components["text_encoder"].trained_token_ids(), defaults=defaults or GenerationDefaults(),
    )  # fmt: skip


def transformer_facts(config) -> ModelFacts:
    """For the transformer alone (the benchmark, the sensitivity tool): the released VQ-VAE's scale
    factor and CLIP's vocabulary, which the transformer's graphs do not depend on."""
    return ModelFacts(
        codebook_size=config.codebook_size, vocab_size=config.vocab_size, mask_token_id=config.mask_token_id, vae_scale_factor=16,
        joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim, text_vocab_size=49408,
    )  # fmt: skip


@dataclass(frozen=True)
class GraphSpec:
    name: str
    component: str  # the checkpoint component the graph wraps
    module: type[nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    sample: Callable[[ModelFacts, dict, np.random.Generator], dict[str, np.ndarray]]
    # Per-position margin of an "ids" output: how far the reference is from choosing another id.
    # Positions closer than `tie_threshold` may legitimately differ between backends.
    tie_margin: Callable[[nn.Module, dict], np.ndarray] | None = None
    tie_threshold: float = 0.0
    # A float output whose error bounds how far the backend's choice boundaries can move (see validate.py).
    tie_evidence: str | None = None
    dims: tuple[str, ...] = field(default=("batch", "height", "width"))
    # Where the checkpoint component's weights sit in the module (the prefix of exported layer names),
    # and whether int8/int4 recipes apply (the conv-only VQ graphs keep the base precision).
    weights_prefix: str = ""
    quantizable: bool = False
    coreml_compute: str = "fp16"  # the Core ML package's compute precision ("fp16" keeps coreml_fp16's regions float32)

    def build(self, components: dict[str, nn.Module]) -> nn.Module:
        return self.module(components[self.component]).eval()

    def weights_module(self, module: nn.Module) -> nn.Module:
        """The part of a built graph module whose parameter names are the checkpoint's."""
        return module.get_submodule(self.weights_prefix.rstrip("."))

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def shapes(self, info: ModelFacts, grid: dict[str, int] | None = None) -> dict[str, tuple]:
        """Each tensor's shape with the checkpoint's constants filled in, and the token grid too where a
        graph is exported for one grid (`grid`: {"height": h, "width": w})."""
        constants = {**info.constants(), **(grid or {})}
        return {t.name: resolve_shape(t.shape, constants) for t in (*self.inputs, *self.outputs)}

    def interface(self, info: ModelFacts, dtype_map: dict[str, str] | None = None, grid: dict[str, int] | None = None) -> dict:
        """The JSON description written into the manifest (`dtype_map`: a target's own dtypes, e.g. int32)."""
        dtype_map, shapes = dtype_map or {}, self.shapes(info, grid)
        describe = lambda t: {"name": t.name, "dtype": dtype_map.get(t.dtype, t.dtype), "shape": list(shapes[t.name]), "doc": t.doc}
        return {"inputs": [describe(t) for t in self.inputs], "outputs": [describe(t) for t in self.outputs]}


# ---- modules ------------------------------------------------------------------------------------


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)


class TransformerGraph(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep):
        return self.transformer(tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep)


class DenoiseStepGraph(nn.Module):
    """One MaskGIT step up to the draw: transformer on [negative, positive] rows, guidance, softmax,
    categorical draw by inverse CDF. Returns ids and log-probabilities only; the logits stay inside."""

    def __init__(self, transformer, head_on_rows: bool = True):
        super().__init__()
        self.transformer = transformer
        self.head_on_rows = head_on_rows  # see guided_probabilities

    def with_head_as_conv(self) -> DenoiseStepGraph:
        """The same step (same transformer) with the codebook head as a 1x1 conv: the Core ML form."""
        return DenoiseStepGraph(self.transformer, head_on_rows=False).eval()

    def probabilities(self, tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep, guidance_scale):
        """-> probs [B, H*W, codebook] after guidance: the reference pipeline's, up to float32 rounding."""
        x, h, w = self.transformer.image_stream(torch.cat([tokens, tokens]), encoder_hidden_states, pooled_projections, micro_conds, timestep)
        return guided_probabilities(self.transformer, x, h, w, guidance_scale, tokens.shape[0], self.head_on_rows)

    def forward(self, tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep, guidance_scale, uniforms):
        probs = self.probabilities(tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep, guidance_scale)
        return draw(probs, uniforms)


def guided_probabilities(transformer, image_stream: torch.Tensor, h: int, w: int, guidance_scale: torch.Tensor, batch, head_on_rows: bool = True) -> torch.Tensor:
    """image stream [2B, h*w, D] of the [negative, positive] rows -> probs [B, H*W, codebook] after guidance.

    The official pipeline guides the logits: uncond + g (cond - uncond). The codebook head's last 1x1
    conv is linear (no bias), so guiding its D-wide input and running the conv once on the guided rows
    gives the same logits up to float32 rounding, at half the conv's cost (the largest single op of a
    step: 24-31% of it on the small preset) and without the codebook-wide guidance arithmetic.

    head_on_rows: run that conv on channels-last rows, a MatMul (ONNX: onnxruntime computes it in int8
    with dynamic activations, 1.8-2.2x the float32 conv, where a Conv only gets dequantized weights; the
    D-wide features are transposed instead of the codebook-wide logits). False keeps the 1x1 conv (Core
    ML: the Neural Engine's preferred form, and coremltools compresses the conv weight by its name)."""
    features = transformer.head_features(image_stream, h, w)
    # Slicing by the batch (not chunk(2)) keeps the batch symbolic when traced.
    uncond, cond = features[:batch], features[batch:]
    # The official pipeline skips guidance at scale <= 1 and uses the conditional logits alone.
    features = torch.where(guidance_scale > 1, uncond + guidance_scale * (cond - uncond), cond)
    if head_on_rows:
        return transformer.mlm_layer.conv2(features.flatten(2).transpose(1, 2)).softmax(dim=-1)
    return transformer.mlm_layer.conv2(features).flatten(2).transpose(1, 2).softmax(dim=-1)


def draw(probs: torch.Tensor, uniforms: torch.Tensor, inverse_cdf: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The categorical draw by inverse CDF -> sampled ids [B, H*W] and their log-probabilities.
    `inverse_cdf`: the rule that picks the ids; the graphs' blocked one unless told."""
    sampled = (inverse_cdf or categorical_by_blocks)(probs, uniforms)
    return sampled, torch.log(torch.gather(probs, -1, sampled[..., None])[..., 0].clamp(1e-20))


def categorical_by_blocks(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [B, L, K], uniforms [B, L] -> the reference's inverse-CDF ids [B, L]
    (`reference.scheduler.categorical_by_inverse_cdf`), in two levels: the block whose cumulative sum
    first exceeds the uniform, then the position inside that block. onnxruntime's CumSum scans the whole
    codebook serially (26-28 ms of a ~130 ms small-preset step at 32x32 tokens); here the scans are over
    K/b block sums and over the b probabilities of one block per position, the rest is one ReduceSum.
    Measured on a [1, 1024, 8192] draw, onnxruntime, 2 threads, interleaved: 14x-19x faster with b = 64
    (12-14 ms against 200-220 ms on a loaded machine); b = 128: 12-16x, 256: 6-8x.
    The CDF values differ from the flat scan's by float32 rounding only (measured <= 1.8e-7 against
    torch's cumsum, peaked and flat distributions, b = 16-128), inside the draw's 1e-6 tie window, so the
    ids are the reference's away from ties. Clamps as the flat rule does: rounding can leave the total
    below the uniform, and the last index is taken."""
    batch, length, codes = probs.shape
    block = _draw_block(codes)
    blocks = probs.reshape(batch, length, codes // block, block)
    block_cdf = blocks.sum(-1).cumsum(-1)  # [B, L, K/b]
    chosen = (block_cdf <= uniforms[..., None]).sum(-1).clamp(max=codes // block - 1)  # [B, L]
    # The cumulative sum before the chosen block: 0 for the first.
    before = torch.gather(block_cdf, -1, (chosen - 1).clamp(min=0)[..., None])[..., 0] * (chosen > 0)
    inside = torch.gather(blocks, 2, chosen[..., None, None].expand(batch, length, 1, block))[:, :, 0]
    within = ((inside.cumsum(-1) + before[..., None]) <= uniforms[..., None]).sum(-1)
    return (chosen * block + within).clamp(max=codes - 1)


def _draw_block(codes: int) -> int:
    """The block length of the two-level draw: the largest power of two <= sqrt(codes) that divides it
    (64 for 8192 codes, the measured optimum; 16 for the demo model's 256)."""
    block = 1
    while codes % (block * 2) == 0 and (block * 2) ** 2 <= codes:
        block *= 2
    return block


class VQDecoderGraph(nn.Module):
    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, tokens):
        return self.vqvae.decode(tokens).clamp(0, 1)


class VQEncoderGraph(nn.Module):
    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, image):
        return self.vqvae.encode(image)


# ---- sample inputs and tie margins ---------------------------------------------------------------


def _float32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _grid_tokens(info: ModelFacts, dims, rng, masked_fraction: float) -> np.ndarray:
    tokens = rng.integers(0, info.codebook_size, (dims["batch"], dims["height"], dims["width"]))
    return np.where(rng.random(tokens.shape) < masked_fraction, info.mask_token_id, tokens).astype(np.int64)


def _conditioning(info: ModelFacts, rows: int, dims, rng) -> dict[str, np.ndarray]:
    size = info.vae_scale_factor
    return {
        "encoder_hidden_states": _float32(rng.standard_normal((rows, TEXT_POSITIONS, info.joint_attention_dim))),
        "pooled_projections": _float32(rng.standard_normal((rows, info.pooled_projection_dim))),
        "micro_conds": _float32([[size * dims["width"], size * dims["height"], 0, 0, 6]] * rows),
        "timestep": _float32([7]),
    }


def _sample_text(info: ModelFacts, dims, rng) -> dict[str, np.ndarray]:
    """Prompt-shaped ids: start token, 1-60 word ids, end token, end-token padding."""
    bos, eos = info.text_vocab_size - 2, info.text_vocab_size - 1
    ids = np.full((dims["batch"], TEXT_POSITIONS), eos, dtype=np.int64)
    for row in ids:
        length = int(rng.integers(1, 60))
        row[0], row[1 : 1 + length] = bos, rng.integers(0, bos, length)
    return {"input_ids": ids}


def _sample_transformer(info, dims, rng):
    return {"tokens": _grid_tokens(info, dims, rng, 0.5), **_conditioning(info, dims["batch"], dims, rng)}


def _sample_denoise_step(info, dims, rng):
    batch, positions = dims["batch"], dims["height"] * dims["width"]
    return {
        "tokens": _grid_tokens(info, dims, rng, 0.5),
        **_conditioning(info, 2 * batch, dims, rng),
        "guidance_scale": _float32([9.0]),
        "uniforms": rng.random((batch, positions), dtype=np.float32),
    }


def _sample_vq_decoder(info, dims, rng):
    return {"tokens": _grid_tokens(info, dims, rng, 0.0)}


def _sample_vq_encoder(info, dims, rng):
    """Smooth random images (low-frequency noise upsampled), closer to photographs than white noise."""
    f, batch = info.vae_scale_factor, dims["batch"]
    coarse = rng.random((batch, 3, dims["height"], dims["width"]), dtype=np.float32)
    return {"image": np.ascontiguousarray(coarse.repeat(f, axis=2).repeat(f, axis=3))}


def _cdf_margin(module: DenoiseStepGraph, inputs: dict) -> np.ndarray:
    """Distance of each uniform to the nearest boundary of the reference CDF [B, H*W]."""
    names = ["tokens", "encoder_hidden_states", "pooled_projections", "micro_conds", "timestep", "guidance_scale"]
    with torch.no_grad():
        cdf = module.probabilities(*(torch.from_numpy(inputs[n]) for n in names)).cumsum(-1)
    return (cdf - torch.from_numpy(inputs["uniforms"])[..., None]).abs().min(-1).values.numpy()


def _code_margin(module: VQEncoderGraph, inputs: dict) -> np.ndarray:
    """Relative gap between the nearest and second-nearest code's squared distance [B, H, W]."""
    vq = module.vqvae
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(torch.from_numpy(inputs["image"]))).permute(0, 2, 3, 1)
        codes = vq.quantize.embedding.weight
        distance = (z * z).sum(-1, keepdim=True) + (codes * codes).sum(-1) - 2 * z @ codes.t()
        two = distance.topk(2, dim=-1, largest=False).values
    return ((two[..., 1] - two[..., 0]) / two[..., 0].abs().clamp(min=1e-12)).numpy()


# ---- the specs -----------------------------------------------------------------------------------

_TOKENS = TensorSpec("tokens", "int64", ("batch", "height", "width"), "ids", "current token ids; mask id = vocab_size - 1")
_CONDITIONING = (
    TensorSpec("encoder_hidden_states", "float32", ("rows", TEXT_POSITIONS, "J"), doc="penultimate CLIP hidden states"),
    TensorSpec("pooled_projections", "float32", ("rows", "P"), doc="CLIP text_embeds"),
    TensorSpec("micro_conds", "float32", ("rows", 5), doc="width, height, crop_x, crop_y, aesthetic score (6)"),
    TensorSpec("timestep", "float32", (1,), doc="step index N-1 .. 0, as the official pipeline passes it"),
)


def _rows(specs: tuple[TensorSpec, ...], rows: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.dtype, tuple(rows if d == "rows" else d for d in t.shape), t.kind, t.doc) for t in specs)


GRAPHS: dict[str, GraphSpec] = {
    spec.name: spec
    for spec in (
        GraphSpec(
            "text_encoder", "text_encoder", TextEncoderGraph,
            inputs=(TensorSpec("input_ids", "int64", ("batch", TEXT_POSITIONS), "ids", "CLIP token ids, padded to 77"),),
            outputs=(
                TensorSpec("text_embeds", "float32", ("batch", "P"), doc="projected pooled output"),
                TensorSpec("encoder_hidden_states", "float32", ("batch", TEXT_POSITIONS, "J"), doc="hidden_states[-2]"),
            ),
            description="CLIP text tower: token ids -> pooled embedding and penultimate hidden states",
            sample=_sample_text, dims=("batch",), weights_prefix="text_encoder.clip.", quantizable=True,
        ),
        GraphSpec(
            "transformer", "transformer", TransformerGraph,
            inputs=(_TOKENS, *_rows(_CONDITIONING, "batch")),
            outputs=(TensorSpec("logits", "float32", ("batch", "codebook", "height", "width"), "logits", "unnormalised scores over the codebook"),),
            description="the raw transformer forward (parity and debugging)",
            sample=_sample_transformer, weights_prefix="transformer.", quantizable=True,
        ),
        GraphSpec(
            "denoise_step", "transformer", DenoiseStepGraph,
            inputs=(
                _TOKENS,
                *_rows(_CONDITIONING, "2*batch"),
                TensorSpec("guidance_scale", "float32", (1,), doc="classifier-free guidance; <= 1 uses the positive rows alone"),
                TensorSpec("uniforms", "float32", ("batch", "height*width"), doc="one uniform per position for the categorical draw"),
            ),
            outputs=(
                TensorSpec("sampled_tokens", "int64", ("batch", "height*width"), "ids", "drawn ids (before keeping known tokens)"),
                TensorSpec("log_probs", "float32", ("batch", "height*width"), doc="log of the drawn id's probability, clamped at 1e-20"),
            ),
            description="one denoising step: transformer on [negative, positive] rows, guidance, softmax, inverse-CDF draw",
            sample=_sample_denoise_step, tie_margin=_cdf_margin, tie_threshold=1e-6, tie_evidence="log_probs",
            weights_prefix="transformer.", quantizable=True,
        ),
        GraphSpec(
            "vq_decoder", "vqvae", VQDecoderGraph,
            inputs=(TensorSpec("tokens", "int64", ("batch", "height", "width"), "ids", "final token ids (codebook entries)"),),
            outputs=(TensorSpec("image", "float32", ("batch", 3, "F*height", "F*width"), "image", "RGB in [0, 1]"),),
            description="VQ-VAE decoder: token ids -> image",
            sample=_sample_vq_decoder, weights_prefix="vqvae.",
        ),
        GraphSpec(
            "vq_encoder", "vqvae", VQEncoderGraph,
            inputs=(TensorSpec("image", "float32", ("batch", 3, "F*height", "F*width"), "image", "RGB in [0, 1]"),),
            outputs=(TensorSpec("tokens", "int64", ("batch", "height", "width"), "ids", "nearest codebook entry per 16x16 patch"),),
            description="VQ-VAE encoder and nearest-code lookup: image -> token ids",
            sample=_sample_vq_encoder, tie_margin=_code_margin, tie_threshold=1e-5, weights_prefix="vqvae.",
            # float32: a trained codebook packs codes closer than float16's rounding of the latents (the
            # shapes model's encoder in float16 chose another code for 7 and 12 of 256 cells, far from any
            # float32 tie); it runs once per edited image, so leaving the Neural Engine costs little
            coreml_compute="fp32",
        ),
    )
}  # fmt: skip


def interface_markdown() -> str:
    """The README's table of the public graph interface, generated from the declarations above."""
    shape = lambda t: "[" + ", ".join(str(d) for d in t.shape).replace("F*", "16*") + "]"
    dtype = lambda t: "int64 (Core ML: int32)" if t.dtype == "int64" else t.dtype
    lines = ["| graph | direction | name | dtype | shape | meaning |", "|---|---|---|---|---|---|"]
    for spec in GRAPHS.values():
        for direction, tensors in (("in", spec.inputs), ("out", spec.outputs)):
            for t in tensors:
                lines.append(f"| `{spec.name}` | {direction} | `{t.name}` | {dtype(t)} | {shape(t)} | {t.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(interface_markdown())
