"""The `shapes` world: procedural images of one filled shape on a plain background, and their reader.

Everything the demo model learns and is judged by comes from here, deterministically from a seed and
with nothing downloaded. numpy and Pillow only (no torch): the evaluation reads images back with it.

    prompt   "a {color} {shape} on a {background} background"
    image    256x256 RGB, exact sRGB colors, no anti-aliasing; the shape's bounding box is 35-70% of
             the side, placed at random and wholly inside the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 50),
    "orange": (245, 140, 30),
    "purple": (140, 70, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 256
BOX_FRACTION = (0.35, 0.70)


@dataclass(frozen=True, order=True)
class Scene:
    """What an image shows: the attributes a prompt names and the analyzer reads back."""

    color: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def _held_out() -> tuple[Scene, ...]:
    """24 combinations never shown in training: per shape, each color once as the shape's color and
    once as a background (offsets 3, 4, 5 around the color list), so every word is still seen."""
    names = list(COLORS)
    return tuple(
        Scene(names[i], shape, names[(i + 3 + k) % len(names)]) for k, shape in enumerate(SHAPES) for i in range(len(names))
    )


ALL_SCENES = tuple(Scene(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if c != b)  # 168
HELD_OUT = _held_out()
TRAINING_SCENES = tuple(scene for scene in ALL_SCENES if scene not in set(HELD_OUT))  # 144


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """-> uint8 [size, size, 3]. Box side uniform in 35-70% of `size`; position uniform inside the image."""
    side = int(rng.integers(round(BOX_FRACTION[0] * size), round(BOX_FRACTION[1] * size) + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)  # Pillow draws without anti-aliasing: every pixel is one of the two colors
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright isosceles: base at the bottom, apex at the top centre, as wide as tall
        draw.polygon([(x0, box[3]), (box[2], box[3]), ((x0 + box[2]) / 2, y0)], fill=fill)
    return np.asarray(image)


def dataset(count: int, seed: int, scenes: tuple[Scene, ...] = TRAINING_SCENES) -> tuple[list[Scene], np.ndarray]:
    """`count` scenes drawn uniformly from `scenes` and their images [count, 256, 256, 3] uint8."""
    rng = np.random.default_rng(seed)
    chosen = [scenes[i] for i in rng.integers(0, len(scenes), size=count)]
    return chosen, np.stack([render(scene, rng) for scene in chosen])


# ----------------------------------------------------------------------------------------------------
# The analyzer: reads (background, shape color, shape kind) back from any RGB image, without learning.

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [8, 3]
_NAMES = list(COLORS)
SQUARE_FILL, TRIANGLE_FILL = 0.90, 0.64  # fill of the bounding box: square 1.0, circle pi/4 = 0.785, triangle 0.5
MIN_SHAPE_FRACTION = 0.02  # a shape covers >= 0.35^2 * 0.5 = 6% of the image; below 2% there is none


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # None: no shape found
    shape: str | None
    fill: float  # shape pixels / bounding-box pixels

    def scene(self) -> Scene | None:
        return None if self.color is None or self.shape is None else Scene(self.color, self.shape, self.background)


def _nearest_color(pixels: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> [...] index of the nearest palette color (Euclidean in sRGB)."""
    diff = pixels.astype(np.float32)[..., None, :] - _PALETTE
    return np.einsum("...kc,...kc->...k", diff, diff).argmin(-1)


def analyze(image: np.ndarray | Image.Image) -> Reading:
    """Background: the palette color most of the border snaps to. Shape color: the most frequent other
    palette color. Shape kind: how much of its bounding box the shape fills (robust percentiles of the
    shape's pixel coordinates bound it, so stray pixels of a generated image do not stretch the box)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = _nearest_color(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[background] = 0
    color = int(counts.argmax())
    if counts[color] < MIN_SHAPE_FRACTION * labels.size:
        return Reading(_NAMES[background], None, None, 0.0)
    rows, cols = np.nonzero(labels == color)
    top, bottom = np.percentile(rows, [0.5, 99.5])
    left, right = np.percentile(cols, [0.5, 99.5])
    box = (bottom - top + 1) * (right - left + 1)
    inside = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
    fill = float(inside.sum() / box)
    shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
    return Reading(_NAMES[background], _NAMES[color], shape, fill)


# ----------------------------------------------------------------------------------------------------
# The fixed evaluation set.

EVALUATION_SEED = 2024


@dataclass(frozen=True)
class EvaluationPair:
    scene: Scene
    seed: int
    held_out: bool


def evaluation_set(count: int = 200, held_out_seeds: int = 2, seed: int = EVALUATION_SEED) -> list[EvaluationPair]:
    """`count` prompt-seed pairs drawn from the training combinations (fresh images: the seeds are the
    sampler's), then every held-out combination with `held_out_seeds` seeds each, reported apart."""
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(TRAINING_SCENES), size=count)
    seeds = rng.integers(0, 2**31, size=count + len(HELD_OUT) * held_out_seeds)
    pairs = [EvaluationPair(TRAINING_SCENES[i], int(s), False) for i, s in zip(chosen, seeds[:count], strict=True)]
    held = [scene for scene in HELD_OUT for _ in range(held_out_seeds)]
    pairs += [EvaluationPair(scene, int(s), True) for scene, s in zip(held, seeds[count:], strict=True)]
    return pairs
