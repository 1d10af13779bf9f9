"""The reference's sampling modes beyond the golden run: explicit noise, editing, odd sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meissonic.reference.scheduler import UniformNoise, categorical_by_inverse_cdf
from meissonic.runtimes.images import outpaint_canvas


def test_inverse_cdf_draw_follows_the_distribution():
    probs = torch.tensor([0.125, 0.0, 0.5, 0.375])  # exact in float32, so the CDF edges are too
    uniforms = torch.from_numpy(np.random.default_rng(0).random(200_000, dtype=np.float32))
    counts = torch.bincount(categorical_by_inverse_cdf(probs.expand(len(uniforms), -1), uniforms), minlength=4)
    frequencies = counts.double() / len(uniforms)
    assert counts[1] == 0  # a zero-probability code is never drawn
    # binomial standard error at n=2e5 is <= 0.0011; 5 sigma
    torch.testing.assert_close(frequencies, probs.double(), atol=0.0056, rtol=0)
    # boundaries: a uniform equal to a cumulative probability belongs to the next code
    edges = torch.tensor([0.0, 0.125, 0.625, 0.99999])
    assert categorical_by_inverse_cdf(probs.expand(4, -1), edges).tolist() == [0, 2, 3, 3]


def test_explicit_noise_is_reproducible_and_differs_by_seed(golden_pipeline):
    run = lambda seed: golden_pipeline("a cat", height=128, width=96, num_inference_steps=4, noise=UniformNoise.from_seed(seed), progress=False).tokens
    first = run(7)
    assert first.shape == (1, 8, 6)  # non-square grid
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


def test_explicit_arrays_equal_seeded_stream(golden_pipeline):
    rng = np.random.Generator(np.random.PCG64(5))
    steps, tokens = 3, 8 * 8
    # per step: categorical then Gumbel, except no Gumbel draw on the last step
    draws = [rng.random((1, tokens), dtype=np.float32) for _ in range(2 * steps - 1)]
    kwargs = {"height": 128, "width": 128, "num_inference_steps": steps, "progress": False}
    by_arrays = golden_pipeline("a dog", noise=UniformNoise.from_arrays(draws), **kwargs).tokens
    assert torch.equal(by_arrays, golden_pipeline("a dog", noise=UniformNoise.from_seed(5), **kwargs).tokens)


def test_inpainting_regenerates_only_the_mask(golden_pipeline):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))  # left half
    result = golden_pipeline("a cat", image=image, mask=mask, height=128, width=128, num_inference_steps=4, noise=UniformNoise.from_seed(1), progress=False)
    original = golden_pipeline.vqvae.encode(torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255))
    assert torch.equal(result.tokens[..., 4:], original[..., 4:])
    assert (result.tokens != golden_pipeline.scheduler.mask_token_id).all()


def test_outpainting_keeps_the_original_region(golden_pipeline):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    canvas, mask = outpaint_canvas(image, left=32, top=32, right=32, bottom=32)
    assert canvas.size == (128, 128)
    result = golden_pipeline("a cat", image=canvas, mask=mask, height=128, width=128, num_inference_steps=3, noise=UniformNoise.from_seed(3), progress=False)
    original = golden_pipeline.vqvae.encode(torch.from_numpy(np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255))
    assert torch.equal(result.tokens[:, 2:6, 2:6], original[:, 2:6, 2:6])


def test_image_to_image_strength_controls_the_change(golden_pipeline):
    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    original = golden_pipeline.vqvae.encode(torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255))
    kept = []
    for strength in (0.25, 1.0):
        tokens = golden_pipeline("a cat", image=image, strength=strength, height=128, width=128, num_inference_steps=8, noise=UniformNoise.from_seed(0), progress=False).tokens
        kept.append((tokens == original).float().mean().item())
    assert kept[0] > 0.6 and kept[0] > kept[1]


def test_bad_arguments(golden_pipeline):
    with pytest.raises(ValueError, match="even token grid"):
        golden_pipeline("a cat", height=136, width=128)
    with pytest.raises(ValueError, match="at least 1"):
        golden_pipeline("a cat", height=128, width=128, num_inference_steps=0)
    with pytest.raises(ValueError, match="strength"):
        golden_pipeline("a cat", height=128, width=128, strength=0)
