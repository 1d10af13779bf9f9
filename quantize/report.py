"""Quality of quantized variants over a whole sampling run, measured with the runtime's own sampler.

Each variant generates from the same prompt and seed as the base precision; the report gives the
fraction of final tokens that agree and the decoded image's PSNR against the base image. A single
flipped draw changes every later step, so these figures fall faster than per-graph SQNR does.
"""
from __future__ import annotations

import numpy as np

from meissonic.runtimes.bundle import Manifest
from meissonic.runtimes.coreml_backend import CoreMLBackend
from meissonic.runtimes.onnx_backend import OnnxBackend
from meissonic.runtimes.sampler import TEXT_TO_IMAGE_GRAPHS, Request, Sampler
from meissonic.runtimes.tokenizer import CLIPTokenizer

from .metrics import psnr_db

PROMPT = "a photo of a cat wearing a hat"
SEED = 0


def skipped_without_generation(manifest: dict, target: str) -> dict | None:
    """{"skipped": why} where `target` lacks a graph that a generation runs (a partial bundle draws
    nothing: its graphs' own gates are all that judge it), else None. The whole-run report and the
    export's prompt-accuracy gate both ask."""
    exported = {entry["name"] for entry in manifest["graphs"] if entry["target"] == target}
    return None if set(TEXT_TO_IMAGE_GRAPHS) <= exported else {"skipped": f"needs the graphs {list(TEXT_TO_IMAGE_GRAPHS)}"}


def sampling_quality(root, manifest: dict, steps: int) -> dict:
    """Per target: each variant's whole sampling run against the target's base precision."""
    view = Manifest.from_json(root, manifest)
    if steps < 1:
        return {"skipped": "--quality-steps 0"}
    width, height = min(view.resolutions, key=lambda r: r[0] * r[1])
    defaults = view.model.defaults  # the model's own guidance and temperature; the steps are the report's
    request = Request(
        prompts=[PROMPT], width=width, height=height, steps=steps, guidance_scale=defaults.guidance_scale,
        temperature=defaults.temperature, seed=SEED,
    )  # fmt: skip
    tokenizer = CLIPTokenizer(root / "tokenizer")
    report = {"prompt": PROMPT, "seed": SEED, "steps": steps, "resolution": [width, height]}
    for target in manifest["base_variants"]:
        if target in ("ort", "phone"):  # the ONNX graphs in another file format or fixed shapes, each validated like them: the onnx row stands for them
            continue
        skipped = skipped_without_generation(manifest, target)
        if skipped:
            report[target] = skipped
            continue
        backend = OnnxBackend if target == "onnx" else CoreMLBackend
        run = lambda variant: Sampler(backend(view, variant, verify=False), tokenizer, view.model)(request, progress=False)  # noqa: B023
        base_variant = view.base_variant(target)
        base = run(base_variant)
        figures = {"against": base_variant}
        for variant in view.variants(target):
            if variant == base_variant:
                continue
            result = run(variant)
            psnr = psnr_db(base.pixels.astype(np.float64), result.pixels)
            figures[variant] = {
                "token_agreement": float((result.tokens == base.tokens).mean()),
                "image_psnr_db": psnr if np.isfinite(psnr) else "inf",
            }
        report[target] = figures
    return report
