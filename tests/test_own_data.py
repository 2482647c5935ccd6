"""Your own data: prepare frames / speech, encode --data-dir, generate, interpolate, --tensorboard.

The trees are made here from the built-in shapes (animated GIFs, folders of PNG frames, a labels
CSV) and, where ../shared/data/fsdd is present, from real speech in a <speaker>/*.wav tree.
"""
import csv
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cdsvae
from data_prep import shapes
from data_prep.frames import natural_key

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
runner = CliRunner()
TINY = ("--static-dim", 4, "--dynamic-dim", 2, "--hidden-dim", 8, "--feature-dim", 8, "--conv-width", 4,
        "--device", "cpu")


def run(*args):
    return runner.invoke(cdsvae.app, [str(a) for a in args])


def shapes_tree(root: Path, count: int = 24, frames: int = 8, size: int = 32, seed: int = 0, kind: str = "mixed"):
    """Sequences of the built-in shapes as animated GIFs (kind "gif"), as folders of PNG frames
    named 1.png .. 8.png ("png"), or odd ones as GIFs and even ones as folders ("mixed"), with
    labels.csv beside the tree. Returns the videos and labels in name order."""
    videos, labels = shapes.render(count, seed, size=size, frames=frames)
    root.mkdir(parents=True)
    rows = [["name", *shapes.LABELS]]
    for i, video in enumerate(videos):
        name = f"seq{i}"
        images = [Image.fromarray(frame) for frame in video]
        if kind == "gif" or (kind == "mixed" and i % 2):
            images[0].save(root / f"{name}.gif", save_all=True, append_images=images[1:], duration=80)
        else:
            (root / name).mkdir()
            for t, image in enumerate(images):
                image.save(root / name / f"{t + 1}.png")
        rows.append([name, *(shapes.LABELS[f][labels[f][i]] for f in shapes.LABELS)])
    with open(root.parent / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return videos, labels


def prepare_shapes(tmp_path, *extra, kind="mixed"):
    shapes_tree(tmp_path / "src", kind=kind)
    return run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep",
               "--labels", tmp_path / "labels.csv", "--static", "shape,colour,large_side", "--dynamic", "direction",
               *extra)


def test_natural_sort_orders_frames_by_number():
    assert sorted(["10.png", "2.png", "1.png"], key=natural_key) == ["1.png", "2.png", "10.png"]


@pytest.mark.parametrize("kind", ["gif", "png", "mixed"])
def test_prepare_frames_keeps_the_frames_and_labels(tmp_path, kind):
    videos, labels = shapes_tree(tmp_path / "src", kind=kind)
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep",
                 "--labels", tmp_path / "labels.csv", "--static", "shape,colour,large_side", "--dynamic", "direction")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["kind"] == {"shape": "static", "colour": "static", "large_side": "static", "direction": "dynamic"}
    assert meta["frame_shape"] == [3, 32, 32] and meta["frames"] == 8
    assert meta["splits"]["test"]["count"] == round(0.2 * 24) and meta["splits"]["train"]["count"] == 24 - 5
    data = cdsvae.load_dataset(None, str(tmp_path / "prep"))
    for split in ("train", "test"):
        for position, name in enumerate(meta["sequence_names"][split]):
            index = int(name[3:])
            stored = np.asarray(getattr(data, split).sequences[position])
            # PNG frames are exact; GIF quantises to a palette, the shapes' few colours survive
            gif = kind == "gif" or (kind == "mixed" and index % 2)
            assert np.abs(stored.astype(int) - videos[index]).max() <= (8 if gif else 0), name
            for factor, classes in shapes.LABELS.items():
                assert meta["labels"][factor][getattr(data, split).labels[factor][position]] == \
                    classes[labels[factor][index]]


def test_prepare_frames_resizes_crops_and_spaces_frames(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    wide = np.zeros((12, 24, 48, 3), np.uint8)          # 12 frames of 48x24, frame t has value 10 t
    for t in range(12):
        wide[t] = 10 * t
        wide[t, :, :12] = 255                            # a left band that a centre crop removes
    (root / "clip").mkdir()
    for t, frame in enumerate(wide):
        Image.fromarray(frame).save(root / "clip" / f"f{t}.png")
    shutil.copytree(root / "clip", root / "clip2")
    result = run("prepare", "frames", "--source", root, "--out", tmp_path / "prep", "--frames", 4,
                 "--size", 16, "--test-fraction", 0.5)
    assert result.exit_code == 0, result.output
    data = cdsvae.load_dataset(None, str(tmp_path / "prep"))
    video = np.asarray(data.train.sequences[0])
    assert video.shape == (4, 16, 16, 1)                                      # grey frames: one channel
    assert [int(v) for v in video[:, 8, 8, 0]] == [0, 40, 70, 110]           # frames 0, 4, 7, 11
    assert video[:, :, 0].min() < 255                                        # the band was cropped away
    assert data.classes == {}                                                # no labels given


def test_prepare_frames_skips_and_counts_short_sequences(tmp_path):
    shapes_tree(tmp_path / "src", count=6)
    frames = sorted((tmp_path / "src" / "seq0").iterdir())
    for path in frames[4:]:
        path.unlink()                                                        # seq0 keeps 4 frames
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep", "--frames", 6)
    assert result.exit_code == 0, result.output
    assert "skipped 1 sequences shorter than --frames" in result.output
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["skipped_short"] == ["seq0"] and meta["frames"] == 6
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 5


def test_split_by_keeps_a_factors_classes_apart(tmp_path):
    result = prepare_shapes(tmp_path, "--split-by", "colour", "--test-fraction", 0.3)
    assert result.exit_code == 0, result.output
    data = cdsvae.load_dataset(None, str(tmp_path / "prep"))
    assert not set(data.train.labels["colour"]) & set(data.test.labels["colour"])
    assert data.disjoint == ("colour",)


@pytest.mark.parametrize("kind", ["gif", "png"])
def test_own_frames_through_every_command(tmp_path, kind):
    """A new user's path, from a folder of animated GIFs and from a folder of PNG-frame folders:
    prepare frames -> train -> judge -> eval -> encode -> generate -> interpolate."""
    assert prepare_shapes(tmp_path, kind=kind).exit_code == 0
    prep, run_dir = tmp_path / "prep", tmp_path / "run"
    result = run("train", "--data-dir", prep, "--epochs", 1, "--batch-size", 8, "--out", run_dir, *TINY)
    assert result.exit_code == 0, result.output
    assert "probe accuracy" in result.output
    ckpt = run_dir / "last.pt"
    result = run("judge", "--data-dir", prep, "-o", tmp_path / "judge.pt", "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = run("eval", "--ckpt", ckpt, "--judge", tmp_path / "judge.pt", "--data-dir", prep,
                 "-o", tmp_path / "eval.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["results"]) == {f"{protocol}/{factor}" for factor, kind in shapes.KINDS.items()
                                      for protocol in ("swap", f"fixed_{'dynamic' if kind == 'dynamic' else 'static'}")}

    data = cdsvae.load_dataset(None, str(prep))
    result = run("encode", "--ckpt", ckpt, "--data-dir", prep, "--split", "test", "--samples", 2,
                 "-o", tmp_path / "enc", "--device", "cpu")
    assert result.exit_code == 0, result.output
    s, z = np.load(tmp_path / "enc" / "s.npy"), np.load(tmp_path / "enc" / "z.npy")
    assert s.shape == (len(data.test.sequences), 4) and z.shape == (len(data.test.sequences), 8, 2)
    assert np.load(tmp_path / "enc" / "s_samples.npy").shape == (2, *s.shape)
    assert np.load(tmp_path / "enc" / "z_samples.npy").shape == (2, *z.shape)
    np.testing.assert_array_equal(np.load(tmp_path / "enc" / "label_shape.npy"), data.test.labels["shape"])
    model = cdsvae.load_checkpoint(ckpt)
    with cdsvae.torch.no_grad():
        expected = model.encode(cdsvae.to_frames(data.test.sequences[:3], "cpu"))
    np.testing.assert_allclose(s[:3], expected.static_mean.numpy(), atol=1e-5)

    np.save(tmp_path / "a.npy", np.asarray(data.test.sequences[:2]))
    np.save(tmp_path / "b.npy", np.asarray(data.test.sequences[2]))
    for keep in ("static", "dynamic"):
        out = tmp_path / f"gen_{keep}.npy"
        result = run("generate", "--ckpt", ckpt, "--keep", keep, "--from", tmp_path / "a.npy", "-n", 3, "-o", out,
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert np.load(out).shape == (2, 3, 8, 32, 32, 3) and out.with_suffix(".png").is_file()
    for latent in ("s", "z"):
        out = tmp_path / f"interp_{latent}.npy"
        result = run("interpolate", tmp_path / "b.npy", tmp_path / "b.npy", "--ckpt", ckpt, "--latent", latent,
                     "--steps", 4, "-o", out, "--device", "cpu")
        assert result.exit_code == 0, result.output
        frames = np.load(out)
        assert frames.shape == (4, 8, 32, 32, 3) and out.with_suffix(".png").is_file()
        assert np.abs(frames.astype(int) - frames[0]).max() <= 1   # from B to B: every step the same


# --- bad input: one line, exit 2, nothing written ----------------------------------------------

def assert_refused(result, expected: str, out: Path):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()                   # (stdout may hold a progress bar)
    assert line.startswith("error: ") and expected in line and len(line.splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_data_whose_frames_are_not_the_models_is_refused_by_eval_fit_prior_encode_and_train(tmp_path):
    """One check for the three commands that feed a prepared split to a checkpoint, and for
    train's --judge."""
    assert prepare_shapes(tmp_path).exit_code == 0
    prep, ckpt = tmp_path / "prep", tmp_path / "small.pt"
    cdsvae.save_checkpoint(cdsvae.CDSVAE(cdsvae.Config(frame_shape=(3, 16, 16), static_dim=4, dynamic_dim=2,
                                                       feature_dim=8, hidden_dim=8, conv_width=4)), ckpt)
    before = ckpt.read_bytes()
    result = run("judge", "--data-dir", prep, "-o", tmp_path / "judge.pt", "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    expected = "frames (3, 32, 32) of the data, (3, 16, 16) of the model"
    assert_refused(run("eval", "--ckpt", ckpt, "--judge", tmp_path / "judge.pt", "--data-dir", prep,
                       "-o", tmp_path / "eval.json", "--device", "cpu"),
                   expected + ", (3, 32, 32) of the judge; expected the same", tmp_path / "eval.json")
    assert_refused(run("encode", "--ckpt", ckpt, "--data-dir", prep, "-o", tmp_path / "enc", "--device", "cpu"),
                   expected + "; expected the same", tmp_path / "enc")
    assert_refused(run("fit-prior", "--ckpt", ckpt, "--data-dir", prep, "--components", 2, "--device", "cpu"),
                   expected + "; expected the same", ckpt.with_name(ckpt.name + ".tmp"))
    assert ckpt.read_bytes() == before                # fit-prior writes into the checkpoint: untouched
    assert_refused(run("train", "--data", "shapes", "--frame-size", 16, "--judge", tmp_path / "judge.pt",
                       "--eval-every", 10, "--out", tmp_path / "run", "--device", "cpu"),
                   "frames (3, 16, 16) of the data, (3, 32, 32) of the judge; expected the same "
                   "(the dataset the judge was trained on)", tmp_path / "run")


def test_an_unreadable_frame_is_named(tmp_path):
    shapes_tree(tmp_path / "src", count=4)
    (tmp_path / "src" / "seq2" / "3.png").write_bytes(b"not a png")
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep")
    assert_refused(result, "seq2/3.png: unreadable image", tmp_path / "prep")


def test_all_sequences_shorter_than_frames_is_refused(tmp_path):
    shapes_tree(tmp_path / "src", count=4)
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep", "--frames", 9)
    assert_refused(result, "no sequence has 9 frames or more", tmp_path / "prep")


@pytest.mark.parametrize("case, expected", [
    ("unknown", "names ghost, not sequences in"),
    ("missing_row", "no row for sequence 'seq3'"),
    ("missing_column", "no column 'direction'"),
])
def test_a_bad_labels_csv_is_refused(tmp_path, case, expected):
    shapes_tree(tmp_path / "src", count=4)
    rows = list(csv.reader(open(tmp_path / "labels.csv")))
    if case == "unknown":
        rows.append(["ghost", *rows[1][1:]])
    elif case == "missing_row":
        rows = rows[:-1]
    else:
        rows = [row[:-1] for row in rows]
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep",
                 "--labels", tmp_path / "labels.csv", "--static", "shape,colour,large_side", "--dynamic", "direction")
    assert_refused(result, expected, tmp_path / "prep")


def test_mixed_frame_sizes_need_size(tmp_path):
    shapes_tree(tmp_path / "src", count=4)
    for path in (tmp_path / "src" / "seq2").iterdir():
        Image.open(path).resize((64, 64)).save(path)
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep")
    assert_refused(result, "expected frames of one size, or --size S", tmp_path / "prep")
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep", "--size", 32)
    assert result.exit_code == 0, result.output


def test_a_gif_with_one_frame_is_refused(tmp_path):
    shapes_tree(tmp_path / "src", count=4)
    Image.new("RGB", (32, 32)).save(tmp_path / "src" / "still.gif")
    result = run("prepare", "frames", "--source", tmp_path / "src", "--out", tmp_path / "prep")
    assert_refused(result, "still.gif: 1 frame; expected an animated file", tmp_path / "prep")


def test_generate_and_interpolate_refuse_bad_arguments(tmp_path):
    assert prepare_shapes(tmp_path).exit_code == 0
    assert run("train", "--data-dir", tmp_path / "prep", "--epochs", 1, "--batch-size", 8,
               "--out", tmp_path / "run", *TINY).exit_code == 0
    ckpt = tmp_path / "run" / "last.pt"
    video = np.asarray(cdsvae.load_dataset(None, str(tmp_path / "prep")).test.sequences[:2])
    np.save(tmp_path / "a.npy", video)
    cases = [
        (("generate", "--ckpt", ckpt, "--keep", "motion", "--from", tmp_path / "a.npy", "-o", tmp_path / "g.npy"),
         "--keep motion: expected static or dynamic", tmp_path / "g.npy"),
        (("generate", "--ckpt", ckpt, "--keep", "static", "--from", tmp_path / "a.npy", "-n", 0,
          "-o", tmp_path / "g.npy"), "-n must be at least 1", tmp_path / "g.npy"),
        (("interpolate", tmp_path / "a.npy", tmp_path / "a.npy", "--ckpt", ckpt, "--latent", "s",
          "-o", tmp_path / "i.npy"), "expected one sequence each", tmp_path / "i.npy"),
        (("interpolate", tmp_path / "a.npy", tmp_path / "a.npy", "--ckpt", ckpt, "--latent", "w",
          "-o", tmp_path / "i.npy"), "--latent w: expected s or z", tmp_path / "i.npy"),
        (("encode", "--ckpt", ckpt, "--data-dir", tmp_path / "prep", "--split", "valid", "-o", tmp_path / "e"),
         "--split valid: expected train or test", tmp_path / "e"),
    ]
    for args, expected, out in cases:
        result = run(*args, "--device", "cpu")
        assert_refused(result, expected, out)


# --- speech ------------------------------------------------------------------------------------

def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, width: int = 2, fmt: int = 1):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == 1:
        with wave.open(str(path), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(width)
            writer.setframerate(rate)
            writer.writeframes((samples * 32767).astype("<i2").tobytes())
        return
    data = samples.astype("<f4").tobytes()          # IEEE float (format 3): not PCM
    header = (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + fmt.to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
              + (rate * 4).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
              + b"data" + len(data).to_bytes(4, "little"))
    path.write_bytes(header + data)


def tone_tree(root: Path, speakers=("ann", "bob", "cid", "dee", "eve"), per_speaker: int = 3):
    rng = np.random.default_rng(0)
    for k, speaker in enumerate(speakers):
        for i in range(per_speaker):
            t = np.arange(4000) / 8000
            samples = 0.3 * np.sin(2 * np.pi * (150 + 40 * k) * t * (1 + 0.1 * i)) + 0.01 * rng.standard_normal(4000)
            write_wav(root / speaker / "session1" / f"utt{i}.wav", samples)


def test_prepare_speech_splits_speakers(tmp_path):
    tone_tree(tmp_path / "src")
    result = run("prepare", "speech", "--source", tmp_path / "src", "--out", tmp_path / "prep")
    assert result.exit_code == 0, result.output
    data = cdsvae.load_dataset(None, str(tmp_path / "prep"))
    assert data.kinds == {"speaker": "static"} and data.disjoint == ("speaker",)
    train_speakers = set(np.unique(data.train.labels["speaker"]))
    test_speakers = set(np.unique(data.test.labels["speaker"]))
    assert len(test_speakers) == 2 and len(train_speakers) == 3 and not train_speakers & test_speakers
    assert data.train.motion_views.shape == data.train.sequences.shape


def test_speech_refuses_a_wav_that_is_not_pcm(tmp_path):
    tone_tree(tmp_path / "src")
    write_wav(tmp_path / "src" / "bob" / "float.wav", np.zeros(4000), fmt=3)
    result = run("prepare", "speech", "--source", tmp_path / "src", "--out", tmp_path / "prep")
    assert_refused(result, "float.wav: unreadable wav", tmp_path / "prep")


@pytest.mark.skipif(not (SHARED / "fsdd").is_dir(), reason="../shared/data/fsdd not present")
def test_own_speech_from_fsdd_through_every_command(tmp_path):
    """FSDD regrouped as <speaker>/*.wav: prepare speech -> train -> judge -> eval -> encode ->
    generate -> interpolate."""
    for path in sorted((SHARED / "fsdd").glob("*.wav")):
        label, speaker, index = path.stem.split("_")
        if int(index) < 6:                               # 6 takes of each digit and speaker
            (tmp_path / "src" / speaker).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / "src" / speaker / path.name)
    prep = tmp_path / "prep"
    result = run("prepare", "speech", "--source", tmp_path / "src", "--out", prep)
    assert result.exit_code == 0, result.output
    data = cdsvae.load_dataset(None, str(prep))
    assert data.kinds == {"speaker": "static", "label": "dynamic"}     # names {label}_{speaker}_{index}
    result = run("train", "--data-dir", prep, "--epochs", 1, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    assert "speaker verification EER" in result.output
    ckpt = tmp_path / "run" / "last.pt"
    assert run("judge", "--data-dir", prep, "-o", tmp_path / "judge.pt", "--epochs", 1, "--device", "cpu").exit_code == 0
    result = run("eval", "--ckpt", ckpt, "--judge", tmp_path / "judge.pt", "--data-dir", prep, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "speaker verification EER" in result.output
    result = run("encode", "--ckpt", ckpt, "--data-dir", prep, "-o", tmp_path / "enc", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "enc" / "z.npy").shape == (len(data.test.sequences), 20, 2)
    np.save(tmp_path / "a.npy", np.asarray(data.test.sequences[:2]))
    np.save(tmp_path / "b.npy", np.asarray(data.test.sequences[2]))
    result = run("generate", "--ckpt", ckpt, "--keep", "static", "--from", tmp_path / "a.npy", "-n", 3,
                 "-o", tmp_path / "g.npy", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "g.npy").shape == (2, 3, 20, 64) and (tmp_path / "g.png").is_file()
    result = run("interpolate", tmp_path / "b.npy", tmp_path / "a.npy", "--ckpt", ckpt, "--latent", "s",
                 "-o", tmp_path / "i.npy", "--device", "cpu")
    assert result.exit_code == 2 and "expected one sequence each" in result.stderr      # a.npy holds 2
    np.save(tmp_path / "a.npy", np.asarray(data.test.sequences[0]))
    result = run("interpolate", tmp_path / "b.npy", tmp_path / "a.npy", "--ckpt", ckpt, "--latent", "z",
                 "--steps", 5, "-o", tmp_path / "i.npy", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "i.npy").shape == (5, 20, 64) and (tmp_path / "i.png").is_file()


# --- --tensorboard -------------------------------------------------------------------------------

def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as if absent
    result = run("train", "--epochs", 1, "--out", tmp_path / "run", "--tensorboard", *TINY)
    assert result.exit_code == 2 and 'pip install -e ".[tensorboard]"' in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_tensorboard_logs_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = run("train", "--epochs", 2, "--out", tmp_path / "run", "--tensorboard", "--log-every", 5, *TINY)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recon = events.Scalars("recon")
    assert [e.step for e in recon] == [r["step"] for r in logged]
    assert [e.value for e in recon] == pytest.approx([r["recon"] for r in logged], rel=1e-6)
    assert len(events.Images("prior samples")) == 2                       # one per epoch
    assert len(events.Images("swap (A, B, A's static with B's dynamic)")) == 2
