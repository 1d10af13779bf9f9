"""Latency, memory and size of every variant against the PyTorch reference, measured in one run.

Every figure is a median over repeated timings after warm-up, with the spread (25th-75th percentile);
every ratio is against the PyTorch reference (float32, eager) timed in the same run, on the same
inputs, with the same thread count. Peak memory is the resident set of a separate generation process
per variant. Results: JSON for machines, a Markdown table for people, and PNG plots.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from runtimes.onnx_backend import OnnxGraph, OnnxOptions

from .graphs import GRAPHS, ModelInfo


@dataclass
class BenchOptions:
    preset: str = "small"  # used when no checkpoint is given
    checkpoint: Path | None = None
    bundle: Path | None = None  # an existing bundle of the checkpoint (skips the export)
    variants: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
    grid: int = 32  # token grid of the step and image timings (32 = 512 px)
    scaling_grids: tuple[int, ...] = (16, 32, 64)
    steps: int = 8  # steps of the full-image timing
    block_size: int | None = None  # int4 block size (the recipe's by default; the tiny preset needs 32)
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    with_1b: bool = True  # one step of the released 1B configuration at the smallest grid
    out: Path = Path("bench")
    progress: bool = True

    def onnx_options(self) -> OnnxOptions:
        return OnnxOptions(intra_op_threads=self.threads, optimization="all", memory_arena=True)


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int

    @classmethod
    def of(cls, function, repeats: int, warmup: int) -> Timing:
        for _ in range(warmup):
            function()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            samples.append((time.perf_counter() - started) * 1000)
        return cls(*(round(float(np.percentile(samples, q)), 2) for q in (50, 25, 75)), repeats)


@dataclass
class Results:
    machine: dict
    settings: dict
    step: dict = field(default_factory=dict)  # variant -> Timing (denoise step at `grid`)
    image: dict = field(default_factory=dict)  # variant -> Timing (text + steps + decode)
    peak_rss_mb: dict = field(default_factory=dict)  # variant -> MB of a generation process
    sizes_mb: dict = field(default_factory=dict)  # variant -> graph -> MB
    quality: dict = field(default_factory=dict)  # variant -> logit SQNR (dB) from the manifest
    scaling: dict = field(default_factory=dict)  # grid -> variant -> Timing
    one_b: dict = field(default_factory=dict)  # variant -> Timing of one 1B step
    profile: dict = field(default_factory=dict)  # variant -> op type -> ms per step at `grid`


def machine() -> dict:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _step_inputs(info: ModelInfo, grid: int) -> dict[str, np.ndarray]:
    return GRAPHS["denoise_step"].sample(info, {"batch": 1, "height": grid, "width": grid}, np.random.default_rng(0))


def _time_step(run, inputs, options: BenchOptions) -> Timing:
    return Timing.of(lambda: run(inputs), options.repeats, options.warmup)


def _torch_step(module):
    names = GRAPHS["denoise_step"].input_names()

    def run(inputs):
        with torch.no_grad():
            module(*(torch.from_numpy(inputs[n]) for n in names))

    return run


def _profile_torch(module, inputs, runs: int) -> dict[str, float]:
    """Self CPU time per aten op, ms per step."""
    run = _torch_step(module)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            run(inputs)
    return _top({e.key: e.self_cpu_time_total / 1000 / runs for e in profiler.key_averages()})


def _profile_onnx(path: Path, inputs, options: BenchOptions, scratch: Path, runs: int) -> dict[str, float]:
    """onnxruntime's own profiler: kernel time per op type (after fusion: what actually ran), ms per step."""
    graph = OnnxGraph(path, replace(options.onnx_options(), profile_prefix=str(scratch / "ort-profile")))
    for _ in range(runs):
        graph(inputs)
    per_op: dict[str, float] = {}
    for event in json.loads(Path(graph.session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1000 / runs
    return _top(per_op)


def _top(per_op: dict[str, float], count: int = 6) -> dict[str, float]:
    ranked = sorted(per_op.items(), key=lambda item: -item[1])
    top = {op: round(ms, 2) for op, ms in ranked[:count]}
    top["other"] = round(sum(ms for _, ms in ranked[count:]), 2)
    return top


def run_bench(options: BenchOptions) -> Results:
    from reference.checkpoint import COMPONENTS, load_component
    from reference.pipeline import MeissonicPipeline
    from reference.presets import write_checkpoint
    from reference.scheduler import UniformNoise
    from runtimes.bundle import read_manifest
    from runtimes.pipeline import MeissonicRuntime

    from .export import ExportOptions, export_bundle

    threads = torch.get_num_threads()  # restored at the end: the benchmark may run inside another program (the tests)
    torch.set_num_threads(options.threads)
    scratch = Path(tempfile.mkdtemp(prefix="meissonic-bench-"))
    size = 16 * options.grid
    results = Results(machine(), {**{k: str(v) for k, v in asdict(options).items()}, "onnxruntime_session": options.onnx_options().to_dict(), "torch_threads": options.threads})
    try:
        checkpoint = options.checkpoint or write_checkpoint(options.preset, scratch / "checkpoint")
        bundle = options.bundle
        quantize = tuple(v for v in options.variants if v != "fp32")
        if bundle is None:
            bundle = scratch / "bundle"
            _note(options, f"exporting {checkpoint} with variants {options.variants} (not timed)")
            export_bundle(checkpoint, bundle, ExportOptions(resolutions=((size, size),), quantize=quantize, block_size=options.block_size, progress=options.progress))
        manifest = read_manifest(bundle)
        variants = [v for v in options.variants if v in manifest.variants("onnx")]
        components = {name: load_component(checkpoint, name) for name in COMPONENTS}
        info = ModelInfo.from_components(components)

        for graph in manifest.graphs:
            results.sizes_mb.setdefault(graph.variant, {})[graph.name] = round(graph.raw["bytes"] / 1e6, 2)
            sqnr = [case["outputs"]["logits"]["sqnr_db"] for case in graph.raw["parity"] if "logits" in case["outputs"]]
            if sqnr:  # worst case over the export's validation inputs
                results.quality[graph.variant] = min(math.inf if v == "inf" else v for v in sqnr)

        work = len(variants) + 1
        bar = tqdm(total=2 * work + len(options.scaling_grids) * work, disable=not options.progress, desc="bench")
        step_module = GRAPHS["denoise_step"].build(components)
        reference = MeissonicPipeline.from_pretrained(checkpoint)
        generate = {"height": size, "width": size, "num_inference_steps": options.steps, "progress": False}

        # 1. one denoising step and 2. one whole image, reference first
        inputs = _step_inputs(info, options.grid)
        results.step["pytorch"] = _time_step(_torch_step(step_module), inputs, options)
        bar.update()
        results.image["pytorch"] = Timing.of(lambda: reference("a cat", noise=UniformNoise.from_seed(0), **generate), max(1, options.repeats // 2), options.warmup)
        bar.update()
        for variant in variants:
            runtime = MeissonicRuntime.from_bundle(bundle, variant=variant, onnx_options=options.onnx_options())
            results.step[variant] = _time_step(runtime.backend.graph("denoise_step"), inputs, options)
            bar.update()
            results.image[variant] = Timing.of(
                lambda runtime=runtime: runtime.generate("a cat", steps=options.steps, width=size, height=size, seed=0, progress=False),
                max(1, options.repeats // 2),
                options.warmup,
            )
            bar.update()

        # 3. peak memory of a whole generation, each in its own process
        results.peak_rss_mb["pytorch"] = _peak_rss([sys.executable, "-m", "meissonic_export.cli", "reference", str(checkpoint), "a cat", "--size", str(size), "--steps", str(options.steps), "--out", str(scratch / "ref.png")])
        for variant in variants:
            results.peak_rss_mb[variant] = _peak_rss(
                [sys.executable, "-m", "runtimes.cli", str(bundle), "a cat", "--size", str(size), "--steps", str(options.steps), "--variant", variant,
                 "--threads", str(options.threads), "--no-progress", "--out", str(scratch / f"{variant}.png")]
            )  # fmt: skip

        # 4. step latency against the token grid (the export is dynamic in the grid)
        for grid in options.scaling_grids:
            grid_inputs = _step_inputs(info, grid)
            results.scaling[grid] = {"pytorch": _time_step(_torch_step(step_module), grid_inputs, options)}
            bar.update()
            for variant in variants:
                entry = manifest.find("denoise_step", "onnx", variant)
                results.scaling[grid][variant] = _time_step(OnnxGraph(bundle / entry.path, options.onnx_options()), grid_inputs, options)
                bar.update()
        bar.close()

        # 5. where a step's time goes: op types by time, PyTorch and every variant, at `grid`
        results.profile["pytorch"] = _profile_torch(step_module, inputs, options.repeats)
        for variant in variants:
            entry = manifest.find("denoise_step", "onnx", variant)
            results.profile[variant] = _profile_onnx(bundle / entry.path, inputs, options, scratch, options.repeats)

        # 6. one step of the released 1B configuration at the smallest grid
        if options.with_1b:
            results.one_b = _one_step_1b(min(options.scaling_grids), options, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torch.set_num_threads(threads)
    return results


def _note(options: BenchOptions, message: str) -> None:
    if options.progress:
        print(message, file=sys.stderr)


def _peak_rss(command: list[str]) -> float:
    """Peak resident memory (MB) of a child process, read through a wrapper that reports its own
    child's ru_maxrss, so children of earlier measurements do not count."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)


def _one_step_1b(grid: int, options: BenchOptions, scratch: Path) -> dict:
    """Random-weight 1B transformer: one denoise step in PyTorch, and in onnxruntime float32 and int4."""
    from quantize.onnx_quant import quantize_graph
    from quantize.recipe import Recipe, quantizable_layers
    from reference.presets import PRESETS
    from reference.transformer import MeissonicTransformer

    from .onnx_export import export_onnx, trace_inputs

    _note(options, "1B: building a random transformer and exporting its denoise step (not timed)")
    torch.manual_seed(0)
    config = PRESETS["meissonic-1b"].transformer
    transformer = MeissonicTransformer(config).eval()
    spec = GRAPHS["denoise_step"]
    module = spec.build({"transformer": transformer})
    info = ModelInfo.from_transformer(config)
    inputs = _step_inputs(info, grid)
    timings = {"pytorch": _time_step(_torch_step(module), inputs, options)}
    path = export_onnx(spec, module, trace_inputs(spec, info, np.random.default_rng(0)), scratch / "1b" / "fp32", spec.shapes(info))
    timings["fp32"] = _time_step(OnnxGraph(path, options.onnx_options()), inputs, options)
    recipe = Recipe.load("int4")
    int4, _ = quantize_graph(path, scratch / "1b" / "int4", spec.weights_prefix, recipe.plan(quantizable_layers(transformer)), recipe)
    shutil.rmtree(path.parent)
    timings["int4"] = _time_step(OnnxGraph(int4, options.onnx_options()), inputs, options)
    timings["int4_bytes"] = sum(f.stat().st_size for f in int4.parent.iterdir())
    timings["grid"] = grid
    return timings


def markdown(results: Results) -> str:
    m, s = results.machine, results.settings
    ref_step, ref_image = results.step["pytorch"].median_ms, results.image["pytorch"].median_ms
    lines = [
        (
            f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']} ({m['torch_cpu_capability']}), "
            f"onnxruntime {m['onnxruntime']}; {s['threads']} threads, graph optimization 'all', memory arena on; "
            f"median of {s['repeats']} runs after {s['warmup']} warm-up, spread = 25th-75th percentile."
        ),
        "",
        f"| variant | step ms ({s['grid']}x{s['grid']} tokens) | step speed-up vs PyTorch | image ms ({s['steps']} steps) | image speed-up | peak RSS MB | denoise_step MB | all graphs MB | logit SQNR dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, step in results.step.items():
        image = results.image[variant]
        sizes = results.sizes_mb.get(variant, {})
        base = results.sizes_mb.get("fp32", {})
        total = sum({**base, **sizes}.values()) if sizes else None
        quality = results.quality.get(variant)
        lines.append(
            f"| {variant} | {step.median_ms:.1f} ({step.p25_ms:.1f}-{step.p75_ms:.1f}) | {ref_step / step.median_ms:.2f}x | "
            f"{image.median_ms:.0f} ({image.p25_ms:.0f}-{image.p75_ms:.0f}) | {ref_image / image.median_ms:.2f}x | {_cell(results.peak_rss_mb.get(variant), '.0f')} | "
            f"{_cell(sizes.get('denoise_step'), '.1f')} | {'' if total is None else f'{total:.1f}'} | {'' if quality is None else f'{quality:.1f}'} |"
        )
    lines += ["", "Step latency against the token grid (ms, median; speed-up vs PyTorch in brackets):", ""]
    columns = list(next(iter(results.scaling.values())).keys()) if results.scaling else []
    lines += ["| grid | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for grid, timings in results.scaling.items():
        ref = timings["pytorch"].median_ms
        lines.append(f"| {grid}x{grid} | " + " | ".join(f"{t.median_ms:.1f} ({ref / t.median_ms:.2f}x)" for t in timings.values()) + " |")
    if results.profile:
        lines += ["", f"Where a step's time goes ({s['grid']}x{s['grid']} tokens; op types by time per step, profiler overhead included):", ""]
        lines += ["| variant | op types, ms per step (share) |", "|---|---|"]
        for variant, per_op in results.profile.items():
            total = sum(per_op.values())
            lines.append(f"| {variant} | " + ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in per_op.items()) + " |")
    if results.one_b:
        one = results.one_b
        ref = one["pytorch"].median_ms
        lines += [
            "",
            (
                f"Released 1B configuration (random weights), one denoise step at {one['grid']}x{one['grid']} tokens: PyTorch "
                f"{ref:.0f} ms, onnxruntime fp32 {one['fp32'].median_ms:.0f} ms ({ref / one['fp32'].median_ms:.2f}x), "
                f"int4 {one['int4'].median_ms:.0f} ms ({ref / one['int4'].median_ms:.2f}x, {one['int4_bytes'] / 1e6:.0f} MB)."
            ),
        ]
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def plots(results: Results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "latency_vs_grid.png", out / "size_vs_quality.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grids = list(results.scaling)
    for variant in next(iter(results.scaling.values())):
        ax.plot([g * g for g in grids], [results.scaling[g][variant].median_ms for g in grids], marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([g * g for g in grids], [f"{g}x{g}" for g in grids])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log-scale minor labels overlap the grids
    ax.set_xlabel("token grid")
    ax.set_ylabel("denoise step latency (ms, median)")
    ax.set_title("Step latency against the token grid")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, sqnr in results.quality.items():
        size = results.sizes_mb.get(variant, {}).get("denoise_step")
        if size is not None:
            shown = min(sqnr, 120.0)
            ax.scatter(size, shown, s=60)
            ax.annotate(variant, (size, shown), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("denoise_step size (MB)")
    ax.set_ylabel("logit SQNR vs float32 reference (dB)")
    ax.set_title("Size against quality per variant")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    finite = lambda o: {k: finite(v) for k, v in o.items()} if isinstance(o, dict) else ("inf" if o == math.inf else o)
    (out / "bench.json").write_text(json.dumps(finite(asdict(results)), indent=2, default=str) + "\n")
    (out / "bench.md").write_text(markdown(results) + "\n")
    return [out / "bench.json", out / "bench.md", *plots(results, out)]
