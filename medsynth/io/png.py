"""PNG previews and picture sheets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from medsynth.io.atomic import atomic_path


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a 2D grey (H, W) or colour (H, W, 3) image to ``path`` atomically.

    Args:
        path: Destination ``.png`` file.
        image: ``uint8`` array, or a float array in [0, 1] (clipped, then scaled to 0..255).

    Returns:
        The destination path.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


# Distinct colours for label values 0..N (background black); repeats after the last entry.
_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 159, 0],
        [86, 180, 233],
        [240, 228, 66],
        [0, 158, 115],
        [213, 94, 0],
        [204, 121, 167],
        [0, 114, 178],
        [255, 255, 255],
    ],
    dtype=np.uint8,
)


def display_slice(image: np.ndarray) -> np.ndarray:
    """Turn an (X, Y) RAS slice into screen orientation: anterior up, patient right on the right.

    An (X, Y, Z) volume is shown by its middle axial slice.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., image.shape[-1] // 2]
    return np.rot90(image)


def colorize_labels(label: np.ndarray) -> np.ndarray:
    """Map an integer label image (H, W) to RGB (H, W, 3) ``uint8`` with a fixed palette."""
    values = np.asarray(label).astype(np.int64)
    first = _PALETTE[0:1]
    rest = _PALETTE[1:]
    return np.where(values[..., None] == 0, first, rest[(values - 1) % len(rest)]).astype(np.uint8)


def picture_sheet(rows: list[list[np.ndarray]], *, titles: list[str] | None = None, scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile 2D pictures into one RGB sheet, optionally with a title above each column.

    Args:
        rows: Rows of pictures; each is (H, W) floats in [0, 1] or (H, W, 3) ``uint8``. All share H, W.
        titles: One title per column.
        scale: Integer upscaling (nearest neighbour) so small slices stay readable.
        pad: Pixels of separation between tiles.

    Returns:
        ``(H_total, W_total, 3)`` ``uint8``.
    """
    from PIL import ImageDraw

    def rgb(picture: np.ndarray) -> np.ndarray:
        p = np.asarray(picture)
        if p.ndim == 2:
            p = np.repeat((np.clip(p, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
        return np.kron(p, np.ones((scale, scale, 1), dtype=np.uint8))

    tiles = [[rgb(p) for p in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncols = max(len(r) for r in tiles)
    header = 14 if titles else 0
    sheet = np.full((header + len(tiles) * (h + pad) + pad, ncols * (w + pad) + pad, 3), 40, dtype=np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y, x = header + pad + i * (h + pad), pad + j * (w + pad)
            sheet[y : y + h, x : x + w] = tile
    if titles:
        canvas = Image.fromarray(sheet)
        draw = ImageDraw.Draw(canvas)
        for j, title in enumerate(titles):
            draw.text((pad + j * (w + pad) + 2, 1), title, fill=(255, 255, 255))
        sheet = np.asarray(canvas)
    return sheet
