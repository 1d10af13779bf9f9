"""Latency, memory and size of every variant against the PyTorch reference, measured in one run.

Absolute times on shared machines drift by up to 3x between runs, so every speed-up is measured in
pairs: the reference and the candidate run back to back (A B A B ..., the candidates' order rotated
each round), each pair gives one ratio, and the table reports the median ratio with its spread (25th to
75th percentile over the pairs), then the milliseconds. Peak memory is the resident set of a separate
generation process per variant. Results: JSON for machines, a Markdown table for people, PNG plots.
"""
from __future__ import annotations

import gc
import json
import math
import multiprocessing
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meissonic.reference.scheduler import categorical_by_inverse_cdf
from meissonic.runtimes.bundle import ModelFacts
from meissonic.runtimes.cli_common import write_report_folder
from meissonic.runtimes.onnx_backend import OnnxGraph, OnnxOptions

from .export import ExportOptions, export_bundle
from .graphs import GRAPHS, draw, model_facts, transformer_facts
from .options import GRAPH_NAMES


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


def _ms(function) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


@dataclass
class Ratio:
    """A candidate's speed-up over the reference from interleaved pairs: pair i is the reference's time
    and the candidate's, measured back to back; its ratio is their quotient (above 1: faster)."""

    median: float
    p25: float
    p75: float
    pairs: int
    reference_ms: float  # medians of each side over the pairs
    candidate_ms: float

    @classmethod
    def of(cls, pairs: list[tuple[float, float]]) -> Ratio:
        reference, candidate = np.array(pairs).T
        ratios = reference / candidate
        return cls(*(round(float(np.percentile(ratios, q)), 3) for q in (50, 25, 75)), len(pairs),
                   round(float(np.median(reference)), 2), round(float(np.median(candidate)), 2))  # fmt: skip


def interleaved(reference, candidates: dict[str, object], pairs: int, warmup: int) -> dict[str, Ratio]:
    """Time `reference` and each candidate alternately, `pairs` rounds; each round rotates the order of
    the candidates, so none always runs first after a (possibly cache-cold) reference run."""
    for _ in range(warmup):
        reference()
        for run in candidates.values():
            run()
    names, measured = list(candidates), {name: [] for name in candidates}
    for round_ in range(pairs):
        shift = round_ % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            measured[name].append((_ms(reference), _ms(candidates[name])))
    return {name: Ratio.of(samples) for name, samples in measured.items()}


@dataclass
class Results:
    machine: dict
    settings: dict
    step: dict = field(default_factory=dict)  # token grid -> variant -> Ratio of one denoise step against PyTorch
    image: dict = field(default_factory=dict)  # variant -> Ratio of a whole image (text + steps + decode)
    peak_rss_mb: dict = field(default_factory=dict)  # variant -> MB of a generation process
    sizes_mb: dict = field(default_factory=dict)  # variant -> graph -> MB
    quality: dict = field(default_factory=dict)  # variant -> logit SQNR (dB) from the manifest
    one_b: dict = field(default_factory=dict)  # variant -> Ratio of one 1B step; sizes, profiles, FLOPs, the grid
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


def _step_inputs(info: ModelFacts, grid: int) -> dict[str, np.ndarray]:
    return GRAPHS["denoise_step"].sample(info, {"batch": 1, "height": grid, "width": grid}, np.random.default_rng(0))


def _step_ratios(torch_step, graphs: dict, inputs: dict[str, np.ndarray], options: BenchOptions) -> dict[str, Ratio]:
    """One denoise step of each onnxruntime graph, interleaved with PyTorch's on the same inputs."""
    return interleaved(partial(torch_step, inputs), {v: partial(graph, inputs) for v, graph in graphs.items()}, options.repeats, options.warmup)


def _torch_step(transformer):
    """A step as the reference pipeline computes it, in eager PyTorch: the transformer on the [negative,
    positive] rows, guidance on the logits, softmax and the inverse-CDF draw. (The exported graph guides
    the codebook head's input instead; the benchmark measures that against the official arithmetic.)"""

    def run(inputs):
        with torch.no_grad():
            tensor = {name: torch.from_numpy(value) for name, value in inputs.items()}
            tokens, scale = tensor["tokens"], float(inputs["guidance_scale"][0])
            rows = (torch.cat([tokens, tokens]), tensor["encoder_hidden_states"], tensor["pooled_projections"], tensor["micro_conds"], tensor["timestep"])
            uncond, cond = transformer(*rows).chunk(2)
            logits = uncond + scale * (cond - uncond) if scale > 1 else cond
            draw(logits.flatten(2).transpose(1, 2).softmax(dim=-1), tensor["uniforms"], categorical_by_inverse_cdf)

    return run


def _profile_torch(transformer, inputs, runs: int) -> dict[str, float]:
    """Self CPU time per aten op, ms per step."""
    run = _torch_step(transformer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            run(inputs)
    return {e.key: round(e.self_cpu_time_total / 1000 / runs, 3) for e in profiler.key_averages() if e.self_cpu_time_total > 0}


# Kernels that multiply matrices (linear layers, convolutions, attention's products), in either profiler:
# the work a graph rewrite cannot remove. A step can be no faster than these kernels alone.
MATRIX_PRODUCT_OPS = frozenset({
    "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "MatMul", "FusedMatMul", "Gemm", "Conv", "FusedConv", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger",
    "MatMulNBits", "ConvInteger", "QLinearConv", "QLinearMatMul",
})  # fmt: skip


def matrix_product_share(per_op: dict[str, float]) -> float:
    """The share of a profiled step spent in matrix-product kernels."""
    return sum(ms for op, ms in per_op.items() if op in MATRIX_PRODUCT_OPS) / sum(per_op.values())


def _step_flops(transformer, inputs) -> int:
    """Floating-point operations of one reference step (torch's FlopCounterMode: the matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _torch_step(transformer)(inputs)
    return int(counter.get_total_flops())


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
    return {op: round(ms, 3) for op, ms in per_op.items()}


def _top(per_op: dict[str, float], count: int = 6) -> dict[str, float]:
    ranked = sorted(per_op.items(), key=lambda item: -item[1])
    top = {op: round(ms, 2) for op, ms in ranked[:count]}
    top["other"] = round(sum(ms for _, ms in ranked[count:]), 2)
    return top


def run_bench(options: BenchOptions) -> Results:
    from meissonic.reference.checkpoint import COMPONENTS, load_component
    from meissonic.reference.pipeline import MeissonicPipeline
    from meissonic.reference.presets import write_checkpoint
    from meissonic.reference.scheduler import UniformNoise
    from meissonic.runtimes.bundle import read_manifest
    from meissonic.runtimes.pipeline import MeissonicRuntime

    threads = torch.get_num_threads()  # restored at the end: the benchmark may run inside another program (the tests)
    torch.set_num_threads(options.threads)
    scratch = Path(tempfile.mkdtemp(prefix="meissonic-bench-"))
    size = 16 * options.grid
    results = Results(machine(), {**{k: str(v) for k, v in asdict(options).items()}, "onnxruntime_session": options.onnx_options().to_dict(), "torch_threads": options.threads})
    try:
        checkpoint = options.checkpoint or write_checkpoint(options.preset, scratch / "checkpoint")
        bundle = options.bundle
        if bundle is None:
            bundle = scratch / "bundle"
            _note(options, f"exporting {checkpoint} with variants {options.variants} (not timed)")
            export_bundle(checkpoint, bundle, export_options(options))
        manifest = read_manifest(bundle)
        variants = [v for v in options.variants if v in manifest.variants("onnx")]
        components = {name: load_component(checkpoint, name) for name in COMPONENTS}
        info = model_facts(components)

        for graph in manifest.graphs:
            if graph.target != "onnx":
                continue
            results.sizes_mb.setdefault(graph.variant, {})[graph.name] = round(graph.bytes / 1e6, 2)
            sqnr = [case["outputs"]["logits"]["sqnr_db"] for case in graph.raw["parity"] if "logits" in case["outputs"]]
            if sqnr:  # worst case over the export's validation inputs
                results.quality[graph.variant] = min(math.inf if v == "inf" else v for v in sqnr)

        grids = list(dict.fromkeys([options.grid, *options.scaling_grids]))
        bar = tqdm(total=len(grids) + 2, disable=not options.progress, desc="bench")
        transformer = components["transformer"]
        reference = MeissonicPipeline.from_pretrained(checkpoint)
        runtimes = {v: MeissonicRuntime.from_bundle(bundle, variant=v, onnx_options=options.onnx_options()) for v in variants}

        # 1. one denoising step at each token grid (the export is dynamic in the grid), every variant against PyTorch
        step_graphs = {v: runtimes[v].backend.graph("denoise_step") for v in variants}
        for graph in step_graphs.values():
            _check_grids(graph, grids)
        for grid in grids:
            results.step[grid] = _step_ratios(_torch_step(transformer), step_graphs, _step_inputs(info, grid), options)
            bar.update()

        # 2. one whole image (text encoding, the steps, decoding), same prompt and seed
        generate = {"height": size, "width": size, "num_inference_steps": options.steps, "progress": False}
        images = {v: (lambda r=runtimes[v]: r.generate("a cat", steps=options.steps, width=size, height=size, seed=0, progress=False)) for v in variants}
        results.image = interleaved(lambda: reference("a cat", noise=UniformNoise.from_seed(0), **generate), images, options.repeats, options.warmup)
        bar.update()
        del runtimes, step_graphs

        # 3. peak memory of a whole generation, each in its own process
        results.peak_rss_mb["pytorch"] = _peak_rss([sys.executable, "-m", "meissonic_export.cli", "reference", str(checkpoint), "a cat", "--size", str(size), "--steps", str(options.steps), "--out", str(scratch / "ref.png")])
        for variant in variants:
            results.peak_rss_mb[variant] = _peak_rss(
                [sys.executable, "-m", "meissonic.runtimes.cli", str(bundle), "a cat", "--size", str(size), "--steps", str(options.steps), "--variant", variant,
                 "--threads", str(options.threads), "--no-progress", "--out", str(scratch / f"{variant}.png")]
            )  # fmt: skip
        bar.update()
        bar.close()

        # 4. where a step's time goes: op types by time, PyTorch and every variant, at `grid`
        inputs = _step_inputs(info, options.grid)
        results.profile["pytorch"] = _profile_torch(transformer, inputs, options.repeats)
        for variant in variants:
            entry = manifest.find("denoise_step", "onnx", variant)
            results.profile[variant] = _profile_onnx(bundle / entry.path, inputs, options, scratch, options.repeats)

        # 5. one step of the released 1B configuration at `grid` (512 px by default: where users run it)
        if options.with_1b:
            results.one_b = one_step_of_preset("meissonic-1b", options.grid, options, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torch.set_num_threads(threads)
    return results


def _check_grids(graph: OnnxGraph, grids: list[int]) -> None:
    """A given bundle exported for one resolution has its step fixed to that grid (onnxruntime would refuse
    the others mid-run, in a traceback): say so before anything is timed."""
    height, width = next(i.shape for i in graph.session.get_inputs() if i.name == "tokens")[1:3]
    if isinstance(height, int) and isinstance(width, int) and any((g, g) != (height, width) for g in grids):
        raise ValueError(
            f"--bundle: its denoise_step is exported for a {height}x{width} token grid only, and the benchmark times {grids}; "
            f"pass --grid {height} --scaling-grids {height}, or leave out --bundle to export every grid"
        )


def export_options(options: BenchOptions) -> ExportOptions:
    """The bundle the benchmark times: every graph (the raw transformer's parity figures are the table's
    logit SQNR), each variant, and a resolution per token grid it times. An export for one resolution fixes
    its grid, so the step graph must be exported for every grid the scaling table runs it at."""
    grids = dict.fromkeys([options.grid, *options.scaling_grids])
    return ExportOptions(
        resolutions=tuple((16 * g, 16 * g) for g in grids), graphs=GRAPH_NAMES, quantize=tuple(v for v in options.variants if v != "fp32"),
        block_size=options.block_size, progress=options.progress,
    )  # fmt: skip


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


PRESET_STEP_VARIANTS = ("fp32", "int8", "int4")


def one_step_of_preset(preset: str, grid: int, options: BenchOptions, scratch: Path) -> dict:
    """A preset's random-weight transformer (the released 1B configuration in the benchmark): one denoise
    step in PyTorch, and in onnxruntime float32, int8 and int4, timed in pairs and profiled by op type;
    with the step's FLOPs and the machine's float32 GEMM rate, so that a ratio can be read against what
    the kernels allow."""
    from meissonic.quantize.onnx_quant import quantize_graph
    from meissonic.quantize.recipe import Recipe, quantizable_layers
    from meissonic.reference.presets import PRESETS
    from meissonic.reference.transformer import MeissonicTransformer

    from .onnx_export import export_onnx, trace_inputs

    _note(options, f"{preset}: building a random transformer and exporting its denoise step (not timed)")
    torch.manual_seed(0)
    config = PRESETS[preset].transformer
    transformer = MeissonicTransformer(config).eval()
    spec = GRAPHS["denoise_step"]
    module = spec.build({"transformer": transformer})
    info = transformer_facts(config)
    inputs = _step_inputs(info, grid)
    path = export_onnx(spec, module, trace_inputs(spec, info, np.random.default_rng(0)), scratch / preset / "fp32", spec.shapes(info))
    del module
    gc.collect()  # the exporter's garbage: the 1B export peaks near 15 GB
    paths = {"fp32": path}
    for variant in PRESET_STEP_VARIANTS[1:]:
        _note(options, f"{preset}: quantizing the step to {variant} in a child process (not timed)")
        recipe = Recipe.load(variant, options.block_size)
        plan = recipe.plan(quantizable_layers(transformer))
        # In a child: quantizing the 1B to int8 in this process (beside the loaded PyTorch model and the
        # exporter's leftovers) ran this 24 GB machine out of memory; a child's memory is returned when it ends.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            paths[variant], _ = child.submit(quantize_graph, path, scratch / preset / variant, spec.weights_prefix, plan, recipe).result()
    # One session at a time, each interleaved with PyTorch: three 1B sessions (prepacked weights) beside the
    # PyTorch model do not fit this 24 GB machine.
    ratios, runs = {}, min(options.repeats, 2)
    profile = {"pytorch": _profile_torch(transformer, inputs, runs)}
    for variant, variant_path in paths.items():
        graph = OnnxGraph(variant_path, options.onnx_options())
        ratios.update(_step_ratios(_torch_step(transformer), {variant: graph}, inputs, options))
        del graph
        profile[variant] = _profile_onnx(variant_path, inputs, options, scratch, runs)
    sizes = {f"{variant}_bytes": sum(f.stat().st_size for f in p.parent.iterdir()) for variant, p in paths.items()}
    facts = {"flops": _step_flops(transformer, inputs), "gemm_gflops": round(_gemm_gflops(), 1), "profile": profile}
    return {**ratios, **sizes, **facts, "preset": preset, "grid": grid}


def _ratio(r: Ratio) -> str:
    return f"{r.median:.2f}x ({r.p25:.2f}-{r.p75:.2f})"


def markdown(results: Results) -> str:
    m, s = results.machine, results.settings
    grid = int(s["grid"])
    step = results.step[grid]
    lines = [
        (
            f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']} ({m['torch_cpu_capability']}), "
            f"onnxruntime {m['onnxruntime']}; {s['threads']} threads, graph optimization 'all', memory arena on. "
            f"Speed-ups against PyTorch float32 from {s['repeats']} interleaved pairs after {s['warmup']} warm-up: "
            "median ratio (25th-75th percentile over the pairs), then each side's median milliseconds."
        ),
        "",
        f"| variant | step speed-up ({grid}x{grid} tokens) | step ms (PyTorch ms) | image speed-up ({s['steps']} steps) | image ms (PyTorch ms) | peak RSS MB | denoise_step MB | all graphs MB | logit SQNR dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| pytorch | 1 | | 1 | | {_cell(results.peak_rss_mb.get('pytorch'), '.0f')} | | | |",
    ]
    for variant, ratio in step.items():
        image = results.image[variant]
        sizes = results.sizes_mb.get(variant, {})
        total = sum({**results.sizes_mb.get("fp32", {}), **sizes}.values()) if sizes else None
        quality = results.quality.get(variant)
        lines.append(
            f"| {variant} | {_ratio(ratio)} | {ratio.candidate_ms:.1f} ({ratio.reference_ms:.1f}) | {_ratio(image)} | "
            f"{image.candidate_ms:.0f} ({image.reference_ms:.0f}) | {_cell(results.peak_rss_mb.get(variant), '.0f')} | "
            f"{_cell(sizes.get('denoise_step'), '.1f')} | {'' if total is None else f'{total:.1f}'} | {'' if quality is None else f'{quality:.1f}'} |"
        )
    lines += ["", "One step against the token grid: speed-up over PyTorch (spread), then ms:", ""]
    columns = list(step)
    lines += ["| grid | PyTorch ms | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for g, ratios in sorted(results.step.items()):
        reference_ms = np.median([r.reference_ms for r in ratios.values()])
        lines.append(f"| {g}x{g} | {reference_ms:.1f} | " + " | ".join(f"{_ratio(r)}, {r.candidate_ms:.1f}" for r in ratios.values()) + " |")
    if results.profile:
        lines += ["", f"Where a step's time goes ({grid}x{grid} tokens; op types by time per step, profiler overhead included):", ""]
        lines += _profile_table(results.profile)
    if results.one_b:
        lines += ["", *one_step_table(results.one_b)]
    return "\n".join(lines)


def _profile_table(profile: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| variant | op types, ms per step (share) |", "|---|---|"]
    for variant, per_op in profile.items():
        total = sum(per_op.values())
        lines.append(f"| {variant} | " + ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in _top(per_op).items()) + " |")
    return lines


def one_step_table(one: dict) -> list[str]:
    """The 1B step: each variant's speed-up, and how far the matrix-product kernels alone would let it go."""
    preset, grid, flops, profile = one["preset"], one["grid"], one["flops"], one["profile"]
    reference_ms = float(np.median([one[v].reference_ms for v in PRESET_STEP_VARIANTS]))
    share = {v: matrix_product_share(per_op) for v, per_op in profile.items()}
    floor_ms = flops / one["gemm_gflops"] / 1e6  # the step's FLOPs at the machine's best float32 GEMM rate
    lines = [
        (f"Preset `{preset}` (random weights; `meissonic-1b` is the released configuration), one denoise step at {grid}x{grid} tokens: "
        f"{flops / 1e12:.3f} TFLOP in the reference's arithmetic. This machine's float32 GEMM rate is {one['gemm_gflops']:.0f} GFLOP/s "
        f"(torch.mm of two 2048x2048 matrices, best of 3), so a float32 step doing that arithmetic takes at least {floor_ms:.0f} ms: "
        f"{reference_ms / floor_ms:.2f}x PyTorch's step at most. "
        "Each variant interleaved with PyTorch; the matrix products' share comes from each side's profiler, and the speed-up they allow "
        "is the measured one divided by that share (every other op free). GFLOP/s: the reference's operations per second of the step."),
        "",
        "| variant | speed-up (25th-75th) | ms (PyTorch ms) | step graph MB | matrix products' share | speed-up if only they took time | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| pytorch | 1 | {reference_ms:.0f} | | {share['pytorch']:.0%} | {1 / share['pytorch']:.2f}x | {flops / reference_ms / 1e6:.0f} |",
    ]
    for v in PRESET_STEP_VARIANTS:
        r = one[v]
        lines.append(
            f"| {v} | {_ratio(r)} | {r.candidate_ms:.0f} ({r.reference_ms:.0f}) | {one[f'{v}_bytes'] / 1e6:.0f} | {share[v]:.0%} | "
            f"{r.median / share[v]:.2f}x | {flops / r.candidate_ms / 1e6:.0f} |"
        )
    return [*lines, "", "Where that step's time goes (op types by time per step):", "", *_profile_table(profile)]


def _gemm_gflops(size: int = 2048, runs: int = 3) -> float:
    """The machine's float32 matrix-product rate at this thread count: what no float32 step can beat."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / min(_ms(lambda: torch.mm(a, b)) for _ in range(runs)) / 1e6


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def plot_latency(results: Results, path: Path) -> None:
    matplotlib, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grids = sorted(results.step)
    reference = [np.median([r.reference_ms for r in results.step[g].values()]) for g in grids]
    ax.plot([g * g for g in grids], reference, marker="o", label="pytorch")
    for variant in results.step[grids[0]]:
        ax.plot([g * g for g in grids], [results.step[g][variant].candidate_ms for g in grids], marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([g * g for g in grids], [f"{g}x{g}" for g in grids])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log-scale minor labels overlap the grids
    ax.set_xlabel("token grid")
    ax.set_ylabel("denoise step latency (ms, median of the pairs)")
    ax.set_title("Step latency against the token grid")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the format by name: the temporary file's suffix is not .png
    plt.close(fig)


def plot_size_vs_quality(results: Results, path: Path) -> None:
    _, plt = _pyplot()
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
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


REPORT_FILES = ("bench.json", "bench.md", "latency_vs_grid.png", "size_vs_quality.png")


def write(results: Results, out: Path) -> list[Path]:
    finite = lambda o: {k: finite(v) for k, v in o.items()} if isinstance(o, dict) else ("inf" if o == math.inf else o)
    writers = (
        lambda p: p.write_text(json.dumps(finite(asdict(results)), indent=2, default=str) + "\n"),
        lambda p: p.write_text(markdown(results) + "\n"),
        lambda p: plot_latency(results, p),
        lambda p: plot_size_vs_quality(results, p),
    )
    return write_report_folder(Path(out), dict(zip(REPORT_FILES, writers, strict=True)))
