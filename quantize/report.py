"""Quality of quantized variants over a whole sampling run, measured with the runtime's own sampler.

Each variant generates from the same prompt and seed as the base precision; the report gives the
fraction of final tokens that agree and the decoded image's PSNR against the base image. A single
flipped draw changes every later step, so these figures fall faster than per-graph SQNR does.
"""
from __future__ import annotations

import numpy as np

from meissonic_export.validate import psnr_db
from runtimes.bundle import Manifest
from runtimes.onnx_backend import OnnxBackend
from runtimes.sampler import ModelFacts, Request, Sampler
from runtimes.tokenizer import CLIPTokenizer

PROMPT = "a photo of a cat wearing a hat"
SEED = 0


def sampling_quality(root, manifest: dict, steps: int) -> dict:
    view = Manifest(root, manifest)
    needed = {"text_encoder", "denoise_step", "vq_decoder"}
    if not needed <= {g.name for g in view.graphs}:
        return {"skipped": f"needs the graphs {sorted(needed)}"}
    width, height = min(view.resolutions, key=lambda r: r[0] * r[1])
    model = manifest["model"]
    facts = ModelFacts(model["mask_token_id"], model["vae_scale_factor"], model["defaults"]["aesthetic_score"])
    request = Request(prompts=[PROMPT], width=width, height=height, steps=steps, seed=SEED)
    tokenizer = CLIPTokenizer(root / "tokenizer")
    run = lambda variant: Sampler(OnnxBackend(view, variant, verify=False), tokenizer, facts)(request, progress=False)
    base = run(manifest["base_variant"])
    report = {"prompt": PROMPT, "seed": SEED, "steps": steps, "resolution": [width, height], "against": manifest["base_variant"]}
    for variant in view.variants("onnx"):
        if variant == manifest["base_variant"]:
            continue
        result = run(variant)
        psnr = psnr_db(base.pixels.astype(np.float64), result.pixels)
        report[variant] = {
            "token_agreement": float((result.tokens == base.tokens).mean()),
            "image_psnr_db": psnr if np.isfinite(psnr) else "inf",
        }
    return report
