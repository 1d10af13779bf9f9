"""Judge a bundle of the shapes model by what it draws.

Every row (the PyTorch reference, each variant of the bundle) generates the same prompt-seed pairs at the
bundle's generation defaults; the shapes analyzer reads each image back. Against the float32 run of the
same seed (ONNX fp32, else the reference) each row also reports token agreement and image PSNR, so a
variant that draws the right thing differently is told apart from one that draws something else.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from meissonic.reference import shapes
from meissonic.runtimes.bundle import read_manifest
from meissonic.runtimes.cli_common import write_report_folder
from meissonic.runtimes.images import pixels_to_pil

from .options import EVALUATION_FILES, EvaluateOptions, ExportError

GRID_PROMPTS = 8  # rows of the PNG grid: the first in-grammar and held-out pairs
MAX_ACCURACY_LOSS_POINTS = 3.0  # a quantized variant may lose at most this much prompt accuracy against its base


def _generators(bundle: Path, options: EvaluateOptions):
    """(row name, generate(prompt, seed) -> (tokens [H,W], uint8 image [h,w,3])) for each row."""
    from meissonic.runtimes.pipeline import MeissonicRuntime

    manifest = read_manifest(bundle)
    defaults = manifest.model.defaults
    rows = []
    if options.reference:
        rows.append(("pytorch", _reference_generator(manifest, defaults)))
    targets = ["onnx"] if options.backend == "onnx" else (["onnx"] if "onnx" in manifest.base_variants else []) + ["coreml"]
    for target in targets:
        if target not in manifest.base_variants:
            raise ExportError(f"{bundle}: has no {target} graphs (it has {sorted(manifest.base_variants)})")
        variants = manifest.variants(target)
        if target == "onnx" and options.backend == "coreml":
            variants = [manifest.base_variant("onnx")]  # the float32 baseline of the Core ML rows
        elif options.variants is not None:
            unknown = [v for v in options.variants if v not in variants]
            if unknown:
                raise ExportError(f"--variants: {unknown} not in this bundle's {target} graphs (it has {variants})")
            variants = list(options.variants)
        for variant in sorted(variants, key=lambda v: v != manifest.base_variant(target)):
            runtime = MeissonicRuntime.from_bundle(bundle, backend=target, variant=variant)

            def generate(prompt, seed, runtime=runtime):
                result = runtime.generate(prompt, seed=seed, progress=False)
                return result.tokens[0], np.asarray(result.images[0])

            rows.append((f"{target} {variant}", generate))
    return rows, defaults


def _reference_generator(manifest, defaults):
    import torch

    from meissonic.reference.pipeline import MeissonicPipeline
    from meissonic.reference.scheduler import UniformNoise

    checkpoint = Path(manifest.source["checkpoint"])
    pipe = MeissonicPipeline.from_pretrained(checkpoint)
    width, height = defaults.resolution or manifest.resolutions[-1]

    def generate(prompt, seed):
        with torch.no_grad():
            out = pipe(
                prompt, width=width, height=height, num_inference_steps=defaults.steps, guidance_scale=defaults.guidance_scale,
                temperature=defaults.temperature, aesthetic_score=defaults.aesthetic_score,
                noise=UniformNoise.from_seed(seed), progress=False,
            )  # fmt: skip
        return out.tokens[0].numpy(), np.asarray(pixels_to_pil(out.pixels)[0])

    return generate


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0**2
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def evaluate_bundle(bundle: Path, options: EvaluateOptions | None = None) -> dict:
    options = options or EvaluateOptions()
    pairs = shapes.evaluation_set(options.count, options.held_out_seeds)
    rows, defaults = _generators(Path(bundle), options)
    baseline_name = next((name for name, _ in rows if name.startswith("onnx")), rows[0][0])
    grid_pairs = [i for i, p in enumerate(pairs) if not p.held_out][: GRID_PROMPTS // 2] + [i for i, p in enumerate(pairs) if p.held_out][: GRID_PROMPTS // 2]
    ordered = sorted(rows, key=lambda row: row[0] != baseline_name)  # the baseline first: the others compare with it
    baseline: list = []
    report = {"defaults": defaults.to_json(), "pairs": len(pairs), "held_out_pairs": sum(p.held_out for p in pairs), "baseline": baseline_name, "rows": {}}
    grid_images = {}
    total = len(rows) * len(pairs)
    with tqdm(total=total, disable=not options.progress, desc="evaluating") as bar:
        for name, generate in ordered:
            readings, agreement, psnr = [], [], []
            for i, pair in enumerate(pairs):
                tokens, image = generate(pair.scene.prompt, pair.seed)
                readings.append(shapes.analyze(image))
                if name == baseline_name:
                    baseline.append((tokens, image))
                else:
                    agreement.append(float((tokens == baseline[i][0]).mean()))
                    psnr.append(_psnr(image, baseline[i][1]))
                if i in grid_pairs:
                    grid_images[(name, i)] = image
                bar.update()
            report["rows"][name] = _figures(pairs, readings, agreement, psnr)
    report["grid"] = {"prompts": [pairs[i].scene.prompt + (" (held out)" if pairs[i].held_out else "") for i in grid_pairs], "rows": [n for n, _ in ordered]}
    report["_grid_images"] = [[grid_images[(n, i)] for n, _ in ordered] for i in grid_pairs]
    return report


def _figures(pairs, readings, agreement, psnr) -> dict:
    def accuracy(selected, attribute=None):
        hits = [
            (reading.scene() == pair.scene) if attribute is None else (getattr(reading, attribute) == getattr(pair.scene, attribute))
            for pair, reading in selected
        ]
        return float(np.mean(hits)) if hits else None

    seen = [(p, r) for p, r in zip(pairs, readings, strict=True) if not p.held_out]
    held = [(p, r) for p, r in zip(pairs, readings, strict=True) if p.held_out]
    figures = {
        "prompt_accuracy": accuracy(seen),
        "held_out_accuracy": accuracy(held),
        "background_accuracy": accuracy(seen, "background"),
        "color_accuracy": accuracy(seen, "color"),
        "shape_accuracy": accuracy(seen, "shape"),
        # where the shape kind goes wrong (the shapes model: squares), which the one shape figure hides
        "shape_accuracy_by_kind": {kind: accuracy([(p, r) for p, r in seen if p.scene.shape == kind], "shape") for kind in shapes.SHAPES},
    }
    if agreement:
        finite = [p for p in psnr if math.isfinite(p)]
        figures.update(
            token_agreement=float(np.mean(agreement)),
            identical_images=int(sum(not math.isfinite(p) for p in psnr)),
            median_psnr_db="inf" if len(finite) * 2 < len(psnr) else float(np.median(psnr)),
        )
    return figures


def format_table(report: dict) -> str:
    def pct(value):
        return "—" if value is None else f"{100 * value:.1f}"

    lines = [
        (
            f"{report['pairs'] - report['held_out_pairs']} prompt-seed pairs + {report['held_out_pairs']} held out; "
            f"{report['defaults']['steps']} steps, guidance {report['defaults']['guidance_scale']}, temperature {report['defaults']['temperature']}; "
            f"agreement and PSNR against {report['baseline']}"
        ),
        f"| {'row':<14} | prompt % | held-out % | background % | color % | shape % | tokens agree % | median PSNR dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in report["rows"].items():
        agree = pct(f.get("token_agreement")) if "token_agreement" in f else "baseline"
        psnr = f.get("median_psnr_db", "—")
        psnr = psnr if isinstance(psnr, str) else f"{psnr:.1f}"
        lines.append(
            f"| {name:<14} | {pct(f['prompt_accuracy'])} | {pct(f['held_out_accuracy'])} | {pct(f['background_accuracy'])} | "
            f"{pct(f['color_accuracy'])} | {pct(f['shape_accuracy'])} | {agree} | {psnr} |"
        )
    return "\n".join(lines)


def grid_png(report: dict) -> Image.Image:
    """Prompts down, rows (variants) across, with labels."""
    images = report["_grid_images"]
    cell, label_h, label_w = 128, 28, 260
    columns = report["grid"]["rows"]
    canvas = Image.new("RGB", (label_w + cell * len(columns), label_h + cell * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((label_w + c * cell + 4, 8), name, fill="black")
    for r, (prompt, row) in enumerate(zip(report["grid"]["prompts"], images, strict=True)):
        y = label_h + r * cell
        for line, text in enumerate(_wrap(prompt, 40)):
            draw.text((6, y + 8 + 14 * line), text, fill="black")
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (label_w + c * cell, y))
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current]


def write_report(report: dict, out: Path) -> list[Path]:
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    writers = (
        lambda p: p.write_text(json.dumps(public, indent=2) + "\n"),
        lambda p: p.write_text(format_table(report) + "\n"),
        lambda p: grid_png(report).save(p, format="PNG"),
    )
    return write_report_folder(Path(out), dict(zip(EVALUATION_FILES, writers, strict=True)))


def accuracy_gate(report: dict, base_row: str) -> dict[str, str]:
    """row -> why it is refused: prompt accuracy more than MAX_ACCURACY_LOSS_POINTS below its base. Only the
    base's own target is judged ("coreml int8" against "coreml fp16"; a Core ML report's "onnx fp32" row is
    its reference, not a variant)."""
    base, target = report["rows"][base_row]["prompt_accuracy"], base_row.split()[0]
    refused = {}
    for name, figures in report["rows"].items():
        loss = 100 * (base - figures["prompt_accuracy"])
        if name != base_row and name.split()[0] == target and loss > MAX_ACCURACY_LOSS_POINTS:
            refused[name] = f"prompt accuracy {100 * figures['prompt_accuracy']:.1f}% is {loss:.1f} points below {base_row}'s {100 * base:.1f}% (bound {MAX_ACCURACY_LOSS_POINTS})"
    return refused
