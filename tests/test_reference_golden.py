"""The reference against outputs of the official implementation (float32, CPU).

Tolerances: 1e-4 absolute for float tensors (the spec's bound for a faithful float32 port; measured
here 0 for logits, 1.2e-5 for VQ decode, 7e-7 for the text encoder); token ids and the scheduler
trajectory identical (same torch generator consumed the same way); the pipeline image within 1/255.
"""
from __future__ import annotations

import numpy as np
import torch

from meissonic.reference.pipeline import load_scheduler, load_tokenizer
from meissonic.reference.scheduler import TorchNoise
from meissonic.reference.transformer import TEXT_POSITIONS, position_ids

ATOL = 1e-4


def test_transformer_logits(golden_pipeline, golden):
    with torch.no_grad():
        logits = golden_pipeline.transformer(
            golden["transformer.tokens"],
            golden["transformer.encoder_hidden_states"],
            golden["transformer.pooled_projections"],
            golden["transformer.micro_conds"],
            golden["transformer.timestep"],
        )
    assert logits.shape == golden["transformer.logits"].shape
    torch.testing.assert_close(logits, golden["transformer.logits"], atol=ATOL, rtol=0)


def test_position_ids_match_the_official_ones(golden_pipeline, golden):
    height, width = golden["transformer.tokens"].shape[1:]
    factor = 2 if golden_pipeline.transformer.config.downsample else 1
    ids = position_ids(height // factor, width // factor).float()
    torch.testing.assert_close(ids[:TEXT_POSITIONS], golden["transformer.txt_ids"], atol=0, rtol=0)
    torch.testing.assert_close(ids[TEXT_POSITIONS:], golden["transformer.img_ids"].reshape(-1, 3), atol=0, rtol=0)


def test_vq_decode(golden_pipeline, golden):
    with torch.no_grad():
        image = golden_pipeline.vqvae.decode(golden["vq.decode.tokens"])
    torch.testing.assert_close(image, golden["vq.decode.image"], atol=ATOL, rtol=0)


def test_vq_encode_ids_identical(golden_pipeline, golden):
    with torch.no_grad():
        tokens = golden_pipeline.vqvae.encode(golden["vq.encode.pixels"])
    assert torch.equal(tokens, golden["vq.encode.tokens"])


def test_text_encoder(golden_pipeline, golden):
    with torch.no_grad():
        text_embeds, hidden = golden_pipeline.text_encoder(golden["text.input_ids"])
    torch.testing.assert_close(text_embeds, golden["text.text_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, golden["text.penultimate_hidden_states"], atol=ATOL, rtol=0)


def test_tokenizer_reproduces_golden_ids(golden_checkpoint, golden_meta, golden):
    tokenizer = load_tokenizer(golden_checkpoint)
    ids = tokenizer(golden_meta["prompts"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, golden["text.input_ids"])


def test_scheduler_trajectory_identical(golden_checkpoint, golden):
    scheduler = load_scheduler(golden_checkpoint)
    logits = golden["scheduler.logits"]  # [steps, B, K, H, W]
    steps = int(golden["scheduler.num_steps"])
    scheduler.set_timesteps(steps, tuple(golden["scheduler.temperature"].tolist()))
    assert torch.equal(scheduler.timesteps, golden["scheduler.timesteps"])
    torch.testing.assert_close(scheduler.temperatures, golden["scheduler.temperatures"], atol=0, rtol=0)
    noise = TorchNoise(torch.Generator().manual_seed(int(golden["scheduler.seed"])))
    batch, _, height, width = logits.shape[1:]
    tokens = torch.full((batch, height, width), scheduler.mask_token_id)
    for step in range(steps):
        tokens = scheduler.step(logits[step], step, tokens, noise)
        assert torch.equal(tokens, golden["scheduler.tokens_after_step"][step]), f"step {step} differs"


def test_whole_pipeline_identical_tokens_and_image(golden_pipeline, golden, golden_meta):
    prompt, negative = golden_meta["prompts"][0], golden_meta["prompts"][1]
    assert torch.equal(golden_pipeline.tokenize([prompt]), golden["pipeline.prompt_input_ids"])
    assert torch.equal(golden_pipeline.tokenize([negative]), golden["pipeline.negative_input_ids"])
    batch, height, width = golden["pipeline.tokens"].shape
    result = golden_pipeline(
        [prompt] * batch,
        negative_prompt=negative,
        height=height * golden_pipeline.vae_scale_factor,
        width=width * golden_pipeline.vae_scale_factor,
        num_inference_steps=int(golden["pipeline.steps"]),
        guidance_scale=float(golden["pipeline.guidance_scale"]),
        generator=torch.Generator().manual_seed(int(golden["pipeline.seed"])),
        progress=False,
    )
    assert torch.equal(result.tokens, golden["pipeline.tokens"])
    image = np.stack([np.asarray(i) for i in result.images]).transpose(0, 3, 1, 2).astype(np.int16)
    assert np.abs(image - golden["pipeline.image_uint8"].numpy().astype(np.int16)).max() <= 1
