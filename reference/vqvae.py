"""The VQ-VAE (aMUSEd's VQGAN as diffusers' `VQModel`), in one readable file.

Parameter names follow diffusers so `vqvae/diffusion_pytorch_model.safetensors` loads with strict keys.
Only the configuration Meissonic uses is implemented (group norm, no mid-block attention, codebook
lookup); other settings are refused by `VQConfig.validate` rather than silently mis-modelled.

Shapes (f = 2^(blocks-1) = 16 in Meissonic):
    decode: token ids [B,H,W] -> pixels [B,3,fH,fW] (unclipped; the pipeline clips to [0,1])
    encode: pixels [B,3,fH,fW] in [0,1] -> token ids [B,H,W]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6


@dataclass
class VQConfig:
    """Field names and meaning follow the released `vqvae/config.json`."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 512, 768])
    layers_per_block: int = 2
    latent_channels: int = 64
    num_vq_embeddings: int = 8192
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    vq_embed_dim: int | None = None
    act_fn: str = "silu"
    norm_type: str = "group"
    mid_block_add_attention: bool = False
    lookup_from_codebook: bool = True
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = False

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        blocks = len(self.block_out_channels)
        unsupported = {
            "act_fn": (self.act_fn, "silu"),
            "norm_type": (self.norm_type, "group"),
            "mid_block_add_attention": (self.mid_block_add_attention, False),
            "lookup_from_codebook": (self.lookup_from_codebook, True),
            "down_block_types": (set(self.down_block_types or ["DownEncoderBlock2D"]), {"DownEncoderBlock2D"}),
            "up_block_types": (set(self.up_block_types or ["UpDecoderBlock2D"]), {"UpDecoderBlock2D"}),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported (Meissonic's VQ-VAE uses {supported!r})")
        for name, types in (("down_block_types", self.down_block_types), ("up_block_types", self.up_block_types)):
            if types is not None and len(types) != blocks:
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {blocks}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")

    def to_dict(self) -> dict:
        blocks = len(self.block_out_channels)
        return {
            "_class_name": "VQModel",
            **asdict(self),
            "down_block_types": self.down_block_types or ["DownEncoderBlock2D"] * blocks,
            "up_block_types": self.up_block_types or ["UpDecoderBlock2D"] * blocks,
        }


class GroupNorm(nn.Module):
    """nn.GroupNorm (same parameters), with its statistics reduced one axis at a time.

    Decoding 1024 px means groups of millions of values. onnxruntime's InstanceNormalization and
    ReduceMean kernels accumulate such sums naively in float32 and drift by ~5e-4 (torch: 5e-7);
    means of means over W, then H, then the group's channels (each <= 1024 values) stay within 1e-6
    of float64 in every backend. The groups are equal-sized, so the result is the same statistic.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:  # over the last three axes of [B,G,C/G,H,W]
        return x.mean(-1, keepdim=True).mean(-2, keepdim=True).mean(-3, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        grouped = x.reshape(b, self.groups, c // self.groups, h, w)
        centered = grouped - self._mean(grouped)
        normed = (centered * torch.rsqrt(self._mean(centered * centered) + GROUP_NORM_EPS)).reshape(b, c, h, w)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(channels, groups)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding right/bottom by one (diffusers Downsample2D, padding=0)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResnetStage(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D / UNetMidBlock2D without attention: resnets then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])
        self.resample = resample

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch, groups, last = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels) - 1
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResnetStage(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups, None if i == last else "down") for i in range(last + 1)
        )
        self.mid_block = ResnetStage(ch[-1], ch[-1], 2, groups)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch, groups, last = list(reversed(c.block_out_channels)), c.norm_num_groups, len(c.block_out_channels) - 1
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = ResnetStage(ch[0], ch[0], 2, groups)
        self.up_blocks = nn.ModuleList(
            ResnetStage(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, groups, None if i == last else "up") for i in range(last + 1)
        )
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Codebook(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,C,H,W] -> index of the nearest code [B,H,W].

        diffusers uses argmin(cdist(z, codebook)). argmin of |e|^2 - 2 z.e is the same choice (|z|^2 is
        constant per position and sqrt is monotone), needs no cdist (which neither ONNX nor Core ML has),
        and is what the exported graphs compute.
        """
        z = latents.permute(0, 2, 3, 1)  # [B,H,W,C]
        codes = self.embedding.weight  # [N,C]
        distance = (codes * codes).sum(-1) - 2 * z @ codes.t()  # [B,H,W,N]
        return distance.argmin(dim=-1)


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = Codebook(config.num_vq_embeddings, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """`VQModel.decode(ids, force_not_quantize=True)`: codebook lookup -> post_quant_conv -> decoder."""
        latents = self.quantize.embedding(tokens).permute(0, 3, 1, 2)  # [B,C,H,W]
        return self.decoder(self.post_quant_conv(latents))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels in [0,1] (no normalisation, as aMUSEd) -> token ids: encoder -> quant_conv -> nearest code."""
        return self.quantize.nearest(self.quant_conv(self.encoder(pixels)))
