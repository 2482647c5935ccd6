"""bench/diagnose.py: the static factor's swap errors split by the dynamic factor's match,
against a direct count over the same swaps; the static factor per z source against the
evaluation's own numbers."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cdsvae
from data_prep import shapes


def test_static_errors_by_dynamic_match_counts_each_kind_of_pair(load_bench):
    diagnose = load_bench("diagnose")
    rng = np.random.default_rng(0)
    count = 200
    skin, action = rng.integers(0, 6, count), rng.integers(0, 9, count)
    classes = ["spellcast-left", "spellcast-front", "spellcast-right", "walk-left", "walk-front",
               "walk-right", "slash-left", "slash-front", "slash-right"]
    data = SimpleNamespace(test=SimpleNamespace(labels={"skin": skin, "action": action}),
                           classes={"action": classes, "skin": [str(i) for i in range(6)]})
    partners, judged = rng.permutation(count), np.where(rng.random(count) < 0.3, (skin + 1) % 6, skin)
    report = diagnose.static_errors_by_dynamic_match((partners, {"skin": judged}), data, "skin", "action")

    def expected(keep):
        pairs = [i for i in range(count) if keep(i)]
        return {"pairs": len(pairs), "wrong": round(float(np.mean([judged[i] != skin[i] for i in pairs])), 4)}

    direction = [name.split("-")[1] for name in classes]
    kind = [name.split("-")[0] for name in classes]
    same = lambda i: action[i] == action[partners[i]]  # noqa: E731
    assert report["same action"] == expected(same)
    assert report["other action, part 0 shared"] == expected(
        lambda i: not same(i) and kind[action[i]] == kind[action[partners[i]]])
    assert report["other action, part 1 differs"] == expected(
        lambda i: direction[action[i]] != direction[action[partners[i]]])
    assert sum(report[f"other action, part 1 {k}"]["pairs"] for k in ("shared", "differs")) + \
        report["same action"]["pairs"] == count


def small_shapes_model():
    """64 shapes videos of 16x16 (the same as training and test split) and an untrained small model."""
    torch.manual_seed(0)
    videos, labels = shapes.render(64, 1, size=16)
    split = cdsvae.Split(videos, labels)
    data = cdsvae.Dataset("shapes", split, split, shapes.KINDS, shapes.LABELS)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), static_dim=4, dynamic_dim=2, feature_dim=8, hidden_dim=8,
                        conv_width=4)
    return videos, labels, data, cfg, cdsvae.CDSVAE(cfg).eval()


def test_static_by_dynamic_source_agrees_with_eval_and_counts_each_class(load_bench):
    diagnose = load_bench("diagnose")
    truth, judged = np.array([0, 0, 1, 1, 1, 3]), np.array([0, 1, 1, 1, 0, 3])
    assert diagnose.accuracy_by_class(judged, truth, ["a", "b", "c", "d"]) == \
        {"right": round(4 / 6, 4), "by class": {"a": 0.5, "b": round(2 / 3, 4), "d": 1.0}}

    videos, labels, data, cfg, model = small_shapes_model()
    judge = cdsvae.Judge(cfg, shapes.LABELS).eval()
    judge.kinds = dict(shapes.KINDS)
    report = diagnose.static_by_dynamic_source(model, judge, data, "colour", seed=3)
    evaluation = cdsvae.evaluate(model, judge, data, "cpu", repeat=1, seed=3)["results"]
    assert report["prior"]["right"] == round(evaluation["fixed_static/colour"]["acc"]["mean"], 4)
    assert report["another sequence's posterior"]["right"] == round(evaluation["swap/colour"]["acc"]["mean"], 4)
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"))
        own = judge(model.decode(encoding.static_mean, encoding.dynamic_mean))["colour"].argmax(1).numpy()
    assert report["own posterior"] == diagnose.accuracy_by_class(own, np.asarray(labels["colour"]), shapes.LABELS["colour"])
    assert report["own posterior"]["right"] == pytest.approx(np.mean(own == np.asarray(labels["colour"])), abs=1e-4)


def test_the_prior_from_another_sequences_first_step_is_the_prior_fed_that_z1(load_bench, monkeypatch):
    """The fourth z source of ``static_by_dynamic_source``: p(z_t | z_<t) fed another sequence's z_1
    (posterior mean) in place of its own first draw, recomputed here by teacher forcing (one step
    more each pass) with the same random stream; a stand-in judge that reads the frames' mean
    brightness, so any other trajectory shows in its classes."""
    diagnose = load_bench("diagnose")
    videos, labels, data, _, model = small_shapes_model()

    def brightness_judge(judge, frames):
        classes = (frames.mean(dim=(1, 2, 3, 4)) * 1e5).long() % len(shapes.LABELS["colour"])
        return {"colour": torch.nn.functional.one_hot(classes, len(shapes.LABELS["colour"])).double().numpy()}

    monkeypatch.setattr(cdsvae, "judge_probabilities", brightness_judge)
    monkeypatch.setattr(cdsvae, "judged_generations", lambda *args: (None, {"swap": {"colour": np.zeros((64, 6))},
                                                                           "fixed_static": {"colour": np.zeros((64, 6))}}))
    report = diagnose.static_by_dynamic_source(model, None, data, "colour", seed=3)
    generator = torch.Generator().manual_seed(3)
    other = torch.randperm(64, generator=generator)
    with torch.no_grad():
        encoding = model.encode(cdsvae.to_frames(videos, "cpu"))
        eps = torch.randn(encoding.dynamic_mean.shape, generator=generator)
        trajectory = encoding.dynamic_mean[other].clone()
        for t in range(1, trajectory.shape[1]):
            mean, logvar = model.dynamic_prior(trajectory)
            trajectory[:, t] = mean[:, t] + torch.exp(0.5 * logvar[:, t]) * eps[:, t]
        judged = brightness_judge(None, model.decode(encoding.static_mean, trajectory))["colour"].argmax(1)
        unlike = brightness_judge(None, model.decode(encoding.static_mean, encoding.dynamic_mean[other]))["colour"].argmax(1)
    truth = np.asarray(labels["colour"])
    assert report["prior from another sequence's z_1"] == diagnose.accuracy_by_class(judged, truth, shapes.LABELS["colour"])
    assert report["prior from another sequence's z_1"] != diagnose.accuracy_by_class(unlike, truth, shapes.LABELS["colour"])
