"""Reading and writing Meissonic checkpoint folders (the diffusers layout) with strict keys.

Every failure names the file and the problem: a missing folder or file, a truncated or unreadable
safetensors file, a config that does not describe the weights (shape mismatch), missing or unknown keys.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig

from meissonic.runtimes.json_files import read_json_object

from .folder import CheckpointError, check_checkpoint_folder
from .text_encoder import TextEncoder
from .transformer import MeissonicTransformer, TransformerConfig
from .vqvae import VQConfig, VQModel


@dataclass(frozen=True)
class Component:
    folder: str
    weights: str
    read_config: Callable[[dict, Path], object]
    build: Callable[[object], nn.Module]
    weights_module: Callable[[nn.Module], nn.Module] = lambda module: module  # where the file's keys start
    rebuild_buffers: Callable[[nn.Module], None] = lambda module: None  # non-persistent buffers left on meta
    config_dict: Callable[[object], dict] = lambda config: config.to_dict()


def _dataclass_config(cls, ignored=()):
    names = {f.name for f in fields(cls)}

    def read(raw: dict, path: Path):
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in names and k not in ignored)
        if unknown:
            raise CheckpointError(f"{path}: unknown key(s) {unknown}; this tool knows {sorted(names)}")
        config = cls(**{k: v for k, v in raw.items() if k in names})
        try:
            config.validate()
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        return config

    return read


def _clip_config(raw: dict, path: Path) -> CLIPTextConfig:
    return CLIPTextConfig.from_dict(raw)


def _clip_position_ids(module: TextEncoder) -> None:
    embeddings = module.clip.text_model.embeddings
    positions = torch.arange(module.config.max_position_embeddings).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)


COMPONENTS = {
    "transformer": Component(
        "transformer", "diffusion_pytorch_model.safetensors", _dataclass_config(TransformerConfig), MeissonicTransformer
    ),
    "vqvae": Component(
        "vqvae",
        "diffusion_pytorch_model.safetensors",
        _dataclass_config(VQConfig, ignored=("shift_factor", "latents_mean", "latents_std")),
        VQModel,
    ),
    "text_encoder": Component(
        "text_encoder",
        "model.safetensors",
        _clip_config,
        TextEncoder,
        weights_module=lambda module: module.clip,
        rebuild_buffers=_clip_position_ids,
        config_dict=lambda config: config.to_dict(),
    ),
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return read_json_object(path, CheckpointError, "a config")


def read_config(folder: Path, name: str):
    component = COMPONENTS[name]
    path = check_checkpoint_folder(folder) / component.folder / "config.json"
    return component.read_config(_read_json(path), path)


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors header, without reading the tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types for corrupt headers)
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as error:  # noqa: BLE001 (a header that promises more bytes than the file holds)
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({error})") from None


def _list(keys, limit=8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_component(folder: Path, name: str, device: str = "cpu") -> nn.Module:
    """Build component `name` from `folder/<name>/config.json` and load its safetensors strictly (float32)."""
    component = COMPONENTS[name]
    config = read_config(folder, name)
    path = Path(folder) / component.folder / component.weights
    header = _read_header(path)
    with torch.device("meta"):
        module = component.build(config)
    target = component.weights_module(module)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    missing, unknown = expected.keys() - header.keys(), header.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {_list(missing)}")
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {_list(unknown)}")
    config_path = Path(folder) / component.folder / "config.json"
    for key, shape in expected.items():
        if header[key][0] != shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(header[key][0])} but {config_path} implies {list(shape)}"
            )
    tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in _load_tensors(path).items()}
    target.load_state_dict(tensors, strict=True, assign=True)
    component.rebuild_buffers(module)
    left_on_meta = [k for k, v in module.named_buffers() if v.is_meta]
    assert not left_on_meta, f"{name}: buffers {left_on_meta} were not rebuilt after loading"
    return module.eval()


def save_component(module: nn.Module, folder: Path, name: str) -> None:
    component = COMPONENTS[name]
    out = Path(folder) / component.folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(component.config_dict(module.config), indent=2) + "\n")
    state = {k: v.contiguous() for k, v in component.weights_module(module).state_dict().items()}
    save_file(state, str(out / component.weights), metadata={"format": "pt"})
