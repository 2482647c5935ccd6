"""Sprites (Li & Mandt, 2018), rendered from the Liberated Pixel Cup sprite-sheet layers.

Source layout: ``<source>/{body,bottomwear,topwear,hair}/{0..5}.png`` and
``<source>/shoes/1.png``, each an 832x1344 sheet of 64x64 cells, 13 cells per row (cell index =
row * 13 + column). A character is the alpha-composite, in this order, of body B, bottomwear P,
topwear T, hair H and shoes over black: 6^4 = 1296 characters.

- Static factors: ``skin`` (body), ``pants`` (bottomwear), ``top`` (topwear), ``hair``; 6 each.
- Dynamic factor: ``action``, 3 actions x 3 directions = 9 classes, 8 frames each (cells below).
- Split: the characters shuffled with ``numpy.random.default_rng(seed)``, the first 1000 for
  training and the other 296 for test: 9000 / 2664 sequences of 8x64x64x3.

Fast: each layer's 63 used cells are cut out once; characters are composited cell-stack by
cell-stack in memory (no intermediate image files) straight into memory-mapped outputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.common import PrepareError, PreparedWriter, open_image

CELL, COLUMNS, VARIANTS = 64, 13, 6
LAYERS = ("body", "bottomwear", "topwear", "hair")
FACTORS = {"skin": "body", "pants": "bottomwear", "top": "topwear", "hair": "hair"}
DIRECTIONS = ("left", "front", "right")
# Per action: the first cell of each direction, the number of cells, and which of the cells
# c0..c(n-1) make frames 0..7.
ACTIONS = {
    "spellcast": ((13, 26, 39), 7, (0, 1, 2, 3, 4, 5, 4, 6)),
    "walk": ((118, 131, 144), 8, (7, 0, 1, 2, 3, 4, 5, 6)),
    "slash": ((169, 182, 195), 6, (0, 1, 2, 3, 4, 5, 4, 0)),
}
MOTIONS = [f"{action}-{direction}" for action in ACTIONS for direction in DIRECTIONS]
LABELS = {**{factor: [f"{layer}/{v}" for v in range(VARIANTS)] for factor, layer in FACTORS.items()},
          "action": MOTIONS}
KINDS = {**{factor: "static" for factor in FACTORS}, "action": "dynamic"}
TRAIN_CHARACTERS = 1000


def motion_cells() -> np.ndarray:
    """(9, 8) sheet-cell index of every frame of every motion class, in ``MOTIONS`` order."""
    rows = []
    for first_cells, _, frame_cells in ACTIONS.values():
        for first in first_cells:
            rows.append([first + c for c in frame_cells])
    return np.array(rows)


def _load_sheet(path: Path, cells: np.ndarray) -> np.ndarray:
    if not path.is_file():
        raise PrepareError(f"{path}: missing; expected the LPC sprite-sheet layers "
                           "<source>/{body,bottomwear,topwear,hair}/0..5.png and <source>/shoes/1.png")
    sheet = np.asarray(open_image(path, "an LPC sprite-sheet PNG").convert("RGBA"))
    if sheet.shape[:2] != (21 * CELL, COLUMNS * CELL):
        raise PrepareError(f"{path}: a {sheet.shape[1]}x{sheet.shape[0]} image; expected an "
                           f"{COLUMNS * CELL}x{21 * CELL} sheet of 64x64 cells")
    rows, columns = np.divmod(cells, COLUMNS)
    return np.stack([sheet[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] for r, c in zip(rows, columns)])


def _over(dst_rgb: np.ndarray, src_rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite src over an opaque dst, in integers (exact for 0/255 alpha)."""
    alpha = src_rgba[..., 3:].astype(np.uint16)
    blended = src_rgba[..., :3].astype(np.uint16) * alpha + dst_rgb.astype(np.uint16) * (255 - alpha)
    return ((blended + 127) // 255).astype(np.uint8)


def _downsample(frames: np.ndarray, size: int) -> np.ndarray:
    factor = CELL // size
    if factor == 1:
        return frames
    shape = frames.shape[:-3] + (size, factor, size, factor, 3)
    return frames.reshape(shape).mean(axis=(-4, -2)).round().astype(np.uint8)


def check_source(source: Path) -> None:
    """Every layer file is there (before any work starts)."""
    expected = [source / layer / f"{v}.png" for layer in LAYERS for v in range(VARIANTS)]
    missing = [p for p in expected + [source / "shoes" / "1.png"] if not p.is_file()]
    if not source.is_dir() or missing:
        where = source if not source.is_dir() else missing[0]
        raise PrepareError(f"{where}: missing; expected the LPC sprite-sheet layers "
                           "<source>/{body,bottomwear,topwear,hair}/0..5.png and <source>/shoes/1.png")


def prepare(source: str | Path, out_dir: str | Path, seed: int = 0, size: int = 64, progress=None) -> Path:
    """Render the whole dataset into ``out_dir`` in the common format (see data_prep/common.py)."""
    source = Path(source)
    check_source(source)
    if size not in (16, 32, 64):
        raise PrepareError(f"frame size {size}: expected 64, 32 or 16")
    frame_cells = motion_cells()                                   # (9, 8)
    used, frame_index = np.unique(frame_cells, return_inverse=True)
    frame_index = frame_index.reshape(frame_cells.shape)
    layers = {layer: np.stack([_load_sheet(source / layer / f"{v}.png", used) for v in range(VARIANTS)])
              for layer in LAYERS}                                 # (6, cells, 64, 64, 4)
    shoes = _load_sheet(source / "shoes" / "1.png", used)

    order = np.random.default_rng(seed).permutation(VARIANTS ** 4)
    split_of = {int(character): ("train", i) if i < TRAIN_CHARACTERS else ("test", i - TRAIN_CHARACTERS)
                for i, character in enumerate(order)}
    counts = {"train": TRAIN_CHARACTERS * len(MOTIONS),
              "test": (VARIANTS ** 4 - TRAIN_CHARACTERS) * len(MOTIONS)}
    writer = PreparedWriter(out_dir)
    try:
        videos = {split: writer.array(split, "sequences", (count, 8, size, size, 3), np.uint8)
                  for split, count in counts.items()}
        labels = {split: {factor: np.zeros(count, np.int64) for factor in LABELS}
                  for split, count in counts.items()}
        black = np.zeros(used.shape + (CELL, CELL, 3), np.uint8)
        character = 0
        for skin in range(VARIANTS):
            with_body = _over(black, layers["body"][skin])
            for pants in range(VARIANTS):
                with_pants = _over(with_body, layers["bottomwear"][pants])
                for top in range(VARIANTS):
                    with_top = _over(with_pants, layers["topwear"][top])
                    for hair in range(VARIANTS):
                        cells = _over(_over(with_top, layers["hair"][hair]), shoes)
                        split, slot = split_of[character]
                        rows = slice(slot * len(MOTIONS), (slot + 1) * len(MOTIONS))
                        videos[split][rows] = _downsample(cells[frame_index], size)
                        for factor, value in zip(("skin", "pants", "top", "hair"), (skin, pants, top, hair)):
                            labels[split][factor][rows] = value
                        labels[split]["action"][rows] = np.arange(len(MOTIONS))
                        character += 1
                        if progress is not None:
                            progress(1)
        for split in counts:
            videos[split].flush()
            for factor, values in labels[split].items():
                writer.save(split, f"label_{factor}", values)
        meta = {
            "dataset": "sprites",
            "splits": {split: {"count": count} for split, count in counts.items()},
            "labels": LABELS, "kind": KINDS, "disjoint": [],
            "frame_shape": [3, size, size], "frames": 8,
            "split_rule": f"characters shuffled with numpy.random.default_rng({seed}); the first "
                          f"{TRAIN_CHARACTERS} train, the other {VARIANTS ** 4 - TRAIN_CHARACTERS} test",
            "source_layout": "body/B.png, bottomwear/P.png, topwear/T.png, hair/H.png (0..5), shoes/1.png",
            "cells": {motion: cells.tolist() for motion, cells in zip(MOTIONS, frame_cells)},
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


TOTAL_STEPS = VARIANTS ** 4   # progress units: one per character
