"""A picture of which vision patches the image predictor kept (one row per image), written without overwriting
anything."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
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


def stack_pictures(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """`pictures` one under the other (left-aligned, `gap` white pixels between): one picture for several images."""
    if not pictures:
        raise ValueError("no pictures to stack")
    if len(pictures) == 1:
        return pictures[0]
    width = max(p.width for p in pictures)
    height = sum(p.height for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    top = 0
    for picture in pictures:
        out.paste(picture.convert("RGB"), (0, top))
        top += picture.height + gap
    return out


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG at `path`, or at the first free name beside it (`kept_patches-1.png`, ...): never replaces a file.
    Atomic (`files.atomic_write_bytes`). Returns the path written."""
    if Path(path).is_dir():
        example = Path(path) / "kept_patches.png"
        raise IsADirectoryError(f"{path} is a directory; pass a PNG file path such as {example}")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=False)
