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
from .folder import TOKENIZER_ASSETS, TRAINED, copy_trained_checkpoint, write_folder
from .transformer import TransformerConfig
from .vqvae import VQConfig

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
    # the demo model's architecture (`reference/training.py` trains it; `shapes` ships the result)
    "shapes": Preset(
        TransformerConfig(
            num_attention_heads=4, attention_head_dim=32, num_layers=2, num_single_layers=4, axes_dims_rope=[8, 12, 12],
            joint_attention_dim=64, pooled_projection_dim=128, codebook_size=256, vocab_size=257,
        ),
        VQConfig(block_out_channels=[8, 16, 32, 64, 64], layers_per_block=1, latent_channels=8, num_vq_embeddings=256, norm_num_groups=1),
        {**_clip(64, 2, 2, 128), "intermediate_size": 256},
        "<|endoftext|>",
    ),
}  # fmt: skip


def build_random(preset: Preset, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    configs = {
        "transformer": preset.transformer,
        "vqvae": preset.vqvae,
        "text_encoder": CLIPTextConfig(**preset.text_encoder),
    }
    return {name: COMPONENTS[name].build(config).eval() for name, config in configs.items()}


def write_checkpoint_folder(modules: dict[str, torch.nn.Module], out: Path, pad_token: str, extras=None, overwrite: bool = False) -> Path:
    """Write `modules` (transformer, vqvae, text_encoder) as a checkpoint folder in the released layout.
    `extras(folder)` may add files (a training report) before the folder is moved into place."""

    def fill(staging: Path) -> None:
        for name, module in modules.items():
            save_component(module, staging, name)
        _write_json(staging / "model_index.json", {
            "_class_name": "Pipeline",
            "scheduler": ["src.scheduler", "Scheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "transformer": ["src.transformer", "Transformer2DModel"],
            "vqvae": ["diffusers", "VQModel"],
        })  # fmt: skip
        mask_id = modules["transformer"].config.mask_token_id
        _write_json(
            staging / "scheduler" / "scheduler_config.json",
            {"_class_name": "Scheduler", "mask_token_id": mask_id, "masking_schedule": "cosine"},
        )
        tokenizer = staging / "tokenizer"
        tokenizer.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tokenizer / name)
        special = {**SPECIAL_TOKENS, "pad_token": pad_token}
        _write_json(tokenizer / "special_tokens_map.json", special)
        _write_json(tokenizer / "tokenizer_config.json", {
            **special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
        })  # fmt: skip
        if extras is not None:
            extras(staging)

    return write_folder(out, fill, overwrite)


def write_checkpoint(preset_name: str, out: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a preset's checkpoint: the shipped trained weights for a trained preset (`shapes`), random
    weights from `seed` for the others."""
    if preset_name in TRAINED:
        return copy_trained_checkpoint(preset_name, out, overwrite)
    preset = PRESETS[preset_name]
    return write_checkpoint_folder(build_random(preset, seed), out, preset.pad_token, overwrite=overwrite)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
