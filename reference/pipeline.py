"""The Meissonic pipeline: text-to-image, image-to-image, inpainting and outpainting.

Reproduces the official `Pipeline` (and its img2img/inpaint variants, which follow diffusers' aMUSEd
pipelines): CLIP text conditioning with classifier-free guidance over [negative, positive] rows,
micro-conditions [width, height, crop_x, crop_y, aesthetic], the MaskGIT loop, VQ decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from meissonic.runtimes.images import image_to_pixels, mask_to_grid, open_image, pixels_to_pil
from meissonic.runtimes.sampler import warn_of_untrained_words

from .checkpoint import _read_json, load_component
from .folder import CheckpointError, check_checkpoint_folder
from .scheduler import MaskGITScheduler, TorchNoise, UniformNoise


@dataclass
class PipelineOutput:
    tokens: torch.Tensor  # [B,H,W] final token ids
    pixels: np.ndarray  # [B,3,16H,16W] float32 in [0,1]

    @property
    def images(self) -> list[Image.Image]:
        return pixels_to_pil(self.pixels)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    folder = check_checkpoint_folder(folder) / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: file not found")
    return CLIPTokenizer.from_pretrained(str(folder))


def load_scheduler(folder: Path) -> MaskGITScheduler:
    path = check_checkpoint_folder(folder) / "scheduler" / "scheduler_config.json"
    config = _read_json(path)
    if "mask_token_id" not in config:
        raise CheckpointError(f"{path}: no mask_token_id")
    try:
        return MaskGITScheduler(config["mask_token_id"], config.get("masking_schedule", "cosine"))
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def micro_conditions(width: int, height: int, crop=(0, 0), aesthetic_score: float = 6.0) -> list[float]:
    return [float(width), float(height), float(crop[0]), float(crop[1]), float(aesthetic_score)]


class MeissonicPipeline:
    def __init__(self, tokenizer, text_encoder, transformer, vqvae, scheduler):
        self.tokenizer, self.text_encoder, self.transformer = tokenizer, text_encoder, transformer
        self.vqvae, self.scheduler = vqvae, scheduler
        self.trained_token_ids = text_encoder.trained_token_ids()
        if scheduler.mask_token_id != transformer.config.mask_token_id:
            raise CheckpointError(
                f"scheduler mask_token_id {scheduler.mask_token_id} is not the transformer's last vocabulary id "
                f"{transformer.config.mask_token_id}"
            )

    @classmethod
    def from_pretrained(cls, folder) -> MeissonicPipeline:
        folder = check_checkpoint_folder(folder)
        return cls(
            load_tokenizer(folder),
            load_component(folder, "text_encoder"),
            load_component(folder, "transformer"),
            load_component(folder, "vqvae"),
            load_scheduler(folder),
        )

    @property
    def vae_scale_factor(self) -> int:
        return self.vqvae.config.scale_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text_embeds [B,P], penultimate hidden states [B,77,J]. Words the model never learned are
        named in a warning, as the runtime names them."""
        ids = self.tokenize(prompts)
        warn_of_untrained_words(ids.numpy(), self.trained_token_ids, self._token_text)
        return self.text_encoder(ids)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id).removesuffix("</w>")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 48,
        guidance_scale: float = 9.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        noise: TorchNoise | UniformNoise | None = None,
        temperature=(2.0, 0.0),
        crop_coords=(0, 0),
        aesthetic_score: float = 6.0,
        image=None,
        strength: float = 1.0,
        mask=None,
        progress: bool = True,
    ) -> PipelineOutput:
        """`generator` consumes torch randomness as the official pipeline does; `noise` overrides it with a
        `UniformNoise` (e.g. `UniformNoise.from_seed(seed)`, the runtime's randomness)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        factor = self.vae_scale_factor
        if height % (2 * factor) or width % (2 * factor):
            raise ValueError(f"height and width must be multiples of {2 * factor} (an even token grid), got {width}x{height}")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if not 0 < strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        if mask is not None and image is None:
            raise ValueError("a mask needs an image to inpaint")
        noise = noise or TorchNoise(generator)
        grid_h, grid_w = height // factor, width // factor
        batch = len(prompts) * num_images_per_prompt

        text_embeds, hidden = self.encode_prompt(prompts)
        text_embeds, hidden = text_embeds.repeat(num_images_per_prompt, 1), hidden.repeat(num_images_per_prompt, 1, 1)
        guided = guidance_scale > 1.0
        if guided:
            negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
            neg_embeds, neg_hidden = self.encode_prompt(negatives)
            text_embeds = torch.cat([neg_embeds.repeat(num_images_per_prompt, 1), text_embeds])
            hidden = torch.cat([neg_hidden.repeat(num_images_per_prompt, 1, 1), hidden])
        micro = torch.tensor([micro_conditions(width, height, crop_coords, aesthetic_score)]).expand(text_embeds.shape[0], -1)

        self.scheduler.set_timesteps(num_inference_steps, temperature)
        start = num_inference_steps - int(num_inference_steps * strength)
        starting_mask_ratio = 1.0
        mask_id = self.scheduler.mask_token_id
        if image is None:
            tokens = torch.full((batch, grid_h, grid_w), mask_id, dtype=torch.long)
            start = 0
        else:
            pixels = torch.from_numpy(image_to_pixels(image, height, width))
            tokens = self.vqvae.encode(pixels).expand(batch, -1, -1)
            if mask is None:  # image-to-image: re-mask at random as the schedule has it at `start`
                tokens = self.scheduler.add_noise(tokens, start, noise)
            else:  # inpainting/outpainting: regenerate exactly the masked tokens
                grid_mask = torch.from_numpy(mask_to_grid(mask, grid_h, grid_w, image_size=open_image(image).size))
                tokens = torch.where(grid_mask, mask_id, tokens)
                starting_mask_ratio = grid_mask.sum() / grid_mask.numel()

        for step in tqdm(range(start, num_inference_steps), disable=not progress, desc="denoising"):
            model_input = torch.cat([tokens, tokens]) if guided else tokens
            timestep = self.scheduler.timesteps[step : step + 1]
            logits = self.transformer(model_input, hidden, text_embeds, micro, timestep)
            if guided:
                uncond, cond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            tokens = self.scheduler.step(logits, step, tokens, noise, starting_mask_ratio)

        pixels = self.vqvae.decode(tokens).clamp(0, 1)
        return PipelineOutput(tokens=tokens, pixels=pixels.numpy())
