"""Seeded fuzzing of what users hand the CLI: malformed .npy files and malformed checkpoints.

Every case must end as a valid load or as one UserError (one line; the CLI turns it into exit
status 2); never another exception, never code run from a pickle, never an allocation of a
size that a forged header or config declares. In-process and fast: no subprocess per case.
"""
import io
import random
import zipfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cdsvae

runner = CliRunner()
CFG = cdsvae.Config(frame_shape=(3, 8, 8), frames=4, static_dim=3, dynamic_dim=2, feature_dim=6,
                    hidden_dim=5, conv_width=2)


def valid_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return buffer.getvalue()


def forged_header(rng: random.Random) -> bytes:
    """A well-formed header naming any dtype, shape and order, over a few bytes of data."""
    descr = rng.choice(["|u1", "<f4", "<f8", "<f2", "|b1", "<i8", ">i4", "<c16", "|O", "<U3", "|V8",
                        [("a", "<f4"), ("b", "|u1")]])
    rank = rng.randint(0, 6)
    shape = tuple(rng.choice([0, 1, 3, 4, 8, 2**31, 10**12, rng.randint(0, 20)]) for _ in range(rank))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": rng.random() < 0.3,
                                                  "shape": shape})
    return buffer.getvalue() + bytes(rng.randrange(256) for _ in range(rng.choice([0, 7, 192, 768, 1600])))


def malformed_npys(count: int):
    rng, base = random.Random(0), valid_npy()
    for case in range(count):
        kind = case % 5
        if kind == 0:                                   # random bytes, some behind the magic
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            yield (b"\x93NUMPY" + body) if rng.random() < 0.5 else body
        elif kind == 1:                                 # bytes flipped in the header
            data = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(128)] = rng.randrange(256)
            yield bytes(data)
        elif kind == 2:                                 # cut short anywhere
            yield base[:rng.randrange(len(base))]
        elif kind == 3:
            yield forged_header(rng)
        else:                                           # valid files of the wrong kind
            array = rng.choice([
                np.zeros((4, 8, 8, 3), dtype=bool), np.ones((4, 8, 8, 3), dtype=np.int16),
                np.full((4, 8, 8, 3), np.nan, dtype=np.float32), np.full((4, 3, 8, 8), 2.0),
                np.zeros((4, 8, 8, 3), dtype=np.complex64), np.zeros((0, 8, 8, 3), dtype=np.uint8),
                np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((1, 1, 4, 8, 8, 3), dtype=np.uint8),
                np.asfortranarray(np.random.default_rng(case).random((2, 4, 8, 8, 3))),
                np.zeros((4, 8, 9, 3), dtype=np.float64), np.array(["ab"] * 4)])
            buffer = io.BytesIO()
            np.save(buffer, array)
            yield buffer.getvalue()


def test_500_malformed_npy_files_load_or_fail_with_one_line(tmp_path):
    path = tmp_path / "x.npy"
    outcomes = {"loaded": 0, "refused": 0}
    for case, data in enumerate(malformed_npys(500)):
        path.write_bytes(data)
        try:
            frames, layout = cdsvae.load_sequences(path, CFG)
        except cdsvae.UserError as error:
            assert "\n" not in str(error) and str(error).startswith(f"{path}: "), (case, str(error))
            outcomes["refused"] += 1
        else:
            assert frames.shape[2:] == (3, 8, 8) and torch.isfinite(frames).all(), case
            assert 0 <= float(frames.min()) and float(frames.max()) <= 1, case
            outcomes["loaded"] += 1
    assert outcomes["refused"] >= 400 and outcomes["loaded"] >= 10, outcomes


def test_malformed_npy_files_through_the_cli_are_exit_2_and_one_line(tmp_path):
    cdsvae.save_checkpoint(cdsvae.CDSVAE(CFG), tmp_path / "c.pt")
    for case, data in enumerate(malformed_npys(60)):
        (tmp_path / "x.npy").write_bytes(data)
        result = runner.invoke(cdsvae.app, ["encode", str(tmp_path / "x.npy"), "--ckpt", str(tmp_path / "c.pt"),
                                            "-o", str(tmp_path / "out")])
        if result.exit_code != 0:
            assert result.exit_code == 2, (case, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output


class RunsCode:
    """A pickle that would write a file if unpickling ran code."""

    marker = None

    def __reduce__(self):
        return (open, (str(RunsCode.marker), "w"))


def mutated_payloads(rng: random.Random, payload: dict):
    """Checkpoint dicts with wrong types in the config, missing, extra or misshapen tensors, NaN."""
    config, state = payload["config"], payload["state_dict"]
    names = sorted(state)
    bad_values = ["x", None, -3, 10**12, 2.5, [1, 2], True, float("nan"), {"a": 1}]
    for case in range(150):
        new_config, new_state = dict(config), dict(state)
        kind = case % 10
        if kind == 0:
            new_config[rng.choice(sorted(config))] = rng.choice(bad_values)
        elif kind == 1:
            del new_config[rng.choice(sorted(config))]
        elif kind == 2:
            new_config["unknown_key"] = 1
        elif kind == 3:
            del new_state[rng.choice(names)]
        elif kind == 4:
            new_state["extra.weight"] = torch.zeros(3)
        elif kind == 5:
            name = rng.choice(names)
            new_state[name] = torch.zeros(*(d + 1 for d in state[name].shape)) if state[name].dim() else torch.zeros(2)
        elif kind == 6:
            name = rng.choice([n for n in names if state[n].is_floating_point()])
            bad = state[name].clone().contiguous()
            bad.view(-1)[0] = rng.choice([float("nan"), float("inf")])
            new_state[name] = bad
        elif kind == 7:
            new_state[rng.choice(names)] = rng.choice([[1.0, 2.0], 3, "w", None])
        elif kind == 8:
            new_config.update(static_dim=10**6, dynamic_dim=10**6, hidden_dim=10**6)   # sizes to allocate
        else:
            yield rng.choice([{**payload, "state_dict": [1, 2]}, {**payload, "config": "cfg"},
                              {**payload, "format": "cdsvae-checkpoint-0"}, [payload], "text",
                              {"format": payload["format"]}])
            continue
        yield {**payload, "config": new_config, "state_dict": new_state}


def test_200_malformed_checkpoints_fail_with_one_line_and_run_no_code(tmp_path):
    torch.manual_seed(0)
    cdsvae.save_checkpoint(cdsvae.CDSVAE(CFG), tmp_path / "valid.pt")
    valid = (tmp_path / "valid.pt").read_bytes()
    payload = torch.load(tmp_path / "valid.pt", weights_only=True)
    RunsCode.marker = tmp_path / "code_ran"
    rng, path = random.Random(0), tmp_path / "c.pt"
    cases = []
    for _ in range(25):                                 # the zip cut short, or bytes flipped
        cases.append(valid[:rng.randrange(len(valid))])
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    for mutated in mutated_payloads(rng, payload):
        buffer = io.BytesIO()
        torch.save(mutated, buffer)
        cases.append(buffer.getvalue())
    for _ in range(5):                                  # pickles that would run code
        buffer = io.BytesIO()
        torch.save({"format": payload["format"], "config": payload["config"], "state_dict": RunsCode()}, buffer)
        cases.append(buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:       # a zip that is no torch file
        archive.writestr("archive/data.pkl", b"not a pickle")
    cases.append(buffer.getvalue())
    assert len(cases) >= 200
    refused = 0
    for case, data in enumerate(cases):
        path.write_bytes(data)
        try:
            model = cdsvae.load_checkpoint(path)
        except cdsvae.UserError as error:
            assert "\n" not in str(error) and str(error).startswith(f"{path}: "), (case, str(error))
            refused += 1
        else:                                           # a flip that left a valid checkpoint
            assert all(torch.isfinite(p).all() for p in model.parameters()), case
    assert not RunsCode.marker.exists()
    assert refused >= 180, refused
    result = runner.invoke(cdsvae.app, ["sample", "--ckpt", str(path), "-n", "1", "-o", str(tmp_path / "s.npy")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
