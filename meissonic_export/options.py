"""What an export may be asked for, and everything refused before any work starts (torch-free).

The command line checks its arguments here before it imports torch, so a mistyped option is refused
at once, and the Python API calls the same checks.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from meissonic.quantize.variants import BASE_PRECISIONS, VARIANTS, quantized_variants
from meissonic.reference.folder import CheckpointError
from meissonic.reference.folder import check_checkpoint_folder as check_folder
from meissonic.runtimes.bundle import MANIFEST, GenerationDefaults, read_manifest
from meissonic.runtimes.json_files import read_json_object
from meissonic.runtimes.limits import MAX_SIDE

# ort: the ONNX graphs also as ORT-format models for apps (the .onnx files are written too: they are the source)
TARGETS = ("onnx", "ort", "coreml")
DTYPES = BASE_PRECISIONS["onnx"]
ONNX_VARIANTS = ("fp16", *quantized_variants("onnx"))  # fp16 is a variant of an fp32 bundle
COREML_VARIANTS = quantized_variants("coreml")  # Core ML's base precision is fp16
QUANTIZE = tuple(dict.fromkeys(ONNX_VARIANTS + COREML_VARIANTS))
GRAPH_NAMES = ("text_encoder", "transformer", "denoise_step", "vq_decoder", "vq_encoder")  # graphs.GRAPHS, in order (a test checks)
# What the runtime runs; the raw transformer forward (parity and debugging) is exported when asked for.
DEFAULT_GRAPHS = ("text_encoder", "denoise_step", "vq_decoder", "vq_encoder")
COREML_GRAPHS = ("text_encoder", "denoise_step", "vq_decoder", "vq_encoder")  # no raw transformer on devices
PRESET_NAMES = ("meissonic-1b", "shapes", "small", "tiny")  # reference.presets.PRESETS (a test checks)
DEFAULT_RESOLUTIONS = ((512, 512), (1024, 1024))  # for checkpoints without a generation_config.json
GENERATION_CONFIG = "generation_config.json"  # a checkpoint's own sampling settings (the shapes model has one)


class ExportError(Exception):
    """An export that cannot start or did not validate; the message says why."""


@dataclass
class ExportOptions:
    targets: tuple[str, ...] = ("onnx",)
    resolutions: tuple[tuple[int, int], ...] | None = None  # (width, height) in pixels; None: the checkpoint's own
    dtype: str = "fp32"
    graphs: tuple[str, ...] = DEFAULT_GRAPHS
    seed: int = 0  # of the validation inputs
    overwrite: bool = False
    keep_failed: bool = False  # keep a failed export's files in BUNDLE.failed/ for inspection
    quantize: tuple[str, ...] = ()  # extra variants: fp16, int8, int4
    recipes: tuple[str, ...] = ()  # recipe names or JSON files replacing the built-in recipe of their scheme
    block_size: int | None = None  # overrides the int4 recipes' block size
    quality_steps: int = 8  # steps of the full sampling run that measures each quantized variant
    chunks: int = 1  # Core ML: split the denoise step into this many packages
    jobs: int | None = None  # graphs exported at a time; None: 2 for checkpoints under 1 GB on 2+ cores, else 1
    progress: bool = True

    @property
    def variants(self) -> list[str]:
        """ONNX variants: the base precision, then the quantized ones."""
        return list(dict.fromkeys([self.dtype, *(q for q in self.quantize if q in ONNX_VARIANTS)]))

    @property
    def coreml_variants(self) -> list[str]:
        return ["fp16", *(q for q in self.quantize if q in COREML_VARIANTS)]

    def load_recipes(self) -> dict:
        """variant -> Recipe for every variant but the base precision."""
        from meissonic.quantize.recipe import Recipe

        schemes = {VARIANTS[q].scheme for q in self.quantize if q != self.dtype}
        recipes = {scheme: Recipe.load(scheme, self.block_size) for scheme in schemes}
        for name in self.recipes:
            recipe = Recipe.load(name, self.block_size)
            if recipe.scheme not in recipes:
                raise ExportError(f"recipe {recipe.name!r} is for {recipe.scheme}, which --quantize does not ask for")
            recipes[recipe.scheme] = recipe
        return recipes


def read_generation_config(checkpoint: Path) -> GenerationDefaults:
    """The checkpoint's own sampling settings over the official ones (those alone when it has none).
    Keys: resolution [w, h], steps, guidance_scale, temperature [start, end], aesthetic_score, and
    optionally `evaluation` (the world it was trained on)."""
    path = Path(checkpoint) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationDefaults()
    try:
        return GenerationDefaults.from_json(read_json_object(path, ExportError, "a generation config"))
    except (TypeError, ValueError) as error:
        raise ExportError(f"{path}: {error}") from None


def default_resolutions(checkpoint: Path) -> tuple[tuple[int, int], ...]:
    own = read_generation_config(checkpoint).resolution
    return (own,) if own else DEFAULT_RESOLUTIONS


def check_checkpoint_folder(checkpoint: Path) -> None:
    try:
        check_folder(checkpoint)
    except CheckpointError as error:
        raise ExportError(str(error)) from None


def is_bundle_written_here(folder: Path) -> bool:
    """A folder this tool wrote: its manifest parses and carries the format version and our tool entry."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "meissonic-export" in manifest.get("tool", {})


def check_output_folder(out: Path, overwrite: bool, owned, what: str, sources: tuple[Path, ...] = (), option: str = "--out") -> None:
    """An output folder may be created, or replaced with --overwrite only when `owned(out)` says this
    tool wrote it; it may never be or lie inside (or contain) a source folder."""
    out = Path(out)
    resolved = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ExportError(f"{option}: {out} overlaps the source {source}; choose a folder outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"{option}: {out} exists and is not a folder; not replacing it")
        if not overwrite:
            raise ExportError(f"{option}: {out} already exists (pass --overwrite to replace it)")
        if not owned(out):
            raise ExportError(f"{option}: {out} exists and is not a {what} written by meissonic-export; --overwrite replaces only those")
    for ancestor in [out.parent, *out.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ExportError(f"{option}: {ancestor} is a file, so {out} cannot be created")
            break


def check_options(checkpoint: Path, out: Path, options: ExportOptions) -> None:
    """Everything that can be refused before any work starts."""
    _check_names("--targets", "target", options.targets, TARGETS)
    if options.dtype not in DTYPES:
        raise ExportError(f"--dtype: unknown dtype {options.dtype!r}; choose from {list(DTYPES)}")
    _check_names("--graphs", "graph", options.graphs, GRAPH_NAMES)
    if options.resolutions is not None:
        if not options.resolutions:
            raise ExportError("--resolution: no resolution given")
        _check_once("--resolution", options.resolutions)
        for width, height in options.resolutions:
            if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
                raise ExportError(f"--resolution: {width}x{height} is outside 1..{MAX_SIDE} pixels a side")
    unknown = [q for q in options.quantize if q not in QUANTIZE]
    if unknown:
        raise ExportError(f"--quantize: unknown scheme(s) {unknown}; choose from {list(QUANTIZE)}")
    _check_once("--quantize", options.quantize)
    palettes = [q for q in options.quantize if q.startswith("palette")]
    if palettes and "coreml" not in options.targets:
        raise ExportError(f"--quantize: {palettes} are Core ML variants; add --targets coreml")
    if options.chunks < 1:
        raise ExportError(f"--chunks: must be at least 1 (got {options.chunks})")
    if options.jobs is not None and not 1 <= options.jobs <= 64:
        raise ExportError(f"--jobs: must be 1..64 (got {options.jobs})")
    if options.quality_steps < 1:
        raise ExportError(f"--quality-steps: must be at least 1 (got {options.quality_steps})")
    check_checkpoint_folder(checkpoint)
    check_output_folder(out, options.overwrite, is_bundle_written_here, "bundle", sources=(Path(checkpoint),))


def _check_names(option: str, what: str, given, known) -> None:
    if not given:
        raise ExportError(f"{option}: no {what} given; choose from " + ", ".join(known))
    unknown = [name for name in given if name not in known]
    if unknown:
        raise ExportError(f"{option}: unknown {what}(s) {unknown}; choose from {list(known)}")
    _check_once(option, given)


def _check_once(option: str, given) -> None:
    """The CLI drops repeats (`names`); the Python API refuses them: a graph listed twice was exported
    twice into the same folder, with two manifest entries for one file."""
    repeated = sorted("x".join(map(str, item)) if isinstance(item, tuple) else item  # a resolution reads 256x256
                      for item, count in Counter(given).items() if count > 1)
    if repeated:
        raise ExportError(f"{option}: {', '.join(repeated)} given more than once")


def check_resolutions(resolutions, scale_factor: int) -> None:
    step = 2 * scale_factor  # an even token grid
    for width, height in resolutions:
        if width % step or height % step or width <= 0 or height <= 0:
            raise ExportError(f"--resolution: {width}x{height} is not a positive multiple of {step} pixels (an even token grid)")


@dataclass
class EvaluateOptions:
    variants: tuple[str, ...] | None = None  # None: every variant of the backend in the bundle
    backend: str = "onnx"
    count: int = 200  # in-grammar prompt-seed pairs
    held_out_seeds: int = 2  # per held-out combination
    out: Path | None = None
    progress: bool = True
    reference: bool = True  # also run the PyTorch reference on the source checkpoint


EVALUATION_FILES = ("evaluation.json", "evaluation.md", "evaluation_grid.png")  # what `evaluate` writes into --out


def check_evaluate_options(bundle: Path, options: EvaluateOptions) -> None:
    from meissonic.runtimes.cli_common import check_report_folder
    from meissonic.runtimes.limits import check_int

    check_int("--count", options.count, 1, 100_000)
    check_int("--held-out-seeds", options.held_out_seeds, 0, 1000)
    if options.out is not None:
        check_report_folder("--out", options.out, list(EVALUATION_FILES))
    if not (Path(bundle) / MANIFEST).is_file():
        raise ExportError(f"{bundle}: not a bundle (no {MANIFEST})")
    evaluation = read_manifest(bundle).model.defaults.evaluation
    if evaluation != "shapes":  # the analyzer reads the shapes world only: any other model would score noise
        raise ExportError(f"{bundle}: evaluate judges only models trained on the shapes world, and this bundle's "
                          'generation settings do not say so ("evaluation": "shapes")')
