"""The MaskGIT sampler in numpy: the loop every backend shares (no torch anywhere in this path).

A backend is anything with `graph(name)` returning a callable that maps the graph's named inputs
(numpy arrays, see the README's graph table) to its named outputs. The loop reproduces the reference
pipeline step for step, including the official float32 arithmetic of the mask schedule.

Randomness: `numpy.random.Generator(PCG64(seed))`; every draw is `random((B, H*W), dtype=float32)`:
  1. image-to-image only, before the first step: which tokens to re-mask (`u < mask ratio`);
  2. each step: the categorical draw, fed to `denoise_step` as `uniforms`;
  3. each step but the last: the Gumbel draw, `g = -log(-log(u))` (both logs clamped at 1e-20).
numpy's float32 draw is `(next_uint32() >> 8) * 2**-24`, with next_uint32 taking the low then the high
half of each 64-bit PCG64 (XSL-RR) output; a Swift or Kotlin port reproduces it bit for bit.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .bundle import ModelFacts
from .images import ImageInputError, image_to_pixels, mask_to_grid, open_image, pixels_to_pil

Graph = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
LOG_FLOAT32_MAX = np.log(np.finfo(np.float32).max, dtype=np.float32)  # confidence of tokens that are given


TEXT_TO_IMAGE_GRAPHS = ("text_encoder", "denoise_step", "vq_decoder")  # what a generation without an input image runs


class Backend:
    """Where the graphs run. A backend loads each graph on first use and keeps it until released;
    subclasses say how to load one (`_load`) and name themselves (`name`, shown to the user)."""

    name: str

    def __init__(self):
        self._graphs: dict[str, Graph] = {}

    def graph(self, name: str) -> Graph:
        if name not in self._graphs:
            self._graphs[name] = self._load(name)
        return self._graphs[name]

    def release(self, name: str) -> None:
        """Drop a loaded graph and its memory (weights, prepacked kernels, activation arena)."""
        self._graphs.pop(name, None)

    def _load(self, name: str) -> Graph:
        raise NotImplementedError


@dataclass
class Request:
    """One generation. The sampling settings have no defaults here: they are the model's, and callers
    take them from the bundle's `ModelFacts.defaults`."""

    prompts: list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    temperature: tuple[float, float]
    negative_prompt: str | None = None
    num_images: int = 1  # per prompt
    seed: int = 0
    crop: tuple[int, int] = (0, 0)
    image: object = None  # path or PIL image: image-to-image / inpainting input
    strength: float = 1.0
    mask: object = None  # path or PIL image: white = regenerate


class GenerationCancelled(Exception):
    """An `on_step` callback returned False: the generation stopped between two steps; nothing is returned."""


@dataclass
class StepReport:
    """What `on_step` receives after each denoising step. `tokens` are the grid as it stands (mask id
    where a token is still unknown); `sampled` fills every unknown position with this step's draw, so
    `preview()` shows what the model would decode now (at the last step, exactly the final image)."""

    step: int  # 0-based index among the run's steps
    steps: int
    tokens: np.ndarray  # [B, h, w]
    sampled: np.ndarray  # [B, h, w]
    decode: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    def preview(self) -> np.ndarray:
        """[B, 3, H, W] in [0, 1], decoded from `sampled` (one VQ decoder run)."""
        return self.decode(self.sampled)


@dataclass
class Result:
    tokens: np.ndarray  # [B, h, w]
    pixels: np.ndarray  # [B, 3, H, W] in [0, 1]
    timings: dict = field(default_factory=dict)

    @property
    def images(self):
        return pixels_to_pil(self.pixels)


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: step = (end - start) / (steps - 1) in float32; entry i is
    start + i*step for the first half and end - (steps-1-i)*step for the rest, each rounded to float32
    once (torch's kernel is compiled with fused multiply-add), which float64 arithmetic reproduces."""
    if steps == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    values = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
    return values.astype(np.float32)


def cosine_mask_ratio(numerator: int, steps: int, starting_mask_ratio: float = 1.0) -> np.float32:
    """starting_ratio * cos(pi/2 * numerator/steps) with the official float32 rounding at each operation
    (divide, times float32(pi), halve, cos rounded from float64, multiply)."""
    ratio = np.float32(numerator) / np.float32(steps)
    angle = ratio * np.float32(math.pi) / np.float32(2)
    return np.float32(starting_mask_ratio) * np.float32(math.cos(float(angle)))


def categorical_draw(probs: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs [B, L, K], uniforms [B, L] -> drawn ids [B, L] (int64) and their log-probabilities (clamped at
    1e-20): the first index whose float32 cumulative probability exceeds the uniform, the rule the
    `denoise_step` graph computes (`reference.scheduler.categorical_by_inverse_cdf`). For step graphs
    that leave the draw to the app (the phone graphs: accelerators take no scan over the codebook)."""
    probs = np.asarray(probs, dtype=np.float32)
    cdf = np.cumsum(probs, axis=-1, dtype=np.float32)
    ids = np.minimum((cdf <= uniforms[..., None]).sum(-1), probs.shape[-1] - 1).astype(np.int64)
    chosen = np.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]
    return ids, np.log(np.maximum(chosen, np.float32(1e-20)))


def gumbel(uniforms: np.ndarray) -> np.ndarray:
    tiny = np.float32(1e-20)
    return -np.log(np.maximum(-np.log(np.maximum(uniforms, tiny)), tiny))


def warn_of_untrained_words(ids: np.ndarray, trained_ids, token_text: Callable[[int], str]) -> None:
    """A closed-vocabulary model (the shapes model) draws anyway when a word is outside it, reading
    the word as a blank: say so rather than let a user wonder why "a dog" draws a shape. `trained_ids`
    None: every id is trained (random and released checkpoints). Shared by the runtime and the reference."""
    if trained_ids is None:
        return
    untrained = sorted(set(np.unique(ids).tolist()) - set(trained_ids))
    if untrained:
        words = ", ".join(repr(token_text(i)) for i in untrained)
        warnings.warn(f"this model was never trained on {words} (their text embeddings are zero): it reads them as blanks", stacklevel=3)


class Sampler:
    """`low_memory`: release each graph when its phase is over (text encoding, the encoding of an input
    image, denoising, decoding), so the peak is the largest graph's, not their sum. Costs a reload per
    generation; the command line always does it (one generation per process)."""

    def __init__(self, backend: Backend, tokenizer, facts: ModelFacts, low_memory: bool = False):
        self.backend, self.tokenizer, self.facts, self.low_memory = backend, tokenizer, facts, low_memory

    def _done(self, name: str) -> None:
        if self.low_memory:
            self.backend.release(name)

    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer(prompts)
        warn_of_untrained_words(ids, self.facts.trained_text_ids, self.tokenizer.token_text)
        out = self.backend.graph("text_encoder")({"input_ids": ids})
        return out["text_embeds"], out["encoder_hidden_states"]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.backend.graph("vq_decoder")({"tokens": tokens})["image"], dtype=np.float32)

    def __call__(self, request: Request, progress: bool = True, on_step: Callable[[StepReport], bool | None] | None = None) -> Result:
        """`on_step(report)` after each denoising step; returning False cancels (GenerationCancelled)."""
        r, f, mask_id = request, self.facts.vae_scale_factor, self.facts.mask_token_id
        grid_h, grid_w = r.height // f, r.width // f
        batch, positions = len(r.prompts) * r.num_images, grid_h * grid_w
        rng = np.random.Generator(np.random.PCG64(r.seed))
        draw = lambda: rng.random((batch, positions), dtype=np.float32)
        grid_mask = None
        if r.mask is not None:  # before any graph runs
            grid_mask = mask_to_grid(r.mask, grid_h, grid_w, image_size=open_image(r.image).size).reshape(1, positions)
            if not grid_mask.any():  # the run would return the input re-encoded: most often a mask drawn the other way round
                raise ImageInputError(
                    f"--mask: no token cell to regenerate: white marks what is regenerated, and at {r.width}x{r.height} "
                    f"a cell ({f}x{f} pixels) is regenerated where at least half of it is white"
                )

        # Conditioning rows: [negative x B, positive x B], images of one prompt tiled as the reference does.
        embeds, hidden = self.encode_prompts(r.prompts)
        neg_embeds, neg_hidden = self.encode_prompts([r.negative_prompt or ""] * len(r.prompts))
        self._done("text_encoder")
        tile = lambda x: np.tile(x, (r.num_images,) + (1,) * (x.ndim - 1))
        conditioning = {
            "encoder_hidden_states": np.concatenate([tile(neg_hidden), tile(hidden)]),
            "pooled_projections": np.concatenate([tile(neg_embeds), tile(embeds)]),
            "micro_conds": np.tile(np.float32([[r.width, r.height, r.crop[0], r.crop[1], self.facts.defaults.aesthetic_score]]), (2 * batch, 1)),
            "guidance_scale": np.float32([r.guidance_scale]),
        }

        start, starting_ratio = 0, np.float32(1)
        tokens = np.full((batch, positions), mask_id, dtype=np.int64)
        if r.image is not None:
            pixels = image_to_pixels(r.image, r.height, r.width)
            encoded = self.backend.graph("vq_encoder")({"image": pixels})["tokens"].reshape(1, positions).astype(np.int64)
            self._done("vq_encoder")
            tokens = np.repeat(encoded, batch, axis=0)
            start = r.steps - int(r.steps * r.strength)
            if r.mask is None:  # image-to-image: re-mask at random as the schedule has it at `start`
                tokens = np.where(draw() < cosine_mask_ratio(start, r.steps), mask_id, tokens)
            else:  # inpainting / outpainting: regenerate exactly the masked tokens
                tokens = np.where(grid_mask, mask_id, tokens)
                starting_ratio = np.float32(grid_mask.sum()) / np.float32(grid_mask.size)

        temperatures = linspace_float32(r.temperature[0], r.temperature[1], r.steps)
        step_graph = self.backend.graph("denoise_step")
        for step in tqdm(range(start, r.steps), disable=not progress, desc=f"denoising ({self.backend.name})"):
            out = step_graph({
                "tokens": tokens.reshape(batch, grid_h, grid_w), **conditioning,
                "timestep": np.float32([r.steps - 1 - step]), "uniforms": draw(),
            })  # fmt: skip
            unknown = tokens == mask_id
            sampled = np.where(unknown, out["sampled_tokens"].astype(np.int64), tokens)
            if step == r.steps - 1:
                tokens = sampled
            else:
                tokens = self._remask(sampled, unknown, out["log_probs"], step, r.steps, starting_ratio, temperatures[step], draw())
            if on_step is not None:
                shape = (batch, grid_h, grid_w)
                report = StepReport(step, r.steps, tokens.reshape(shape), sampled.reshape(shape), self.decode)
                if on_step(report) is False:
                    raise GenerationCancelled(f"cancelled after step {step + 1} of {r.steps}")

        del step_graph
        self._done("denoise_step")
        tokens = tokens.reshape(batch, grid_h, grid_w)
        pixels = self.decode(tokens)
        self._done("vq_decoder")
        return Result(tokens=tokens, pixels=pixels)

    def _remask(self, sampled, unknown, log_probs, step: int, steps: int, starting_ratio, temperature, gumbel_uniforms) -> np.ndarray:
        """MaskGIT: keep the most confident draws, mask the rest again as the cosine schedule says."""
        positions = sampled.shape[-1]
        mask_len = np.floor(np.float32(positions) * cosine_mask_ratio(step + 1, steps, starting_ratio))
        mask_len = np.maximum(1, np.minimum(unknown.sum(-1) - 1, mask_len)).astype(np.int64)  # [B]
        confidence = np.where(unknown, log_probs, LOG_FLOAT32_MAX) + temperature * gumbel(gumbel_uniforms)
        cut_off = np.take_along_axis(np.sort(confidence, axis=-1), mask_len[:, None], axis=-1)
        return np.where(confidence < cut_off, self.facts.mask_token_id, sampled)
