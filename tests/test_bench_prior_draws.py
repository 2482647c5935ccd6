"""bench/prior_draws.py: the travel against a hand-made sequence, and the script end to end on a
small model and judge (the ex-post mixture it fits: tests/test_model.py)."""
import math

import numpy as np
import pytest
import torch

import cdsvae
from data_prep import shapes


def test_horizontal_travel_follows_the_centre_of_mass(load_bench):
    bench = load_bench("prior_draws")
    frames = torch.zeros(2, 4, 3, 8, 8)
    for t in range(4):
        frames[0, t, :, 3, 1 + 2 * t] = 1.0                # moves right by 6 pixels
        frames[1, t, 1, 2:4, 5:7] = 1.0                     # stays
    assert bench.horizontal_travel(frames).tolist() == pytest.approx([6.0, 0.0])


def test_prior_draws_prints_a_row_per_source(load_bench, tmp_path, capsys):
    bench = load_bench("prior_draws")
    videos, labels = shapes.render(96, 0, size=16)
    test_videos, test_labels = shapes.render(32, 1, size=16)
    data = cdsvae.Dataset("shapes", cdsvae.Split(videos, labels), cdsvae.Split(test_videos, test_labels),
                          shapes.KINDS, shapes.LABELS)
    cdsvae.train_judge(data, "cpu", epochs=1, out=tmp_path / "judge.pt", show_progress=False)
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), frames=8, static_dim=4, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4)
    model = cdsvae.CDSVAE(cfg)
    judge = cdsvae.load_judge(tmp_path / "judge.pt")
    rows = bench.prior_draws(model, judge, data.train.sequences, 24, [1, 3], temperatures=[0.5])
    assert list(rows) == ["prior", "prior at 0.5", "fitted 1", "fitted 3"]
    for row in rows.values():
        assert set(row) == {*shapes.LABELS, "sure", "travel"} and 0 <= row["sure"] <= 1
        score, h_yx, h_y = row["shape"]
        assert math.log(score) == pytest.approx(h_y - h_yx, abs=1e-6)
        assert row["travel"].shape == (24,)
    cdsvae.save_checkpoint(model, tmp_path / "m.pt")
    bench.main(["--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "judge.pt"), "--components", "2",
                "--count", "16"])
    out = capsys.readouterr().out
    assert "| the test split (real) |" in out and "| prior |" in out and "| fitted 2 |" in out
