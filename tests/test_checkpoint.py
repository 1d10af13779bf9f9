"""Loading failures name the file and the problem; presets describe the released model exactly."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meissonic.reference.checkpoint import CheckpointError, load_component
from meissonic.reference.pipeline import MeissonicPipeline
from meissonic.reference.presets import PRESETS, write_checkpoint
from meissonic.reference.transformer import MeissonicTransformer
from meissonic.reference.vqvae import VQModel

SPEC = Path(__file__).parent / "data" / "spec"  # copied from ../shared/spec
TRANSFORMER_WEIGHTS = Path("transformer/diffusion_pytorch_model.safetensors")


@pytest.fixture
def checkpoint(golden_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(golden_checkpoint, copy)
    for path in copy.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return copy


def _load_error(folder: Path, component: str = "transformer") -> str:
    with pytest.raises(CheckpointError) as error:
        load_component(folder, component)
    return str(error.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        MeissonicPipeline.from_pretrained(tmp_path / "nowhere")


def test_missing_weight_file(checkpoint):
    (checkpoint / TRANSFORMER_WEIGHTS).unlink()
    message = _load_error(checkpoint)
    assert str(TRANSFORMER_WEIGHTS) in message and "not found" in message


def test_truncated_weight_file(checkpoint):
    path = checkpoint / TRANSFORMER_WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _load_error(checkpoint)
    assert str(TRANSFORMER_WEIGHTS) in message and ("truncated" in message or "unreadable" in message)


def test_garbage_weight_file(checkpoint):
    (checkpoint / "vqvae/diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    assert "unreadable safetensors" in _load_error(checkpoint, "vqvae")


def test_config_shapes_do_not_match_weights(checkpoint):
    config_path = checkpoint / "transformer/config.json"
    config = json.loads(config_path.read_text())
    config["codebook_size"] = 32
    config_path.write_text(json.dumps(config))
    message = _load_error(checkpoint)
    assert "mlm_layer.conv2.weight" in message and "[64, 64, 1, 1]" in message and "[32, 64, 1, 1]" in message
    assert "transformer/config.json" in message


def test_unknown_and_missing_keys(checkpoint):
    path = checkpoint / TRANSFORMER_WEIGHTS
    tensors = load_file(str(path))
    tensors["transformer_blocks.9.attn.to_q.weight"] = torch.zeros(1)
    save_file(tensors, str(path))
    assert "unknown key(s) transformer_blocks.9.attn.to_q.weight" in _load_error(checkpoint)
    del tensors["transformer_blocks.9.attn.to_q.weight"], tensors["embed.conv.weight"]
    save_file(tensors, str(path))
    assert "missing key(s) embed.conv.weight" in _load_error(checkpoint)


def test_unknown_config_key_and_bad_json(checkpoint):
    config_path = checkpoint / "vqvae/config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_fancy_attention": True}))
    assert "unknown key(s) ['use_fancy_attention']" in _load_error(checkpoint, "vqvae")
    config_path.write_text("{ not json")
    assert "vqvae/config.json: not valid JSON" in _load_error(checkpoint, "vqvae")


def test_cli_reports_one_line(checkpoint):
    (checkpoint / TRANSFORMER_WEIGHTS).unlink()
    run = subprocess.run(
        [sys.executable, "-m", "meissonic_export.cli", "reference", str(checkpoint), "a cat", "--steps", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "weight file not found" in lines[0], run.stderr


def test_1b_preset_matches_released_keys_and_parameter_count():
    with torch.device("meta"):
        transformer = MeissonicTransformer(PRESETS["meissonic-1b"].transformer)
        vqvae = VQModel(PRESETS["meissonic-1b"].vqvae)
    assert sum(p.numel() for p in transformer.parameters()) == 1_006_946_304
    expected = json.loads((SPEC / "transformer_keys_meissonic_1b.json").read_text())
    assert {k: list(v.shape) for k, v in transformer.state_dict().items()} == expected
    expected = json.loads((SPEC / "vqvae_keys_meissonic.json").read_text())
    assert {k: list(v.shape) for k, v in vqvae.state_dict().items()} == expected


def test_written_checkpoint_round_trips(tmp_path):
    folder = write_checkpoint("tiny", tmp_path / "tiny", seed=3)
    assert not (tmp_path / "tiny.partial").exists()
    pipe = MeissonicPipeline.from_pretrained(folder)
    result = pipe("a red apple", height=128, width=128, num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert result.tokens.shape == (1, 8, 8) and (result.tokens < pipe.transformer.config.codebook_size).all()
    assert result.pixels.shape == (1, 3, 128, 128)
    with pytest.raises(FileExistsError):
        write_checkpoint("tiny", folder)
