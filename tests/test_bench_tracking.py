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
    centres, matched, heads, heads_apart, static = bench.glyph_centres(model, videos)
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"))
        unit = model.frame_decoder.centres(encoding.dynamic_mean.flatten(0, 1)).view(3, 4, 2, 2)
    assert heads is None and heads_apart is None and centres.shape == matched.shape == (3, 4, 2, 2)
    torch.testing.assert_close(static, encoding.static_mean)
    np.testing.assert_allclose(centres, ((unit + 1) * 16).numpy(), rtol=1e-6)
    order = encoding.glyph_order.numpy()                # glyph k is at place order[n, t, k]
    for n, t, k in np.ndindex(3, 4, 2):
        np.testing.assert_array_equal(matched[n, t, k], centres[n, t, order[n, t, k]])
    assert ((centres >= 8) & (centres <= 24)).all()     # a glyph of 16 px stays inside the frame


def test_glyphs_drawn_apart_fill_the_diagonal_quarters_each_with_its_own_glyph(load_bench):
    bench = load_bench("glyph_tracking")
    cfg = cdsvae.Config(**cdsvae.preset("sm-mnist", "cpu"), frame_shape=(1, 32, 32), frames=4)
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(cfg).eval()
    with torch.no_grad():
        model.frame_decoder.background.fill_(-2.0)
        static = torch.randn(3, cfg.static_dim)
        frames = bench.drawn_apart(model, static, 5)
        glyphs = model.frame_decoder.drawn(static).view(3, 2, 1, 16, 16)
    assert frames.shape == (3, 5, 1, 32, 32) and torch.equal(frames[:, 0], frames[:, 4])
    none = torch.exp(-torch.nn.functional.softplus(torch.tensor(-2.0)))   # no background drawn
    union = lambda glyph: 1 - (1 - glyph * (1 - 1e-6)) * none              # noqa: E731
    torch.testing.assert_close(frames[:, 0, :, :16, :16], union(glyphs[:, 0]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(frames[:, 0, :, 16:, 16:], union(glyphs[:, 1]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(frames[:, 0, :, :16, 16:], union(torch.zeros(3, 1, 16, 16)), atol=1e-5, rtol=1e-4)


def test_real_digits_apart_are_the_pools_digits_in_the_diagonal_quarters(load_bench):
    bench = load_bench("glyph_tracking")
    from data_prep import sm_mnist

    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    videos, found = bench.real_apart(images, labels, 4, 32, 3, seed=2)
    pairs = np.random.default_rng(2).integers(5, size=(4, 2))
    small = sm_mnist._resize(images, 16)
    assert videos.shape == (4, 3, 32, 32, 1) and (videos[:, 0] == videos[:, 2]).all()
    np.testing.assert_array_equal(videos[:, 1, :16, :16, 0], small[pairs[:, 0]])
    np.testing.assert_array_equal(videos[:, 1, 16:, 16:, 0], small[pairs[:, 1]])
    assert not videos[:, :, :16, 16:].any() and not videos[:, :, 16:, :16].any()
    np.testing.assert_array_equal(found["digit_low"], np.minimum(labels[pairs[:, 0]], labels[pairs[:, 1]]))
    np.testing.assert_array_equal(found["digit_high"], np.maximum(labels[pairs[:, 0]], labels[pairs[:, 1]]))


def test_per_digit_counts_each_appearance_under_either_head(load_bench):
    bench = load_bench("glyph_tracking")
    labels = {"digit_low": np.array([1, 1, 2]), "digit_high": np.array([2, 7, 7])}
    right = np.array([[True, False], [True, True], [False, False]])
    # 1: right twice of 2; 2: wrong as high (video 0), wrong as low (video 2); 7: right once of 2
    assert bench.per_digit(right, labels) == {1: 1.0, 2: 0.0, 7: 0.5}


def test_by_overlap_bins_sequences_by_the_share_of_frames_whose_digits_are_close(load_bench):
    bench = load_bench("glyph_tracking")
    paths = np.repeat(digits(), 4, axis=0)                    # digit 0 on digit 1 in frame 3 only: 1 / 6
    paths[0, 3, 0] = [8, 8]                                   # never close
    paths[2, 2, 0] = [24, 21]                                 # 3 px away in frame 2, and frame 3: 2 / 6
    paths[3, :, 0] = [22, 22]                                 # always: 6 / 6
    right = {"real": np.array([True, True, False, True]), "reconstructed": np.array([True, False, False, False])}
    report = bench.by_overlap(right, paths)
    assert report == {"none": {"sequences": 1, "real": 1.0, "reconstructed": 1.0},
                      "(0, 0.2)": {"sequences": 1, "real": 1.0, "reconstructed": 0.0},
                      "[0.2, 0.5)": {"sequences": 1, "real": 0.0, "reconstructed": 0.0},
                      "[0.5, 1]": {"sequences": 1, "real": 1.0, "reconstructed": 0.0}}
    empty = bench.by_overlap({"real": np.array([True])}, paths[:1])
    assert empty["[0.5, 1]"] == {"sequences": 0, "real": None}


def test_with_a_judge_each_reconstruction_and_each_pair_drawn_apart_is_judged(load_bench):
    bench = load_bench("glyph_tracking")
    cfg = cdsvae.Config(**cdsvae.preset("sm-mnist", "cpu"), frame_shape=(1, 32, 32), frames=4)
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(cfg)
    judge = cdsvae.Judge(cdsvae.Config(**cdsvae.preset("sm-mnist"), frame_shape=(1, 32, 32), frames=4),
                         {"digit_low": list("0123456789"), "digit_high": list("0123456789")})
    videos = np.random.default_rng(0).integers(0, 256, (3, 4, 32, 32, 1), dtype=np.uint8)
    labels = {"digit_low": np.array([0, 1, 2]), "digit_high": np.array([3, 4, 5])}
    heads, heads_apart = bench.glyph_centres(model, videos, judge, labels)[2:4]
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"))
        reconstruction = model.decode(encoding.static_mean, encoding.dynamic_mean, encoding.glyph_order)
        apart = bench.drawn_apart(model, encoding.static_mean, 4)
    np.testing.assert_array_equal(heads, bench.heads_right(judge, reconstruction, labels))
    np.testing.assert_array_equal(heads_apart, bench.heads_right(judge, apart, labels))
    assert heads.shape == heads_apart.shape == (3, 2)


def test_real_digits_along_paths_are_drawn_as_the_generator_draws_them(load_bench):
    bench = load_bench("glyph_tracking")
    from data_prep import sm_mnist

    images = np.random.default_rng(1).integers(1, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    # the generator's paths (whole pixels), each frame the union of the pair's two digits there
    videos, found, paths = sm_mnist.generate(images, labels, 3, seed=4, size=32, frames=5)
    pairs = np.random.default_rng(2).integers(5, size=(3, 2))
    drawn, drawn_labels = bench.real_along(images, labels, paths, 32, seed=2)
    small = sm_mnist._resize(images, 16)
    assert drawn.shape == videos.shape
    for n, t in np.ndindex(3, 5):
        frame = np.zeros((32, 32), dtype=np.uint8)
        for k in range(2):
            x, y = (paths[n, t, k] - 8).astype(int)
            frame[y:y + 16, x:x + 16] = np.maximum(frame[y:y + 16, x:x + 16], small[pairs[n, k]])
        np.testing.assert_array_equal(drawn[n, t, ..., 0], frame)
    np.testing.assert_array_equal(drawn_labels["digit_low"], labels[pairs].min(1))
    # off-grid and outside: rounded, and kept inside the frame
    off = np.array([[[[8.4, 8.6], [40.0, -3.0]]]], dtype=np.float32)
    drawn = bench.real_along(images, labels, off, 32, seed=2)[0][0, 0, ..., 0]
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[0:16, 16:32] = small[pairs[0, 1]]                  # (40, -3): the corner (16, 0)
    expected[1:17, 0:16] = small[pairs[0, 0]]                   # (8.4, 8.6): the corner (0, 1)
    np.testing.assert_array_equal(drawn, expected)


def test_glyphs_along_paths_are_the_decoders_frames_at_those_centres(load_bench):
    bench = load_bench("glyph_tracking")
    cfg = cdsvae.Config(**{**cdsvae.preset("sm-mnist", "cpu"), "whole_pixels": False}, frame_shape=(1, 32, 32), frames=4)
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(cfg).eval()                   # decode draws where z_t says, as glyphs_along does
    static, dynamic = torch.randn(3, cfg.static_dim), torch.randn(3, 4, cfg.dynamic_dim)
    with torch.no_grad():
        paths = ((model.frame_decoder.centres(dynamic.flatten(0, 1)) + 1) * 16).view(3, 4, 2, 2).numpy()
        # the decoder's own centres as paths: its frames come back (glyph k at place k)
        torch.testing.assert_close(bench.glyphs_along(model, static, paths), model.decode(static, dynamic),
                                   atol=1e-5, rtol=1e-4)
    drawn = bench.prior_paths(model, 3, 4, seed=5)
    with torch.no_grad():
        dynamic = cdsvae.sample_dynamic(model, 3, 4, generator=torch.Generator().manual_seed(5))
        expected = (model.frame_decoder.centres(dynamic.flatten(0, 1)) + 1) * 16
    np.testing.assert_allclose(drawn, expected.view(3, 4, 2, 2).numpy(), rtol=1e-6)
