"""The built-in procedural dataset: coloured shapes that move and change size (no download).

Each sequence shows one shape on a black canvas for 8 frames.
- Static factors: ``shape`` (square, circle, triangle, diamond) and ``colour`` (6 colours).
- Dynamic factors: ``direction`` (left-to-right or right-to-left) and ``scale`` (growing or
  shrinking). A nuisance vertical offset is drawn per sequence and is not labelled.

The dynamic factors differ only in the *order* of the frames, never in the unordered set of
frames a sequence shows (right-to-left is left-to-right played backwards, and so on). The
content augmentation shuffles frames, so ``s`` sees a sequence as an unordered set; a factor the
set reveals could legitimately end up in ``s``. With these factors a probe that finds the
direction or the scale trend in ``s`` measures a failure to disentangle, not the dataset.

Everything is a pure function of the seed.
"""
from __future__ import annotations

import numpy as np

SHAPES = ["square", "circle", "triangle", "diamond"]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
DIRECTIONS = ["left-to-right", "right-to-left"]
SCALES = ["growing", "shrinking"]
PALETTE = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [235, 220, 50], [220, 60, 220], [60, 220, 220]],
    dtype=np.uint8,
)
LABELS = {"shape": SHAPES, "colour": COLOURS, "direction": DIRECTIONS, "scale": SCALES}
KINDS = {"shape": "static", "colour": "static", "direction": "dynamic", "scale": "dynamic"}


def render(count: int, seed: int, size: int = 32, frames: int = 8):
    """Return ``(videos, labels)``: uint8 ``(count, frames, size, size, 3)`` and a dict of int64
    label arrays, one per factor of ``LABELS``."""
    if size < 16:
        raise ValueError(f"frame size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    labels = {name: rng.integers(0, len(classes), count) for name, classes in LABELS.items()}
    y_centre = rng.integers(round(0.3 * size), round(0.7 * size) + 1, count).astype(float)

    step = np.linspace(0.0, 1.0, frames)                                  # 0 -> 1 over the clip
    x_path = (0.25 + 0.5 * step) * size                                   # left to right
    r_path = (0.12 + 0.12 * step) * size                                  # small to large
    x_centre = np.where(labels["direction"][:, None] == 0, x_path, x_path[::-1])
    radius = np.where(labels["scale"][:, None] == 0, r_path, r_path[::-1])

    coords = np.arange(size) + 0.5
    dx = coords[None, None, None, :] - x_centre[:, :, None, None]          # (N, T, 1, W)
    dy = coords[None, None, :, None] - y_centre[:, None, None, None]       # (N, 1, H, 1)
    r = radius[:, :, None, None]
    masks = np.stack([
        (np.abs(dx) <= r) & (np.abs(dy) <= r),                            # square
        dx**2 + dy**2 <= r**2,                                            # circle
        (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2),                 # triangle, apex up
        np.abs(dx) + np.abs(dy) <= 1.3 * r,                               # diamond
    ])                                                                    # (4, N, T, H, W)
    mask = masks[labels["shape"], np.arange(count)]                        # (N, T, H, W)
    colour = PALETTE[labels["colour"]][:, None, None, None, :]
    videos = (mask[..., None] * colour).astype(np.uint8)
    return videos, {name: values.astype(np.int64) for name, values in labels.items()}
