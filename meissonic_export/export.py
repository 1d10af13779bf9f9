"""checkpoint folder -> bundle: export every graph, validate it against the reference, write the manifest.

The bundle is written into a hidden staging folder beside the destination and moved into place only
when every graph has passed validation, so an interrupted or failed export never leaves a folder that
looks like a bundle (the manifest, written last, is what makes a folder a bundle).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from meissonic.quantize.graph_files import onnx_files
from meissonic.quantize.onnx_quant import dequantized_weights, quantize_graph
from meissonic.quantize.recipe import Recipe, RecipeError, quantizable_layers
from meissonic.quantize.report import sampling_quality, skipped_without_generation
from meissonic.quantize.variants import VARIANTS
from meissonic.reference.checkpoint import COMPONENTS, load_component, read_config
from meissonic.reference.pipeline import load_scheduler, load_tokenizer
from meissonic.runtimes.bundle import FORMAT_VERSION, MANIFEST, GraphEntry, ModelFacts, sha256_file
from meissonic.runtimes.coreml_backend import CoreMLGraph
from meissonic.runtimes.onnx_backend import PHONE_POOLING_INPUT, PHONE_STEP_OUTPUT, OnnxGraph, PhoneGraph

from .evaluate import MAX_ACCURACY_LOSS_POINTS, accuracy_gate, evaluate_bundle
from .graphs import GRAPHS, TEXT_POSITIONS, GraphSpec, model_facts
from .onnx_export import OPSET, export_onnx, trace_inputs
from .options import (
    COREML_GRAPHS,
    GRAPH_NAMES,
    TARGETS,
    EvaluateOptions,
    ExportError,
    ExportOptions,
    check_options,
    check_resolutions,
    default_resolutions,
    read_generation_config,
)
from .ort_format import (
    OPERATORS_CONFIG,
    PHONE_APP_SIDE,
    PHONE_GRAPHS,
    convert_to_ort,
    mobile_usability,
    phone_graph,
    too_large_for_ort,
    write_operators_config,
)
from .validate import BUDGETS, reference_outputs, sqnr_db, validate


@dataclass
class ValidationCase:
    """Inputs a graph is validated on, with the reference outputs computed once for every variant."""

    label: dict
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] = field(default_factory=dict)


def export_bundle(checkpoint: Path, out: Path, options: ExportOptions | None = None) -> dict:
    """Export `checkpoint` into the bundle folder `out`; returns the manifest."""
    options = options or ExportOptions()
    checkpoint, out = Path(checkpoint), Path(out)
    check_options(checkpoint, out, options)
    if options.resolutions is None:
        options = dataclasses.replace(options, resolutions=default_resolutions(checkpoint))
    check_resolutions(options.resolutions, read_config(checkpoint, "vqvae").scale_factor)
    recipes = _checked_recipes(checkpoint, options)
    started = time.time()
    components = {name: load_component(checkpoint, name) for name in COMPONENTS}
    tokenizer, scheduler = load_tokenizer(checkpoint), load_scheduler(checkpoint)
    facts = model_facts(components, tokenizer.pad_token_id, read_generation_config(checkpoint))
    if scheduler.mask_token_id != facts.mask_token_id:  # the official pipeline refuses such a checkpoint too
        raise ExportError(f"{checkpoint}: scheduler mask_token_id {scheduler.mask_token_id} is not the transformer's last vocabulary id {facts.mask_token_id}")
    if "ort" in options.targets and "onnx" not in options.targets:  # ORT models are converted from the ONNX graphs, kept beside them
        options = dataclasses.replace(options, targets=("onnx", *options.targets))
    work = [(target, name) for target in options.targets for name in options.graphs if target == "onnx" or (target == "coreml" and name in COREML_GRAPHS)]
    jobs = min(len(work), options.jobs or _default_jobs(checkpoint))
    with staged_folder(out, options.overwrite, options.keep_failed) as staging, tqdm(total=len(work), disable=not options.progress, unit="graph") as bar:
        shutil.copytree(checkpoint / "tokenizer", staging / "tokenizer")
        shutil.copytree(checkpoint / "scheduler", staging / "scheduler")
        if jobs == 1:
            entries = []
            for target, name in work:
                bar.set_description(f"{target} {name}")
                entries += _graph_entries(components, target, name, staging, options, recipes, bar)
                bar.update()
        else:
            entries = _graph_entries_in_parallel(checkpoint, work, staging, options, recipes, jobs, bar)
        if "ort" in options.targets:
            write_operators_config([staging / e["path"] for e in entries if e["target"] in ("ort", "phone")], staging)
        manifest = _manifest(checkpoint, components, facts, options, entries, staging)
        if "ort" in options.targets:
            manifest["ort"] = {
                "conversion": "onnxruntime.tools.convert_onnx_models_to_ort, optimization style Fixed, target platform arm",
                "operators_config": OPERATORS_CONFIG,
                "skipped": {f"{e['name']} ({e['variant']})": e["ort_skipped"] for e in entries if "ort_skipped" in e},
            }
        if recipes:
            bar.set_description("quality runs")
            manifest["quality"] = sampling_quality(staging, manifest, options.quality_steps)
            if facts.defaults.evaluation == "shapes":
                bar.set_description("prompt accuracy")
                manifest["evaluation"] = _accuracy_gate(staging, manifest, options)
        manifest["export_seconds"] = round(time.time() - started, 1)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _graph_entries(components, target: str, name: str, staging: Path, options: ExportOptions, recipes, bar) -> list[dict]:
    """Export, validate and describe one graph for one target: its manifest entries. The validation
    inputs come from (seed, target, graph), so they do not depend on which process exports what."""
    spec = GRAPHS[name]
    module = spec.build(components)
    info = model_facts(components)
    rng = np.random.default_rng([options.seed, TARGETS.index(target), GRAPH_NAMES.index(name)])
    cases = _validation_cases(spec, module, info, options.resolutions, rng)
    export = _export_onnx_graph if target == "onnx" else _export_coreml_graph
    return export(spec, module, info, cases, staging, options, recipes, bar)


PARALLEL_EXPORT_BYTES = 1 << 30  # checkpoints above this export one graph at a time: each worker holds the model
# The workers take the graphs longest first, so that they finish together. `shapes`, each graph alone on
# 2026-11-26: denoise_step 40 s, vq_decoder 33 s, vq_encoder 15 s, text_encoder 6 s; in the declared
# order the step started after the text encoder and ended 6 s after the other worker had finished.
LONGEST_FIRST = ("denoise_step", "transformer", "vq_decoder", "vq_encoder", "text_encoder")


def _default_jobs(checkpoint: Path) -> int:
    """Two graphs at a time where two cores and the memory allow: torch.export and the ONNX translation
    are single-threaded Python and take 95% of a small model's export (20-60 s a graph here)."""
    weights = sum(f.stat().st_size for f in checkpoint.glob("*/*.safetensors"))
    return 1 if weights > PARALLEL_EXPORT_BYTES else min(2, os.cpu_count() or 1)


def _graph_entries_in_parallel(checkpoint: Path, work, staging: Path, options: ExportOptions, recipes, jobs: int, bar) -> list[dict]:
    """`_graph_entries` for every (target, graph) in worker processes (spawned: torch and onnxruntime
    keep threads that a fork would copy mid-flight), each loading the checkpoint once. Each graph writes
    its own folders of the staging folder; the entries come back as JSON text and keep `work`'s order."""
    bar.set_description(f"{len(work)} graphs, {jobs} at a time")
    found = {}
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(stop,)) as pool:
        queue = sorted(work, key=lambda item: LONGEST_FIRST.index(item[1]))
        futures = {pool.submit(_worker_graph_entries, checkpoint, target, name, staging, options, recipes): (target, name) for target, name in queue}
        try:
            for future in as_completed(futures):
                found[futures[future]] = json.loads(future.result())
                bar.set_postfix_str(f"done: {' '.join(n for _, n in found)}")
                bar.update()
        except BaseException:
            # Stop the workers now rather than after their current graph (a minute on a large model): a
            # SIGINT sent to this process alone (kill -INT, an IDE's stop) does not reach them. Interrupted,
            # a worker reports KeyboardInterrupt and exits cleanly (terminate() would leave the pool's
            # semaphores to the resource tracker, which warns on stderr). The executor lists its workers
            # only in `_processes` before Python 3.14. Then wait: nothing may still write into the staging
            # folder when it is removed.
            stop.set()  # graphs already queued to a worker (the executor queues one more than it runs) start and end at once
            for worker in list((pool._processes or {}).values()):
                with suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [entry for key in work for entry in found[key]]


def _start_worker(stop) -> None:
    """Once `stop` is set, a worker skips the graphs still queued to it (the executor queues one more than
    it runs, and cancel_futures cannot take it back): an interrupted export of the golden model took 30-36 s
    to stop here, running that graph, and takes 4 s now. And a worker raises KeyboardInterrupt on the SIGINT
    the parent sends it even when started from a process that ignores SIGINT (nohup; then only a failed
    graph stops the others), which Python would leave ignored."""
    global _worker_stop
    _worker_stop = stop
    signal.signal(signal.SIGINT, signal.default_int_handler)


_worker_stop = None  # the parent's stop event, in a worker process
_worker_components: dict[Path, dict] = {}  # a worker process's checkpoint, loaded on its first graph


def _worker_graph_entries(checkpoint: Path, target: str, name: str, staging: Path, options: ExportOptions, recipes) -> str:
    if _worker_stop is not None and _worker_stop.is_set():
        raise KeyboardInterrupt
    if checkpoint not in _worker_components:
        _worker_components[checkpoint] = {component: load_component(checkpoint, component) for component in COMPONENTS}
    with tqdm(disable=True) as silent:
        return json.dumps(_graph_entries(_worker_components[checkpoint], target, name, staging, options, recipes, silent))


def _accuracy_gate(staging: Path, manifest: dict, options: ExportOptions) -> dict:
    """For a model trained on the shapes world: each quantized variant's prompt accuracy on an
    evaluation subset against its target's base precision; a variant that loses more than
    MAX_ACCURACY_LOSS_POINTS stops the export with the figures (the manifest records them otherwise)."""
    (staging / MANIFEST).write_text(json.dumps(manifest))  # the runtime reads the staged bundle; rewritten at the end
    # The evaluation set's in-grammar pairs, all of them (EvaluateOptions' default count, 200). A variant and its
    # base draw the same pairs, so only the pairs where one is right and the other wrong move the difference;
    # on a 48-pair subset the Core ML int8 variant of `shapes` gained 2.1 points while 124 pairs measured a 5.0-point loss.
    report = {"pairs": EvaluateOptions.count, "max_loss_points": MAX_ACCURACY_LOSS_POINTS}
    for target in manifest["base_variants"]:
        skipped = skipped_without_generation(manifest, target)
        if skipped:
            report[target] = skipped
            continue
        # Core ML rows run on Core ML on macOS, elsewhere through the numpy evaluator (~2.7 s an image for
        # `shapes` here, so 200 pairs per variant take about 9 minutes): unmeasured, a Core ML variant would pass unjudged.
        evaluation = evaluate_bundle(staging, EvaluateOptions(backend=target, held_out_seeds=0, reference=False, progress=False))
        base = f"{target} {manifest['base_variants'][target]}"
        refused = accuracy_gate(evaluation, base)
        report[target] = {name: round(100 * f["prompt_accuracy"], 1) for name, f in evaluation["rows"].items()}
        if refused:
            raise ExportError("refused by the prompt-accuracy gate (shapes evaluation):\n" + "\n".join(f"{k}: {v}" for k, v in refused.items()))
    return report



def _validation_cases(spec: GraphSpec, module, info: ModelFacts, resolutions, rng) -> list[ValidationCase]:
    """One image at every resolution, plus two images (the batch is dynamic) at the smallest, capped at
    512 px a side: two 1024-px images through the 1B VQ-VAE's graphs took the export to 16 GB of
    memory, and the batch dimension is checked as well at 512. Text: two prompts."""
    if "height" not in spec.dims:
        cases = [ValidationCase({"batch": 2}, spec.sample(info, {"batch": 2}, rng))]
    else:
        f = info.vae_scale_factor
        smallest = min(resolutions, key=lambda r: r[0] * r[1])
        sizes = [(1, w, h) for w, h in resolutions] + [(2, min(smallest[0], 512), min(smallest[1], 512))]
        cases = [
            ValidationCase({"batch": b, "resolution": [w, h]}, spec.sample(info, {"batch": b, "height": h // f, "width": w // f}, rng))
            for b, w, h in sizes
        ]
    for case in cases:
        case.expected = reference_outputs(spec, module, case.inputs)
    return cases


def run_validation(spec: GraphSpec, module, run, cases: list[ValidationCase], variant: str, budget=None) -> list[dict]:
    """Validate one exported variant on every case; raises ExportError with the full report on failure."""
    budget = budget or BUDGETS[variant]
    reports = [{**case.label, **validate(spec, module, run, case.inputs, budget, case.expected)} for case in cases]
    failures = [f"  {r.get('resolution', '')} batch {r['batch']}: {f}" for r in reports for f in r["failures"]]
    if failures:
        raise ExportError(f"{spec.name} ({variant}) failed validation against the reference:\n" + "\n".join(failures))
    for report in reports:
        del report["failures"]
    return reports


def _checked_recipes(checkpoint: Path, options: ExportOptions) -> dict:
    """Load the recipes and check them against the checkpoint's layers (from its configs, on the meta
    device), so a wrong recipe or block size fails before any export work."""
    try:
        recipes = options.load_recipes()
        if not recipes:
            return {}
        layers = []
        # against every quantizable component, not only the graphs asked for: a recipe names the whole model's layers
        for component in dict.fromkeys(spec.component for spec in GRAPHS.values() if spec.quantizable):
            with torch.device("meta"):
                module = COMPONENTS[component].build(read_config(checkpoint, component))
            layers += quantizable_layers(COMPONENTS[component].weights_module(module))
        for recipe in recipes.values():
            recipe.check(layers)
    except RecipeError as error:
        raise ExportError(str(error)) from None
    return recipes


def _export_onnx_graph(spec: GraphSpec, module, info: ModelFacts, cases, staging: Path, options: ExportOptions, recipes, bar) -> list[dict]:
    """Export the float32 graph once, then derive, validate and describe every variant of it."""
    bar.set_postfix_str("exporting")
    fp32_dir = staging / "onnx" / "fp32" / spec.name
    grid = _one_grid(spec, info, cases)
    fp32_path = export_onnx(spec, module, trace_inputs(spec, info, np.random.default_rng(0), grid), fp32_dir, spec.shapes(info, grid))
    entries = []
    # The VQ graphs (convolutions) are kept at the base precision; the runtime falls back to it.
    variants = options.variants if spec.quantizable else [options.dtype]
    weights = spec.weights_module(module)
    for variant in variants:
        quantization = None
        if variant == "fp32":
            path = fp32_path
        else:
            bar.set_postfix_str(f"quantizing {variant}")
            recipe = recipes.get(variant) or Recipe.load(variant)
            plan = recipe.plan(quantizable_layers(weights))
            path, graph_layers = quantize_graph(fp32_path, staging / "onnx" / variant / spec.name, spec.weights_prefix, plan, recipe)
            present = {layer.name for layer in graph_layers}
            bits = {name: b for name, b in plan.items() if name in present}
            quantization = _quantization_report(recipe, bits, dequantized_weights(path, graph_layers), weights, sorted(set(plan) - present))
        bar.set_postfix_str(f"validating {variant}")
        parity = run_validation(spec, module, OnnxGraph(path), cases, variant)
        files = onnx_files(path)
        entries.append({
            "name": spec.name, "target": "onnx", "variant": variant,
            "path": _relative(path, staging), "files": [_relative(f, staging) for f in files],
            "bytes": sum(f.stat().st_size for f in files), "opset": OPSET,
            "precision": {"weights": {"fp32": "float32", "fp16": "float16"}.get(variant, variant), "inputs_outputs": "as declared"},
            "description": spec.description, **spec.interface(info, grid=grid),
            "parity": parity, "budget": BUDGETS[variant].to_dict(),
            **({"quantization": quantization} if quantization else {}),
        })  # fmt: skip
        if "ort" in options.targets:
            entries += _ort_entries(spec, module, info, entries[-1], cases, staging, options, bar)
    if "fp32" not in variants:
        shutil.rmtree(fp32_dir)  # the float32 export was only the source of the variants
        if not any(fp32_dir.parent.iterdir()):
            fp32_dir.parent.rmdir()
    return entries


def _one_grid(spec: GraphSpec, info: ModelFacts, cases: list[ValidationCase]) -> dict[str, int] | None:
    """The token grid an export fixes in its ONNX graphs (the batch stays dynamic) where every validation
    input has that one grid: an export for one resolution of at most 512 px a side. None for a graph
    without a grid, for several resolutions (one graph serves them all) and above 512 px, where the
    two-image case is validated at 512. torch.export reasons about a dynamic grid symbolically; one fixed
    grid takes a third or more off: for `shapes`, the step's export took 18.6 s against 28.2 and the
    decoder's 12.9 against 22.0 (2026-11-27), at the same step time in onnxruntime (24.6 and 24.2 ms)."""
    sizes = {tuple(case.label["resolution"]) for case in cases if "resolution" in case.label}
    if len(sizes) != 1:
        return None
    ((width, height),), f = sizes, info.vae_scale_factor
    return {"height": height // f, "width": width // f}


def _ort_entries(spec: GraphSpec, module, info: ModelFacts, onnx_entry: dict, cases, staging: Path, options: ExportOptions, bar) -> list[dict]:
    """The ORT-format twin of an exported ONNX graph and, for the graphs an app runs, its fixed-shape
    phone graphs (batch 1, one per resolution), each validated like every graph and described with the
    mobile usability checker's figures. A graph over the format's 2 GB limit gets none; its ONNX entry
    says why (`ort_skipped`)."""
    variant = onnx_entry["variant"]
    reason = too_large_for_ort([staging / f for f in onnx_entry["files"]])
    if reason is not None:
        onnx_entry["ort_skipped"] = reason
        return []
    source = staging / onnx_entry["path"]
    bar.set_postfix_str(f"ORT format {variant}")
    path = _converted(spec, variant, source)
    bar.set_postfix_str(f"validating ORT {variant}")
    parity = run_validation(spec, module, OnnxGraph(path), cases, variant)
    relative = _relative(path, staging)
    entries = [{**onnx_entry, "target": "ort", "path": relative, "files": [relative], "bytes": path.stat().st_size, "parity": parity,
                "mobile_usability": mobile_usability(source)}]  # fmt: skip
    if spec.name not in PHONE_GRAPHS:
        return entries
    f = info.vae_scale_factor
    for size in options.resolutions if "height" in spec.dims else [None]:
        dims = {"batch": 1} if size is None else {"batch": 1, "height": size[1] // f, "width": size[0] // f}
        bar.set_postfix_str(f"phone graph {variant}" + (f" {size[0]}x{size[1]}" if size else ""))
        app_side = PHONE_APP_SIDE.get(spec.name)
        phone_onnx = phone_graph(source, source.parent / ("phone" if size is None else f"phone-{size[0]}x{size[1]}"), dims, app_side)
        phone = _converted(spec, variant, phone_onnx)
        files = [_relative(p, staging) for p in (phone, phone_onnx)]
        entry = {
            **onnx_entry, "target": "phone", "path": files[0], "files": files, "bytes": phone.stat().st_size,
            **({"resolution": list(size)} if size else {}), "static_shapes": dims, "mobile_usability": mobile_usability(phone_onnx),
            **_phone_interface(onnx_entry, module, info, phone_onnx),
        }  # fmt: skip
        graph = PhoneGraph(staging, [GraphEntry.from_json(entry)])
        own = [c for c in cases if c.label.get("resolution") == (list(size) if size else None)]
        entry["parity"] = run_validation(spec, module, graph, own, f"phone {variant}", BUDGETS[variant])
        entries.append(entry)
    return entries


def _phone_interface(onnx_entry: dict, module, info: ModelFacts, phone_onnx: Path) -> dict:
    """The inputs and outputs of a phone graph that leaves work to the app (see `phone_graph`), and what
    the app does; {} for the others, whose interface is the desktop graph's."""
    graph = onnx.load(str(phone_onnx), load_external_data=False).graph
    dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in (*graph.input, *graph.output)}
    if PHONE_POOLING_INPUT in dtypes:
        onehot = {"name": PHONE_POOLING_INPUT, "dtype": dtypes[PHONE_POOLING_INPUT], "shape": ["batch", TEXT_POSITIONS],
                  "doc": "1.0 at the pooled position: the first eos_token_id (runtimes.onnx_backend.eos_onehot)"}  # fmt: skip
        eos = module.text_encoder.clip.config.eos_token_id
        return {"inputs": [*onnx_entry["inputs"], onehot], "eos_token_id": eos, "app_side": f"pooling position from the ids (eos_token_id {eos})"}
    if PHONE_STEP_OUTPUT not in dtypes:
        return {}
    tokens = next(t for t in onnx_entry["outputs"] if t["name"] == "sampled_tokens")
    probs = {"name": PHONE_STEP_OUTPUT, "dtype": dtypes[PHONE_STEP_OUTPUT], "shape": [*tokens["shape"], info.codebook_size],
             "doc": "guided probabilities over the codebook; the app draws from them (runtimes.sampler.categorical_draw)"}  # fmt: skip
    return {
        "inputs": [t for t in onnx_entry["inputs"] if t["name"] != "uniforms"], "outputs": [probs],
        "app_side": "the draw: inverse CDF of float32 cumulative probabilities, as the desktop step; guidance always applied, "
        "so for a scale <= 1 feed the positive conditioning as the negative rows too",
    }  # fmt: skip


def _converted(spec: GraphSpec, variant: str, onnx_path: Path) -> Path:
    try:
        return convert_to_ort(onnx_path)
    except RuntimeError as error:
        raise ExportError(f"{spec.name} ({variant}): {error}") from None


def _quantization_report(recipe, bits: dict[str, int], computed: dict, weights: torch.nn.Module, folded: list[str]) -> dict:
    """The recipe, the bits of every weight in the graph, and each compressed weight's SQNR against the
    float one (`computed`: layer -> the weight the exported graph computes with)."""
    errors, signal, noise = {}, 0.0, 0.0
    for name, array in computed.items():
        if bits.get(name, 32) == 32:
            continue
        reference = weights.get_submodule(name).weight.detach().numpy().astype(np.float64)
        array = np.asarray(array, dtype=np.float64).reshape(reference.shape)
        errors[name] = round(sqnr_db(reference, array), 2)
        signal, noise = signal + float((reference**2).sum()), noise + float(((array - reference) ** 2).sum())
    return {
        "recipe": recipe.to_dict(),
        "bits": bits,
        # weights the exporter folded into constants (CLIP's position embedding): float, float16 in fp16
        "folded_layers": folded,
        "weight_sqnr_db": round(10 * np.log10(signal / noise), 2) if noise else "inf",
        "layer_weight_sqnr_db": errors,
    }


def _export_coreml_graph(spec: GraphSpec, module, info: ModelFacts, cases, staging: Path, options: ExportOptions, recipes, bar) -> list[dict]:
    """One package per resolution (static shapes, one image), float16 compute, then the compressed
    variants; each validated through the runtime's own Core ML graph (the MIL evaluator on Linux).

    Variants that share a deployment target share one conversion. Packages are converted, compressed
    and saved one at a time, and validated from disk afterwards: the 1B step held in memory whole, in
    two targets and compressed, came within 1 GB of this machine's 24 GB."""
    # coremltools is imported here, not at the top: it takes seconds to load and ONNX-only exports never need it
    from meissonic.quantize.coreml_quant import compress, compressed_weights, recipe_for, weight_constants

    from .coreml_convert import save_mlpackage
    from .coreml_fp16 import FP32_REGIONS

    weights = spec.weights_module(module)
    layers = quantizable_layers(weights)
    variants = options.coreml_variants if spec.quantizable else ["fp16"]
    sizes = list(options.resolutions) if "height" in spec.dims else [None]
    # Several resolutions end in one iOS 18 multifunction package per variant (_share_packages_across_resolutions),
    # so every variant converts once, at iOS 18, rather than once per deployment target it could have had alone.
    target_of = {v: "iOS18" if len(sizes) > 1 else VARIANTS[v].coreml_target for v in variants}
    by_target = {target: [v for v in variants if target_of[v] == target] for target in dict.fromkeys(target_of.values())}
    f = info.vae_scale_factor
    # a float32 graph keeps float32 weights whatever the variant; a float16 graph's weights are the variant's
    compute, fixed_weights = ("float32", "float32") if spec.coreml_compute == "fp32" else (f"float16, float32 where it matters ({', '.join(FP32_REGIONS)})", None)
    entries = []
    for size in sizes:
        dims = {"batch": 1} if size is None else {"batch": 1, "height": size[1] // f, "width": size[0] // f}
        example = spec.sample(info, dims, np.random.default_rng(0))
        stem = spec.name if size is None else f"{spec.name}_{size[0]}x{size[1]}"
        for target, group in by_target.items():
            parts, bits, computed = ({v: [] for v in group}, {v: {} for v in group}, {v: {} for v in group})
            bar.set_postfix_str(f"converting {stem} ({target})")
            for suffix, inputs, outputs, model, part in _convert_coreml(spec, module, example, options.chunks, target):
                constants = weight_constants(part, weights)
                for variant in group:
                    bar.set_postfix_str(f"{stem}{suffix} {variant}")
                    package = model
                    if variant != "fp16":
                        recipe = recipe_for(variant, recipes)
                        package, part_bits = compress(model, variant, recipe.plan(layers), constants, recipe.block_size)
                        bits[variant].update(part_bits)
                    path = save_mlpackage(package, staging / "coreml" / variant / f"{stem}{suffix}.mlpackage")
                    del package
                    parts[variant].append({"path": _relative(path, staging), "inputs": inputs, "outputs": outputs, "bytes": _tree_bytes(path)})
                    if variant != "fp16":
                        computed[variant].update(compressed_weights(path, constants))
                del model
            for variant in group:
                files = sorted(_relative(p, staging) for part in parts[variant] for p in (staging / part["path"]).rglob("*") if p.is_file())
                entry = {
                    "name": spec.name, "target": "coreml", "variant": variant, "path": parts[variant][0]["path"], "files": files,
                    "bytes": sum(part["bytes"] for part in parts[variant]), "deployment_target": target,
                    **({"resolution": list(size)} if size else {}), "static_shapes": dims,
                    "precision": {"compute": compute, "weights": fixed_weights or {"fp16": "float16"}.get(variant, variant), "inputs_outputs": "float32; token ids int32"},
                    "description": spec.description, **spec.interface(info, {"int64": "int32"}),
                    **({"chunks": parts[variant]} if len(parts[variant]) > 1 else {}),
                }  # fmt: skip
                if variant != "fp16":
                    entry["quantization"] = _quantization_report(recipe_for(variant, recipes), bits[variant], computed[variant], weights, [])
                entries.append(entry)
    if len(sizes) > 1:
        bar.set_postfix_str(f"one package for {len(sizes)} resolutions")
        _share_packages_across_resolutions(entries, staging)
    for entry in entries:
        bar.set_postfix_str(f"validating {spec.name} {entry.get('resolution', '')} {entry['variant']}")
        graph = CoreMLGraph(staging, [GraphEntry.from_json(entry)])
        own = [c for c in cases if c.label.get("resolution") == entry.get("resolution")]
        entry["parity"] = run_validation(spec, module, graph, own, f"coreml {entry['variant']}", BUDGETS[entry["variant"]])
        entry["budget"] = BUDGETS[entry["variant"]].to_dict()
        del graph
    return entries


def _share_packages_across_resolutions(entries: list[dict], staging: Path) -> None:
    """Merge each variant's per-resolution packages (each chunk apart) into one multifunction package,
    one function per resolution (`size_WxH`), and point the entries at their function.

    Each resolution keeps its own static-shape program (the Neural Engine compiles static shapes; the
    rotary tables and grid constants are folded per size), and coremltools stores a weight the
    functions share once: for `shapes` the float16 step at 256 and 512 px is 6.0 MB in one package
    against 11.9 MB in two. Enumerated input shapes would keep one program, but the rotary tables
    depend on the grid, which the traced program bakes in. The price: multifunction packages need
    iOS 18 / macOS 15 (specification 9); a bundle of one resolution keeps its iOS 17 package. Every
    variant was converted and compressed at iOS 18 for this: palettes then use iOS 18's lookup-table
    constants, which a multifunction program holds (coremltools 9 cannot lift iOS 16's into one)."""
    from .coreml_convert import save_multifunction_package

    for variant in dict.fromkeys(e["variant"] for e in entries):
        group = [e for e in entries if e["variant"] == variant]
        parts = [e.get("chunks") or [{"path": e["path"]}] for e in group]
        for index in range(len(parts[0])):
            functions = {f"size_{e['resolution'][0]}x{e['resolution'][1]}": staging / entry_parts[index]["path"] for e, entry_parts in zip(group, parts)}
            first = Path(parts[0][index]["path"])
            shared = first.with_name(first.name.replace(f"_{group[0]['resolution'][0]}x{group[0]['resolution'][1]}", ""))
            save_multifunction_package(functions, staging / shared)
            for (function, package), entry_parts in zip(functions.items(), parts):
                shutil.rmtree(package)
                entry_parts[index].update({"path": str(shared), "function": function, "bytes": _tree_bytes(staging / shared)})
        files = sorted({_relative(f, staging) for entry_parts in parts[:1] for part in entry_parts for f in (staging / part["path"]).rglob("*") if f.is_file()})
        for entry, entry_parts in zip(group, parts):
            entry.update(path=entry_parts[0]["path"], function=entry_parts[0]["function"], files=files, deployment_target="iOS18",
                         bytes=sum(part["bytes"] for part in entry_parts), resolutions_in_package=[e["resolution"] for e in group])
            if "chunks" in entry:
                entry["chunks"] = entry_parts


def _convert_coreml(spec: GraphSpec, module, example: dict, chunks: int, target: str):
    """Yields (file name suffix, input names, output names, MLModel, the torch module converted) per package."""
    from .coreml_chunks import convert_denoise_chunks  # coremltools: see _export_coreml_graph
    from .coreml_convert import convert_graph

    if spec.name == "denoise_step" and chunks > 1:
        for i, (chunk, model) in enumerate(convert_denoise_chunks(spec, module, example, chunks, "fp16", target)):
            yield f".chunk{i}", chunk.spec.input_names(), chunk.spec.output_names(), model, chunk.module
            del model  # before the next chunk converts
    else:
        yield "", spec.input_names(), spec.output_names(), convert_graph(spec, module, example, spec.coreml_compute, target), module


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _versions() -> dict:
    names = ["torch", "transformers", "onnx", "onnxscript", "onnxruntime", "coremltools", "numpy", "tokenizers", "safetensors"]
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ["meissonic-export", *names]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _manifest(checkpoint, components, facts: ModelFacts, options, entries, staging: Path) -> dict:
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": _versions(),
        "source": {
            "checkpoint": str(checkpoint.resolve()),
            "configs": {name: COMPONENTS[name].config_dict(module.config) for name, module in components.items()},
            "weights_sha256": {
                f"{c.folder}/{c.weights}": sha256_file(checkpoint / c.folder / c.weights) for c in COMPONENTS.values()
            },
        },
        "model": facts.to_json(),
        "resolutions": [list(r) for r in options.resolutions],
        "base_variants": {target: "fp16" if target == "coreml" else options.dtype for target in dict.fromkeys(e["target"] for e in entries)},
        "graphs": entries,
        "files": {_relative(p, staging): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
    }


@contextmanager
def staged_folder(out: Path, overwrite: bool, keep_failed: bool = False):
    """Yield a hidden folder beside `out`; move it to `out` on success, delete it on any failure (or,
    with `keep_failed`, move it to `out.failed`: no manifest, so no runtime mistakes it for a bundle)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            if not overwrite:
                raise ExportError(f"{out}: appeared during the export; not replacing it")
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    except BaseException:
        if keep_failed and staging.exists():
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            staging.rename(failed)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
