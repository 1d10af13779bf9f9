"""Configuration presets and the random-weight checkpoint writer.

`meissonic-1b` is the released configuration; `tiny` matches the golden checkpoint's sizes (fast tests,
the embedded demo); `small` is a mid-size model for scale tests and benchmarks.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig

from .checkpoint import COMPONENTS, save_component
from .transformer import TransformerConfig
from .vqvae import VQConfig

TOKENIZER_ASSETS = Path(__file__).parent / "assets" / "tokenizer"
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@dataclass(frozen=True)
class Preset:
    transformer: TransformerConfig
    vqvae: VQConfig
    text_encoder: dict  # CLIPTextConfig fields
    pad_token: str  # "<|endoftext|>" or "!" (id 0): both conventions exist among CLIP tokenizers


def _clip(hidden: int, layers: int, heads: int, projection: int) -> dict:
    return {
        "vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "projection_dim": projection, "max_position_embeddings": 77, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }  # fmt: skip


PRESETS = {
    "tiny": Preset(
        TransformerConfig(
            num_attention_heads=2, attention_head_dim=32, num_layers=2, num_single_layers=2, axes_dims_rope=[8, 12, 12],
            joint_attention_dim=32, pooled_projection_dim=64, codebook_size=64, vocab_size=72,
        ),
        VQConfig(block_out_channels=[32] * 5, layers_per_block=1, latent_channels=16, num_vq_embeddings=64, norm_num_groups=8),
        {**_clip(32, 2, 2, 64), "intermediate_size": 64},
        "<|endoftext|>",
    ),
    "small": Preset(
        TransformerConfig(
            num_attention_heads=4, attention_head_dim=64, num_layers=2, num_single_layers=4, axes_dims_rope=[16, 24, 24],
            joint_attention_dim=256, pooled_projection_dim=256, codebook_size=8192, vocab_size=8256,
        ),
        VQConfig(block_out_channels=[32, 64, 64, 128, 128], layers_per_block=1, latent_channels=64, norm_num_groups=32),
        _clip(256, 4, 4, 256),
        "!",
    ),
    "meissonic-1b": Preset(TransformerConfig(), VQConfig(), _clip(1024, 24, 16, 1024), "!"),
}  # fmt: skip


def build_random(preset: Preset, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    configs = {
        "transformer": preset.transformer,
        "vqvae": preset.vqvae,
        "text_encoder": CLIPTextConfig(**preset.text_encoder),
    }
    return {name: COMPONENTS[name].build(config).eval() for name, config in configs.items()}


def write_checkpoint(preset_name: str, out: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of a preset in the released folder layout (atomically)."""
    preset = PRESETS[preset_name]
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose another folder or remove it")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, module in build_random(preset, seed).items():
            save_component(module, staging, name)
        _write_json(staging / "model_index.json", {
            "_class_name": "Pipeline",
            "scheduler": ["src.scheduler", "Scheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "transformer": ["src.transformer", "Transformer2DModel"],
            "vqvae": ["diffusers", "VQModel"],
        })  # fmt: skip
        _write_json(
            staging / "scheduler" / "scheduler_config.json",
            {"_class_name": "Scheduler", "mask_token_id": preset.transformer.mask_token_id, "masking_schedule": "cosine"},
        )
        tokenizer = staging / "tokenizer"
        tokenizer.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tokenizer / name)
        special = {**SPECIAL_TOKENS, "pad_token": preset.pad_token}
        _write_json(tokenizer / "special_tokens_map.json", special)
        _write_json(tokenizer / "tokenizer_config.json", {
            **special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
        })  # fmt: skip
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
