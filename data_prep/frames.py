"""Your own videos: a folder of sequences, each a folder of frame images or one animated file.

Layout: ``<source>/<name>/`` holding frame images (PNG or JPEG, ordered by name in natural sort:
``2.png`` before ``10.png``), or ``<source>/<name>.gif|.png|.apng|.tif|.tiff`` holding every frame
in one animated file (GIF, APNG, multi-page TIFF). ``<name>`` names the sequence in the labels CSV.

- ``frames``: keep T evenly spaced frames of each sequence; shorter ones are skipped and counted
  (meta.json lists them). Without it every sequence must have the same length.
- ``size``: crop the frames square (``crop="center"``; ``"none"`` squashes) and resize them to
  size x size. Without it every frame must already be one square size. The model's frame coders
  halve the side down to 4x4, so the side must be a power of two, 8 to 256.
- Colour: one channel when every frame is grey (R = G = B), else RGB.
- Labels (optional): a CSV whose header is ``name,<factor>,...`` and whose rows give each
  sequence's class of each factor; ``static``/``dynamic`` name each factor's kind.
- Split: ``test_fraction`` of the sequences, drawn with ``seed``; with ``split_by`` whole classes
  of that factor go to one split (as MUG's subjects), so the factor's classes are disjoint.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from data_prep.common import PrepareError, PreparedWriter, open_image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
ANIMATED_SUFFIXES = (".gif", ".png", ".apng", ".tif", ".tiff")
LAYOUT = ("<source>/<name>/ with frame images (PNG/JPEG), or <source>/<name>.gif|.png|.apng|.tif|.tiff "
          "animated files")


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: frame2 before frame10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def find_sequences(source: Path) -> list:
    """``[(name, path)]`` of every sequence under ``source``: frame folders and animated files."""
    if not source.is_dir():
        raise PrepareError(f"{source}: no such folder; expected {LAYOUT}")
    found = []
    for path in sorted(source.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if path.is_dir() and _frame_files(path):
            found.append((path.name, path))
        elif path.is_file() and path.suffix.lower() in ANIMATED_SUFFIXES:
            found.append((path.stem, path))
    if not found:
        raise PrepareError(f"{source}: no sequences found; expected {LAYOUT}")
    names = [name for name, _ in found]
    for name in names:
        if names.count(name) > 1:
            raise PrepareError(f"{source}: two sequences are named '{name}' (a folder and a file, or "
                               "two files); expected one sequence per name")
    return found


def _frame_files(folder: Path) -> list:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def _open(path: Path):
    return open_image(path, "a PNG, JPEG, GIF, APNG or TIFF file")


def open_sequence(path: Path) -> tuple:
    """``(frame count, read)`` of one sequence, ``read(indices)`` giving those frames as RGB PIL
    images; an animated file is opened once for both."""
    if path.is_dir():
        files = _frame_files(path)
        return len(files), lambda indices: [_open(files[i]).convert("RGB") for i in indices]
    image = _open(path)
    count = getattr(image, "n_frames", 1)
    if count < 2:
        raise PrepareError(f"{path}: 1 frame; expected an animated file with at least 2 frames "
                           "(or a folder of frame images)")

    def read(indices) -> list:
        frames = []
        for i in indices:
            try:
                image.seek(i)
                frames.append(image.convert("RGB"))
            except (EOFError, OSError, ValueError) as error:
                raise PrepareError(f"{path}: unreadable frame {i} ({error}); expected a complete "
                                   "animated file") from None
        return frames
    return count, read


def _square(image, size: int, crop: str):
    from PIL import Image

    if crop == "center":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.LANCZOS)


def read_labels(path: Path, static: list, dynamic: list) -> tuple:
    """``({factor: {sequence name: class name}}, {factor: kind})`` from the labels CSV."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise PrepareError(f"{path}: unreadable ({error}); expected a CSV file") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows or len(rows[0]) < 2:
        raise PrepareError(f"{path}: expected a header row 'name,<factor>,...' naming at least one factor")
    factors = [cell.strip() for cell in rows[0][1:]]
    kinds = {**{f: "static" for f in static}, **{f: "dynamic" for f in dynamic}}
    if set(static) & set(dynamic):
        raise PrepareError(f"--static and --dynamic both name {', '.join(sorted(set(static) & set(dynamic)))}; "
                           "expected each factor once")
    for factor in kinds:
        if factor not in factors:
            raise PrepareError(f"{path}: no column '{factor}' (columns: {', '.join(factors)}); expected "
                               "a column for every factor --static and --dynamic name")
    for factor in factors:
        if factor not in kinds:
            raise PrepareError(f"{path}: column '{factor}' is in neither --static nor --dynamic; "
                               "expected each factor column named by one of them")
    labels = {factor: {} for factor in factors}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(factors) + 1 or any(not cell.strip() for cell in row):
            raise PrepareError(f"{path}:{line}: {len(row)} columns, expected {len(factors) + 1} "
                               f"non-empty ones (name, {', '.join(factors)})")
        name = row[0].strip()
        if name in labels[factors[0]]:
            raise PrepareError(f"{path}:{line}: a second row for '{name}'; expected one row per sequence")
        for factor, cell in zip(factors, row[1:]):
            labels[factor][name] = cell.strip()
    return labels, kinds


def split_sequences(names: list, labels: dict, test_fraction: float, split_by, seed: int) -> np.ndarray:
    """A boolean mask over ``names``: True for the test split."""
    rng = np.random.default_rng(seed)
    count = len(names)
    if split_by is None:
        if count < 2:
            raise PrepareError(f"{count} usable sequence(s); expected at least 2 for a train and a test split")
        test = np.zeros(count, bool)
        test[rng.permutation(count)[:min(count - 1, max(1, round(test_fraction * count)))]] = True
        return test
    if split_by not in labels:
        raise PrepareError(f"--split-by {split_by}: not a labelled factor; expected one of "
                           f"{', '.join(labels) or '(none: give --labels)'}")
    values = np.array([labels[split_by][name] for name in names])
    classes = sorted(set(values.tolist()), key=natural_key)
    if len(classes) < 2:
        raise PrepareError(f"--split-by {split_by}: one class ({classes[0]}); expected at least 2")
    test_classes, held = [], 0
    for cls in rng.permutation(np.array(classes, dtype=object)):
        if held >= test_fraction * count or len(test_classes) == len(classes) - 1:
            break
        test_classes.append(cls)
        held += int((values == cls).sum())
    return np.isin(values, test_classes)


def prepare(source, out_dir, seed: int = 0, frames: int | None = None, size: int | None = None,
            crop: str = "center", labels_csv=None, static=(), dynamic=(), test_fraction: float = 0.2,
            split_by=None, progress=None, skip_bad: bool = False) -> Path:
    source = Path(source)
    if crop not in ("center", "none"):
        raise PrepareError(f"--crop {crop}: expected center or none")
    if not 0 < test_fraction < 1:
        raise PrepareError(f"--test-fraction {test_fraction}: expected a fraction between 0 and 1")
    if frames is not None and frames < 2:
        raise PrepareError(f"--frames {frames}: expected at least 2")
    if size is not None and (size < 8 or size > 256 or size & (size - 1)):
        raise PrepareError(f"--size {size}: expected a power of two from 8 to 256 (the frame coders "
                           "halve the side down to 4x4)")
    if labels_csv is None and (static or dynamic or split_by):
        raise PrepareError("--static, --dynamic and --split-by name columns of --labels; expected --labels FILE.csv")
    sequences = find_sequences(source)
    labels, kinds = read_labels(Path(labels_csv), list(static), list(dynamic)) if labels_csv else ({}, {})
    names = {name for name, _ in sequences}
    for factor, values in labels.items():
        unknown = sorted(set(values) - names, key=natural_key)
        if unknown:
            raise PrepareError(f"{labels_csv}: names {', '.join(unknown[:3])}, not sequences in {source}; "
                               "expected one row per sequence (its folder or file name without suffix)")
        missing = [name for name, _ in sequences if name not in values]
        if missing:
            raise PrepareError(f"{labels_csv}: no row for sequence '{missing[0]}' ({len(missing)} missing); "
                               "expected one row per sequence")
        break   # every factor has the same rows

    videos, short, bad, length, frame_size, grey = [], [], [], frames, None, True
    for name, path in sequences:
        try:
            count, read = open_sequence(path)
        except PrepareError:
            if not skip_bad:
                raise
            bad.append(str(path))
            continue
        if frames is None:
            length = length or count
            if count < 2:
                raise PrepareError(f"{path}: {count} frame; expected sequences of at least 2 frames")
            if count != length:
                raise PrepareError(f"{path}: {count} frames, the first sequence {length}; expected "
                                   "sequences of one length, or --frames T")
        elif count < frames:
            short.append(name)
            continue
        try:
            images = read(np.linspace(0, count - 1, length).round().astype(int))
        except PrepareError:
            if not skip_bad:
                raise
            bad.append(str(path))
            continue
        if size is not None:
            images = [_square(image, size, crop) for image in images]
        for image in images:
            if frame_size is None:
                frame_size = image.size
            if image.size != frame_size:
                raise PrepareError(f"{path}: frames of {image.width}x{image.height}, the first sequence's "
                                   f"{frame_size[0]}x{frame_size[1]}; expected frames of one size, or --size S")
        video = np.stack([np.asarray(image, dtype=np.uint8) for image in images])   # (T, H, W, 3)
        grey = grey and bool((video[..., 0] == video[..., 1]).all() and (video[..., 1] == video[..., 2]).all())
        videos.append((name, video))
        if progress is not None:
            progress(1)
    if not videos:
        raise PrepareError(f"{source}: no sequence has {length} frames or more ({len(short)} shorter, "
                           f"{len(bad)} unreadable); expected --frames T at most the shortest length")
    width, height = frame_size
    if width != height or width < 8 or width > 256 or width & (width - 1):
        raise PrepareError(f"frames of {width}x{height}; expected square frames with a power-of-two side "
                           "from 8 to 256 (give --size S to crop and resize)")

    names = [name for name, _ in videos]
    test = split_sequences(names, labels, test_fraction, split_by, seed)
    classes = {factor: sorted({values[name] for name in names}, key=natural_key) for factor, values in labels.items()}
    channels = 1 if grey else 3
    writer = PreparedWriter(out_dir)
    try:
        for split, mask in (("train", ~test), ("test", test)):
            chosen = [video for (_, video), held in zip(videos, mask) if held]
            stacked = np.stack(chosen)[..., :channels]
            writer.save(split, "sequences", np.ascontiguousarray(stacked))
            for factor, values in labels.items():
                writer.save(split, f"label_{factor}", np.array(
                    [classes[factor].index(values[name]) for name, held in zip(names, mask) if held], np.int64))
        meta = {
            "dataset": "frames",
            "splits": {"train": {"count": int((~test).sum())}, "test": {"count": int(test.sum())}},
            "labels": classes, "kind": kinds, "disjoint": [split_by] if split_by else [],
            "frame_shape": [channels, height, width], "frames": int(length),
            "split_rule": (f"whole classes of '{split_by}' per split" if split_by else "sequences at random")
                          + f", test fraction {test_fraction}, numpy.random.default_rng({seed})",
            "source": str(source.resolve()),
            "sequence_names": {"train": [n for n, held in zip(names, test) if not held],
                               "test": [n for n, held in zip(names, test) if held]},
            "resize": None if size is None else {"size": size, "crop": crop},
            "skipped_short": short, "skipped_bad_files": bad,
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def count_sequences(source) -> int:
    return len(find_sequences(Path(source)))
