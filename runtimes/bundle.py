"""Reading and verifying an exported bundle (torch-free; the exporter writes what this reads).

A bundle is a folder with `manifest.json` (written last, so a folder without it is not a bundle), the
tokenizer files, the scheduler config and one folder per exported graph variant. The manifest lists the
sha256 of every other file.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .json_files import read_json_object

FORMAT_VERSION = 3  # 2: the "model" section is `ModelFacts` (adds text_vocab_size); 3: adds trained_text_ids
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("model", "resolutions", "base_variants", "graphs", "files")


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own sampling settings: Meissonic's official ones, unless the checkpoint's
    `generation_config.json` says otherwise (the shapes model's). The runtime uses them for every
    setting a caller does not give."""

    steps: int = 48
    guidance_scale: float = 9.0
    temperature: tuple[float, float] = (2.0, 0.0)
    aesthetic_score: float = 6.0
    resolution: tuple[int, int] | None = None  # the model's size; None: the bundle's largest
    evaluation: str | None = None  # "shapes": the model draws the shapes world (meissonic_export.evaluate)

    @classmethod
    def from_json(cls, raw: dict) -> GenerationDefaults:
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown generation setting(s) {sorted(unknown)}")
        tuples = {key: tuple(raw[key]) for key in ("temperature", "resolution") if raw.get(key) is not None}
        return cls(**{**raw, **tuples})

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None}

    def sampling(self, steps: int | None, guidance_scale: float | None, temperature) -> tuple[int, float, tuple[float, float]]:
        """(steps, guidance scale, temperature): a caller's own where given, else these."""
        return (
            self.steps if steps is None else steps,
            self.guidance_scale if guidance_scale is None else guidance_scale,
            self.temperature if temperature is None else tuple(temperature),
        )


@dataclass(frozen=True)
class ModelFacts:
    """What every stage knows about the model, in one type: the exporter reads it off the checkpoint
    (`meissonic_export.graphs.model_facts`), the manifest stores it as "model", and the graphs' sample
    inputs, the sampler, the evaluation and the reports read it back."""

    codebook_size: int
    vocab_size: int  # the transformer's token ids: the codebook and the mask id (vocab_size - 1)
    mask_token_id: int
    vae_scale_factor: int  # pixels per token side
    joint_attention_dim: int  # text embedding width
    pooled_projection_dim: int
    text_vocab_size: int  # CLIP's; its last two ids are start and end of text
    pad_token_id: int | None = None  # the tokenizer's (None where no tokenizer was read: benchmarks)
    text_positions: int = 77
    masking_schedule: str = "cosine"
    # Where some text ids' embeddings are all zero (never trained: the shapes model zeroes the words its
    # grammar lacks), the others; None where every id is trained. The runtime warns of prompt words outside.
    trained_text_ids: tuple[int, ...] | None = None
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    def constants(self) -> dict[str, int]:
        """The names symbolic graph shapes use (`meissonic_export.graphs.TensorSpec`)."""
        return {"J": self.joint_attention_dim, "P": self.pooled_projection_dim, "codebook": self.codebook_size, "F": self.vae_scale_factor}

    @classmethod
    def from_json(cls, raw: dict) -> ModelFacts:
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing, unknown = [k for k in required if k not in raw], set(raw) - names
        if missing or unknown:
            raise ValueError(f"model section: missing {missing}, unknown {sorted(unknown)}")
        trained = raw.get("trained_text_ids")
        return cls(**{**raw, "trained_text_ids": None if trained is None else tuple(trained),
                      "defaults": GenerationDefaults.from_json(raw.get("defaults", {}))})  # fmt: skip

    def to_json(self) -> dict:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "defaults"}, "defaults": self.defaults.to_json()}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a graph, as the manifest describes it (README: the graph table)."""

    name: str
    dtype: str
    shape: tuple  # ints, or symbolic sizes: "batch", "2*batch", "height*width", ...
    doc: str = ""

    @classmethod
    def from_json(cls, raw: dict) -> TensorInfo:
        return cls(raw["name"], raw["dtype"], tuple(raw["shape"]), raw.get("doc", ""))


@dataclass(frozen=True)
class GraphPart:
    """One stored model of a graph: the whole graph, or one of the sequential Core ML chunks of a large
    `denoise_step`; `function` names the resolution's function in a multifunction package."""

    path: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    function: str | None = None


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph in one target and variant. The fields are what the runtime reads; `raw` is the
    whole entry, reports included (parity figures, budget, quantization, mobile usability)."""

    name: str
    target: str  # "onnx", "ort" (the ONNX graphs as ORT-format models), "phone" (fixed-shape ORT graphs) or "coreml"
    variant: str  # "fp32", "fp16", "int8", "int4", ...
    path: str  # relative to the bundle
    files: tuple[str, ...]  # every file the graph needs, relative to the bundle
    bytes: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    resolution: tuple[int, int] | None  # static-shape targets (Core ML, phone): the one size this model takes
    static_shapes: dict[str, int] | None  # their symbolic sizes' values ("batch", "height", "width")
    parts: tuple[GraphPart, ...]
    eos_token_id: int | None  # a phone text encoder that pools in the app: the token whose position it pools
    raw: dict

    @classmethod
    def from_json(cls, raw: dict) -> GraphEntry:
        inputs = tuple(TensorInfo.from_json(t) for t in raw["inputs"])
        outputs = tuple(TensorInfo.from_json(t) for t in raw["outputs"])
        chunks = raw.get("chunks") or [{"path": raw["path"], "inputs": [t.name for t in inputs], "outputs": [t.name for t in outputs], "function": raw.get("function")}]
        parts = tuple(GraphPart(c["path"], tuple(c["inputs"]), tuple(c["outputs"]), c.get("function")) for c in chunks)
        resolution = tuple(raw["resolution"]) if "resolution" in raw else None
        return cls(
            raw["name"], raw["target"], raw["variant"], raw["path"], tuple(raw["files"]), raw["bytes"], inputs, outputs,
            resolution, raw.get("static_shapes"), parts, raw.get("eos_token_id"), raw,
        )  # fmt: skip

    @property
    def resolutions(self) -> list[tuple[int, int]] | None:
        """Static-shape targets (Core ML, phone) hold one model per resolution; None means any validated size."""
        return None if self.resolution is None else [self.resolution]


@dataclass
class Manifest:
    root: Path
    raw: dict
    model: ModelFacts  # raw["model"], typed
    graphs: list[GraphEntry]  # raw["graphs"], typed

    @classmethod
    def from_json(cls, root: Path, raw: dict) -> Manifest:
        """Raises KeyError, TypeError or ValueError on a malformed section (`read_manifest` says which file)."""
        return cls(Path(root), raw, ModelFacts.from_json(raw["model"]), [GraphEntry.from_json(g) for g in raw["graphs"]])

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.raw["resolutions"]]

    @property
    def base_variants(self) -> dict[str, str]:
        """target -> the precision every graph of that target has (ONNX: fp32 or fp16; Core ML: fp16)."""
        return self.raw["base_variants"]

    @property
    def files(self) -> dict[str, dict]:
        """path relative to the bundle -> {"sha256", "bytes"}, for every file but the manifest."""
        return self.raw["files"]

    @property
    def source(self) -> dict:
        """The checkpoint exported: its path, component configs and weights' sha256."""
        return self.raw["source"]

    def base_variant(self, target: str) -> str:
        return self.base_variants[target]

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
        raise BundleError(f"{path}: bundle format version {version!r} is not supported (this runtime reads {FORMAT_VERSION}; export the checkpoint again with this meissonic-export)")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise BundleError(f"{path}: incomplete manifest, missing {missing}")
    try:
        return Manifest.from_json(bundle, raw)
    except KeyError as error:
        raise BundleError(f"{path}: bad manifest: a graph lacks {error}") from None
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: bad manifest: {error}") from None


def verify_files(manifest: Manifest, paths: list[str] | None = None) -> None:
    """Check that each listed file (default: all) exists with the size and sha256 the manifest records."""
    files = manifest.files
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
