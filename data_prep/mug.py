"""The MUG Facial Expression Database (Aifanti et al., 2010), as in the MoCoGAN/S3VAE protocol.

Source layout: ``<root>/<subject>/<expression>/<take>/<frame>.jpg``, frames in name order.
- Neutral takes are dropped; 6 expression labels (``expression``, dynamic) and the subject
  (``subject``, static; the split is by subject, so its classes differ between the splits).
- Every frame is cropped to a fixed box (fractions of the image: left, top, right, bottom;
  ``--crop`` to change it; no face detector, no OpenCV) and resized to 64x64.
- 15 frames per sequence, evenly spaced over the take; takes shorter than 15 frames are skipped.
- Split by subject: the subjects shuffled with ``numpy.random.default_rng(seed)``, the first 80%
  (rounded) for training and the rest for test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.common import PrepareError, PreparedWriter, open_image

EXPRESSIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
LAYOUT = "<root>/<subject>/<expression>/<take>/<frame>.jpg with expressions " + ", ".join(EXPRESSIONS + ["neutral"])
DEFAULT_CROP = (0.125, 0.0, 0.875, 0.75)
FRAMES, TRAIN_FRACTION = 15, 0.8


def find_takes(root: Path):
    """[(subject, expression index, [frame paths])] for every non-neutral take."""
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder; expected the MUG layout {LAYOUT}")
    takes = []
    for subject in sorted(p for p in root.iterdir() if p.is_dir()):
        for expression_dir in sorted(p for p in subject.iterdir() if p.is_dir()):
            name = expression_dir.name.lower()
            if name not in EXPRESSIONS:
                continue
            for take in sorted(p for p in expression_dir.iterdir() if p.is_dir()):
                frames = sorted(p for p in take.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
                if frames:
                    takes.append((subject.name, EXPRESSIONS.index(name), frames))
    if not takes:
        raise PrepareError(f"{root}: no expression takes found; expected the MUG layout {LAYOUT}")
    return takes


def load_frame(path: Path, crop, size: int) -> np.ndarray:
    from PIL import Image

    image = open_image(path, "a JPEG frame").convert("RGB")
    width, height = image.size
    box = (round(crop[0] * width), round(crop[1] * height), round(crop[2] * width), round(crop[3] * height))
    return np.asarray(image.crop(box).resize((size, size), Image.BILINEAR))


def prepare(source, out_dir, seed: int = 0, size: int = 64, crop=DEFAULT_CROP, progress=None,
            skip_bad: bool = False) -> Path:
    """Write MUG in the common format; ``skip_bad`` skips a take with an unreadable frame (and
    lists the file in meta.json) instead of stopping."""
    if len(crop) != 4 or not (0 <= crop[0] < crop[2] <= 1 and 0 <= crop[1] < crop[3] <= 1):
        raise PrepareError(f"crop box {crop}: expected left,top,right,bottom fractions with left < right, top < bottom")
    takes = find_takes(Path(source))
    usable = [t for t in takes if len(t[2]) >= FRAMES]
    if not usable:
        raise PrepareError(f"{source}: no take has {FRAMES} frames or more")
    subjects = sorted({subject for subject, _, _ in usable})
    shuffled = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    cut = max(1, round(TRAIN_FRACTION * len(subjects))) if len(subjects) > 1 else 1
    train_subjects = set(shuffled[:cut])
    by_split = {"train": [t for t in usable if t[0] in train_subjects],
                "test": [t for t in usable if t[0] not in train_subjects]}
    writer, skipped = PreparedWriter(out_dir), []
    try:
        for split, split_takes in list(by_split.items()):
            videos = writer.array(split, "sequences", (len(split_takes), FRAMES, size, size, 3), np.uint8)
            kept = []
            for take in split_takes:
                chosen = np.linspace(0, len(take[2]) - 1, FRAMES).round().astype(int)
                frames = []
                try:
                    for i in chosen:
                        frames.append(load_frame(take[2][i], crop, size))
                    videos[len(kept)] = np.stack(frames)
                    kept.append(take)
                except PrepareError:
                    if not skip_bad:
                        raise
                    skipped.append(str(take[2][chosen[len(frames)]]))     # the frame that failed
                if progress is not None:
                    progress(1)
            videos.flush()
            if len(kept) < len(split_takes):          # rewrite without the rows of skipped takes
                trimmed = np.array(videos[:len(kept)])
                del videos
                writer.save(split, "sequences", trimmed)
            if not kept:
                raise PrepareError(f"{source}: no readable take left in the {split} split; expected JPEG frames")
            by_split[split] = kept
            writer.save(split, "label_expression", np.array([t[1] for t in kept], np.int64))
            writer.save(split, "label_subject", np.array([subjects.index(t[0]) for t in kept], np.int64))
        meta = {
            "dataset": "mug",
            "splits": {split: {"count": len(t)} for split, t in by_split.items()},
            "labels": {"expression": EXPRESSIONS, "subject": subjects},
            "kind": {"expression": "dynamic", "subject": "static"}, "disjoint": ["subject"],
            "frame_shape": [3, size, size], "frames": FRAMES,
            "split_rule": f"by subject: subjects shuffled with numpy.random.default_rng({seed}), the first "
                          f"{cut} of {len(subjects)} train ({', '.join(sorted(train_subjects))}), the rest test",
            "crop": list(crop), "skipped_short_takes": len(takes) - len(usable), "skipped_bad_files": skipped,
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def count_takes(source) -> int:
    return sum(1 for t in find_takes(Path(source)) if len(t[2]) >= FRAMES)
