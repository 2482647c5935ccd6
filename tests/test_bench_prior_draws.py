"""bench/prior_draws.py: the ex-post mixture against known mixtures, the travel against a hand-made
sequence, and the script end to end on a small model and judge."""
import math

import numpy as np
import pytest
import torch

import cdsvae
from data_prep import shapes


def test_the_fitted_mixture_finds_two_known_gaussians(load_bench):
    bench = load_bench("prior_draws")
    generator = torch.Generator().manual_seed(0)
    first = torch.tensor([4.0, -2.0]) + torch.tensor([0.5, 1.0]) * torch.randn(3000, 2, generator=generator)
    second = torch.tensor([-4.0, 3.0]) + torch.tensor([1.0, 0.3]) * torch.randn(1000, 2, generator=generator)
    means, variances, log_weights = bench.fit_mixture(torch.cat([first, second]), 2)
    found = means[:, 0].argsort(descending=True)          # the first Gaussian has the larger x
    assert means[found].flatten().tolist() == pytest.approx([4.0, -2.0, -4.0, 3.0], abs=0.08)
    assert variances[found].flatten().tolist() == pytest.approx([0.25, 1.0, 1.0, 0.09], rel=0.1)
    assert log_weights[found].exp().tolist() == pytest.approx([0.75, 0.25], abs=0.01)
    one = bench.fit_mixture(first, 1)                      # K 1: the points' own mean and variance
    assert one[0][0].tolist() == pytest.approx(first.mean(0).tolist(), abs=1e-5)
    assert one[1][0].tolist() == pytest.approx(first.var(0, unbiased=False).tolist(), rel=1e-4)
    draws = bench.draw_mixture((means, variances, log_weights), 20000, torch.Generator().manual_seed(1))
    assert float((draws[:, 0] > 0).float().mean()) == pytest.approx(0.75, abs=0.01)


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
