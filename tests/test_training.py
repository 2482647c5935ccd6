"""Training that scales out and survives faults: DDP equivalence, exact resume after SIGKILL,
non-finite steps, hostile checkpoints under --resume."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cdsvae

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "helpers"))
import ddp_step  # noqa: E402

runner = CliRunner()
TINY = ["--frame-size", "16", "--static-dim", "4", "--dynamic-dim", "2", "--hidden-dim", "8",
        "--feature-dim", "8", "--conv-width", "4", "--batch-size", "256", "--device", "cpu"]


def torchrun(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(random.randint(20000, 40000)), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_processes_take_the_same_first_step_as_one(tmp_path):
    result = torchrun(HERE / "helpers" / "ddp_step.py", tmp_path / "grads.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    ddp_step.deterministic()
    try:
        model = ddp_step.make_model()
        x, views = ddp_step.make_batch()
        loss, _ = model(x, views)                          # the whole global batch at once
        loss.backward()
    finally:
        import importlib
        importlib.reload(cdsvae)                           # undo the patches
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(distributed[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_torchrun_trains_unchanged(tmp_path):
    result = torchrun("-m", "cdsvae", "train", "--epochs", "1", *TINY, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and "probe" in summary
    assert result.stdout.count("trained ") == 1               # rank 0 alone reports


def train_args(out, epochs=4):
    return [sys.executable, "-m", "cdsvae", "train", "--epochs", str(epochs), *TINY, "--log-every", "1",
            "--out", str(out)]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_args(tmp_path / "whole"), check=True, capture_output=True, env=env, timeout=300)
    rng = random.Random(0)
    out, kills = tmp_path / "killed", 0
    command = train_args(out)
    while not (out / "summary.json").exists():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if kills < 3:
            deadline = time.time() + 120
            while not (out / "last.pt").exists() and time.time() < deadline:   # at least one epoch done
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        process.wait(timeout=300)
        command = train_args(out) + ["--resume"]
    assert kills >= 1
    whole = cdsvae.read_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = cdsvae.read_checkpoint(out / "last.pt")
    assert whole["step"] == resumed["step"]
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_last_pt_under_resume_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(cdsvae.app, ["train", "--epochs", "1", *TINY, "--out", str(out)]).exit_code == 0
    original = (out / "last.pt").read_bytes()
    cases = {"truncated": original[: len(original) // 2],
             "tampered": original[:200] + bytes(b ^ 0xFF for b in original[200:400]) + original[400:],
             "foreign": None}
    for name, content in cases.items():
        if content is None:
            torch.save({"format": cdsvae.CHECKPOINT_FORMAT, "config": {"static_dim": 4},
                        "state_dict": {}}, out / "last.pt")
        else:
            (out / "last.pt").write_bytes(content)
        before = folder_digest(out)
        result = runner.invoke(cdsvae.app, ["train", *TINY, "--out", str(out), "--resume"])
        assert result.exit_code == 2, (name, result.output)
        assert result.output.strip().startswith("error: ") and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert folder_digest(out) == before, name


def test_a_pickle_payload_in_last_pt_runs_no_code_under_resume(tmp_path):
    import pickle

    from test_cli import RunsCode

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    with open(out / "last.pt", "wb") as handle:
        pickle.dump({"format": cdsvae.CHECKPOINT_FORMAT, "config": RunsCode(str(marker))}, handle)
    result = runner.invoke(cdsvae.app, ["train", *TINY, "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "not a cdsvae checkpoint" in result.output
    assert not marker.exists()


def nan_after(calls_before_nan, always=False):
    original = cdsvae.CDSVAE.forward
    count = {"n": 0}

    def forward(self, x, motion_view=None):
        loss, terms = original(self, x, motion_view)
        count["n"] += 1
        if always or count["n"] == calls_before_nan + 1:
            loss = loss * float("nan")
        return loss, terms
    return forward


def small_data():
    from data_prep import shapes

    videos, labels = shapes.render(64, 0, size=16)
    split = cdsvae.Split(videos, labels)
    return cdsvae.Dataset("shapes", split, split, shapes.KINDS, shapes.LABELS)


def small_cfg(**overrides):
    return cdsvae.Config(frame_shape=(3, 16, 16), static_dim=4, dynamic_dim=2, feature_dim=8,
                         hidden_dim=8, conv_width=4, batch_size=16, **overrides)


def test_a_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(cdsvae.CDSVAE, "forward", nan_after(2))
    cdsvae.train(small_cfg(epochs=2), small_data(), tmp_path, log_every=1, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [3]
    assert len(records) == 8
    model = cdsvae.load_checkpoint(tmp_path / "last.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_non_finite_steps_stop_training_without_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(cdsvae.CDSVAE, "forward", nan_after(0, always=True))
    with pytest.raises(cdsvae.TrainingStopped, match="3 steps in a row"):
        cdsvae.train(small_cfg(epochs=2), small_data(), tmp_path, show_progress=False, max_nonfinite=3)
    assert not (tmp_path / "last.pt").exists()


def test_keep_holds_the_last_k_epoch_checkpoints(tmp_path):
    cdsvae.train(small_cfg(epochs=4), small_data(), tmp_path, show_progress=False, keep=2)
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == ["epoch-0003.pt", "epoch-0004.pt"]
    assert cdsvae.read_checkpoint(tmp_path / "epoch-0004.pt")["step"] == 16


def test_a_time_budget_stops_training_after_the_step_that_runs_out_and_saves_it(tmp_path):
    summary = cdsvae.train(small_cfg(epochs=50), small_data(), tmp_path, show_progress=False,
                           time_budget=1e-9)
    assert summary["stopped"] == "time budget" and summary["steps"] == 1
    assert cdsvae.read_checkpoint(tmp_path / "last.pt")["step"] == 1
    result = runner.invoke(cdsvae.app, ["train", *TINY, "--epochs", "1", "--time-budget", "0",
                                        "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and result.output.startswith("error: --time-budget must be positive")
    assert not (tmp_path / "cli").exists()
