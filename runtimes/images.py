"""Image and mask I/O shared by the reference pipeline and the runtime (numpy + Pillow only).

Follows diffusers' `VaeImageProcessor` as aMUSEd/Meissonic configure it: RGB, Lanczos resize, pixels
in [0,1] without normalisation; masks are grayscale, resized to the token grid, binarised at 0.5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .limits import MAX_INPUT_PIXELS


class ImageInputError(ValueError):
    """An image or mask that cannot be used; the message names the file and the problem."""


def open_image(source) -> Image.Image:
    """Open an image file (or pass a PIL image through); refuses files over MAX_INPUT_PIXELS before
    decoding them, so a 20000x20000 PNG costs nothing."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise ImageInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise ImageInputError(f"{path}: {width}x{height} pixels is over the limit of {MAX_INPUT_PIXELS:,} pixels")
            image.load()
            return image.copy()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path}: refused as a decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageInputError(f"{path}: unreadable image ({error})") from None


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """Integer and float images as 8-bit: Pillow's own convert() clips 16-bit values at 255 (a 16-bit
    grayscale PNG became 99.6% white). I;16* and I hold 16-bit samples (PNG and TIFF decode to them);
    F holds floats on Pillow's 0..255 scale, as its convert('L') reads them."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        return Image.fromarray(np.asarray(image, dtype=np.float64).round().clip(0, 255).astype(np.uint8), mode="L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow reads (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, I;16, I, F) -> RGB. Transparency
    is dropped as diffusers does (convert('RGB') keeps the stored colors)."""
    image = _scaled_to_8_bits(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def image_to_pixels(source, height: int, width: int) -> np.ndarray:
    """-> float32 [1,3,height,width] in [0,1]."""
    image = to_rgb(open_image(source))
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
    mask = _scaled_to_8_bits(mask).convert("L")
    if mask.size != (grid_width, grid_height):
        mask = mask.resize((grid_width, grid_height), resample=Image.LANCZOS)
    return (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5)[None]


def outpaint_canvas(source, left: int, top: int, right: int, bottom: int) -> tuple[Image.Image, Image.Image]:
    """Place an image on a larger canvas; the mask is white (regenerate) on the added border."""
    image = to_rgb(open_image(source))
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
