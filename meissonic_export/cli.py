"""`meissonic-export`: make checkpoints, export bundles, analyse quantization, benchmark."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NEURAL_ENGINE_BYTES = 1e9  # packages larger than this load slowly or not at all on the Neural Engine (Apple's SD tooling splits at it)


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


def _make_checkpoint(args) -> None:
    from reference.presets import write_checkpoint

    if args.overwrite and args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    out = write_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote a random-weight {args.preset} checkpoint to {out}")


def _reference(args) -> None:
    import torch

    from reference.pipeline import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(args.checkpoint)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
    )
    _save_images(result.images, args.out)


def _resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """'512,1024' -> ((512, 512), (1024, 1024)); 'WxH' entries give non-square sizes."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, _, height = item.partition("x")
        if not (width.isdigit() and (not height or height.isdigit())):
            raise UsageError(f"--resolution: cannot read {item!r}; use sizes like 512,1024 or 768x512")
        sizes.append((int(width), int(height or width)))
    return tuple(sizes)


def _names(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in text.split(","))))


def _export(args) -> None:
    from .export import ExportOptions, export_bundle

    options = ExportOptions(
        targets=_names(args.targets),
        resolutions=_resolutions(args.resolution),
        dtype=args.dtype,
        graphs=_names(args.graphs),
        seed=args.seed,
        overwrite=args.overwrite,
        keep_failed=args.keep_failed,
        quantize=_names(args.quantize),
        recipes=tuple(args.recipe),
        block_size=args.block_size,
        quality_steps=args.quality_steps,
        chunks=args.chunks,
    )
    manifest = export_bundle(args.checkpoint, args.out, options)
    _print_summary(manifest, args.out)


def _headline(figures: dict, variant: str) -> tuple[str, float, bool]:
    """The one figure that sums up an output's parity, and whether a larger value is worse."""
    error = ("max_abs", True) if variant == "fp32" else ("sqnr_db", False)
    for key, larger_is_worse in (("agreement", False), ("psnr_db", False), error):
        if key in figures:
            value = figures[key]
            return key, float("inf") if value == "inf" else value, larger_is_worse
    raise KeyError(figures)


def _print_summary(manifest: dict, out: Path) -> None:
    print(f"\nwrote {out} in {manifest['export_seconds']} s")
    print(f"{'graph':<24}{'target':<8}{'variant':<9}{'MB':>9}  parity (worst over the validation inputs)")
    for graph in manifest["graphs"]:
        quantization = graph.get("quantization")
        worst = {"weights": ("sqnr_db", quantization["weight_sqnr_db"])} if quantization else {}
        for case in graph["parity"]:
            for name, figures in case["outputs"].items():
                key, value, larger_is_worse = _headline(figures, graph["variant"])
                if name not in worst or (value > worst[name][1]) == larger_is_worse:
                    worst[name] = (key, value)
        parity = ", ".join(f"{name} {key}={value:.4g}" if not isinstance(value, str) else f"{name} {key}={value}" for name, (key, value) in worst.items())
        name = graph["name"] + (f"@{graph['resolution'][0]}x{graph['resolution'][1]}" if "resolution" in graph else "")
        print(f"{name:<24}{graph['target']:<8}{graph['variant']:<9}{graph['bytes'] / 1e6:>9.1f}  {parity}")
        for part in graph.get("chunks", []):
            too_large = "  over the Neural Engine's ~1 GB: use more --chunks" if part["bytes"] > NEURAL_ENGINE_BYTES else ""
            print(f"{'  ' + Path(part['path']).name:<41}{part['bytes'] / 1e6:>9.1f}{too_large}")
    quality = manifest.get("quality", {})
    for target, figures in quality.items():
        if not isinstance(figures, dict) or "against" not in figures:
            continue
        print(f"\n{target}: whole sampling run vs {figures['against']} ({quality['steps']} steps, {quality['resolution'][0]}x{quality['resolution'][1]}, seed {quality['seed']}):")
        for variant, values in figures.items():
            if isinstance(values, dict):
                psnr = values["image_psnr_db"]
                print(f"  {variant:<9} token agreement {values['token_agreement']:.3f}, image PSNR " + (psnr if isinstance(psnr, str) else f"{psnr:.1f}") + " dB")


def _sensitivity(args) -> None:
    from quantize.sensitivity import analyse, format_table, write_report
    from reference.checkpoint import load_component

    bits = tuple(int(b) for b in _names(args.bits))
    if not bits or set(bits) - {4, 8}:
        raise UsageError(f"--bits: choose from 4 and 8 (got {args.bits!r})")
    transformer = load_component(args.checkpoint, "transformer")
    results = analyse(transformer, bits=bits, block_size=args.block_size, grid=args.grid, granularity=args.granularity)
    title = f"{args.checkpoint.name}: one {args.granularity} quantized at a time ({args.grid}x{args.grid} tokens, int4 blocks of {args.block_size})"
    print(format_table(results, title))
    for path in write_report(results, args.out, title):
        print(f"wrote {path}")


def _bench(args) -> None:
    from .bench import BenchOptions, markdown, run_bench, write

    options = BenchOptions(
        preset=args.preset, checkpoint=args.checkpoint, bundle=args.bundle, variants=_names(args.variants), grid=args.grid,
        scaling_grids=tuple(int(g) for g in _names(args.scaling_grids)), steps=args.steps, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, with_1b=not args.no_1b, out=args.out, block_size=args.block_size,
    )  # fmt: skip
    if args.bundle is not None and args.checkpoint is None:
        raise UsageError("--bundle needs the --checkpoint it was exported from (the PyTorch reference runs on it)")
    results = run_bench(options)
    print(markdown(results))
    for path in write(results, args.out):
        print(f"wrote {path}")


def _save_images(images, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from reference.presets import PRESETS

    from .graphs import GRAPHS

    parser = argparse.ArgumentParser(prog="meissonic-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    make = commands.add_parser(
        "make-checkpoint",
        help="write a random-weight checkpoint of a preset in the released folder layout",
        description="Write a random-weight checkpoint (diffusers folder layout, safetensors) of a configuration "
        "preset: 'tiny' (golden sizes, seconds), 'small' (mid-size), 'meissonic-1b' (the released configuration, ~6 GB).",
    )
    make.add_argument("out", type=Path, help="folder to create (must not exist)")
    make.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="configuration (default: tiny)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    make.add_argument("--overwrite", action="store_true", help="replace the folder if it exists")
    make.set_defaults(run=_make_checkpoint)

    ref = commands.add_parser(
        "reference",
        help="generate a PNG with the PyTorch reference pipeline",
        description="Text-to-image with the PyTorch reference (official randomness: torch.Generator seeded with --seed).",
    )
    ref.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    ref.add_argument("prompt")
    ref.add_argument("--negative-prompt", default=None)
    ref.add_argument("--size", type=int, default=1024, help="image width and height in pixels (default: 1024)")
    ref.add_argument("--steps", type=int, default=48, help="denoising steps (default: 48)")
    ref.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default: 9)")
    ref.add_argument("--num-images", type=int, default=1)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--out", type=Path, default=Path("reference.png"))
    ref.set_defaults(run=_reference)
    exp = commands.add_parser(
        "export",
        help="export a checkpoint to a validated bundle (ONNX graphs, tokenizer, manifest)",
        description="Export a checkpoint folder to a bundle: one folder per graph, the tokenizer and scheduler "
        "files, and manifest.json (interfaces, versions, sha256 of every file, parity figures). Every graph is "
        "validated against the PyTorch reference right after export; a failure stops the export and no bundle "
        "is left behind.",
    )
    exp.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    exp.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    exp.add_argument("--targets", default="onnx", help="comma-separated: onnx, coreml (default: onnx). Core ML packages are float16, static (one per resolution)")
    exp.add_argument("--resolution", default="512,1024", help="image sizes to support and validate, e.g. 512,1024 or 768x512 (default: 512,1024)")
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="base precision of the graphs (default: fp32)")
    exp.add_argument("--graphs", default=",".join(GRAPHS), help=f"comma-separated subset of {','.join(GRAPHS)} (default: all)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the generated validation inputs")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically, after success)")
    exp.add_argument("--quantize", default="", help="extra variants, comma-separated: fp16, int8, int4 (ONNX and Core ML), palette4, palette6 (Core ML)")
    exp.add_argument("--recipe", action="append", default=[], metavar="NAME|FILE", help="a recipe (built-in name such as int4-mixed, or a JSON file) replacing the built-in recipe of its scheme; repeatable")
    exp.add_argument("--block-size", type=int, choices=[32, 64, 128], default=None, help="int4 block size (default: the recipe's, 64)")
    exp.add_argument("--quality-steps", type=int, default=8, help="steps of the sampling run that measures quantized variants (default: 8)")
    exp.add_argument("--chunks", type=int, default=1, help="Core ML: split the denoise step into N packages run in sequence (each under the Neural Engine's ~1 GB)")
    exp.add_argument("--keep-failed", action="store_true", help="on a failed validation keep the files in OUT.failed/ for inspection")
    exp.set_defaults(run=_export)
    sens = commands.add_parser(
        "sensitivity",
        help="rank transformer layer groups by how much quantizing them alone hurts the logits",
        description="Quantize one group of transformer layers at a time (simulated in the reference) and report "
        "logit SQNR and top-1 agreement against float32: a table, JSON and a PNG plot. Use it to write a mixed "
        "recipe: groups with low SQNR at int4 belong in a rule with 8 bits.",
    )
    sens.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    sens.add_argument("--bits", default="4,8", help="schemes to try, comma-separated (default: 4,8)")
    sens.add_argument("--block-size", type=int, choices=[32, 64, 128], default=64, help="int4 block size (default: 64)")
    sens.add_argument("--granularity", choices=["group", "block"], default="group", help="layer groups by role, or one transformer block at a time")
    sens.add_argument("--grid", type=int, default=16, help="token grid of the fixed inputs (default: 16, i.e. 256 px)")
    sens.add_argument("--out", type=Path, default=Path("sensitivity"), help="folder for sensitivity.{json,md,png}")
    sens.set_defaults(run=_sensitivity)
    bench = commands.add_parser(
        "bench",
        help="latency, memory and size of every variant against the PyTorch reference",
        description="Benchmark, in one run: per-step and whole-image latency of the PyTorch reference and of every "
        "onnxruntime variant (with ratios to the reference), peak memory of a generation process per variant, graph "
        "sizes, step latency against the token grid, and one step of the released 1B configuration. Writes "
        "bench.json, bench.md and PNG plots. The defaults take about 6 minutes on 2 cores.",
    )
    bench.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model to benchmark when no --checkpoint is given (default: small)")
    bench.add_argument("--checkpoint", type=Path, default=None, help="benchmark this checkpoint instead of a preset")
    bench.add_argument("--bundle", type=Path, default=None, help="an existing bundle of --checkpoint (skips the export)")
    bench.add_argument("--variants", default="fp32,fp16,int8,int4", help="onnxruntime variants (default: fp32,fp16,int8,int4)")
    bench.add_argument("--grid", type=int, default=32, help="token grid of the step and image timings (default: 32 = 512 px)")
    bench.add_argument("--scaling-grids", default="16,32,64", help="token grids of the scaling measurement (default: 16,32,64)")
    bench.add_argument("--steps", type=int, default=8, help="denoising steps of the whole-image timing (default: 8)")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    bench.add_argument("--threads", type=int, default=2, help="threads for PyTorch and onnxruntime (default: 2)")
    bench.add_argument("--block-size", type=int, choices=[32, 64, 128], default=None, help="int4 block size (default: the recipe's)")
    bench.add_argument("--no-1b", action="store_true", help="skip the one-step measurement of the 1B configuration")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json, bench.md and plots")
    bench.set_defaults(run=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from reference.checkpoint import CheckpointError
    from runtimes.images import ImageInputError

    from .export import ExportError

    try:
        args.run(args)
    except (UsageError, ExportError, CheckpointError, ImageInputError, FileExistsError, ValueError) as error:
        print(f"meissonic-export {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
