"""The command line: the happy paths and every bad-input path (one line, exit 2, no traceback,
nothing written)."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cdsvae

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), frames=5, static_dim=6, dynamic_dim=3,
                        feature_dim=8, hidden_dim=10, conv_width=4)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    cdsvae.save_checkpoint(cdsvae.CDSVAE(cfg), path)
    return path


def run(*args):
    return runner.invoke(cdsvae.app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_encode_writes_posterior_means_for_both_layouts(tmp_path, checkpoint):
    sequence = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", sequence)
    result = run("encode", tmp_path / "x.npy", "--ckpt", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    s, z = np.load(tmp_path / "out" / "s.npy"), np.load(tmp_path / "out" / "z.npy")
    assert s.shape == (6,) and z.shape == (5, 3)
    channels_first = sequence.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.save(tmp_path / "x_cf.npy", channels_first[None].repeat(2, 0))
    result = run("encode", tmp_path / "x_cf.npy", "--ckpt", checkpoint, "-o", tmp_path / "out2")
    assert result.exit_code == 0, result.output
    s_batch = np.load(tmp_path / "out2" / "s.npy")
    assert s_batch.shape == (2, 6)
    np.testing.assert_allclose(s_batch[0], s, atol=1e-5)  # same sequence, either layout


def test_swap_writes_arrays_in_the_input_layout_and_a_png(tmp_path, checkpoint):
    from PIL import Image

    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.random((5, 3, 16, 16), dtype=np.float32))
    result = run("swap", tmp_path / "a.npy", tmp_path / "b.npy", "--ckpt", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    a_b = np.load(tmp_path / "out" / "a_static_b_dynamic.npy")
    b_a = np.load(tmp_path / "out" / "b_static_a_dynamic.npy")
    assert a_b.shape == (5, 16, 16, 3) and a_b.dtype == np.uint8
    assert b_a.shape == (5, 3, 16, 16) and b_a.dtype == np.float32
    image = Image.open(tmp_path / "out" / "swap.png")
    assert image.height > image.width / 5 * 3   # one pair: four rows of five frames

    np.save(tmp_path / "a6.npy", rng.integers(0, 256, (6, 5, 16, 16, 3), dtype=np.uint8))
    result = run("swap", tmp_path / "a6.npy", tmp_path / "a6.npy", "--ckpt", checkpoint, "-o", tmp_path / "out6")
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "out6" / "swap.png")
    assert image.size == (5 * 16, 16 * (16 + 2))   # the first four of six pairs, four rows each


def test_sample_writes_sequences_that_encode_accepts(tmp_path, checkpoint):
    result = run("sample", "--ckpt", checkpoint, "-n", 3, "-o", tmp_path / "samples.npy")
    assert result.exit_code == 0, result.output
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (3, 5, 16, 16, 3) and samples.dtype == np.uint8
    assert (tmp_path / "samples.png").is_file()
    result = run("encode", tmp_path / "samples.npy", "--ckpt", checkpoint, "-o", tmp_path / "enc")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "enc" / "z.npy").shape == (3, 5, 3)


def bad_inputs(tmp_path):
    good = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    cases = {
        "wrong_rank": (np.zeros((16, 16, 3), dtype=np.uint8), "rank 3"),
        "wrong_frame_size": (np.zeros((5, 32, 32, 3), dtype=np.uint8), "do not match"),
        "nan": (np.full((5, 16, 16, 3), np.nan, dtype=np.float32), "NaN"),
        "out_of_range": (np.full((5, 16, 16, 3), 2.0, dtype=np.float32), "outside [0, 1]"),
        "object": (np.array([None] * 5, dtype=object), "dtype object not supported"),
        "strings": (np.array(["a", "b"]), "dtype <U1"),
        "empty": (np.zeros((0, 16, 16, 3), dtype=np.uint8), "empty"),
        "int64": (good.astype(np.int64), "dtype int64"),
    }
    paths = {}
    for name, (array, fragment) in cases.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array, allow_pickle=True)
        paths[name] = (path, fragment)
    np.save(tmp_path / "full.npy", good)
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    paths["truncated"] = (tmp_path / "truncated.npy", "header declares shape (5, 16, 16, 3) (3840 bytes) but the file holds")
    (tmp_path / "text.npy").write_text("hello, not an array\n")
    paths["not_npy"] = (tmp_path / "text.npy", "not a .npy file")
    np.savez(tmp_path / "archive.npz", x=good)
    paths["npz"] = (tmp_path / "archive.npz", ".npz archive")
    paths["missing"] = (tmp_path / "missing.npy", "no such file")
    return paths


@pytest.mark.parametrize("command", ["encode", "swap"])
def test_every_bad_sequence_gets_one_line_and_exit_2(tmp_path, checkpoint, command):
    np.save(tmp_path / "good.npy", np.zeros((5, 16, 16, 3), dtype=np.uint8))
    for name, (path, fragment) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{name}"
        args = [path] if command == "encode" else [tmp_path / "good.npy", path]
        result = run(command, *args, "--ckpt", checkpoint, "-o", out)
        assert_user_error(result, fragment, "expected")
        assert not out.exists(), f"{name}: output written despite the error"


def bad_checkpoints(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"format": cdsvae.CHECKPOINT_FORMAT, "config": {"static_dim": 6, "bogus": 1},
                "state_dict": {}}, tmp_path / "badconfig.pt")
    torch.save({"format": cdsvae.CHECKPOINT_FORMAT, "config": {"frame_shape": [3, 16, 16]},
                "state_dict": {"nope": torch.zeros(1)}}, tmp_path / "badweights.pt")
    return {"text": tmp_path / "text.pt", "foreign": tmp_path / "foreign.pt",
            "tensor": tmp_path / "tensor.pt", "badconfig": tmp_path / "badconfig.pt",
            "badweights": tmp_path / "badweights.pt", "missing": tmp_path / "missing.pt"}


class RunsCode:
    """A pickle payload: unpickling it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_checkpoints_get_one_line_and_exit_2_under_every_command(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 16, 16, 3), dtype=np.uint8))
    checkpoints = bad_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "payload.pt", "wb") as handle:
        pickle.dump({"format": cdsvae.CHECKPOINT_FORMAT, "config": RunsCode(str(marker))}, handle)
    checkpoints["payload"] = tmp_path / "payload.pt"
    for name, ckpt in checkpoints.items():
        for args in (["encode", tmp_path / "x.npy"], ["swap", tmp_path / "x.npy", tmp_path / "x.npy"],
                     ["sample", "-n", 2]):
            out = tmp_path / f"out_{name}" / ("s.npy" if args[0] == "sample" else "")
            result = run(*args, "--ckpt", ckpt, "-o", out)
            assert_user_error(result, "checkpoint")
            assert not (tmp_path / f"out_{name}").exists()
    assert not marker.exists(), "loading a checkpoint ran code"


def test_sm_mnist_without_network_or_files_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import urllib.error
    from data_prep import sm_mnist

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(sm_mnist, "urlopen", offline)
    monkeypatch.delenv("CDSVAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert_user_error(run("train", "--data", "sm-mnist", "--out", tmp_path / "run"),
                      "could not download MNIST", "--data-dir", "CDSVAE_DATA", str(tmp_path / "cache"))
    result = run("prepare", "sm-mnist", "--out", tmp_path / "prepared")
    assert_user_error(result, "could not download MNIST")
    assert result.output.startswith("error: "), "nothing (not even the download's empty bar) before the error"
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # no run, no prepared folder, no cache


def test_train_rejects_bad_options(tmp_path):
    assert_user_error(run("train", "--data", "nope", "--out", tmp_path / "r"), "unknown dataset", "expected")
    assert_user_error(run("train", "--mi", "nope", "--out", tmp_path / "r"), "expected contrastive")
    assert_user_error(run("train", "--epochs", 0, "--out", tmp_path / "r"), "--epochs must be positive")
    assert_user_error(run("train", "--alpha-static", -1, "--out", tmp_path / "r"), "--alpha-static must be non-negative")
    assert_user_error(run("train", "--club", -0.5, "--out", tmp_path / "r"), "--club must be non-negative")
    assert_user_error(run("train", "--pair-critic", -1, "--out", tmp_path / "r"), "--pair-critic must be non-negative")
    assert_user_error(run("train", "--data", "sm-mnist", "--data-dir", tmp_path / "absent",
                          "--out", tmp_path / "r"), "MNIST")
    # a mistyped --data-dir (no meta.json) must not train on the built-in shapes instead
    assert_user_error(run("train", "--data-dir", tmp_path / "absent", "--out", tmp_path / "r"),
                      "absent has no meta.json; expected a folder written by 'cdsvae prepare'")
    assert not (tmp_path / "r").exists()
    assert_user_error(run("train", "--device", "cuda:7" if not torch.cuda.is_available() else "tpu",
                          "--out", tmp_path / "r"), "expected")
    assert_user_error(run("train", "--precision", "fp8", "--out", tmp_path / "r"), "expected auto, fp32 or bf16")
    assert_user_error(run("train", "--likelihood", "laplace", "--out", tmp_path / "r"), "expected gaussian or bernoulli")
    assert_user_error(run("train", "--scale", "huge", "--out", tmp_path / "r"), "expected one of paper, cpu")
    assert_user_error(run("train", "--lr-schedule", "step", "--out", tmp_path / "r"), "expected constant or cosine")
    assert_user_error(run("train", "--decay-fraction", 1.5, "--out", tmp_path / "r"), "--decay-fraction must be in (0, 1]")
    assert_user_error(run("train", "--decay-fraction", 0, "--out", tmp_path / "r"), "--decay-fraction must be positive")
    assert_user_error(run("train", "--decay-fraction", 0.3, "--out", tmp_path / "r"),  # shapes: constant rate
                      "expected --lr-schedule cosine with it")
    assert_user_error(run("train", "--mi-rollout", "x", "--out", tmp_path / "r"), "expected sampled or mean")
    assert_user_error(run("train", "--glyphs", -1, "--out", tmp_path / "r"), "--glyphs must be non-negative")
    assert_user_error(run("train", "--glyphs", 3, "--out", tmp_path / "r"),        # shapes: s of 16
                      "expected a static dim divisible by it, got 16")
    assert_user_error(run("train", "--glyphs", 5, "--static-dim", 20, "--out", tmp_path / "r"), "expected at most 4, got 5")
    assert_user_error(run("train", "--glyphs", 2, "--content-flip", "--out", tmp_path / "r"),
                      "expected --no-content-flip with it")
    assert_user_error(run("train", "--glyphs", 2, "--frame-size", 24, "--out", tmp_path / "r"),
                      "expected a side of 16, 32, 64")
    assert_user_error(run("train", "--explain-away", "--out", tmp_path / "r"),      # shapes: no glyphs
                      "expected --glyphs 2 or more with it, got 0")
    assert_user_error(run("train", "--eval-every", -1, "--out", tmp_path / "r"), "--eval-every")
    assert_user_error(run("train", "--judge", tmp_path / "j.pt", "--out", tmp_path / "r"), "expected it with --eval-every")
    assert_user_error(run("train", "--sync-bn", "--device", "cpu", "--out", tmp_path / "r"), "--sync-bn needs CUDA")
    assert_user_error(run("train", "--resume", "--out", tmp_path / "r"), "no such checkpoint")
    assert not (tmp_path / "r").exists()


def test_sample_rejects_bad_options(tmp_path, checkpoint):
    assert_user_error(run("sample", "--ckpt", checkpoint, "-n", 0, "-o", tmp_path / "s.npy"), "at least 1")
    assert_user_error(run("sample", "--ckpt", checkpoint, "-o", tmp_path / "s.png"), "ending in .npy")


def test_train_cli_writes_its_outputs_and_a_first_session_needs_no_flags_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "cdsvae"                        # train's default --out
    trained = run("train", "--epochs", 1, "--frame-size", 16, "--static-dim", 4, "--dynamic-dim", 2,
                  "--hidden-dim", 8, "--feature-dim", 8, "--conv-width", 4, "--batch-size", 256,
                  "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    # the README's first session: two sequences, then a swap with no flags, twice
    for seed, name in ((0, "a.npy"), (1, "b.npy")):
        result = run("sample", "-n", 1, "--seed", seed, "-o", name)
        assert result.exit_code == 0 and f"used {Path('runs/cdsvae/last.pt')}" in result.output, result.output
    for n in (1, 2):
        result = run("swap", "a.npy", "b.npy")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "runs" / f"swap-{n}" / "swap.png").is_file()
        assert f"wrote {Path(f'runs/swap-{n}')}/" in result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cdsvae", "swap-1", "swap-2"]
    result = run("encode", "a.npy")
    assert result.exit_code == 0 and (tmp_path / "runs" / "encode-1" / "s.npy").is_file(), result.output
    assert "probe accuracy" in trained.output
    config = json.loads((out / "config.json").read_text())
    assert config["frame_shape"] == [3, 16, 16] and config["static_dim"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"recon", "kl_s", "kl_z", "mi_sx", "mi_zx", "mi_zs", "loss"} <= set(records[0])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["probe"]) >= {"s_static", "s_dynamic", "z_static", "z_dynamic", "chance"}
    assert all(0.0 <= summary["probe"][k] <= 1.0 for k in ("s_static", "s_dynamic", "z_static", "z_dynamic"))
    test_labels = cdsvae.load_dataset("shapes", None, 16, 0).test.labels     # chance, computed directly
    for kind, factors in (("static", ("shape", "colour", "large_side")), ("dynamic", ("direction",))):
        majority = [max(np.mean(test_labels[f] == c) for c in set(test_labels[f].tolist())) for f in factors]
        assert summary["probe"]["chance"][kind] == pytest.approx(np.mean(majority))
    assert summary["probe"]["s_static"] == pytest.approx(np.mean([summary["probe"]["per_factor"][f"s/{f}"]
                                                                  for f in ("shape", "colour", "large_side")]))
    assert cdsvae.load_checkpoint(out / "last.pt").cfg.static_dim == 4


def test_whole_pixels_without_glyphs_is_a_one_line_error_and_nothing_is_written(tmp_path):
    assert_user_error(run("train", "--whole-pixels", "--epochs", 1, "--out", tmp_path / "run"),
                      "--whole-pixels places glyphs; expected --glyphs K")
    assert not (tmp_path / "run").exists()


def test_glyph_contrast_without_glyphs_is_a_one_line_error_and_nothing_is_written(tmp_path):
    assert_user_error(run("train", "--glyph-contrast", "--epochs", 1, "--out", tmp_path / "run"),
                      "--glyph-contrast compares glyphs; expected --glyphs K")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--static-pool", "max"], "--static-pool max: expected lstm or mean or attention"),
    (["--critic-grad", "dynamic"], "--critic-grad dynamic: expected both or static"),
    (["--static-pool", "mean", "--glyphs", 2], "--static-pool mean: with --glyphs q(s|x, z) averages over the frames already; expected --static-pool lstm (the plain mean) or attention"),
    (["--glyphs", 2], "--static-pool mean: with --glyphs"),      # the shapes preset's pool
])
def test_a_bad_static_pool_or_critic_grad_is_a_one_line_error_and_nothing_is_written(tmp_path, args, message):
    assert_user_error(run("train", *args, "--epochs", 1, "--out", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--glyph-dynamic"], ["--glyphs", 2, "--static-pool", "lstm", "--glyph-dynamic", "--explain-away"]])
def test_glyph_dynamic_without_glyphs_or_with_explain_away_is_a_one_line_error_and_nothing_is_written(tmp_path, args):
    assert_user_error(run("train", *args, "--epochs", 1, "--out", tmp_path / "run"),
                      "--glyph-dynamic lets z_t draw the glyphs; expected --glyphs K and no --explain-away")
    assert not (tmp_path / "run").exists()


def test_a_negative_static_prior_is_a_one_line_error_and_nothing_is_written(tmp_path):
    assert_user_error(run("train", "--static-prior", -1, "--epochs", 1, "--out", tmp_path / "run"),
                      "--static-prior must be non-negative, got -1")
    assert not (tmp_path / "run").exists()
    with pytest.raises(cdsvae.UserError, match=r"--static-prior -2: expected 0 \(the paper's N\(0, I\)\)"):
        cdsvae.check_config(cdsvae.Config(static_prior=-2))


def test_glyph_distort_without_glyphs_is_a_one_line_error_and_nothing_is_written(tmp_path):
    assert_user_error(run("train", "--glyph-distort", 1, "--epochs", 1, "--out", tmp_path / "run"),
                      "--glyph-distort 1.0: expected 0 or more, and above 0 only with --glyphs K")
    assert not (tmp_path / "run").exists()


def test_without_a_run_the_commands_ask_for_train_or_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run("swap", "a.npy", "b.npy"), "no trained model under runs/", "cdsvae train", "--ckpt")
    assert_user_error(run("sample", "-n", 1), "no trained model under runs/")
    assert list(tmp_path.iterdir()) == []


def test_the_newest_run_is_used_and_its_best_checkpoint_first(tmp_path, checkpoint):
    import os
    runs = tmp_path / "runs"
    for age, name in ((200, "old"), (100, "new"), (0, "swap-3")):
        (runs / name).mkdir(parents=True)
        if name != "swap-3":
            (runs / name / "last.pt").write_bytes(checkpoint.read_bytes())
            os.utime(runs / name / "last.pt", (1e9 - age, 1e9 - age))
    assert cdsvae.newest_checkpoint(runs) == runs / "new" / "last.pt"
    (runs / "new" / "best.pt").write_bytes(checkpoint.read_bytes())
    assert cdsvae.newest_checkpoint(runs) == runs / "new" / "best.pt"
    assert cdsvae.new_output_folder("swap", runs) == runs / "swap-4"      # after the largest, never reused
    assert cdsvae.new_output_folder("encode", runs) == runs / "encode-1"


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "cdsvae", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "swap" in result.stdout


def test_feature_frame_checkpoints_swap_and_sample(tmp_path):
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(12,), frames=20, static_dim=4, dynamic_dim=3, feature_dim=8,
                        hidden_dim=10, mlp_width=16)
    cdsvae.save_checkpoint(cdsvae.CDSVAE(cfg), tmp_path / "speech.pt")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((20, 12)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((20, 12)).astype(np.float32))
    result = run("swap", tmp_path / "a.npy", tmp_path / "b.npy", "--ckpt", tmp_path / "speech.pt", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "a_static_b_dynamic.npy").shape == (20, 12)
    assert (tmp_path / "out" / "swap.png").is_file()
    result = run("sample", "--ckpt", tmp_path / "speech.pt", "-n", 2, "-o", tmp_path / "s.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "s.npy").shape == (2, 20, 12)
    np.save(tmp_path / "wrong.npy", rng.standard_normal((20, 13)).astype(np.float32))
    assert_user_error(run("encode", tmp_path / "wrong.npy", "--ckpt", tmp_path / "speech.pt", "-o", tmp_path / "e"),
                      "(T, 12)")


def test_scale_applies_its_settings_over_the_preset_and_flags_win_over_both(tmp_path, monkeypatch):
    assert cdsvae.preset("sm-mnist", "paper")["static_dim"] == cdsvae.PAPER_VIDEO["static_dim"]
    assert cdsvae.preset("sprites", "cpu") == {**cdsvae.PRESETS["sprites"], **cdsvae.SCALES["cpu"]["sprites"]}
    assert cdsvae.preset("shapes") == cdsvae.PRESETS["shapes"]
    monkeypatch.setitem(cdsvae.SCALES["cpu"], "shapes", dict(static_dim=5, hidden_dim=6, likelihood="bernoulli"))
    refined, refine = [], cdsvae.CDSVAE.refine
    monkeypatch.setattr(cdsvae.CDSVAE, "refine", lambda self, x, encoding, steps: refined.append(steps) or refine(self, x, encoding, steps))
    result = run("train", "--scale", "cpu", "--hidden-dim", 8, "--epochs", 1, "--frame-size", 16,
                 "--dynamic-dim", 2, "--feature-dim", 8, "--conv-width", 4, "--batch-size", 256,
                 "--alpha-static", 2.5, "--club", 1.5, "--pair-critic", 0.5, "--club-start", 3, "--critic-grad", "static", "--no-motion-grad", "--refine-steps", 4, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["static_dim"], config["hidden_dim"], config["likelihood"]) == (5, 8, "bernoulli")
    assert (config["alpha"], config["alpha_static"]) == (cdsvae.PRESETS["shapes"]["alpha"], 2.5)
    assert config["motion_grad"] is False and config["explain_away"] is False
    assert (config["refine_steps"], config["refine_lr"]) == (4, cdsvae.Config.refine_lr)
    trained = cdsvae.load_checkpoint(tmp_path / "run" / "last.pt")
    assert (trained.cfg.alpha_static, trained.cfg.club, trained.cfg.pair_critic, trained.cfg.club_start,
            trained.cfg.critic_grad) == (2.5, 1.5, 0.5, 3, "static")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert int(trained.club_step) == summary["steps"]
    # the summary probes the encoder's means: the refinement is left to eval and encode
    assert refined and set(refined) == {0} and summary["probe_posterior_means"]["latents"] == "posterior means"
    assert config["lr"] == cdsvae.PRESETS["shapes"]["lr"]                 # the rest from the preset


def test_fit_prior_stores_a_mixture_that_sample_draws_from_and_zero_removes_it(tmp_path, checkpoint, monkeypatch):
    """``cdsvae fit-prior`` (ours): the mixture fitted to the training split's posterior means of s
    goes into the checkpoint, everything else stays; the loaded model draws s from it; --components
    0 takes it out again; bad counts are one line, exit 2, the checkpoint untouched."""
    from data_prep import shapes
    videos, labels = shapes.render(40, 0, size=16, frames=5)
    data = cdsvae.Dataset("shapes", cdsvae.Split(videos, labels), cdsvae.Split(videos[:8], {k: v[:8] for k, v in labels.items()}),
                          shapes.KINDS, shapes.LABELS)
    monkeypatch.setattr(cdsvae, "load_dataset", lambda *args, **kwargs: data)
    path = tmp_path / "last.pt"
    model = cdsvae.load_checkpoint(checkpoint)
    with torch.no_grad():
        model.static_posterior.head.weight.mul_(300.0)          # means that differ from video to video
        model.dynamic_posterior.head.weight.mul_(300.0)
    cdsvae.save_checkpoint(model, path, step=7)
    written = path.read_bytes()
    before = cdsvae.read_checkpoint(path)
    for components, message in ((-1, "--components must be at least 0"), (41, "at most the 40 points")):
        assert_user_error(run("fit-prior", "--ckpt", path, "--components", components), message)
        assert path.read_bytes() == written
    result = run("fit-prior", "--ckpt", path, "--components", 1)
    assert result.exit_code == 0, result.output
    model = cdsvae.load_checkpoint(path)
    means = torch.cat([model.encode(cdsvae.to_frames(videos[i:i + 16], "cpu"), refine_steps=0).static_mean
                       for i in range(0, 40, 16)]).detach()
    assert model.fitted_prior.means[0].tolist() == pytest.approx(means.mean(0).tolist(), abs=1e-5)
    assert model.fitted_prior.logvars[0].exp().tolist() == pytest.approx(means.var(0, unbiased=False).tolist(), rel=1e-3)
    assert float(model.fitted_prior.logvars.exp().min()) > 1e-3
    with torch.no_grad():
        first = torch.cat([model.encode(cdsvae.to_frames(videos[i:i + 16], "cpu"), refine_steps=0).dynamic_mean[:, 0]
                           for i in range(0, 40, 16)])
    assert model.fitted_first_step.means[0].tolist() == pytest.approx(first.mean(0).tolist(), abs=1e-5)
    assert model.fitted_first_step.logvars[0].exp().tolist() == pytest.approx(first.var(0, unbiased=False).tolist(), rel=1e-3)
    assert float(model.fitted_first_step.logvars.exp().min()) > 1e-3
    after = cdsvae.read_checkpoint(path)
    assert after["step"] == 7 and all(torch.equal(after["state_dict"][name], value) for name, value in before["state_dict"].items())
    assert "fit" in cdsvae.static_prior_name(model)
    draws = cdsvae.sample_static(model, 4000, torch.Generator().manual_seed(0))
    assert draws.mean(0).tolist() == pytest.approx(means.mean(0).tolist(), abs=0.1 * float(means.std(0).max()) + 1e-3)
    result = run("sample", "--ckpt", path, "-n", 2, "-o", tmp_path / "s.npy")
    assert result.exit_code == 0, result.output
    result = run("fit-prior", "--ckpt", path, "--components", 1, "--no-first-step")      # s's mixture only
    assert result.exit_code == 0 and "the s of 40" in result.output, result.output
    model = cdsvae.load_checkpoint(path)
    assert model.fitted_prior is not None and model.fitted_first_step is None
    assert run("fit-prior", "--ckpt", path, "--components", 0).exit_code == 0
    model = cdsvae.load_checkpoint(path)
    assert model.fitted_prior is None and model.fitted_first_step is None
    assert not {"fitted_prior", "fitted_first_step"} & set(cdsvae.read_checkpoint(path))


def test_a_checkpoint_whose_fitted_prior_does_not_fit_s_is_a_one_line_error(tmp_path, checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    payload["fitted_prior"] = {"means": torch.zeros(3, 5), "logvars": torch.zeros(3, 5), "logits": torch.zeros(3)}
    torch.save(payload, tmp_path / "bad.pt")
    assert_user_error(run("sample", "--ckpt", tmp_path / "bad.pt", "-n", 1, "-o", tmp_path / "out" / "s.npy"),
                      "fitted_prior", "3 components of 6")
    assert not (tmp_path / "out").exists()
    del payload["fitted_prior"]
    payload["fitted_first_step"] = {"means": torch.zeros(3, 5), "logvars": torch.zeros(3, 5), "logits": torch.zeros(3)}
    torch.save(payload, tmp_path / "bad.pt")
    assert_user_error(run("sample", "--ckpt", tmp_path / "bad.pt", "-n", 1, "-o", tmp_path / "out" / "s.npy"),
                      "fitted_first_step's shapes do not fit z_1", "3 components of 3")
    assert not (tmp_path / "out").exists()
