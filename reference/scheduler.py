"""The MaskGIT scheduler of Meissonic (aMUSEd's `AmusedScheduler`), with two sources of randomness.

`TorchNoise` consumes a `torch.Generator` exactly as the official scheduler does, so a seed reproduces
the official pipeline token for token. `UniformNoise` takes plain uniforms instead, which a torch-free
runtime or an exported graph can replay:

Draw order (each draw is float32 uniforms in [0,1), one per image and token position, shape [B, H*W]):
  1. image-to-image only, once before the first step: the initial re-masking draw (`add_noise`);
  2. every step: the categorical draw, sampled by inverse CDF (the first codebook index whose
     cumulative probability exceeds the uniform);
  3. every step but the last: the Gumbel draw for the confidence noise, `-log(-log(u))`.
`UniformNoise.from_seed` draws them from numpy's `Generator(PCG64(seed)).random(shape, dtype=float32)`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def categorical_by_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [..., K], uniforms [...] -> the first index whose cumulative probability exceeds the uniform.

    Counting the indices whose CDF is <= u gives that index; rounding can leave the total CDF below u,
    so the count is clamped to the last index.
    """
    cdf = probs.cumsum(dim=-1)
    return (cdf <= uniforms[..., None]).sum(dim=-1).clamp(max=probs.shape[-1] - 1)


def gumbel_from_uniforms(uniforms: torch.Tensor) -> torch.Tensor:
    return -torch.log((-torch.log(uniforms.clamp(1e-20))).clamp(1e-20))


class TorchNoise:
    """The official randomness: `torch.multinomial` then `uniform_`, on one generator."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def uniforms(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:  # probs [B,L,K] -> [B,L]
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator)[:, 0].view(*probs.shape[:-1])

    def gumbel(self, shape) -> torch.Tensor:
        return gumbel_from_uniforms(torch.zeros(shape).uniform_(0, 1, generator=self.generator))


class UniformNoise:
    """Explicit float32 uniforms in the documented order; `draw(shape)` returns the next array."""

    def __init__(self, draw):
        self._draw = draw

    @classmethod
    def from_seed(cls, seed: int) -> UniformNoise:
        rng = np.random.Generator(np.random.PCG64(seed))
        return cls(lambda shape: rng.random(shape, dtype=np.float32))

    @classmethod
    def from_arrays(cls, arrays) -> UniformNoise:
        arrays = iter(arrays)

        def draw(shape):
            array = next(arrays, None)
            if array is None:
                raise ValueError("explicit noise ran out of draws")
            return np.asarray(array, dtype=np.float32).reshape(shape)

        return cls(draw)

    def uniforms(self, shape) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._draw(tuple(shape)), dtype=np.float32))

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        return categorical_by_inverse_cdf(probs, self.uniforms(probs.shape[:-1]))

    def gumbel(self, shape) -> torch.Tensor:
        return gumbel_from_uniforms(self.uniforms(shape))


def mask_ratio(step: int, num_steps: int, starting_mask_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The cosine schedule in float32, as the official scheduler evaluates it: cos(pi/2 * (step+1)/N)."""
    ratio = torch.tensor([[step + 1]]) / num_steps
    return starting_mask_ratio * torch.cos(ratio * math.pi / 2)


class MaskGITScheduler:
    def __init__(self, mask_token_id: int, masking_schedule: str = "cosine"):
        if masking_schedule != "cosine":
            raise ValueError(f"masking_schedule {masking_schedule!r} is not supported (Meissonic uses 'cosine')")
        self.mask_token_id = mask_token_id

    def set_timesteps(self, num_steps: int, temperature=(2.0, 0.0)) -> None:
        self.num_steps = num_steps
        self.timesteps = torch.arange(num_steps).flip(0)  # N-1 .. 0
        if isinstance(temperature, (tuple, list)):
            self.temperatures = torch.linspace(temperature[0], temperature[1], num_steps)
        else:
            self.temperatures = torch.linspace(temperature, 0.01, num_steps)

    def add_noise(self, tokens: torch.Tensor, start_step: int, noise) -> torch.Tensor:
        """Image-to-image: re-mask each token with the probability the schedule has at `start_step`.

        The official code indexes `timesteps[start - 1]`, which at strength 1 (start 0) wraps around to
        the last step and masks nothing; here start 0 masks everything, as strength 1 means.
        """
        ratio = torch.cos(torch.tensor([[start_step]]) / self.num_steps * math.pi / 2)
        masked = noise.uniforms(tokens.shape) < ratio.reshape(())
        return torch.where(masked, self.mask_token_id, tokens)

    def step(self, logits: torch.Tensor, step: int, tokens: torch.Tensor, noise, starting_mask_ratio=1.0) -> torch.Tensor:
        """logits [B,K,H,W], tokens [B,H,W] -> tokens after step `step` (0-based; timestep N-1-step)."""
        batch, codebook, height, width = logits.shape
        tokens = tokens.reshape(batch, height * width)
        probs = logits.reshape(batch, codebook, height * width).permute(0, 2, 1).softmax(dim=-1)  # [B,L,K]
        unknown = tokens == self.mask_token_id
        sampled = torch.where(unknown, noise.categorical(probs), tokens)
        if step == self.num_steps - 1:
            return sampled.reshape(batch, height, width)

        mask_len = (height * width * mask_ratio(step, self.num_steps, starting_mask_ratio)).floor()
        mask_len = torch.min(unknown.sum(dim=-1, keepdim=True) - 1, mask_len)  # never more than were masked
        mask_len = torch.max(torch.tensor([1]), mask_len)  # at least one
        selected = torch.gather(probs, -1, sampled[:, :, None])[:, :, 0]
        selected = torch.where(unknown, selected, FLOAT32_MAX)  # given tokens are never re-masked
        confidence = torch.log(selected.clamp(1e-20)) + self.temperatures[step] * noise.gumbel(selected.shape)
        cut_off = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
        return torch.where(confidence < cut_off, self.mask_token_id, sampled).reshape(batch, height, width)
