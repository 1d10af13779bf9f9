"""Image and mask I/O shared by the reference pipeline and the runtime (numpy + Pillow only).

Follows diffusers' `VaeImageProcessor` as aMUSEd/Meissonic configure it: RGB, Lanczos resize, pixels
in [0,1] without normalisation; masks are grayscale, resized to the token grid, binarised at 0.5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageInputError(ValueError):
    """An image or mask that cannot be used; the message names the file and the problem."""


def open_image(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise ImageInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ImageInputError(f"{path}: unreadable image ({error})") from None


def image_to_pixels(source, height: int, width: int) -> np.ndarray:
    """-> float32 [1,3,height,width] in [0,1]."""
    image = open_image(source).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def mask_to_grid(source, grid_height: int, grid_width: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """-> bool [1,grid_height,grid_width], True where the image is to be regenerated.

    `image_size` (width, height) is the size of the image the mask belongs to; a mask of another size
    is refused rather than silently stretched.
    """
    mask = open_image(source)
    if image_size is not None and mask.size != tuple(image_size):
        raise ImageInputError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image_size[0]}x{image_size[1]}")
    mask = mask.convert("L")
    if mask.size != (grid_width, grid_height):
        mask = mask.resize((grid_width, grid_height), resample=Image.LANCZOS)
    return (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5)[None]


def outpaint_canvas(source, left: int, top: int, right: int, bottom: int) -> tuple[Image.Image, Image.Image]:
    """Place an image on a larger canvas; the mask is white (regenerate) on the added border."""
    image = open_image(source).convert("RGB")
    width, height = image.size[0] + left + right, image.size[1] + top + bottom
    canvas = Image.new("RGB", (width, height), (127, 127, 127))
    canvas.paste(image, (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.size[0], top + image.size[1]))
    return canvas, mask


def pixels_to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """float [B,3,H,W] in [0,1] -> PIL images, rounded as diffusers' `numpy_to_pil` does."""
    array = (np.clip(pixels, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]
