"""Training that scales out and survives faults: DDP equivalence, exact resume after SIGKILL,
non-finite steps, hostile checkpoints under --resume."""
import errno
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


def test_torchrun_resume_restores_every_ranks_noise_and_ends_as_an_uninterrupted_run(tmp_path):
    common = ["-m", "cdsvae", "train", "--epochs", "2", *TINY, "--log-every", "1"]
    assert torchrun(*common, "--out", tmp_path / "whole").returncode == 0
    stopped = torchrun(*common, "--time-budget", "0.00001", "--out", tmp_path / "cut")   # after step 1
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    saved = cdsvae.read_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["step"] == 1 and len(saved["rng"]["per_rank"]) == 2
    assert not torch.equal(saved["rng"]["per_rank"][0]["torch"], saved["rng"]["per_rank"][1]["torch"])
    resumed = torchrun(*common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, cut = (cdsvae.read_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    assert whole["step"] == cut["step"] == 22
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, cut["state_dict"][name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


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


# The third case cuts the critics of I(z;s) mid warm-up (from step 4, full weight at 6): their
# weights, their optimiser state and the warm-up's step counter must survive the resume too.
@pytest.mark.parametrize("stop_signal, critics", [(signal.SIGTERM, {}), (signal.SIGINT, {}),
                                                  (signal.SIGTERM, dict(club=1.0, pair_critic=1.0, club_start=4))])
def test_a_signal_in_mid_epoch_saves_that_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                        stop_signal, critics):
    cdsvae.train(small_cfg(epochs=3, **critics), small_data(), tmp_path / "whole", show_progress=False, log_every=1)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    learning_rate = cdsvae.learning_rate

    def signalled_at_step_6(cfg, step, total_steps, budget_used=0.0):   # 4 steps an epoch: epoch 1, batch 2
        if step == 5:
            os.kill(os.getpid(), stop_signal)
        return learning_rate(cfg, step, total_steps, budget_used)
    monkeypatch.setattr(cdsvae, "learning_rate", signalled_at_step_6)
    with pytest.raises(cdsvae.TrainingInterrupted, match=f"stopped by {stop_signal.name} after step 6") as stop:
        cdsvae.train(small_cfg(epochs=3, **critics), small_data(), tmp_path / "cut", show_progress=False,
                     log_every=1)
    assert stop.value.exit_status == 128 + stop_signal
    assert {number: signal.getsignal(number) for number in handlers} == handlers      # restored
    saved = cdsvae.read_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["position"]) == (6, 1, 2)
    if critics:                                   # the critics trained, and the warm-up's counter was saved
        assert int(saved["state_dict"]["club_step"]) == 6
        assert '"mi_zs_ratio"' in (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert not (tmp_path / "cut" / "train.lock").exists()
    monkeypatch.setattr(cdsvae, "learning_rate", learning_rate)
    cdsvae.train(small_cfg(epochs=3, **critics), small_data(), tmp_path / "cut", show_progress=False, log_every=1,
                 resume=True)
    whole = cdsvae.read_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = cdsvae.read_checkpoint(tmp_path / "cut" / "last.pt")
    assert whole["step"] == resumed["step"] == 12
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_sigterm_to_the_cli_is_one_line_and_exit_143(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    process = subprocess.Popen(train_args(out, epochs=1000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                                          # into the training loop
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    step = cdsvae.read_checkpoint(out / "last.pt")["step"]
    assert lines[-1] == (f"stopped by SIGTERM after step {step}; {out / 'last.pt'} holds that step, and the "
                         "same command with --resume continues from it")
    assert "Traceback" not in stderr and not (out / "train.lock").exists()


class FullDiskFile:
    """A file whose writes fail with ENOSPC after ``allowed`` of them."""

    def __init__(self, handle, allowed):
        self.handle, self.allowed = handle, allowed

    def write(self, text):
        self.allowed -= 1
        if self.allowed < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.parametrize("site", ["last.pt", "config.json", "summary.json", "metrics.jsonl"])
def test_a_full_disk_at_any_write_keeps_the_previous_state_and_is_one_line(tmp_path, monkeypatch, site):
    out = tmp_path / "run"
    if site == "last.pt":                                   # the second epoch's checkpoint fails mid-file
        real_save, saves = torch.save, []

        def save(payload, path, *args, **kwargs):
            saves.append(path)
            if len(saves) == 2:
                Path(path).write_bytes(b"PK\x03\x04 cut short")
                raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
            return real_save(payload, path, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save)
    elif site == "metrics.jsonl":                           # fails after 15 records (epoch 2)
        real_open = Path.open
        monkeypatch.setattr(Path, "open", lambda path, mode="r", *args, **kwargs: FullDiskFile(
            real_open(path, mode, *args, **kwargs), 15) if path.name == site and mode == "a"
            else real_open(path, mode, *args, **kwargs))
    else:
        real_replace = os.replace

        def replace(source, target):
            if Path(target).name == site:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(source, target)
        monkeypatch.setattr(os, "replace", replace)
    result = runner.invoke(cdsvae.app, ["train", "--epochs", "3", *TINY, "--log-every", "1", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write {out / site} ("), lines
    assert lines[0].endswith("expected a writable folder with free space") and "Traceback" not in result.output
    assert not list(out.glob("*.tmp"))
    if site in ("last.pt", "metrics.jsonl", "summary.json"):   # the state saved before is intact
        assert cdsvae.read_checkpoint(out / "last.pt")["step"] == (11 if site != "summary.json" else 33)
    if site == "last.pt":
        assert "the last.pt written before is intact" in lines[0]


def test_one_run_per_folder_and_a_dead_runs_lock_is_taken_over(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    first = subprocess.Popen(train_args(out, epochs=1000), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:   # the lock comes first
            time.sleep(0.05)
        lock = (out / "train.lock").read_text().split()
        assert lock[1] == str(first.pid)
        second = subprocess.run(train_args(out, epochs=1), capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: {out}: another cdsvae train (process {first.pid} on {lock[0]}) is writing there; "
            "expected one run per folder (wait for it, or pass another --out)"]
        assert first.poll() is None                         # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    third = subprocess.run(train_args(out, epochs=1), capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"note: took over {out / 'train.lock'}, left by process {first.pid}, which is gone" in third.stderr
    assert (out / "summary.json").is_file() and not (out / "train.lock").exists()


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
    saved = cdsvae.read_checkpoint(tmp_path / "last.pt")
    assert (saved["step"], saved["epoch"], saved["position"]) == (1, 0, 1)     # resumes right there
    result = runner.invoke(cdsvae.app, ["train", *TINY, "--epochs", "1", "--time-budget", "0",
                                        "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and result.output.startswith("error: --time-budget must be positive")
    assert not (tmp_path / "cli").exists()


def test_cpu_bf16_is_detected_from_the_cpu_flags_and_auto_follows_it_on_cpu(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cdsvae.cpu_has_native_bf16(str(with_bf16)) and not cdsvae.cpu_has_native_bf16(str(without))
    assert not cdsvae.cpu_has_native_bf16(str(tmp_path / "absent"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(cdsvae, "cpu_has_native_bf16", lambda: False)
    assert cdsvae.resolve_precision("auto", cpu) == "fp32" and cdsvae.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(cdsvae.UserError, match="no native bf16"):
        cdsvae.resolve_precision("bf16", cpu)
    monkeypatch.setattr(cdsvae, "cpu_has_native_bf16", lambda: True)
    assert cdsvae.resolve_precision("bf16", cpu) == "bf16" and cdsvae.resolve_precision("auto", cpu) == "bf16"
    assert cdsvae.resolve_precision("fp32", cpu) == "fp32"


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


def test_cosine_schedule_under_a_time_budget_decays_with_the_minutes(tmp_path):
    cfg = small_cfg(lr=0.01, lr_schedule="cosine", warmup_steps=4)
    # whichever runs out first: half the minutes gone at step 6 of 100 -> half-way down the cosine
    assert cdsvae.learning_rate(cfg, 6, 100, budget_used=0.5) == pytest.approx(0.005)
    assert cdsvae.learning_rate(cfg, 10, 12, budget_used=0.1) == pytest.approx(0.005 * (1 + math.cos(math.pi * 6 / 8)))
    assert cdsvae.learning_rate(cfg, 2, 100, budget_used=0.9) == pytest.approx(0.0075)     # warm-up first
    assert cdsvae.learning_rate(small_cfg(lr=0.01), 50, 100, budget_used=0.9) == 0.01     # constant
    summary = cdsvae.train(small_cfg(epochs=10_000, lr=0.01, lr_schedule="cosine"), small_data(), tmp_path,
                           show_progress=False, time_budget=1.0)
    assert summary["stopped"] == "time budget" and summary["steps"] < 10_000
    optimizer = cdsvae.read_checkpoint(tmp_path / "last.pt")["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == 0.0       # the last step of the budget: the cosine's end


def test_decay_fraction_keeps_the_rate_then_cools_down_over_the_last_part():
    cfg = small_cfg(lr=0.01, lr_schedule="cosine", decay_fraction=0.25)
    # 20 steps, the last quarter (progress 0.75 -> 1) decays: steps 0..15 at lr, then k/5 down the cosine
    expected = [0.01] * 15 + [0.005 * (1 + math.cos(math.pi * k / 5)) for k in range(6)]
    assert [cdsvae.learning_rate(cfg, step, 20) for step in range(21)] == pytest.approx(expected)
    assert cdsvae.learning_rate(cfg, 3, 1000, budget_used=0.7) == 0.01                   # minutes: not yet
    assert cdsvae.learning_rate(cfg, 3, 1000, budget_used=0.875) == pytest.approx(0.005)   # half-way down
    with_warmup = small_cfg(lr=0.01, lr_schedule="cosine", warmup_steps=4, decay_fraction=0.5)
    assert cdsvae.learning_rate(with_warmup, 1, 12) == pytest.approx(0.005)                # warm-up first
    assert cdsvae.learning_rate(with_warmup, 7, 12) == 0.01          # (7 - 4) / 8 of the rest: constant
    assert cdsvae.learning_rate(with_warmup, 10, 12) == pytest.approx(0.005 * (1 + math.cos(math.pi * 0.5)))
    with pytest.raises(cdsvae.UserError, match="--decay-fraction must be in"):
        cdsvae.check_config(small_cfg(decay_fraction=1.5))


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
        assert set(record["validation"]) == {"s/shape", "s/colour", "s/large_side", "z/direction", "score"}
        assert record["validation"]["score"] == pytest.approx(np.mean(accuracies), abs=1e-4)
        assert record["minutes"] >= 0
    best = max(scored, key=lambda r: r["validation"]["score"])             # the first of equal ones
    payload = cdsvae.read_checkpoint(tmp_path / "best.pt")
    assert payload["step"] == best["step"] and payload["validation"] == best["validation"]
    assert cdsvae.read_checkpoint(tmp_path / "last.pt")["best_score"] == best["validation"]["score"]
    assert "best validation score" in cdsvae.load_checkpoint(tmp_path / "best.pt").description
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
