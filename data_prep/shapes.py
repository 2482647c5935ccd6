"""The built-in procedural dataset: coloured shapes that move and change size (no download).

Each sequence shows one shape on a black canvas for 8 frames, moving left-to-right or
right-to-left while it grows or shrinks.
- Static factors: ``shape`` (square, circle, triangle, diamond), ``colour`` (6 colours) and
  ``large_side`` (right or left: the end of its path where the shape is largest).
- Dynamic factor: ``direction`` (left-to-right or right-to-left). A nuisance vertical offset is
  drawn per sequence and is not labelled.

Why the size is not a dynamic factor of its own: each frame shows where the shape is and how large
it is, so the unordered set of frames already tells on which side it is largest; only the order
tells which way it goes. Growing (or shrinking) is the direction combined with that side
(``growing``), as static as the shape. The content augmentation shuffles frames, so ``s`` sees a
sequence as an unordered set: a probe that finds the direction in ``s`` measures a failure to
disentangle, not the dataset.

Everything is a pure function of the seed.
"""
from __future__ import annotations

import numpy as np

SHAPES = ["square", "circle", "triangle", "diamond"]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
DIRECTIONS = ["left-to-right", "right-to-left"]
SIDES = ["right", "left"]
PALETTE = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [235, 220, 50], [220, 60, 220], [60, 220, 220]],
    dtype=np.uint8,
)
LABELS = {"shape": SHAPES, "colour": COLOURS, "large_side": SIDES, "direction": DIRECTIONS}
KINDS = {"shape": "static", "colour": "static", "large_side": "static", "direction": "dynamic"}


def growing(labels) -> np.ndarray:
    """Whether each sequence's shape grows over time: it moves towards the side where it is
    largest (direction and large_side as ``render`` labels them, 0 = left-to-right / right)."""
    return labels["direction"] == labels["large_side"]


def render(count: int, seed: int, size: int = 32, frames: int = 8):
    """Return ``(videos, labels)``: uint8 ``(count, frames, size, size, 3)`` and a dict of int64
    label arrays, one per factor of ``LABELS``."""
    if size < 16:
        raise ValueError(f"frame size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    # drawn in the order of the earlier labels (the size trend fourth), so a seed gives the same videos
    shape, colour = rng.integers(0, len(SHAPES), count), rng.integers(0, len(COLOURS), count)
    direction, shrinking = rng.integers(0, len(DIRECTIONS), count), rng.integers(0, 2, count)
    y_centre = rng.integers(round(0.3 * size), round(0.7 * size) + 1, count).astype(float)

    step = np.linspace(0.0, 1.0, frames)                                  # 0 -> 1 over the clip
    x_path = (0.25 + 0.5 * step) * size                                   # left to right
    r_path = (0.12 + 0.12 * step) * size                                  # small to large
    x_centre = np.where(direction[:, None] == 0, x_path, x_path[::-1])
    radius = np.where(shrinking[:, None] == 0, r_path, r_path[::-1])

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
    mask = masks[shape, np.arange(count)]                                  # (N, T, H, W)
    videos = (mask[..., None] * PALETTE[colour][:, None, None, None, :]).astype(np.uint8)
    labels = dict(shape=shape, colour=colour, large_side=direction ^ shrinking, direction=direction)
    return videos, {name: values.astype(np.int64) for name, values in labels.items()}
