"""Training that scales out and survives faults: DDP equivalence, exact resume after SIGKILL,
non-finite steps, hostile checkpoints under --resume."""
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def test_cpu_bf16_is_detected_from_the_cpu_flags_and_auto_keeps_fp32_on_cpu(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cdsvae.cpu_has_native_bf16(str(with_bf16)) and not cdsvae.cpu_has_native_bf16(str(without))
    assert not cdsvae.cpu_has_native_bf16(str(tmp_path / "absent"))
    cpu = torch.device("cpu")
    assert cdsvae.resolve_precision("auto", cpu) == "fp32" and cdsvae.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(cdsvae, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(cdsvae.UserError, match="no native bf16"):
        cdsvae.resolve_precision("bf16", cpu)
    monkeypatch.setattr(cdsvae, "cpu_has_native_bf16", lambda: True)
    assert cdsvae.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.skipif(not cdsvae.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_runs_on_a_cpu_with_native_bf16(tmp_path):
    summary = cdsvae.train(small_cfg(epochs=1), small_data(), tmp_path, show_progress=False, precision="bf16")
    assert summary["precision"] == "bf16" and all(
        torch.isfinite(p).all() for p in cdsvae.load_checkpoint(tmp_path / "last.pt").parameters())


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero(tmp_path):
    cfg = small_cfg(lr=0.01, lr_schedule="cosine", warmup_steps=4)
    expected = [0.0025, 0.005, 0.0075, 0.01] + [0.005 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]
    assert [cdsvae.learning_rate(cfg, step, 12) for step in range(13)] == pytest.approx(expected)
    assert cdsvae.learning_rate(small_cfg(lr=0.01), 7, 12) == 0.01          # constant
    summary = cdsvae.train(small_cfg(epochs=3, lr=0.01, lr_schedule="cosine", warmup_steps=4),
                           small_data(), tmp_path, show_progress=False)
    assert summary["steps"] == 12
    optimizer = cdsvae.read_checkpoint(tmp_path / "last.pt")["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.005 * (1 + math.cos(math.pi * 7 / 8)))


class RecordingSequences:
    """Training sequences that remember which indices each read asked for."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        self.reads.append(np.arange(len(self.array))[index].tolist())
        return self.array[index]


def test_eval_every_holds_out_a_validation_split_logs_its_score_and_keeps_the_best(tmp_path):
    data = small_data()
    data.train = cdsvae.Split(RecordingSequences(data.train.sequences), data.train.labels)
    validation, training = cdsvae.validation_split(64, 0)
    assert len(validation) == 6 and sorted([*validation, *training]) == list(range(64))
    cdsvae.train(small_cfg(epochs=2), data, tmp_path, show_progress=False, eval_every=2)
    batches = [read for read in data.train.sequences.reads if len(read) == 16]   # the training steps
    assert len(batches) == 6 and set(sum(batches, [])).isdisjoint(validation.tolist())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "validation" in r]
    assert [r["step"] for r in scored] == [2, 4, 6]                        # 58 sequences, batch 16
    for record in scored:
        accuracies = [v for k, v in record["validation"].items() if k != "score"]
        assert set(record["validation"]) == {"s/shape", "s/colour", "z/direction", "z/scale", "score"}
        assert record["validation"]["score"] == pytest.approx(np.mean(accuracies), abs=1e-4)
        assert record["minutes"] >= 0
    best = max(scored, key=lambda r: r["validation"]["score"])             # the first of equal ones
    payload = cdsvae.read_checkpoint(tmp_path / "best.pt")
    assert payload["step"] == best["step"] and payload["validation"] == best["validation"]
    assert cdsvae.read_checkpoint(tmp_path / "last.pt")["best_score"] == best["validation"]["score"]
    assert "best validation score" in cdsvae.checkpoint_description(tmp_path / "best.pt")
    # scoring leaves training untouched: scored every 3 steps instead of 2, the same parameters
    cdsvae.train(small_cfg(epochs=2), small_data(), tmp_path / "other", show_progress=False, eval_every=3)
    for (name, a), b in zip(cdsvae.load_checkpoint(tmp_path / "last.pt").state_dict().items(),
                            cdsvae.load_checkpoint(tmp_path / "other" / "last.pt").state_dict().values()):
        assert torch.equal(a, b), name


def test_fresh_data_trains_each_later_epoch_on_a_new_draw(tmp_path):
    from data_prep import shapes

    data, draws = small_data(), []

    def resample(seed):
        draws.append(seed)
        videos, labels = shapes.render(64, seed, size=16)
        return cdsvae.Split(videos, labels)
    data.resample_train = resample
    cdsvae.train(small_cfg(epochs=3, fresh_data=True, seed=5), data, tmp_path, show_progress=False)
    assert draws == [5 * 1_000_003 + 1, 5 * 1_000_003 + 2]
    draws.clear()
    cdsvae.train(small_cfg(epochs=3), data, tmp_path / "fixed", show_progress=False)
    assert draws == []
