"""Stochastic Moving MNIST (Denton & Fergus, 2018) from the MNIST IDX files.

Two digits move on a black canvas. Each digit moves at a constant velocity until it hits a wall;
there it takes a new random velocity pointing away from the wall (the "stochastic" part).

- Static factors: the two digit identities. Nothing in a sequence says which digit is "first",
  so the labels are order-free: ``digit_low`` and ``digit_high``, the smaller and the larger of
  the two (10 classes each; together they name the pair).
- Dynamic factor: ``motions``, the unordered pair of the quadrants of the two digits' initial
  velocities (up-left, up-right, down-left, down-right; 10 classes). The full trajectories
  (centre of each digit per frame, in pixels) are returned too.

Digit pools: with the full MNIST files present, training sequences use the 60k training digits
and test sequences the 10k test digits. With only the test files (``t10k-*``), the 10k test
digits are split into disjoint pools: the first 8000 for training sequences and the last 2000
for test sequences.

With no directory given, ``locate`` looks for the files in ``$CDSVAE_DATA/mnist``, then in the
cache folder (``$XDG_CACHE_HOME/cdsvae/mnist``, by default ``~/.cache/cdsvae/mnist``), and
only then ``download``s the four standard files into the cache: each to a ``.part`` file, its MD5
checksum verified, then renamed, so an interrupted download never leaves a file that is trusted.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
from pathlib import Path
from urllib.request import urlopen

import numpy as np

MOTIONS = ["up-left", "up-right", "down-left", "down-right"]
MOTION_PAIRS = [(i, j) for i in range(4) for j in range(i, 4)]
LABELS = {
    "digit_low": [str(d) for d in range(10)],
    "digit_high": [str(d) for d in range(10)],
    "motions": [f"{MOTIONS[i]}+{MOTIONS[j]}" for i, j in MOTION_PAIRS],
}
KINDS = {"digit_low": "static", "digit_high": "static", "motions": "dynamic"}

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FILES_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
TEST_ONLY_TRAIN_POOL = 8000


class MnistError(ValueError):
    """A missing or malformed MNIST file (the message names what was expected)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise MnistError(f"{path}: unreadable ({error}); expected an MNIST IDX file") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise MnistError(f"{path}: not an IDX file of unsigned bytes (magic 0x0000 08 nn)")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise MnistError(f"{path}: truncated IDX file, header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def _find(directory: Path, split: str, kind: str) -> Path | None:
    rank = 3 if kind == "images" else 1
    for name in (f"{split}-{kind}-idx{rank}-ubyte", f"{split}-{kind}.idx{rank}-ubyte"):
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def _read_split(directory: Path, split: str):
    images_path, labels_path = _find(directory, split, "images"), _find(directory, split, "labels")
    if images_path is None or labels_path is None:
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MnistError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def check_source(directory: Path) -> None:
    """The test files are there (before any work starts)."""
    if not directory.is_dir() or _find(directory, "t10k", "images") is None or \
            _find(directory, "t10k", "labels") is None:
        raise MnistError(f"{directory}: expected MNIST IDX files t10k-images-idx3-ubyte[.gz] and "
                         "t10k-labels-idx1-ubyte[.gz] (and optionally train-*)")


def digit_pools(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint training and test digit pools ``{"train": (images, labels), "test": ...}``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MnistError(f"{directory}: no such folder; expected a folder with MNIST IDX files "
                         "(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])")
    test = _read_split(directory, "t10k")
    if test is None:
        raise MnistError(f"{directory}: expected MNIST IDX files t10k-images-idx3-ubyte[.gz] and "
                         "t10k-labels-idx1-ubyte[.gz] (and optionally train-*)")
    train = _read_split(directory, "train")
    if train is not None:
        return {"train": train, "test": test}
    images, labels = test
    cut = TEST_ONLY_TRAIN_POOL
    return {"train": (images[:cut], labels[:cut]), "test": (images[cut:], labels[cut:])}


def cache_folder() -> Path:
    """Where downloaded MNIST files are kept: ``$XDG_CACHE_HOME/cdsvae/mnist`` (``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdsvae" / "mnist"


def _has_test_files(directory: Path) -> bool:
    return _find(directory, "t10k", "images") is not None and _find(directory, "t10k", "labels") is not None


def locate(show_progress: bool = True) -> Path:
    """The folder of MNIST IDX files to use when none is given: ``$CDSVAE_DATA/mnist`` if it has
    them, else the cache folder, downloading what it lacks (``download``)."""
    if os.environ.get("CDSVAE_DATA"):
        candidate = Path(os.environ["CDSVAE_DATA"]) / "mnist"
        if _has_test_files(candidate):
            return candidate
    return download(cache_folder(), show_progress)


def _fetch(url: str, path: Path, progress, task) -> None:
    """Stream ``url`` into ``path``, advancing the progress bar."""
    with urlopen(url, timeout=60) as response, path.open("wb") as handle:
        size = response.headers.get("Content-Length")
        progress.update(task, total=int(size) if size else None)
        while chunk := response.read(1 << 16):
            handle.write(chunk)
            progress.advance(task, len(chunk))


def download(cache_dir: str | Path, show_progress: bool = True) -> Path:
    """Fetch the four standard MNIST files into ``cache_dir`` (each verified by its MD5 sum and
    then renamed into place; files already there and verified are kept). Without network: a
    one-line MnistError naming where the files could be put instead, and nothing left behind."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    cache_dir = Path(cache_dir)
    missing = [name for name, md5 in FILES_MD5.items() if not (cache_dir / name).is_file()
               or hashlib.md5((cache_dir / name).read_bytes()).hexdigest() != md5]
    if not missing:
        return cache_dir
    created = [folder for folder in (cache_dir, *cache_dir.parents) if not folder.exists()]   # deepest first
    cache_dir.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    console = Console()                     # a transient bar only on a terminal: nothing in a redirected log
    with Progress(*columns, console=console, disable=not (show_progress and console.is_terminal),
                  transient=True) as progress:
        for name in missing:
            target, partial = cache_dir / name, cache_dir / (name + ".part")
            try:
                _fetch(MIRROR + name, partial, progress, progress.add_task(name))
            except (OSError, http.client.HTTPException) as error:   # URLError is an OSError
                partial.unlink(missing_ok=True)
                for folder in created:              # leave no empty folders behind either
                    if not any(folder.iterdir()):
                        folder.rmdir()
                reason = getattr(error, "reason", None) or error
                raise MnistError(
                    f"could not download MNIST from {MIRROR} ({type(error).__name__}: {reason}); expected "
                    f"network access, or the IDX files (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
                    f"optionally train-*) in a folder passed with --data-dir (train) or --source (prepare), "
                    f"in $CDSVAE_DATA/mnist, or in {cache_dir}") from None
            if hashlib.md5(partial.read_bytes()).hexdigest() != FILES_MD5[name]:
                partial.unlink()
                raise MnistError(f"{name}: checksum mismatch after download from {MIRROR}; expected "
                                 f"MD5 {FILES_MD5[name]} (try again, or pass the files with --data-dir)")
            partial.replace(target)
    return cache_dir


def pools_from(source, show_progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digit pools from a folder of IDX files, or (``source`` None) from the folder ``locate``
    finds or downloads."""
    return digit_pools(source if source is not None else locate(show_progress))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size:
        return images
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.tensor(images, dtype=torch.float32)[:, None], size=(size, size),
                            mode="bilinear", antialias=True, align_corners=False)
    return resized[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def generate(images: np.ndarray, labels: np.ndarray, count: int, seed: int, size: int = 64,
             frames: int = 15):
    """Render ``count`` sequences of two moving digits from a digit pool.

    Returns ``(videos, labels, trajectories)``: uint8 ``(count, frames, size, size, 1)``, a dict of
    int64 label arrays (see ``LABELS``) and float32 ``(count, frames, 2, 2)`` digit centres (x, y).
    The digit is ``size / 2`` pixels wide and moves at most ``size / 16`` pixels per frame, as in
    Denton & Fergus's 64x64 setting (32-pixel digits, speed up to 4).
    """
    rng = np.random.default_rng(seed)
    digit_size = size // 2
    max_speed = max(1, size // 16)
    digits = _resize(images, digit_size)
    limit = size - digit_size
    videos = np.zeros((count, frames, size, size), dtype=np.uint8)
    trajectories = np.zeros((count, frames, 2, 2), dtype=np.float32)
    identities = np.zeros((count, 2), dtype=np.int64)
    quadrants = np.zeros((count, 2), dtype=np.int64)
    speeds = np.concatenate([np.arange(-max_speed, 0), np.arange(1, max_speed + 1)])
    for n in range(count):
        for slot in range(2):
            index = rng.integers(len(digits))
            identities[n, slot] = labels[index]
            x, y = rng.integers(0, limit + 1, 2)
            dx, dy = rng.choice(speeds, 2)
            quadrants[n, slot] = 2 * int(dy > 0) + int(dx > 0)
            for t in range(frames):
                canvas = videos[n, t, y:y + digit_size, x:x + digit_size]
                np.maximum(canvas, digits[index], out=canvas)
                trajectories[n, t, slot] = (x + digit_size / 2, y + digit_size / 2)
                x, y = x + dx, y + dy
                # Bounce: a new random velocity pointing away from the wall that was hit.
                if x < 0 or x > limit:
                    x = min(max(x, 0), limit)
                    dx = rng.integers(1, max_speed + 1) * (1 if x == 0 else -1)
                    dy = rng.choice(speeds)
                if y < 0 or y > limit:
                    y = min(max(y, 0), limit)
                    dy = rng.integers(1, max_speed + 1) * (1 if y == 0 else -1)
                    dx = rng.choice(speeds)
    quadrants.sort(axis=1)
    pair_index = {pair: k for k, pair in enumerate(MOTION_PAIRS)}
    out_labels = {
        "digit_low": identities.min(axis=1),
        "digit_high": identities.max(axis=1),
        "motions": np.array([pair_index[tuple(q)] for q in quadrants], dtype=np.int64),
    }
    return videos[..., None], out_labels, trajectories


def prepare(source, out_dir, seed: int = 0, size: int = 64, train_count: int = 8000,
            test_count: int = 2000, progress=None):
    """Write a fixed training and test set in the common format (see data_prep/common.py);
    ``source`` is a folder of MNIST IDX files (``None``: download them to the cache)."""
    from data_prep.common import PrepareError, PreparedWriter

    try:
        pools = pools_from(source)
    except MnistError as error:
        raise PrepareError(str(error)) from None
    writer = PreparedWriter(out_dir)
    try:
        counts = {"train": train_count, "test": test_count}
        for offset, (split, count) in enumerate(counts.items()):
            videos, labels, trajectories = generate(*pools[split], count, seed + 10_000 * offset, size=size)
            writer.save(split, "sequences", videos)
            writer.save(split, "trajectories", trajectories)
            for factor, values in labels.items():
                writer.save(split, f"label_{factor}", values)
            if progress is not None:
                progress(count)
        meta = {
            "dataset": "sm-mnist",
            "splits": {split: {"count": count} for split, count in counts.items()},
            "labels": LABELS, "kind": KINDS, "disjoint": [],
            "frame_shape": [1, size, size], "frames": 15,
            "split_rule": ("training sequences from the MNIST training digits, test sequences from the "
                           "test digits" if len(pools["train"][0]) > TEST_ONLY_TRAIN_POOL else
                           "only the MNIST test digits: the first 8000 make training sequences, the "
                           "last 2000 test sequences (disjoint digit pools)"),
            "generator": f"seed {seed} (train), {seed + 10_000} (test); digits {size // 2} px, "
                         f"speed up to {max(1, size // 16)} px per frame",
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
