"""What makes a folder a checkpoint (torch-free, so the command line checks it before importing torch)."""
from __future__ import annotations

from pathlib import Path

MODEL_INDEX = "model_index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the problem."""


def check_checkpoint_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {MODEL_INDEX})")
    return folder
