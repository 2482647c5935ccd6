"""bench/set_probe.py: the order-free pair read part by part, against direct enumeration."""
import math

import numpy as np
import pytest
import torch

import cdsvae


def test_pair_log_probs_sum_both_assignments_of_the_two_parts(load_bench):
    bench = load_bench("set_probe")
    logits = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double(), -1)
    got = bench.pair_log_probs(logits)
    for n in range(3):
        for i in range(4):
            for j in range(4):
                if i < j:
                    expected = math.log(p[n, 0, i] * p[n, 1, j] + p[n, 0, j] * p[n, 1, i])
                elif i == j:
                    expected = math.log(p[n, 0, i] * p[n, 1, i])
                else:
                    assert got[n, i, j] == float("-inf")
                    continue
                assert float(got[n, i, j]) == pytest.approx(expected, rel=1e-5)
        assert float(got[n].exp().sum()) == pytest.approx(1.0, rel=1e-6)


def pairs_in_parts(count, informative, seed):
    """s of two 8-number parts, each a noisy code of one digit, the two parts in random order;
    ``informative`` False: the parts are noise."""
    generator = np.random.default_rng(seed)
    codes = np.random.default_rng(99).normal(size=(10, 8))        # one code per digit, shared by the splits
    digits = generator.integers(0, 10, size=(count, 2))
    parts = codes[digits] + 0.3 * generator.normal(size=(count, 2, 8))
    if not informative:
        parts = generator.normal(size=(count, 2, 8))
    return parts.reshape(count, 16).astype(np.float32), digits.min(1), digits.max(1)


def test_set_probe_reads_digits_from_parts_in_any_order_and_not_from_noise(load_bench):
    bench = load_bench("set_probe")
    for informative in (True, False):
        train, test = pairs_in_parts(2000, informative, 0), pairs_in_parts(500, informative, 1)
        result = bench.set_probe_accuracy(train[0], train[1], train[2], test[0], test[1], test[2])
        chance = max(np.bincount(test[1]).max(), np.bincount(test[2]).max()) / 500
        if informative:
            assert result["digit_low"] > 0.95 and result["digit_high"] > 0.95 and result["both"] > 0.9
        else:
            assert result["s_static"] < chance + 0.1


def test_split_statics_gives_samples_or_the_encoders_unrefined_means(load_bench):
    bench = load_bench("set_probe")
    torch.manual_seed(0)
    model = cdsvae.CDSVAE(cdsvae.Config(frame_shape=(1, 32, 32), glyphs=2, static_dim=8, dynamic_dim=3,
                                        feature_dim=8, hidden_dim=10, conv_width=4, refine_steps=5))
    sequences = np.random.default_rng(0).integers(0, 256, (5, 4, 32, 32, 1), dtype=np.uint8)   # as stored
    train_means, test_means = bench.split_statics(model, sequences, sequences[:3], means=True)
    with torch.no_grad():
        expected = model.encode(cdsvae.to_frames(sequences, "cpu"), sample=False, refine_steps=0).static.numpy()
    np.testing.assert_allclose(train_means, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(test_means, expected[:3], rtol=1e-5, atol=1e-6)
    train_samples, _ = bench.split_statics(model, sequences, sequences[:3])
    assert train_samples.shape == (5, 8) and np.abs(train_samples - train_means).max() > 1e-2


def test_probe_ceiling_pairs_are_order_free_and_clean_codes_are_read_whole(load_bench):
    """bench/probe_ceiling.py: synthetic s is two parts, each its digit's centre plus sigma noise,
    in random order, labelled by the smaller and the larger digit; with no noise the package's
    probe and the shared linear reading are perfect, and with more noise both read less."""
    bench = load_bench("probe_ceiling")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 4))
    s, low, high = bench.synthetic_pairs(200, 0.0, centres, rng)
    parts = s.reshape(200, 2, 4)
    digits = [[int(np.argmin(np.abs(centres - part).sum(1))) for part in pair] for pair in parts]
    assert [min(d) for d in digits] == low.tolist() and [max(d) for d in digits] == high.tolist()
    first_is_low = np.array([d[0] == min(d) for d in digits])[low != high]
    assert 0.3 < first_is_low.mean() < 0.7                        # no fixed order of the parts
    clean = bench.ceiling(0.0, part_dim=8, train=1000, test=300)
    noisy = bench.ceiling(3.0, part_dim=8, train=1000, test=300)
    assert all(clean[key] == pytest.approx(1.0) for key in ("s_static", "linear_per_part", "set_probe", "set_probe_both"))
    assert noisy["s_static"] < 0.8 and noisy["linear_per_part"] < 0.9 and noisy["set_probe"] < 0.9
