"""A picture of which vision patches the image predictor kept, written without overwriting anything."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw


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


def free_path(path: Path) -> Path:
    """`path` if nothing is there, else the first free `stem-1.suffix`, `stem-2.suffix`, ... beside it."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def save_png(picture: Image.Image, path) -> Path:
    """Write a PNG at a free name near `path` (see `free_path`): to a temporary file first, then renamed."""
    target = free_path(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            picture.save(handle, format="PNG")
        if target.exists():  # taken meanwhile: never replace it
            target = free_path(target)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
