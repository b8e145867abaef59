"""A picture of which vision patches the image predictor kept, written without overwriting anything."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import atomic_write_bytes


def kept_patches_image(image: Image.Image, kept: Iterable[int], grid: int, scale: int = 4) -> Image.Image:
    """The model's input image, enlarged `scale` times, beside the same image with the dropped patches darkened.

    `image` is what the vision tower saw (square, grid x grid patches); `kept` are row-major patch indices in
    [0, grid * grid). Returns an RGB image of (2 * side + gap) x side pixels, side = image width x `scale`.
    """
    kept = {int(i) for i in kept}
    if any(not 0 <= i < grid * grid for i in kept):
        raise ValueError(f"kept patch indices must lie in [0, {grid * grid}), got {sorted(kept)}")
    side = image.width * scale
    big = image.convert("RGB").resize((side, side), Image.NEAREST)
    shaded = big.copy()
    dark = Image.new("RGB", (side, side), (0, 0, 0))
    cell = side / grid
    draw = ImageDraw.Draw(shaded)
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        box = (round(col * cell), round(row * cell), round((col + 1) * cell) - 1, round((row + 1) * cell) - 1)
        if index in kept:
            draw.rectangle(box, outline=(255, 255, 0))
        else:
            region = big.crop(box[:2] + (box[2] + 1, box[3] + 1))
            shaded.paste(Image.blend(region, dark.crop((0, 0) + region.size), 0.75), box[:2])
    gap = 8
    out = Image.new("RGB", (2 * side + gap, side), (255, 255, 255))
    out.paste(big, (0, 0))
    out.paste(shaded, (side + gap, 0))
    return out


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG at `path`, or at the first free name beside it (`kept_patches-1.png`, ...): never replaces a file.
    Atomic (`files.atomic_write_bytes`). Returns the path written."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=False)
