"""Data preparation: real inputs where we have them (LPC layers, MNIST, FSDD), and small trees in
exactly the MUG and TIMIT layouts for the licensed corpora."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cdsvae
from data_prep import audio, common, mug, sprites

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
runner = CliRunner()


def run(*args):
    return runner.invoke(cdsvae.app, [str(a) for a in args])


def needs(folder):
    return pytest.mark.skipif(not (SHARED / folder).is_dir(), reason=f"../shared/data/{folder} not present")


# --- Sprites ------------------------------------------------------------------------------------

@needs("lpc-sprites")
def test_full_sprites_render(tmp_path):
    result = run("prepare", "sprites", "--source", SHARED / "lpc-sprites", "--out", tmp_path / "sprites")
    assert result.exit_code == 0, result.output
    data = cdsvae.load_dataset(None, str(tmp_path / "sprites"))
    assert data.name == "sprites"
    assert data.train.sequences.shape == (9000, 8, 64, 64, 3)
    assert data.test.sequences.shape == (2664, 8, 64, 64, 3)
    for split in (data.train, data.test):
        for factor in ("skin", "pants", "top", "hair"):
            assert set(np.unique(split.labels[factor])) == set(range(6))
        assert set(np.unique(split.labels["action"])) == set(range(9))
    # Characters do not cross the split: each appears 9 times (once per motion) in one split.
    characters = {split_name: {tuple(int(split.labels[f][i]) for f in ("skin", "pants", "top", "hair"))
                               for i in range(len(split.sequences))}
                  for split_name, split in (("train", data.train), ("test", data.test))}
    assert len(characters["train"]) == 1000 and len(characters["test"]) == 296
    assert not characters["train"] & characters["test"]

    # Pixel check: frame 0 of walk-front is cell c7 of walk-front (cells 131..138, row 10,
    # column 8); composite that cell with PIL from the layer images and compare.
    index = next(i for i in range(len(data.train.sequences))
                 if data.train.labels["action"][i] == sprites.MOTIONS.index("walk-front"))
    labels = {f: int(data.train.labels[f][index]) for f in ("skin", "pants", "top", "hair")}
    canvas = Image.new("RGBA", (832, 1344), (0, 0, 0, 255))
    for layer, variant in (("body", labels["skin"]), ("bottomwear", labels["pants"]),
                           ("topwear", labels["top"]), ("hair", labels["hair"]), ("shoes", 1)):
        canvas = Image.alpha_composite(canvas, Image.open(SHARED / "lpc-sprites" / layer / f"{variant}.png").convert("RGBA"))
    cell = 138
    row, column = divmod(cell, 13)
    expected = np.asarray(canvas.convert("RGB"))[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
    assert np.abs(data.train.sequences[index, 0].astype(int) - expected.astype(int)).max() <= 1
    assert expected.any()


def test_sprites_motion_cells_follow_the_frame_rules():
    cells = sprites.motion_cells()
    spellcast_left, walk_front, slash_right = cells[0], cells[4], cells[8]
    assert list(spellcast_left) == [13, 14, 15, 16, 17, 18, 17, 19]
    assert list(walk_front) == [138, 131, 132, 133, 134, 135, 136, 137]
    assert list(slash_right) == [195, 196, 197, 198, 199, 200, 199, 195]


# --- SM-MNIST -----------------------------------------------------------------------------------

@needs("mnist")
def test_sm_mnist_prepare_from_real_digits(tmp_path):
    result = run("prepare", "sm-mnist", "--source", SHARED / "mnist", "--out", tmp_path / "mm", "--frame-size", 32)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "mm" / "meta.json").read_text())
    assert meta["splits"] == {"train": {"count": 8000}, "test": {"count": 2000}}
    assert "only the MNIST test digits" in meta["split_rule"]
    data = cdsvae.load_dataset("sm-mnist", str(tmp_path / "mm"))
    assert data.train.sequences.shape == (8000, 15, 32, 32, 1)
    assert np.load(tmp_path / "mm" / "test" / "trajectories.npy").shape == (2000, 15, 2, 2)


# --- audio --------------------------------------------------------------------------------------

def dominant_frequency(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("semitones", [-4.0, 3.0])
def test_voice_conversion_shifts_pitch_and_keeps_duration(semitones):
    rate = 16000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    converted = audio.voice_conversion(tone, rate, semitones)
    assert len(converted) == len(tone)
    expected = 220.0 * 2 ** (semitones / 12)
    middle = slice(rate // 4, 3 * rate // 4)
    assert dominant_frequency(converted[middle], rate) == pytest.approx(expected, rel=0.03)


def test_wsola_changes_duration_not_pitch():
    rate = 8000
    tone = np.sin(2 * np.pi * 300.0 * np.arange(rate) / rate).astype(np.float32)
    stretched = audio.wsola(tone, 1.5, rate)
    assert len(stretched) == 12000
    assert dominant_frequency(stretched[2000:10000], rate) == pytest.approx(300.0, rel=0.02)


def test_log_mel_frames_have_a_10ms_shift():
    samples = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    features = audio.log_mel(samples, 16000, 40)
    assert features.shape == (1 + (16000 - 400) // 160, 40)
    assert np.isfinite(features).all()


@needs("fsdd")
def test_fsdd_through_the_audio_pipeline(tmp_path):
    result = run("prepare", "fsdd", "--source", SHARED / "fsdd", "--out", tmp_path / "fsdd")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "fsdd" / "meta.json").read_text())
    assert meta["features"]["shift_ms"] == 10 and meta["features"]["segment_frames"] == 20
    assert meta["labels"]["speaker"] == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    data = cdsvae.load_dataset(None, str(tmp_path / "fsdd"))
    assert data.train.sequences.shape[1:] == (20, 64)
    assert data.train.motion_views.shape == data.train.sequences.shape      # same length
    assert not np.allclose(data.train.motion_views, data.train.sequences)   # a different voice
    assert set(np.unique(data.test.labels["speaker"])) == set(range(6))
    assert abs(float(np.mean(data.train.sequences))) < 1e-3                 # standardised


def write_sphere(path, samples, rate=16000, coding="pcm", byte_format="01"):
    fields = ["database_id -s5 TIMIT", f"sample_count -i {len(samples)}", f"sample_rate -i {rate}",
              "channel_count -i 1", "sample_n_bytes -i 2", f"sample_byte_format -s2 {byte_format}",
              f"sample_coding -s{len(coding)} {coding}", "sample_sig_bits -i 16", "end_head"]
    header = ("NIST_1A\n   1024\n" + "\n".join(fields) + "\n").encode("ascii")
    header += b" " * (1024 - len(header))
    dtype = "<i2" if byte_format == "01" else ">i2"
    path.write_bytes(header + samples.astype(dtype).tobytes())


def timit_tree(root, upper=True):
    rng = np.random.default_rng(0)
    case = str.upper if upper else str.lower
    for split, speakers in (("TRAIN", ("MABC0", "FDEF1")), ("TEST", ("MGHI0", "FJKL0"))):
        for region, speaker in zip(("DR1", "DR2"), speakers):
            folder = root / case(split) / case(region) / case(speaker)
            folder.mkdir(parents=True)
            for name in ("SA1", "SX12"):
                t = np.arange(8000) / 16000
                tone = 8000 * np.sin(2 * np.pi * rng.uniform(120, 250) * t) + 300 * rng.standard_normal(8000)
                write_sphere(folder / f"{case(name)}.{case('WAV')}", tone.astype(np.int16),
                             byte_format="01" if upper else "10")


def test_sphere_reader_reads_both_byte_orders(tmp_path):
    samples = (np.arange(-500, 500) * 30).astype(np.int16)
    write_sphere(tmp_path / "little.wav", samples, byte_format="01")
    write_sphere(tmp_path / "big.wav", samples, byte_format="10")
    for name in ("little.wav", "big.wav"):
        read, rate = audio.read_sphere(tmp_path / name)
        assert rate == 16000
        np.testing.assert_allclose(read * 32768, samples)


def test_shorten_compressed_sphere_is_refused_with_a_clear_message(tmp_path):
    write_sphere(tmp_path / "x.wav", np.zeros(100, np.int16), coding="pcm,embedded-shorten-v2.00")
    with pytest.raises(common.PrepareError, match="shorten-compressed"):
        audio.read_sphere(tmp_path / "x.wav")


@pytest.mark.parametrize("upper", [True, False])
def test_timit_tree_in_either_letter_case(tmp_path, upper):
    timit_tree(tmp_path / "timit", upper)
    result = run("prepare", "timit", "--source", tmp_path / "timit", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["labels"]["speaker"] == ["FDEF1", "FJKL0", "MABC0", "MGHI0"]
    assert meta["disjoint"] == ["speaker"] and meta["kind"]["region"] == "static"
    data = cdsvae.load_dataset("timit", str(tmp_path / "out"))
    # 0.5 s utterances: 48 frames of 10 ms -> 2 segments of 20 frames each, 2 utterances a speaker.
    assert len(data.train.sequences) == 2 * 2 * 2 and len(data.test.sequences) == 2 * 2 * 2
    assert data.train.motion_views.shape == data.train.sequences.shape


def test_timit_with_shorten_files_fails_cleanly(tmp_path):
    timit_tree(tmp_path / "timit")
    victim = next((tmp_path / "timit").rglob("SA1.WAV"))
    write_sphere(victim, np.zeros(8000, np.int16), coding="pcm,embedded-shorten-v2.00")
    result = run("prepare", "timit", "--source", tmp_path / "timit", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "shorten" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# --- MUG ----------------------------------------------------------------------------------------

def mug_tree(root, subjects=("001", "002", "003", "004", "005"), frames=18):
    rng = np.random.default_rng(0)
    for subject in subjects:
        for expression in ("happiness", "surprise", "neutral"):
            take = root / subject / expression / "take000"
            take.mkdir(parents=True)
            for i in range(frames):
                pixels = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(take / f"img_{i:04d}.jpg", quality=90)
    short = root / subjects[0] / "anger" / "take001"
    short.mkdir(parents=True)
    Image.fromarray(np.zeros((96, 80, 3), np.uint8)).save(short / "img_0000.jpg")


def test_mug_tree_is_prepared_with_a_subject_split(tmp_path):
    mug_tree(tmp_path / "mug")
    result = run("prepare", "mug", "--source", tmp_path / "mug", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["labels"]["expression"] == mug.EXPRESSIONS                 # neutral dropped
    assert meta["skipped_short_takes"] == 1
    assert meta["splits"] == {"train": {"count": 8}, "test": {"count": 2}}  # 4 / 1 subjects x 2 takes
    data = cdsvae.load_dataset("mug", str(tmp_path / "out"))
    assert data.train.sequences.shape == (8, 15, 64, 64, 3)
    assert not set(data.train.labels["subject"]) & set(data.test.labels["subject"])
    assert set(data.train.labels["expression"]) == {mug.EXPRESSIONS.index("happiness"), mug.EXPRESSIONS.index("surprise")}


def test_mug_crop_box_is_applied(tmp_path):
    frame = np.zeros((100, 100, 3), np.uint8)
    frame[:50, :50] = 255
    Image.fromarray(frame).save(tmp_path / "f.jpg", quality=100)
    top_left = mug.load_frame(tmp_path / "f.jpg", (0.0, 0.0, 0.5, 0.5), 16)
    bottom_right = mug.load_frame(tmp_path / "f.jpg", (0.5, 0.5, 1.0, 1.0), 16)
    assert top_left.mean() > 240 and bottom_right.mean() < 15


# --- errors -------------------------------------------------------------------------------------

def test_prepare_errors_name_the_expected_layout(tmp_path):
    mug_tree(tmp_path / "mug", subjects=("001",), frames=15)
    timit_tree(tmp_path / "timit")
    cases = [
        (("prepare", "nope", "--source", tmp_path, "--out", tmp_path / "o"), "unknown dataset 'nope'"),
        (("prepare", "sprites", "--source", tmp_path / "absent", "--out", tmp_path / "o"), "no such folder"),
        (("prepare", "timit", "--source", tmp_path / "mug", "--out", tmp_path / "o"), "TIMIT layout"),
        (("prepare", "mug", "--source", tmp_path / "timit", "--out", tmp_path / "o"), "MUG layout"),
        (("prepare", "fsdd", "--source", tmp_path / "timit", "--out", tmp_path / "o"), "{label}_{speaker}_{index}.wav"),
        (("prepare", "sprites", "--source", tmp_path / "mug", "--out", tmp_path / "o"), "LPC sprite-sheet layers"),
        (("prepare", "sm-mnist", "--source", tmp_path / "mug", "--out", tmp_path / "o"), "MNIST IDX files"),
        (("prepare", "mug", "--source", tmp_path / "mug", "--out", tmp_path / "o", "--crop", "1,2"), "left,top,right,bottom"),
        (("prepare", "timit", "--out", tmp_path / "o"), "--source is required"),
    ]
    for args, fragment in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and fragment in lines[0], (args, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "o").exists()


def test_train_on_a_folder_that_is_not_prepared_says_so(tmp_path):
    result = run("train", "--data", "sprites", "--data-dir", tmp_path, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "cdsvae prepare sprites" in result.output


def test_training_on_prepared_speech_reports_speaker_verification(tmp_path):
    timit_tree(tmp_path / "timit")
    assert run("prepare", "timit", "--source", tmp_path / "timit", "--out", tmp_path / "prep").exit_code == 0
    result = run("train", "--data-dir", tmp_path / "prep", "--epochs", 1, "--static-dim", 4, "--dynamic-dim", 2,
                 "--hidden-dim", 8, "--feature-dim", 8, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reported = summary["speaker_verification"]
    assert reported["pairs"] == 8 * 7 // 2                                     # every pair of test segments
    data = cdsvae.load_dataset(None, str(tmp_path / "prep"))                   # recomputed from last.pt
    again = cdsvae.speaker_verification(cdsvae.load_checkpoint(tmp_path / "run" / "last.pt"), data, "cpu")
    assert again == reported
    assert f"EER (test split): s {reported['eer_s']:.3f} (low is good), z {reported['eer_z']:.3f}" in result.output
    assert set(summary["probe"]["per_factor"]) == {"s/region", "z/region"}   # speaker is disjoint


# --- corrupt media -------------------------------------------------------------------------------

def corrupt(kind, path):
    """Spoil one source file the way real corpora get spoiled."""
    data = path.read_bytes()
    if kind == "truncated image":
        path.write_bytes(data[:len(data) // 3])
    elif kind == "not an image":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif kind == "truncated wav":                          # header says 8000 frames, 1000 are there
        import wave
        with wave.open(str(path), "wb") as writer:
            writer.setnchannels(1), writer.setsampwidth(2), writer.setframerate(16000)
            writer.writeframes(np.zeros(8000, np.int16).tobytes())
        path.write_bytes(path.read_bytes()[:44 + 2000])
    elif kind == "impossible sphere count":
        path.write_bytes(data.replace(b"sample_count -i 8000", b"sample_count -i 9999999"))


@pytest.mark.parametrize("kind", ["truncated image", "not an image"])
def test_a_corrupt_mug_frame_is_one_line_or_skipped(tmp_path, kind):
    mug_tree(tmp_path / "mug")
    victim = tmp_path / "mug" / "002" / "surprise" / "take000" / "img_0000.jpg"   # always among the 15
    corrupt(kind, victim)
    result = run("prepare", "mug", "--source", tmp_path / "mug", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().startswith(f"error: {victim}: unreadable image")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    result = run("prepare", "mug", "--source", tmp_path / "mug", "--out", tmp_path / "out", "--skip-bad")
    assert result.exit_code == 0 and "skipped 1 unreadable files" in result.output, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped_bad_files"] == [str(victim)]
    data = cdsvae.load_dataset("mug", str(tmp_path / "out"))
    assert len(data.train.sequences) + len(data.test.sequences) == 5 * 2 - 1      # that take is gone
    assert len(data.train.labels["expression"]) == len(data.train.sequences)


@pytest.mark.parametrize("kind", ["truncated wav", "impossible sphere count"])
def test_corrupt_audio_is_one_line_or_skipped(tmp_path, kind):
    timit_tree(tmp_path / "timit")
    victim = next((tmp_path / "timit").rglob("SX12.WAV"))
    corrupt(kind, victim)
    result = run("prepare", "timit", "--source", tmp_path / "timit", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {victim}: ")
    assert ("claims 8000 frames, the file holds 1000" if kind == "truncated wav" else "claims 9999999 samples") in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    result = run("prepare", "timit", "--source", tmp_path / "timit", "--out", tmp_path / "out", "--skip-bad")
    assert result.exit_code == 0 and "skipped 1 unreadable files" in result.output, result.output
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped_bad_files"] == [str(victim)]


def test_a_corrupt_sprite_sheet_names_the_file(tmp_path):
    from data_prep import sprites
    (tmp_path / "body").mkdir()
    (tmp_path / "body" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(common.PrepareError, match=r"body/0.png: unreadable image"):
        sprites._load_sheet(tmp_path / "body" / "0.png", np.array([0]))
