"""Speech datasets: TIMIT, and any folder of speaker-labelled wav files (e.g. FSDD).

TIMIT layout: ``<root>/{TRAIN,TEST}/DR<n>/<speaker>/*.WAV`` (either letter case), NIST SPHERE
16-bit PCM (RIFF wav copies are read too); the corpus's own train/test split.
- Static factors: ``speaker`` (disjoint between the splits: scored by speaker verification, not
  by a probe) and ``region`` (the dialect region DR1-DR8).

Folder layout (``fsdd``): ``<root>/{label}_{speaker}_{index}.wav``, as the Free Spoken Digit
Dataset names its files; by that dataset's convention indices 0-4 are the test split.
- Static factor: ``speaker``; dynamic factor: ``digit`` (the spoken label).

Speaker-tree layout (``speech``, your own recordings): ``<root>/<speaker>/**/*.wav`` (any depth
below the speaker's folder), or the folder layout above. Static factor: ``speaker``; when every
file is named ``{label}_{speaker}_{index}.wav`` also the dynamic factor ``label``. Speakers are
split, never shared: a seeded ``test_fraction`` of them (at least 2, so that speaker verification
has pairs of different speakers) are the test split.

Each utterance becomes 200 ms segments of log mel frames (data_prep/audio.py), each with its
motion-augmented view (voice conversion) computed from the waveform. Features are standardised
per dimension with the training split's mean and standard deviation (kept in meta.json).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep import audio
from data_prep.common import PrepareError, PreparedWriter

TIMIT_LAYOUT = "<root>/{TRAIN,TEST}/DR<n>/<speaker>/*.WAV (either letter case)"
FOLDER_LAYOUT = "<root>/{label}_{speaker}_{index}.wav"
FOLDER_NAME = re.compile(r"^(?P<label>[^_]+)_(?P<speaker>[^_]+)_(?P<index>\d+)\.wav$", re.IGNORECASE)


def _child(folder: Path, name: str):
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def timit_items(root: Path) -> dict:
    """{split: [(path, {"speaker": name, "region": "DRn"})]} from a TIMIT tree."""
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder; expected the TIMIT layout {TIMIT_LAYOUT}")
    items = {}
    for split in ("train", "test"):
        split_dir = _child(root, split)
        files = []
        if split_dir is not None:
            for region in sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.upper().startswith("DR")):
                for speaker in sorted(p for p in region.iterdir() if p.is_dir()):
                    for path in sorted(speaker.iterdir()):
                        if path.is_file() and path.suffix.lower() == ".wav":
                            files.append((path, {"speaker": speaker.name.upper(), "region": region.name.upper()}))
        if not files:
            raise PrepareError(f"{root}: no {split.upper()} utterances found; expected the TIMIT "
                               f"layout {TIMIT_LAYOUT}")
        items[split] = files
    return items


def folder_items(root: Path, test_indices: int = 5) -> dict:
    """{split: [(path, {"speaker", "digit"})]} from a folder of {label}_{speaker}_{index}.wav."""
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder; expected wav files named {FOLDER_LAYOUT}")
    items = {"train": [], "test": []}
    for path in sorted(root.iterdir()):
        match = FOLDER_NAME.match(path.name)
        if match and path.is_file():
            split = "test" if int(match["index"]) < test_indices else "train"
            items[split].append((path, {"speaker": match["speaker"], "digit": match["label"]}))
    if not items["train"] or not items["test"]:
        raise PrepareError(f"{root}: no wav files named {FOLDER_LAYOUT} in both splits "
                           f"(indices 0-{test_indices - 1} are test); expected that layout")
    return items


SPEECH_LAYOUT = "<root>/<speaker>/**/*.wav, or <root>/{label}_{speaker}_{index}.wav"


def speech_items(root: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple:
    """``({split: [(path, labels)]}, kinds)`` of a speaker tree or a flat folder of
    {label}_{speaker}_{index}.wav, the speakers split at random into disjoint sets."""
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder; expected {SPEECH_LAYOUT}")
    if not 0 < test_fraction < 1:
        raise PrepareError(f"--test-fraction {test_fraction}: expected a fraction between 0 and 1")
    files = []
    for speaker in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += [(path, speaker.name) for path in sorted(speaker.rglob("*"))
                  if path.is_file() and path.suffix.lower() == ".wav"]
    for path in sorted(root.iterdir()):
        match = FOLDER_NAME.match(path.name)
        if path.is_file() and match:
            files.append((path, match["speaker"]))
    if not files:
        raise PrepareError(f"{root}: no wav files found; expected {SPEECH_LAYOUT}")
    named = [FOLDER_NAME.match(path.name) for path, _ in files]
    kinds = {"speaker": "static", **({"label": "dynamic"} if all(named) else {})}
    speakers = sorted({speaker for _, speaker in files})
    if len(speakers) < 3:
        raise PrepareError(f"{root}: {len(speakers)} speaker(s); expected at least 3 (2 or more held out "
                           "for the test split's speaker verification, the rest for training)")
    rng = np.random.default_rng(seed)
    held = max(2, round(test_fraction * len(speakers)))
    held = min(held, len(speakers) - 1)
    test_speakers = set(rng.permutation(np.array(speakers, dtype=object))[:held].tolist())
    items = {"train": [], "test": []}
    for (path, speaker), match in zip(files, named):
        labels = {"speaker": speaker, **({"label": match["label"]} if "label" in kinds else {})}
        items["test" if speaker in test_speakers else "train"].append((path, labels))
    return items, kinds


def _write(out_dir, dataset: str, items: dict, kinds: dict, disjoint: list, split_rule: str,
           seed: int, n_mels: int, progress, skip_bad: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    skipped = []
    classes = {factor: sorted({labels[factor] for split in items.values() for _, labels in split})
               for factor in kinds}
    collected, rates = {}, set()
    for split, files in items.items():
        originals, views, labels = [], [], {factor: [] for factor in kinds}
        for path, file_labels in files:
            try:
                original, converted, rate = audio.utterance_segments(path, rng, n_mels)
            except PrepareError:
                if not skip_bad:
                    raise
                skipped.append(str(path))
                continue
            rates.add(rate)
            originals.append(original)
            views.append(converted)
            for factor in kinds:
                labels[factor] += [classes[factor].index(file_labels[factor])] * len(original)
            if progress is not None:
                progress(1)
        collected[split] = (np.concatenate(originals), np.concatenate(views),
                            {f: np.array(v, np.int64) for f, v in labels.items()})
        if len(collected[split][0]) == 0:
            raise PrepareError(f"{split}: no utterance is 200 ms long or longer")
    train = collected["train"][0].reshape(-1, n_mels)
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-5
    writer = PreparedWriter(out_dir)
    try:
        for split, (originals, views, labels) in collected.items():
            writer.save(split, "sequences", ((originals - mean) / std).astype(np.float32))
            writer.save(split, "motion_views", ((views - mean) / std).astype(np.float32))
            for factor, values in labels.items():
                writer.save(split, f"label_{factor}", values)
        meta = {
            "dataset": dataset,
            "splits": {split: {"count": int(len(v[0]))} for split, v in collected.items()},
            "labels": classes, "kind": kinds, "disjoint": disjoint,
            "frame_shape": [n_mels], "frames": audio.SEGMENT_FRAMES,
            "split_rule": split_rule, "skipped_bad_files": skipped,
            "features": {"type": "log mel filterbank", "n_mels": n_mels, "window_ms": audio.WINDOW_MS,
                         "shift_ms": audio.SHIFT_MS, "segment_frames": audio.SEGMENT_FRAMES,
                         "sample_rates": sorted(rates),
                         "standardised_with": {"mean": mean.tolist(), "std": std.tolist()}},
            "motion_augmentation": "pitch shift of 2-5 semitones up or down by resampling, then "
                                   "WSOLA back to the original duration, one draw per utterance "
                                   f"(numpy.random.default_rng({seed}))",
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def prepare_timit(source, out_dir, seed: int = 0, n_mels: int = audio.N_MELS, progress=None,
                  skip_bad: bool = False) -> Path:
    items = timit_items(Path(source))
    return _write(out_dir, "timit", items, {"speaker": "static", "region": "static"}, ["speaker"],
                  "the corpus's own TRAIN/TEST split (disjoint speakers)", seed, n_mels, progress, skip_bad)


def prepare_folder(source, out_dir, seed: int = 0, n_mels: int = audio.N_MELS, progress=None,
                   skip_bad: bool = False) -> Path:
    items = folder_items(Path(source))
    return _write(out_dir, "fsdd", items, {"speaker": "static", "digit": "dynamic"}, [],
                  "files with index 0-4 are test, the rest train (the FSDD convention)",
                  seed, n_mels, progress, skip_bad)


def prepare_speech(source, out_dir, seed: int = 0, n_mels: int = audio.N_MELS, progress=None,
                   skip_bad: bool = False, test_fraction: float = 0.2) -> Path:
    items, kinds = speech_items(Path(source), test_fraction, seed)
    return _write(out_dir, "speech", items, kinds, ["speaker"],
                  f"speakers split at random (test fraction {test_fraction}, at least 2 test speakers, "
                  f"numpy.random.default_rng({seed})): disjoint speakers", seed, n_mels, progress, skip_bad)


def count_files(source, folder_mode) -> int:
    """Utterances to prepare: folder_mode True (fsdd), False (timit) or "speech"."""
    items = speech_items(Path(source))[0] if folder_mode == "speech" else \
        folder_items(Path(source)) if folder_mode else timit_items(Path(source))
    return sum(len(files) for files in items.values())
