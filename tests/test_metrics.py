"""Speaker-verification EER against hand-computed values."""
import numpy as np
import pytest

import cdsvae


def test_eer_of_separable_scores_is_zero():
    assert cdsvae.eer([0.9, 0.8, 0.7, 0.1, 0.2], [True, True, True, False, False]) == 0.0


def test_eer_of_inseparable_scores_is_one_half():
    assert cdsvae.eer([0.5] * 6, [True, False] * 3) == pytest.approx(0.5)
    # same and different pairs drawn from one distribution: close to 0.5
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(20000)
    assert cdsvae.eer(scores, rng.random(20000) < 0.3) == pytest.approx(0.5, abs=0.02)


def test_eer_of_partially_overlapping_scores():
    # same: 0.9 0.8 0.4, different: 0.7 0.3 0.2. Accepting scores >= 0.7 rejects one of three
    # same pairs (0.4) and accepts one of three different pairs (0.7): FAR = FRR = 1/3.
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
    same = [True, True, True, False, False, False]
    assert cdsvae.eer(scores, same) == pytest.approx(1 / 3)


def test_eer_of_reversed_scores_is_one():
    assert cdsvae.eer([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == pytest.approx(1.0)


def test_eer_needs_both_kinds_of_pair():
    with pytest.raises(ValueError):
        cdsvae.eer([0.1, 0.2], [True, True])


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert cdsvae.inception_score(np.full((10, 4), 0.25)) == pytest.approx(1.0)
    one_hot = np.eye(4)[np.arange(12) % 4]            # confident and balanced over 4 classes
    assert cdsvae.inception_score(one_hot) == pytest.approx(4.0)
    assert cdsvae.inception_score(np.eye(4)[np.zeros(8, int)]) == pytest.approx(1.0)   # one class only


def test_entropies_of_known_distributions():
    uniform = np.full((5, 8), 1 / 8)
    assert cdsvae.entropy_yx(uniform) == pytest.approx(np.log(8))
    assert cdsvae.entropy_y(uniform) == pytest.approx(np.log(8))
    one_hot = np.eye(2)[[0, 1, 0, 1]]
    assert cdsvae.entropy_yx(one_hot) == pytest.approx(0.0, abs=1e-9)
    assert cdsvae.entropy_y(one_hot) == pytest.approx(np.log(2))
    half = np.array([[0.5, 0.5, 0.0]])
    assert cdsvae.entropy_yx(half) == pytest.approx(np.log(2))
    # IS = exp(H(y) - H(y|x))
    p = np.random.default_rng(0).dirichlet(np.ones(5), 50)
    assert cdsvae.inception_score(p) == pytest.approx(np.exp(cdsvae.entropy_y(p) - cdsvae.entropy_yx(p)))


def test_metrics_reject_rows_that_are_not_distributions():
    with pytest.raises(ValueError):
        cdsvae.inception_score(np.array([[0.5, 0.6]]))


def test_balanced_selection_keeps_the_first_items_of_each_class_up_to_the_rarest():
    # counts: class 0 twice, class 1 twice, class 2 three times -> two of each, the first ones
    labels = [2, 0, 2, 1, 0, 2, 1, 0]   # class 0 three times here: still two of each
    assert cdsvae.balanced_selection(labels).tolist() == [0, 1, 2, 3, 4, 6]
    assert cdsvae.balanced_selection([1, 1, 1]).tolist() == [0, 1, 2]


def test_speaker_verification_scores_every_pair_of_test_segments_once(monkeypatch):
    """Three speakers, two segments each: s names the speaker (EER 0); z is speaker-free. The
    EER of z equals the EER of the 15 pairs built by hand."""
    speakers = np.array([0, 0, 1, 1, 2, 2])
    static = np.eye(3)[speakers] + 0.01 * np.arange(6)[:, None]
    dynamic = np.array([[1.0, 0.2], [0.1, 1.0], [0.9, 0.5], [0.3, 0.8], [1.0, 0.0], [0.6, 0.6]])
    monkeypatch.setattr(cdsvae, "encode_split", lambda model, sequences, device, sample: (
        static, np.repeat(dynamic[:, None], 4, axis=1)))
    split = cdsvae.Split(np.zeros((6, 4, 2), np.float32), {"speaker": speakers})
    data = cdsvae.Dataset("fsdd", split, split, {"speaker": "static"}, {"speaker": ["a", "b", "c"]})
    result = cdsvae.speaker_verification(None, data, "cpu")
    scores, same = [], []
    for i in range(6):
        for j in range(i + 1, 6):
            u, v = dynamic[i], dynamic[j]
            scores.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
            same.append(speakers[i] == speakers[j])
    assert result["pairs"] == 15 and result["eer_s"] == 0.0
    assert result["eer_z"] == pytest.approx(cdsvae.eer(scores, same))
    sampled = cdsvae.speaker_verification(None, data, "cpu", max_pairs=10)    # random pairs, never a self-pair
    assert sampled["pairs"] <= 10 and sampled["eer_s"] == 0.0
