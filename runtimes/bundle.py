"""Reading and verifying an exported bundle (torch-free; the exporter writes what this reads).

A bundle is a folder with `manifest.json` (written last, so a folder without it is not a bundle), the
tokenizer files, the scheduler config and one folder per exported graph variant. The manifest lists the
sha256 of every other file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .json_files import read_json_object

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("model", "resolutions", "base_variants", "graphs", "files")
REQUIRED_MODEL_KEYS = ("mask_token_id", "vae_scale_factor", "defaults")


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class GraphEntry:
    name: str
    target: str  # "onnx", "ort" (the ONNX graphs as ORT-format models), "phone" (fixed-shape ORT graphs) or "coreml"
    variant: str  # "fp32", "fp16", "int8", "int4", ...
    path: str  # relative to the bundle
    raw: dict

    @property
    def resolutions(self) -> list[tuple[int, int]] | None:
        """Static-shape targets (Core ML, phone) hold one model per resolution; None means any validated size."""
        sizes = self.raw.get("resolution")
        return None if sizes is None else [tuple(sizes)]


@dataclass
class Manifest:
    root: Path
    raw: dict

    @property
    def model(self) -> dict:
        return self.raw["model"]

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.raw["resolutions"]]

    @property
    def graphs(self) -> list[GraphEntry]:
        return [GraphEntry(g["name"], g["target"], g["variant"], g["path"], g) for g in self.raw["graphs"]]

    def base_variant(self, target: str) -> str:
        """The precision every graph of `target` has (ONNX: fp32 or fp16; Core ML: fp16)."""
        return self.raw["base_variants"][target]

    def variants(self, target: str) -> list[str]:
        return sorted({g.variant for g in self.graphs if g.target == target})

    def find(self, name: str, target: str, variant: str, resolution: tuple[int, int] | None = None) -> GraphEntry:
        """The graph `name` in `variant`, falling back to the bundle's base precision for graphs the
        variant does not quantize (the VQ graphs, for example)."""
        for wanted in dict.fromkeys([variant, self.base_variant(target)]):
            for graph in self.graphs:
                wanted_size = resolution is None or graph.resolutions is None or resolution in graph.resolutions
                if (graph.name, graph.target, graph.variant) == (name, target, wanted) and wanted_size:
                    return graph
        raise BundleError(f"{self.root}: no {target} graph {name!r} for variant {variant!r}" + (f" at {resolution}" if resolution else ""))


def read_manifest(bundle: Path) -> Manifest:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: bundle folder not found")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a complete bundle (an interrupted export leaves none)")
    raw = read_json_object(path, BundleError, "a manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r} is not supported (this runtime reads {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise BundleError(f"{path}: incomplete manifest, missing {missing}")
    missing = [key for key in REQUIRED_MODEL_KEYS if key not in raw["model"]]
    if missing:
        raise BundleError(f"{path}: incomplete manifest, model lacks {missing}")
    return Manifest(bundle, raw)


def verify_files(manifest: Manifest, paths: list[str] | None = None) -> None:
    """Check that each listed file (default: all) exists with the size and sha256 the manifest records."""
    files = manifest.raw["files"]
    for relative in paths if paths is not None else files:
        if relative not in files:
            raise BundleError(f"{manifest.root / relative}: not listed in the manifest")
        path = manifest.root / relative
        expected = files[relative]
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        if path.stat().st_size != expected["bytes"]:
            raise BundleError(f"{path}: corrupt ({path.stat().st_size} bytes, manifest says {expected['bytes']})")
        if sha256_file(path) != expected["sha256"]:
            raise BundleError(f"{path}: corrupt (sha256 differs from the manifest)")
