"""bench/glyph_tracking.py: whether each glyph follows one digit, on trajectories written by hand."""
import numpy as np
import pytest
import torch

import cdsvae


def digits(frames=6):
    """Two digits (N=1, T, 2, 2) in pixels: one moving right along y = 8, one still at (24, 24);
    in frame 3 the first one jumps onto the second (closer than 6 px: not judged)."""
    path = np.zeros((1, frames, 2, 2), dtype=np.float32)
    path[0, :, 0] = [[8 + t, 8] for t in range(frames)]
    path[0, :, 1] = [24, 24]
    path[0, 3, 0] = [22, 22]
    return path


def test_glyphs_on_their_own_digits_are_consistent_even_with_the_two_swapped(load_bench):
    bench = load_bench("glyph_tracking")
    path = digits()
    for centres in (path + 0.5, path[:, :, ::-1] - 0.5):
        found = bench.tracking(centres, path)
        assert found["consistent"].tolist() == [True] and found["switches"].tolist() == [0]
        assert np.allclose(found["error"], np.sqrt(0.5))


def test_a_glyph_that_changes_digit_between_judged_frames_is_a_switch(load_bench):
    bench = load_bench("glyph_tracking")
    path = digits()
    centres = path.copy()
    centres[0, 5:] = path[0, 5:, ::-1]           # frame 5: the glyphs exchange their digits
    found = bench.tracking(centres, path)
    assert found["consistent"].tolist() == [False] and found["switches"].tolist() == [1]
    centres = path.copy()
    centres[0, 3:] = path[0, 3:, ::-1]           # the exchange comes in frame 3, which is not judged
    found = bench.tracking(centres, path)
    assert found["consistent"].tolist() == [False] and found["switches"].tolist() == [0]


def test_two_glyphs_on_one_digit_are_not_consistent(load_bench):
    bench = load_bench("glyph_tracking")
    path = digits()
    centres = path.copy()
    centres[0, :, 1] = path[0, :, 0]
    assert bench.tracking(centres, path)["consistent"].tolist() == [False]
    assert bench.tracking(path, path, apart=100.0)["consistent"].tolist() == [False]   # no frame judged


def test_centres_are_the_decoders_in_pixels(load_bench):
    bench = load_bench("glyph_tracking")
    cfg = cdsvae.Config(**cdsvae.preset("sm-mnist", "cpu"), frame_shape=(1, 32, 32), frames=4)
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(cfg)
    videos = np.random.default_rng(0).integers(0, 256, (3, 4, 32, 32, 1), dtype=np.uint8)
    centres, matched, right = bench.glyph_centres(model, videos)
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"))
        unit = model.frame_decoder.centres(encoding.dynamic_mean.flatten(0, 1)).view(3, 4, 2, 2)
    assert right is None and centres.shape == matched.shape == (3, 4, 2, 2)
    np.testing.assert_allclose(centres, ((unit + 1) * 16).numpy(), rtol=1e-6)
    order = encoding.glyph_order.numpy()                # glyph k is at place order[n, t, k]
    for n, t, k in np.ndindex(3, 4, 2):
        np.testing.assert_array_equal(matched[n, t, k], centres[n, t, order[n, t, k]])
    assert ((centres >= 8) & (centres <= 24)).all()     # a glyph of 16 px stays inside the frame
