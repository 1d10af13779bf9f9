"""The Meissonic masked-image-modeling transformer, in one readable file.

Re-implements `Transformer2DModel` from the official Meissonic code (viiika/Meissonic `src/transformer.py`,
built from diffusers' Flux blocks and aMUSEd's UVit embeddings) with the same parameter names, so a
released `transformer/diffusion_pytorch_model.safetensors` loads with strict keys.

Written to be traced: no numpy, no complex numbers, no data-dependent Python control flow. The rotary
table is computed with torch from the token grid size, so one traced graph serves every even grid.

Shapes (B batch, H x W token grid, h x w = H/2 x W/2 compressed grid, S = 77 + h*w, D inner dim):
    tokens [B,H,W] int -> logits [B, codebook_size, H, W]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

TEXT_POSITIONS = 77  # CLIP context length; the text stream always has 77 rows
MICRO_COND_DIM = 256  # sinusoid width of each micro-condition (aMUSEd's micro_cond_encode_dim)
NORM_EPS = 1e-6


@dataclass
class TransformerConfig:
    """Field names and meaning follow the released `transformer/config.json`."""

    num_attention_heads: int = 8
    attention_head_dim: int = 128
    num_layers: int = 14  # dual-stream blocks
    num_single_layers: int = 28  # single-stream blocks
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 56, 56])
    joint_attention_dim: int = 1024  # width J of the text hidden states
    pooled_projection_dim: int = 1024  # width P of the pooled text embedding
    codebook_size: int = 8192
    vocab_size: int = 8256  # codebook + special tokens; the last id is the mask token
    downsample: bool = True
    upsample: bool = True
    in_channels: int = 64  # unused by the model (the token embedding width is D); kept for round-trips
    patch_size: int = 1
    guidance_embeds: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must all be even")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=true is not part of Meissonic and is not supported")
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size} is not supported (Meissonic uses 1)")
        if self.downsample != self.upsample:
            raise ValueError("downsample and upsample must be equal, or the output grid differs from the input grid")
        if self.codebook_size >= self.vocab_size:
            raise ValueError(f"codebook_size {self.codebook_size} must be smaller than vocab_size {self.vocab_size}")

    def to_dict(self) -> dict:
        return {"_class_name": "Transformer2DModel", **asdict(self)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = NORM_EPS) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return x if weight is None else x * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight)


class ChannelRMSNorm(RMSNorm):
    """RMSNorm over the channel axis of a [B,C,H,W] map (the official code permutes to channels-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.permute(0, 2, 3, 1), self.weight).permute(0, 3, 1, 2)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def sinusoid(x: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0): [N] -> [N, dim], cos first."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    angles = x.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_2(silu(linear_1(x))): diffusers' TimestepEmbedding / PixArtAlphaTextProjection."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(dim, dim)

    def forward(self, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(sinusoid(timestep, 256)) + self.text_embedder(cond)


def position_ids(height: int, width: int, device=None) -> torch.Tensor:
    """[77 + h*w, 3] float64: 77 text rows of zeros, then (0, row, col) per compressed image position, row-major.

    The official pipeline builds these outside the model and gets them right only at 1024x1024; here
    they follow from the grid, so every even grid works. `height`/`width` may be symbolic when traced.
    """
    rows = torch.arange(height, device=device, dtype=torch.float64)[:, None].expand(-1, width)
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, :].expand(height, -1)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return torch.cat([torch.zeros(TEXT_POSITIONS, 3, device=device, dtype=torch.float64), image], dim=0)


def rotary_tables(ids: torch.Tensor, axes_dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim] for position ids [S, n_axes], interleaved as diffusers' FluxPosEmbed.

    FluxPosEmbed computes the angles in float64 and casts the tables to float32; so do we, which keeps
    agreement with the official model at large grids.
    """
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=ids.device, dtype=torch.float64) / dim))
        angles = ids[:, axis : axis + 1] * freqs[None, :]
        cos.append(torch.cos(angles).repeat_interleave(2, dim=1))
        sin.append(torch.sin(angles).repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,heads,S,head_dim]; rotates each interleaved pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Joint attention with per-head RMSNorm on q and k. With `context=True` it also owns the text projections."""

    def __init__(self, dim: int, heads: int, context: bool):
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B,S,D] -> [B,heads,S,head_dim]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        return norm_q(self._heads(to_q(x))), norm_k(self._heads(to_k(x))), self._heads(to_v(x))

    def forward(self, x, rotary, context=None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:  # text first along the sequence
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B,S,D]
        if context is None:
            return out
        text_len = context.shape[1]
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class AdaNorm(nn.Module):
    """`linear(silu(temb))` -> `chunks` modulation vectors of width D (AdaLayerNormZero and its Single variant)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.chunks = chunks

    def forward(self, temb: torch.Tensor) -> list[torch.Tensor]:
        return [c[:, None, :] for c in self.linear(F.silu(temb)).chunk(self.chunks, dim=1)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale) + shift


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # net.1 is dropout

    def forward(self, x):
        return self.net[2](self.net[0](x))


class DualStreamBlock(nn.Module):
    """Flux's MM-DiT block: separate weights for the image and text streams, joint attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, context=True)
        self.ff, self.ff_context = FeedForward(dim), FeedForward(dim)

    def forward(self, x, context, temb, rotary):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        attn, context_attn = self.attn(modulate(x, shift_msa, scale_msa), rotary, modulate(context, c_shift_msa, c_scale_msa))
        x = x + gate_msa * attn
        x = x + gate_mlp * self.ff(modulate(x, shift_mlp, scale_mlp))
        context = context + c_gate_msa * context_attn
        context = context + c_gate_mlp * self.ff_context(modulate(context, c_shift_mlp, c_scale_mlp))
        return x, context


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: attention and MLP in parallel over concat(text, image)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)
        self.attn = Attention(dim, heads, context=False)

    def forward(self, x, temb, rotary):
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        mixed = torch.cat([self.attn(h, rotary), gelu_tanh(self.proj_mlp(h))], dim=2)
        return x + gate * self.proj_out(mixed)


class TokenEmbed(nn.Module):
    """aMUSEd's UVit2DConvEmbed: token embedding -> RMSNorm -> channels-first -> 1x1 conv."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, tokens):  # [B,H,W] -> [B,D,H,W]
        return self.conv(self.layer_norm(self.embeddings(tokens)).permute(0, 3, 1, 2))


class Resample(nn.Module):
    """diffusers' Downsample2D / Upsample2D with norm_type='rms_norm', kernel 2, stride 2, no bias.

    Downsample2D pads right/bottom by one before the conv; on even grids the padding never reaches a
    window, so it is omitted.
    """

    def __init__(self, dim: int, up: bool):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x):
        return self.conv(self.norm(x))


class ResampleBlock(nn.Module):
    """Holds the resampler under the official attribute name (`down_block.downsample`, `up_block.upsample`)."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        setattr(self, "upsample" if up else "downsample", Resample(dim, up))
        self.up = up

    def forward(self, x):
        return (self.upsample if self.up else self.downsample)(x)


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv (the checkpoint's [out, in, 1, 1] weight) that also takes channels-last rows [B, N, in]
    -> [B, N, out], as the linear layer it is. The reference runs it on maps, as the official code does;
    the exported step graph runs it on rows: a MatMul, which onnxruntime computes in int8 with dynamic
    activations (measured 1.8-2.2x the float32 conv for the codebook head), where a Conv only gets its
    weights dequantized (0.6-0.85x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return F.linear(x, self.weight.flatten(1))
        return super().forward(x)


class MlmHead(nn.Module):
    """aMUSEd's ConvMlmLayer: 1x1 conv -> channel RMSNorm -> 1x1 conv to codebook logits, run by
    `MeissonicTransformer.head` in two parts (`head_features`, then `conv2`)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = ChannelRMSNorm(dim)
        self.conv2 = PointwiseConv(dim, codebook_size, kernel_size=1, bias=False)


class MeissonicTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim, heads = config.inner_dim, config.num_attention_heads
        self.time_text_embed = TimeTextEmbed(dim)
        self.cond_embed = MLPEmbedder(config.pooled_projection_dim + 5 * MICRO_COND_DIM, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.encoder_proj_layer_norm = RMSNorm(dim)
        self.embed = TokenEmbed(config.vocab_size, dim)
        if config.downsample:
            self.down_block = ResampleBlock(dim, up=False)
            self.up_block = ResampleBlock(dim, up=True)
        self.project_to_hidden_norm = RMSNorm(dim)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(dim, heads) for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(dim, heads) for _ in range(config.num_single_layers))
        self.project_from_hidden_norm = RMSNorm(dim)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.mlm_layer = MlmHead(dim, config.codebook_size)

    def forward(
        self,
        tokens: torch.Tensor,  # [B,H,W] int token ids (mask id = vocab_size - 1)
        encoder_hidden_states: torch.Tensor,  # [B,77,J] penultimate CLIP hidden states
        pooled_projections: torch.Tensor,  # [B,P] CLIP text_embeds
        micro_conds: torch.Tensor,  # [B,5] width, height, crop_x, crop_y, aesthetic score
        timestep: torch.Tensor,  # [1] or [B]: the step index N-1 .. 0, scaled by 1000 here as in the official model
    ) -> torch.Tensor:  # [B, codebook_size, H, W]
        x, h, w = self.image_stream(tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep)
        return self.head(x, h, w)

    def image_stream(self, tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep):
        """-> the image stream after the last block [B,h*w,D] and the compressed grid (h, w)."""
        x, context, temb, (h, w) = self.embed_inputs(tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep)
        rotary = self.rotary(h, w, x.device)
        for block in self.transformer_blocks:
            x, context = block(x, context, temb, rotary)
        x = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rotary)
        return x[:, TEXT_POSITIONS:], h, w

    # forward in three parts, so a model cut between blocks (the Core ML chunks) runs the same code

    def embed_inputs(self, tokens, encoder_hidden_states, pooled_projections, micro_conds, timestep):
        """-> image stream [B,h*w,D], text stream [B,77,D], conditioning vector temb [B,D], grid (h, w)."""
        batch = tokens.shape[0]
        micro = sinusoid(micro_conds.flatten(), MICRO_COND_DIM).reshape(batch, 5 * MICRO_COND_DIM)
        cond = self.cond_embed(torch.cat([pooled_projections, micro], dim=1))
        temb = self.time_text_embed(timestep.float() * 1000, cond)  # [B,D]

        context = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))  # [B,77,D]
        x = self.embed(tokens)  # [B,D,H,W]
        if self.config.downsample:
            x = self.down_block(x)  # [B,D,h,w]
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [B,h*w,D] row-major
        return self.project_to_hidden(self.project_to_hidden_norm(x)), context, temb, (h, w)

    def rotary(self, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [77 + h*w, head_dim] for the compressed grid h x w."""
        return rotary_tables(position_ids(h, w, device=device), self.config.axes_dims_rope)

    def head(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """image stream [B,h*w,D] -> logits [B, codebook_size, H, W]."""
        return self.mlm_layer.conv2(self.head_features(x, h, w))

    def head_features(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """image stream [B,h*w,D] -> the input of the codebook head's last 1x1 conv [B, D, H, W]. That conv
        has no bias, so it is linear: guidance may mix these D-wide features instead of the logits."""
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        if self.config.downsample:
            x = self.up_block(x)
        return self.mlm_layer.layer_norm(self.mlm_layer.conv1(x))
