"""What a generation request may ask for, checked before any model is loaded (numpy-free, torch-free).

The command line and the Python API call the same checks, so a bad value gets the same one-line
error everywhere, and none of them reaches a graph: NaN or infinite floats, values out of range,
requests whose size would exhaust memory, and requests under which no denoising step would run.
"""
from __future__ import annotations

import math
import os

MAX_IMAGES_PER_CALL = 16  # prompts x images: 16 images of 1024 px hold ~1 GB of decoder activations each
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0  # far beyond any useful scale (Meissonic uses 9); larger values only amplify noise
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1  # numpy's PCG64 takes seeds up to 2^128, the port kit documents 64 bits
MAX_SIDE = 2048  # pixels per side (twice the released model's 1024; a 1024 px decode of the 1B VQ-VAE already needs ~4 GB)
MAX_INPUT_PIXELS = 4096 * 4096  # an input image or mask; larger files are refused before decoding


class RuntimeInputError(ValueError):
    """A generation request that cannot be served; the message names the option and the problem."""


def check_float(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise RuntimeInputError(f"{name}: must be a finite number (got {value})")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RuntimeInputError(f"{name}: must be in {bracket}{low:g}, {high:g}] (got {value:g})")
    return value


def check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeInputError(f"{name}: must be an integer (got {value!r})")
    if not low <= value <= high:
        raise RuntimeInputError(f"{name}: must be in [{low}, {high}] (got {value})")
    return value


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(name: str, value: int, low: int) -> int:
    """Thread counts up to the usable CPUs: more threads than CPUs only time-slice each other (1000 intra-op
    threads on 2 CPUs made a 0.8 s generation take 208 s), so a larger count is a mistake, not a request."""
    check_int(name, value, low, 1024)
    if value > usable_cpus():
        raise RuntimeInputError(f"{name}: {value} threads is more than the {usable_cpus()} CPUs this process may use" + (" (0 uses them all)" if low == 0 else ""))
    return value


def check_request(
    steps: int, guidance: float, temperature, strength: float, seed: int, images: int, has_image: bool, has_mask: bool
) -> None:
    check_int("--steps", steps, 1, MAX_STEPS)
    check_float("--guidance", guidance, 0.0, MAX_GUIDANCE)
    if len(temperature) != 2:
        raise RuntimeInputError(f"--temperature: give START and END (got {list(temperature)})")
    for value in temperature:
        check_float("--temperature", value, 0.0, MAX_TEMPERATURE)
    check_float("--strength", strength, 0.0, 1.0, low_open=True)
    check_int("--seed", seed, 0, MAX_SEED)
    if images < 1:
        raise RuntimeInputError("need at least one prompt and one image per prompt")
    if images > MAX_IMAGES_PER_CALL:
        raise RuntimeInputError(f"--num-images: {images} images in one call; at most {MAX_IMAGES_PER_CALL} (prompts x images)")
    if has_mask and not has_image:
        raise RuntimeInputError("--mask: a mask needs an input image (--image)")
    if has_image and int(steps * strength) == 0:
        raise RuntimeInputError(
            f"--strength: {strength:g} of {steps} steps runs no denoising step (int(steps x strength) = 0); raise --strength or --steps"
        )
