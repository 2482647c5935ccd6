"""The one on-disk format every dataset is prepared into, and its loader.

    DIR/meta.json
    DIR/train/sequences.npy        (N, T, H, W, C) uint8 video or (N, T, D) float32 features
    DIR/train/label_<factor>.npy   (N,) int64, one file per labelled factor
    DIR/train/motion_views.npy     (N, T, D) float32, audio only: the motion-augmented view
    DIR/test/...                   the same

``meta.json`` holds at least ``{"dataset", "splits": {"train": {"count"}, "test": {"count"}},
"labels": {factor: [class names]}, "kind": {factor: "static" | "dynamic"}}`` plus
``frame_shape``, ``frames``, ``split_rule``, ``disjoint`` (factors whose classes differ between
the splits, e.g. held-out speakers: a probe trained on one split cannot score the other) and
dataset-specific settings (feature extraction, crop box, ...).

Arrays load memory-mapped with ``allow_pickle=False``. A folder is written under a temporary
name and renamed when complete, so a failed preparation leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")


class PrepareError(ValueError):
    """Bad source data or output folder; the message names what was expected."""


class PreparedWriter:
    """Collects a prepared dataset in a temporary folder; ``commit`` moves it into place."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not (self.out_dir / "meta.json").is_file() and any(self.out_dir.iterdir()):
            raise PrepareError(f"{self.out_dir}: exists and is not a prepared dataset; "
                               "expected a new folder, an empty one, or one written by 'cdsvae prepare'")
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for split in SPLITS:
            (self.tmp_dir / split).mkdir(parents=True)

    def array(self, split: str, name: str, shape: tuple, dtype) -> np.ndarray:
        """A writable memory-mapped .npy array to fill in place."""
        return np.lib.format.open_memmap(self.tmp_dir / split / f"{name}.npy", mode="w+",
                                         dtype=dtype, shape=shape)

    def save(self, split: str, name: str, values: np.ndarray) -> None:
        np.save(self.tmp_dir / split / f"{name}.npy", values, allow_pickle=False)

    def commit(self, meta: dict) -> Path:
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def open_image(path: Path, expected: str):
    """A PIL image with its (first) frame read; a truncated file, one that is not an image, or a
    decompression bomb is a PrepareError naming the file and ``expected``. Animated files stay
    open, so that later frames can be seeked."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise PrepareError(f"{path}: unreadable image ({type(error).__name__}: {error}); expected {expected}") from None


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise PrepareError(f"{directory}: unreadable meta.json ({error}); expected a folder "
                           "written by 'cdsvae prepare'") from None
    required = ("dataset", "splits", "labels", "kind", "frame_shape")
    if not isinstance(meta, dict) or any(key not in meta for key in required):
        raise PrepareError(f"{directory}/meta.json: expected keys {', '.join(required)}")
    return meta


def load_split(directory: str | Path, split: str, meta: dict):
    """``(sequences, labels, motion_views or None)`` of one split, memory-mapped."""
    folder = Path(directory) / split

    def load(name: str, required: bool = True):
        path = folder / f"{name}.npy"
        if not path.is_file():
            if required:
                raise PrepareError(f"{path}: missing; expected a folder written by 'cdsvae prepare'")
            return None
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise PrepareError(f"{path}: unreadable ({error}); expected a .npy array") from None

    sequences = load("sequences")
    count = meta["splits"][split]["count"]
    if len(sequences) != count or sequences.shape[2:] != _stored_frame_shape(meta):
        raise PrepareError(f"{folder}/sequences.npy: shape {sequences.shape} does not match meta.json "
                           f"({count} sequences of frames {meta['frame_shape']})")
    labels = {}
    for factor, classes in meta["labels"].items():
        values = load(f"label_{factor}")
        if values.shape != (count,) or values.dtype.kind not in "iu" or \
                (count and (values.min() < 0 or values.max() >= len(classes))):
            raise PrepareError(f"{folder}/label_{factor}.npy: expected {count} integers in [0, {len(classes)})")
        labels[factor] = np.array(values, dtype=np.int64)   # small: a writable copy
    views = load("motion_views", required=False)
    if views is not None and views.shape != sequences.shape:
        raise PrepareError(f"{folder}/motion_views.npy: shape {views.shape}, expected {sequences.shape}")
    return sequences, labels, views


def _stored_frame_shape(meta: dict) -> tuple:
    shape = tuple(meta["frame_shape"])
    return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape
