"""What makes a folder a checkpoint, and how one is written atomically; torch-free, so the command line
checks a folder, and copies the shipped trained checkpoint, without importing torch (seconds of a first run)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MODEL_INDEX = "model_index.json"
OWNER_MARKER = ".written-by-meissonic-export"
ASSETS = Path(__file__).parent / "assets"
TOKENIZER_ASSETS = ASSETS / "tokenizer"  # the one shipped copy of CLIP's BPE files
TRAINED = {"shapes": ASSETS / "shapes"}  # presets whose checkpoint ships trained (without the BPE files)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the problem."""


def check_checkpoint_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {MODEL_INDEX})")
    return folder


def copy_trained_checkpoint(preset_name: str, out: Path, overwrite: bool = False) -> Path:
    """Write the shipped trained checkpoint of `preset_name` to `out`, with the BPE files added."""
    source = TRAINED[preset_name]

    def copy(staging: Path) -> None:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, staging / "tokenizer" / name)

    return write_folder(out, copy, overwrite)


def write_folder(out: Path, fill, overwrite: bool = False) -> Path:
    """Stage a folder beside `out` with `fill(staging)`, mark it as this tool's, and rename it into
    place: nothing half-written is ever at `out`, and an interrupted write leaves no staging folder.
    `overwrite` replaces only a folder that carries the marker (one this tool wrote)."""
    out = Path(out)
    if out.exists() and not (overwrite and (out / OWNER_MARKER).is_file()):
        raise FileExistsError(f"{out}: already exists" + (" and was not written by meissonic-export; not replacing it" if overwrite else "; choose another folder or pass --overwrite"))
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        fill(staging)
        (staging / OWNER_MARKER).write_text("a checkpoint folder written by meissonic-export\n")
        if out.exists():
            out.rename(trash)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    return out
