"""`meissonic-export`: make and train checkpoints, export bundles, evaluate, analyse quantization, benchmark.

Arguments are checked before torch is imported: a mistyped option is refused at once.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from meissonic.reference.folder import OWNER_MARKER, TRAINED, copy_trained_checkpoint
from meissonic.runtimes.cli_common import (
    ArgumentParser,
    HelpFormatter,
    UsageError,
    check_output_file,
    check_report_folder,
    finite_float,
    names,
    numbered_paths,
    parse_size,
    run_main,
    save_images,
)
from meissonic.runtimes.limits import check_int, check_request, check_threads

from .options import (
    DEFAULT_GRAPHS,
    DTYPES,
    GRAPH_NAMES,
    PRESET_NAMES,
    QUANTIZE,
    TARGETS,
    ExportError,
    ExportOptions,
    check_checkpoint_folder,
    check_options,
    check_output_folder,
    read_generation_config,
)  # fmt: skip

NEURAL_ENGINE_BYTES = 1e9  # packages larger than this load slowly or not at all on the Neural Engine (Apple's SD tooling splits at it)


def _owned_checkpoint(folder: Path) -> bool:
    return (Path(folder) / OWNER_MARKER).is_file()


def _make_checkpoint(args) -> None:
    """Write a checkpoint (diffusers folder layout, safetensors) of a preset: 'shapes' (the trained demo model:
    draws one colored shape on a plain background), or random weights of 'tiny' (golden sizes, seconds),
    'small' (mid-size) or 'meissonic-1b' (the released configuration, ~6 GB)."""
    check_int("--seed", args.seed, 0, 2**32 - 1)
    check_output_folder(args.out, args.overwrite, _owned_checkpoint, "checkpoint folder", option="OUT")
    if args.preset in TRAINED:  # a copy: no torch to import
        out = copy_trained_checkpoint(args.preset, args.out, overwrite=args.overwrite)
    else:
        from meissonic.reference.presets import write_checkpoint

        out = write_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.overwrite)
    kind = "the trained" if args.preset in TRAINED else "a random-weight"
    print(f"wrote {kind} {args.preset} checkpoint to {out}")


def _train(args) -> None:
    """Train the `shapes` demo model from procedural images, deterministically from --seed: the VQ-VAE on image
    crops, then the transformer and the CLIP text encoder together with the MaskGIT objective. Writes a
    checkpoint folder with training/report.json and training/loss_curves.png. Measured 36-40 minutes on 2 quiet
    CPU cores. Reproducible per machine and thread count: with the default seed and 2 threads it wrote the shipped
    `shapes` checkpoint byte for byte where that was trained; another CPU's floats differ, and so does what the
    model draws (docs/shapes_research.md: "One run is one draw")."""
    check_int("--seed", args.seed, 0, 2**32 - 1)
    check_int("--threads", args.threads, 1, 256)
    check_output_folder(args.out, args.overwrite, _owned_checkpoint, "checkpoint folder", option="OUT")
    from meissonic.reference.training import TrainConfig, train_shapes

    config = TrainConfig(seed=args.seed, threads=args.threads)
    report = train_shapes(args.out, config, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {args.out} in {report['times']['total_s'] / 60:.1f} min; loss curves: {args.out / 'training' / 'loss_curves.png'}")


def _reference(args) -> None:
    """Text-to-image with the PyTorch reference (official randomness: torch.Generator seeded with --seed).
    Settings not given are the checkpoint's own (its generation_config.json), as meissonic-generate takes
    them from the bundle: the shapes model at the official 1024 px, 48 steps and guidance 9 draws scattered
    spots (read as a purple triangle for a red circle), at its own 256 px its usual blob."""
    check_int("--seed", args.seed, 0, 2**63 - 1)
    check_checkpoint_folder(args.checkpoint)
    defaults = read_generation_config(args.checkpoint)
    size = parse_size("--size", args.size) if args.size is not None else defaults.resolution or (1024, 1024)
    steps, guidance, temperature = defaults.sampling(args.steps, args.guidance, args.temperature)
    check_request(steps, guidance, temperature, strength=1.0, seed=args.seed, images=args.num_images, has_image=False, has_mask=False)
    check_output_file("--out", args.out, paths=numbered_paths(args.out, args.num_images))
    import torch

    from meissonic.reference.pipeline import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(args.checkpoint)
    result = pipe(
        args.prompt, negative_prompt=args.negative_prompt, width=size[0], height=size[1], num_inference_steps=steps,
        guidance_scale=guidance, num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
        temperature=temperature, aesthetic_score=defaults.aesthetic_score, progress=not args.no_progress,
    )  # fmt: skip
    save_images(result.images, args.out)


def _export_options(args) -> ExportOptions:
    resolutions = None if args.resolution is None else tuple(dict.fromkeys(parse_size("--resolution", item) for item in names(args.resolution)))
    check_int("--seed", args.seed, 0, 2**32 - 1)
    return ExportOptions(
        targets=names(args.targets), resolutions=resolutions, dtype=args.dtype, graphs=names(args.graphs), seed=args.seed,
        overwrite=args.overwrite, keep_failed=args.keep_failed, quantize=names(args.quantize), recipes=tuple(args.recipe),
        block_size=args.block_size, quality_steps=args.quality_steps, chunks=args.chunks, jobs=args.jobs, progress=not args.no_progress,
    )  # fmt: skip


def _export(args) -> None:
    """Export a checkpoint folder to a bundle: one folder per graph, the tokenizer and scheduler files, and
    manifest.json (interfaces, versions, sha256 of every file, parity figures, generation defaults). Every
    graph is validated against the PyTorch reference right after export; a failure stops the export and no
    bundle is left behind."""
    options = _export_options(args)
    check_options(args.checkpoint, args.out, options)
    from .export import export_bundle

    manifest = export_bundle(args.checkpoint, args.out, options)
    _print_summary(manifest, args.out)


def _evaluate(args) -> None:
    """Generate a fixed evaluation set (prompt-seed pairs drawn from the shapes grammar by a fixed seed, plus
    the held-out combinations, reported apart) with the PyTorch reference and every variant of the bundle,
    read each image back with the shapes analyzer, and report prompt accuracy (all three attributes right),
    per-attribute accuracy, token agreement and image PSNR against the float32 run of the same seed. Prints
    a table, writes evaluation.json (which adds the shape kind's accuracy for each kind) and
    evaluation_grid.png (prompts x variants)."""
    from .options import EvaluateOptions, check_evaluate_options

    options = EvaluateOptions(
        variants=names(args.variants) if args.variants else None, backend=args.backend, count=args.count,
        held_out_seeds=args.held_out_seeds, out=args.out, progress=not args.no_progress, reference=not args.no_reference,
    )  # fmt: skip
    check_evaluate_options(args.bundle, options)
    from .evaluate import evaluate_bundle, format_table, write_report

    report = evaluate_bundle(args.bundle, options)
    print(format_table(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")


def _port_kit(args) -> None:
    """Write language-neutral test vectors (JSON plus raw little-endian arrays): PCG64 streams from numpy's
    seeding to float32 draws, the float32 temperature and mask-length schedules, the tokenizer on 320
    prompts, and one whole generation of BUNDLE (every graph input and output per step, the draws and the
    tokens after each step). The README's Porting section says how a port uses them."""
    from meissonic.runtimes.bundle import BundleError, read_manifest

    from .port_kit import is_port_kit_written_here

    check_output_folder(args.out, args.overwrite, is_port_kit_written_here, "port kit", sources=(args.bundle,))
    try:
        manifest = read_manifest(args.bundle)
    except BundleError as error:
        raise ExportError(str(error)) from None
    if "onnx" not in manifest.base_variants:
        raise ExportError(f"{args.bundle}: the port kit records an ONNX generation; this bundle has no ONNX graphs (export with --targets onnx)")
    from .export import staged_folder
    from .port_kit import write_port_kit

    with staged_folder(args.out, args.overwrite) as staging:
        written = write_port_kit(args.bundle, staging, progress=not args.no_progress)
    for path in written:
        print(f"wrote {args.out / path.name}")


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
    for report, figures_by_target in (("whole sampling run", quality), ("prompt-accuracy gate", manifest.get("evaluation", {}))):
        for target, figures in figures_by_target.items():
            if isinstance(figures, dict) and "skipped" in figures:  # the variants above were judged by their graphs' gates only
                print(f"\n{target}: no {report}: it {figures['skipped']}")
    for target, figures in quality.items():
        if not isinstance(figures, dict) or "against" not in figures:
            continue
        print(f"\n{target}: whole sampling run vs {figures['against']} ({quality['steps']} steps, {quality['resolution'][0]}x{quality['resolution'][1]}, seed {quality['seed']}):")
        for variant, values in figures.items():
            if isinstance(values, dict):
                psnr = values["image_psnr_db"]
                print(f"  {variant:<9} token agreement {values['token_agreement']:.3f}, image PSNR " + (psnr if isinstance(psnr, str) else f"{psnr:.1f}") + " dB")


def _sensitivity(args) -> None:
    """Quantize one group of transformer layers at a time (simulated in the reference) and report logit SQNR
    and top-1 agreement against float32: a table, JSON and a PNG plot. Use it to write a mixed recipe:
    groups with low SQNR at int4 belong in a rule with 8 bits."""
    from meissonic.reference.checkpoint import load_component
    from meissonic_export.sensitivity import REPORT_FILES, analyse, format_table, write_report

    check_report_folder("--out", args.out, list(REPORT_FILES))

    bits = names(args.bits)
    if not bits or set(bits) - {"4", "8"}:
        raise UsageError(f"--bits: choose from 4 and 8 (got {args.bits!r})")
    (grid,) = _token_grids("--grid", str(args.grid))
    transformer = load_component(args.checkpoint, "transformer")
    results = analyse(transformer, bits=tuple(map(int, bits)), block_size=args.block_size, grid=grid, granularity=args.granularity)
    title = f"{args.checkpoint.name}: one {args.granularity} quantized at a time ({grid}x{grid} tokens, int4 blocks of {args.block_size or 'the largest dividing size'})"
    print(format_table(results, title))
    for path in write_report(results, args.out, title):
        print(f"wrote {path}")


def _bench(args) -> None:
    """Benchmark, in one run: the speed-up of every onnxruntime variant over the PyTorch reference for one step
    (at each token grid) and for a whole image, each measured in interleaved pairs (reference, variant,
    reference, ...; the table gives the median ratio and its spread over the pairs, then milliseconds), peak
    memory of a generation process per variant, graph sizes, where a step's time goes, and one step of the
    released 1B configuration (random weights) in onnxruntime float32, int8 and int4, each quantized in a child
    process and profiled, with the step's FLOPs and the machine's float32 GEMM rate (how fast any float32 step
    could be); 15 minutes and up to 16 GB of memory on this 2-core machine. Writes bench.json, bench.md and PNG plots."""
    for option, value, low, high in (("--repeats", args.repeats, 1, 1000), ("--warmup", args.warmup, 0, 100), ("--steps", args.steps, 1, 1000)):
        check_int(option, value, low, high)
    check_threads("--threads", args.threads, 1)  # more threads than CPUs would time the time-slicing
    (grid,) = _token_grids("--grid", str(args.grid))
    scaling_grids = _token_grids("--scaling-grids", args.scaling_grids)
    from .bench import REPORT_FILES, BenchOptions, markdown, run_bench, write

    check_report_folder("--out", args.out, list(REPORT_FILES))

    options = BenchOptions(
        preset=args.preset, checkpoint=args.checkpoint, bundle=args.bundle, variants=names(args.variants), grid=grid,
        scaling_grids=scaling_grids, steps=args.steps, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, with_1b=not args.no_1b, out=args.out, block_size=args.block_size,
        progress=not args.no_progress,
    )  # fmt: skip
    if args.bundle is not None and args.checkpoint is None:
        raise UsageError("--bundle needs the --checkpoint it was exported from (the PyTorch reference runs on it)")
    results = run_bench(options)
    print(markdown(results))
    for path in write(results, args.out):
        print(f"wrote {path}")


def _token_grids(option: str, text: str) -> tuple[int, ...]:
    """'16,32' -> (16, 32): token grids the transformer takes (even: its 2x downsampling), checked before any
    export starts (an odd grid failed only at its timing, minutes in)."""
    grids = names(text)
    if not grids or not all(g.isdigit() and int(g) % 2 == 0 and 2 <= int(g) <= 128 for g in grids):
        raise UsageError(f"{option}: {text!r}: token grids are even numbers in 2..128 (16 px each: 32 = 512 px)")
    return tuple(int(g) for g in grids)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="meissonic-export", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run, progress: bool = True, **kwargs) -> argparse.ArgumentParser:
        """A subcommand running `run(args)`; `progress`: it shows progress bars, and takes --no-progress."""
        # the command's description is its function's docstring
        parser = commands.add_parser(name, formatter_class=HelpFormatter, description=inspect.cleandoc(run.__doc__), **kwargs)
        parser.set_defaults(run=run)
        if progress:
            parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        return parser

    make = add("make-checkpoint", run=_make_checkpoint, progress=False, help="write a checkpoint of a preset in the released folder layout")
    make.add_argument("out", type=Path, help="folder to create")
    make.add_argument("--preset", choices=PRESET_NAMES, default="shapes", help="configuration (default: shapes)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0; ignored by shapes)")
    make.add_argument("--overwrite", action="store_true", help="replace a checkpoint folder this tool wrote (nothing else)")

    train = add("train", run=_train, help="train the shapes demo model (VQ-VAE, CLIP text encoder, transformer) on this machine")
    train.add_argument("out", type=Path, help="checkpoint folder to create")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    train.add_argument("--threads", type=int, default=2, help="torch threads; results are reproducible per thread count (default: 2)")
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint folder this tool wrote (nothing else)")

    ref = add("reference", run=_reference, help="generate a PNG with the PyTorch reference pipeline")
    ref.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    ref.add_argument("prompt", help="text prompt")
    ref.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    ref.add_argument("--size", default=None, help="image size in pixels, e.g. 1024 or 768x512 (default: the checkpoint's own from its generation_config.json, else 1024)")
    ref.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's, else 48)")
    ref.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale (default: the checkpoint's, else 9)")
    ref.add_argument("--temperature", type=finite_float, nargs=2, default=None, metavar=("START", "END"), help="Gumbel noise temperature, annealed linearly (default: the checkpoint's, else 2 0)")
    ref.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    ref.add_argument("--seed", type=int, default=0, help="seed of the torch generator (default: 0)")
    ref.add_argument("--out", type=Path, default=Path("reference.png"), help="output PNG, numbered when several (default: reference.png)")

    exp = add("export", run=_export, help="export a checkpoint to a validated bundle (ONNX graphs, tokenizer, manifest)")
    exp.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    exp.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    exp.add_argument("--targets", default="onnx", help=f"comma-separated: {', '.join(TARGETS)} (default: onnx). ort: the ONNX graphs also as ORT-format models for apps, "
                     "with the operator config of a reduced onnxruntime build. Core ML packages are float16, static (one per resolution)")
    exp.add_argument("--resolution", default=None, help="image sizes to support and validate, e.g. 512,1024 or 768x512 (default: the checkpoint's own from its generation_config.json, else 512,1024)")
    exp.add_argument("--dtype", default="fp32", choices=DTYPES, help="base precision of the graphs (default: fp32)")
    exp.add_argument("--graphs", default=",".join(DEFAULT_GRAPHS), help="comma-separated subset of: " + ", ".join(GRAPH_NAMES) + " (default: "
                     + ", ".join(DEFAULT_GRAPHS) + ": what the runtime runs; add transformer, the raw forward, for parity and debugging)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the generated validation inputs (default: 0)")
    exp.add_argument("--overwrite", action="store_true", help="replace a bundle this tool wrote (atomically, after success); nothing else is replaced")
    exp.add_argument("--quantize", default="", help=f"extra variants, comma-separated: {', '.join(QUANTIZE)} (palettes: Core ML only)")
    exp.add_argument("--recipe", action="append", default=[], metavar="NAME|FILE", help="a recipe (built-in name such as int4-mixed, or a JSON file) replacing the built-in recipe of its scheme; repeatable")
    exp.add_argument("--block-size", type=int, choices=[32, 64, 128], default=None, help="int4 block size (default: the recipe's, 64)")
    exp.add_argument("--quality-steps", type=int, default=8, help="steps of the sampling run that measures quantized variants (default: 8)")
    exp.add_argument("--chunks", type=int, default=1, help="Core ML: split the denoise step into N packages run in sequence, each under the Neural Engine's ~1 GB (default: 1)")
    exp.add_argument("--jobs", type=int, default=None, help="graphs exported at a time, each in its own process holding the model (default: 2 "
                     "on two or more cores for checkpoints under 1 GB, else 1)")
    exp.add_argument("--keep-failed", action="store_true", help="on a failed validation keep the files in OUT.failed/ for inspection")

    ev = add("evaluate", run=_evaluate, help="judge a bundle of the shapes model by what it draws: prompt accuracy per variant")
    ev.add_argument("bundle", type=Path, help="bundle of a shapes checkpoint (its manifest names the checkpoint)")
    ev.add_argument("--variants", default=None, help="comma-separated variants of the backend (default: all in the bundle)")
    ev.add_argument("--backend", choices=["onnx", "coreml"], default="onnx", help="onnx, or coreml (Core ML on macOS, the numpy evaluator elsewhere) (default: onnx)")
    ev.add_argument("--count", type=int, default=200, help="in-grammar prompt-seed pairs (default: 200)")
    ev.add_argument("--held-out-seeds", type=int, default=2, help="seeds per held-out combination (default: 2, i.e. 48 pairs)")
    ev.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference row")
    ev.add_argument("--out", type=Path, default=Path("evaluation"), help="folder for evaluation.json, evaluation.md and evaluation_grid.png; files of those names this tool did not write are refused (default: evaluation)")

    kit = add("port-kit", run=_port_kit, help="write test vectors for a Swift, Kotlin or JavaScript port of the runtime")
    kit.add_argument("bundle", type=Path, help="bundle whose generation is recorded (its base ONNX variant, the model's own settings)")
    kit.add_argument("--out", type=Path, default=Path("port-kit"), help="folder to create (default: port-kit)")
    kit.add_argument("--overwrite", action="store_true", help="replace a port kit this tool wrote (nothing else)")

    sens = add("sensitivity", run=_sensitivity, progress=False, help="rank transformer layer groups by how much quantizing them alone hurts the logits")
    sens.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    sens.add_argument("--bits", default="4,8", help="schemes to try, comma-separated (default: 4,8)")
    sens.add_argument("--block-size", type=int, choices=[32, 64, 128], default=None, help="int4 block size (default: the largest of 128, 64, 32 that divides every layer)")
    sens.add_argument("--granularity", choices=["group", "block"], default="group", help="layer groups by role, or one transformer block at a time")
    sens.add_argument("--grid", type=int, default=16, help="token grid of the fixed inputs (default: 16, i.e. 256 px)")
    sens.add_argument("--out", type=Path, default=Path("sensitivity"), help="folder for sensitivity.{json,md,png}; files of those names this tool did not write are refused (default: sensitivity)")
    bench = add("bench", run=_bench, help="latency, memory and size of every variant against the PyTorch reference")
    bench.add_argument("--preset", choices=PRESET_NAMES, default="small", help="model to benchmark when no --checkpoint is given (default: small)")
    bench.add_argument("--checkpoint", type=Path, default=None, help="benchmark this checkpoint instead of a preset")
    bench.add_argument("--bundle", type=Path, default=None, help="an existing bundle of --checkpoint (skips the export)")
    bench.add_argument("--variants", default="fp32,fp16,int8,int4", help="onnxruntime variants (default: fp32,fp16,int8,int4)")
    bench.add_argument("--grid", type=int, default=32, help="token grid of the step and image timings (default: 32 = 512 px)")
    bench.add_argument("--scaling-grids", default="16,32,64", help="more token grids to time one step at (default: 16,32,64)")
    bench.add_argument("--steps", type=int, default=8, help="denoising steps of the whole-image timing (default: 8)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved pairs (PyTorch run, variant run) per measurement; each pair gives one ratio (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    bench.add_argument("--threads", type=int, default=2, help="threads for PyTorch and onnxruntime, at most the CPUs this process may use (default: 2)")
    bench.add_argument("--block-size", type=int, choices=[32, 64, 128], default=None, help="int4 block size (default: the recipe's)")
    bench.add_argument("--no-1b", action="store_true", help="skip the one-step measurement of the 1B configuration (its export and two quantizations)")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json, bench.md and the PNG plots; files of those names this tool did not write are refused (default: bench)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    # CheckpointError, ImageInputError, RecipeError and RuntimeInputError are ValueErrors, FileExistsError an
    # OSError: caught by their bases, so that nothing here imports torch before the arguments are checked
    return run_main(f"meissonic-export {args.command}", lambda: args.run(args), (ExportError, ValueError, OSError))

if __name__ == "__main__":
    sys.exit(main())
