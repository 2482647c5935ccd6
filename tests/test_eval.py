"""The judge and the paper's evaluation protocol, end to end on small data."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cdsvae
from data_prep import shapes

runner = CliRunner()


def small_data():
    videos, labels = shapes.render(192, 0, size=16)
    test_videos, test_labels = shapes.render(48, 1, size=16)
    return cdsvae.Dataset("shapes", cdsvae.Split(videos, labels), cdsvae.Split(test_videos, test_labels),
                          shapes.KINDS, shapes.LABELS)


def evaluate_toy(monkeypatch, judge, videos, labels, encode, decode, static_dim, **options):
    """``evaluate`` with a stand-in model (``encode``, ``decode`` given as functions) on sequences
    that carry their labels in pixels; generation samples zeros for the missing factor."""
    class Model(torch.nn.Module):
        cfg = cdsvae.Config(frame_shape=(1, 16, 16))

        def encode(self, x, sample=False, generator=None, refine_steps=None):   # the means, as evaluate asks
            means = encode(x)
            return SimpleNamespace(static=means.static_mean, dynamic=means.dynamic_mean)

        def decode(self, static, dynamic):
            return decode(static, dynamic)

    split = cdsvae.Split(videos, labels)
    toy = cdsvae.Dataset("toy", split, split, judge.kinds, judge.classes)
    monkeypatch.setattr(cdsvae, "to_frames", lambda seq, device: torch.as_tensor(np.array(seq)).permute(0, 1, 4, 2, 3))
    def generate(model, static=None, dynamic=None, batch=1, frames=None, generator=None):
        batch = static.shape[0] if static is not None else dynamic.shape[0] if dynamic is not None else batch
        return model.decode(static if static is not None else torch.zeros(batch, static_dim),
                            dynamic if dynamic is not None else torch.zeros(batch, frames or 3, 1))
    monkeypatch.setattr(cdsvae, "generate", generate)
    return cdsvae.evaluate(Model(), judge, toy, "cpu", **options)


def colour_direction_judge():
    """A perfect judge: each frame carries its colour in pixel (0, 6), its direction in (0, 7)."""
    class Oracle(torch.nn.Module):
        def forward(self, x):
            pixels = x[:, 0, 0, 0].long()
            return {"colour": torch.nn.functional.one_hot(pixels[:, 6], 6).float() * 50,
                    "direction": torch.nn.functional.one_hot(pixels[:, 7], 2).float() * 50}

    judge = Oracle()
    judge.classes = {"colour": shapes.COLOURS, "direction": shapes.DIRECTIONS}
    judge.kinds = {"colour": "static", "direction": "dynamic"}
    judge.eval = lambda: judge
    return judge


def colour_direction_means(x):
    """The posterior means of a stand-in model for ``colour_direction_judge``'s sequences."""
    return SimpleNamespace(static_mean=x[:, 0, 0, 0, 6:7], dynamic_mean=x[:, :, 0, 0, 7:8])


def test_judge_learns_the_shapes_factors_and_eval_reports_the_protocol(tmp_path):
    data = small_data()
    accuracy = cdsvae.train_judge(data, "cpu", epochs=40, out=tmp_path / "judge.pt", show_progress=False)
    assert set(accuracy) == {"shape", "colour", "large_side", "direction"}
    assert accuracy["colour"] > 0.9 and accuracy["direction"] > 0.9     # easy factors, real learning
    judge = cdsvae.load_judge(tmp_path / "judge.pt", factors=data.test.labels)
    assert judge.kinds["direction"] == "dynamic"
    cdsvae.expect_same_frames(data, judge=judge)                          # the data it was trained on
    with pytest.raises(cdsvae.UserError, match=r"frames \(3, 32, 32\) of the data, \(3, 16, 16\) of the judge"):
        cdsvae.expect_same_frames(SimpleNamespace(frame_shape=(3, 32, 32)), judge=judge)

    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), static_dim=4, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4)
    model = cdsvae.CDSVAE(cfg)
    report = cdsvae.evaluate(model, judge, data, "cpu", repeat=2)
    assert report["rounds"] == 2
    assert set(report["results"]) == {"fixed_dynamic/direction", "fixed_static/shape", "fixed_static/colour",
                                      "fixed_static/large_side", "swap/shape", "swap/colour",
                                      "swap/large_side", "swap/direction"}
    for metrics in report["results"].values():
        assert 0 <= metrics["acc"]["mean"] <= 1 and metrics["is"]["mean"] >= 1 - 1e-6
        assert metrics["h_yx"]["mean"] >= 0 and metrics["acc"]["std"] >= 0
    # IS = exp E_x KL(p(y|x) || p(y)) = exp(H(y) - H(y|x)) over the same generations, and
    # H(y) <= log(classes): a slip in any of the three metrics breaks one of these
    single = cdsvae.evaluate(model, judge, data, "cpu", repeat=1)
    for key, metrics in single["results"].items():
        classes = len(judge.classes[key.split("/")[1]])
        h_y, h_yx, score = (metrics[m]["mean"] for m in ("h_y", "h_yx", "is"))
        assert math.log(score) == pytest.approx(h_y - h_yx, abs=1e-6), key
        assert h_y <= math.log(classes) + 1e-9 and score <= classes + 1e-9, key
    assert "| fixed_dynamic/direction |" in cdsvae.evaluation_table(report)
    # the sampled protocol: every factor of sequences drawn from both priors, with its own
    # generator, so the fixed-factor protocols draw what they drew without it
    assert set(report["sampled"]) == set(judge.classes)
    without = cdsvae.evaluate(model, judge, data, "cpu", repeat=1, sampled=False)
    assert without["results"] == single["results"] and "sampled" not in without
    assert "| sampled/shape | - |" in cdsvae.evaluation_table(single)
    generator = torch.Generator().manual_seed(cdsvae.SAMPLED_SEED)    # round 0 of seed 0: one batch here
    with torch.no_grad():
        frames = model.decode(cdsvae.sample_static(model, 48, generator),
                              cdsvae.sample_dynamic(model, 48, cfg.frames, generator))
        direct = cdsvae.judge_probabilities(judge, frames)
    for factor, p in direct.items():
        assert single["sampled"][factor]["is"]["mean"] == pytest.approx(cdsvae.inception_score(p), rel=1e-6)
        assert single["sampled"][factor]["h_yx"]["mean"] == pytest.approx(cdsvae.entropy_yx(p), abs=1e-6)
        assert single["sampled"][factor]["h_y"]["mean"] == pytest.approx(cdsvae.entropy_y(p), abs=1e-6)
    # each protocol has a generator of its own: with s drawn from a fitted mixture (which takes
    # other random numbers than N(0, I)) the fixed-dynamic generations change, and the fixed-static
    # ones (z ~ p(z)) and the swaps stay exactly as they were
    model.fitted_prior = cdsvae.Mixture(means=torch.full((2, cfg.static_dim), 3.0), logvars=torch.zeros(2, cfg.static_dim),
                                        logits=torch.zeros(2))
    fitted = cdsvae.evaluate(model, judge, data, "cpu", repeat=1, sampled=False)
    for key, metrics in single["results"].items():
        assert (fitted["results"][key] == metrics) != key.startswith("fixed_dynamic/"), key
    assert fitted["all_static"] == single["all_static"]
    # z_1 from a fitted mixture: the fixed-static generations change, the rest stays
    model.fitted_prior = None
    model.fitted_first_step = cdsvae.Mixture(means=torch.full((2, cfg.dynamic_dim), 3.0),
                                             logvars=torch.zeros(2, cfg.dynamic_dim), logits=torch.zeros(2))
    fitted = cdsvae.evaluate(model, judge, data, "cpu", repeat=1, sampled=False)
    for key, metrics in single["results"].items():
        assert (fitted["results"][key] == metrics) != key.startswith("fixed_static/"), key


def test_sampled_protocol_scores_what_the_priors_draw(monkeypatch):
    """A stand-in whose prior draws show colours 0, 1, 2 in turn and always direction 1: a perfect
    judge then finds H(y|x) 0, H(y) log 3 and IS 3 for the colour, and IS 1 for the direction."""
    def decode(static, dynamic):
        frames = torch.zeros(static.shape[0], dynamic.shape[1], 1, 16, 16)
        drawn_from_prior = not static.any() and not dynamic.any()       # the stand-in's priors draw zeros
        frames[:, :, 0, 0, 6] = (torch.arange(static.shape[0]) % 3)[:, None] if drawn_from_prior else static[:, :1]
        frames[:, :, 0, 0, 7] = 1.0 if drawn_from_prior else dynamic[..., 0]
        return frames

    n = 30
    videos = np.zeros((n, 3, 16, 16, 1), np.float32)
    labels = {"colour": np.arange(n) % 6, "direction": np.arange(n) % 2}
    videos[:, :, 0, 6, 0], videos[:, :, 0, 7, 0] = labels["colour"][:, None], labels["direction"][:, None]
    report = evaluate_toy(monkeypatch, colour_direction_judge(), videos, labels, colour_direction_means, decode, 1,
                          repeat=2)
    colour, direction = report["sampled"]["colour"], report["sampled"]["direction"]
    assert colour["h_yx"]["mean"] == pytest.approx(0.0, abs=1e-6) and colour["h_y"]["mean"] == pytest.approx(math.log(3))
    assert colour["is"] == {"mean": pytest.approx(3.0), "std": pytest.approx(0.0, abs=1e-9)}
    assert direction["is"]["mean"] == pytest.approx(1.0) and direction["h_y"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert "| sampled/colour | - | 3.000 ± 0.000 | 0.000 ± 0.000 | 1.099 ± 0.000 |" in cdsvae.evaluation_table(report)


def test_swap_accuracy_of_a_judge_is_checked_against_the_right_sources(monkeypatch):
    """With a 'model' whose decode returns the static source's frames for the static factors and
    the dynamic source's for the dynamic ones, the swap accuracy is that of the judge itself."""
    def decode(static, dynamic):
        frames = torch.zeros(static.shape[0], dynamic.shape[1], 1, 16, 16)
        frames[:, :, 0, 0, 6] = static[:, :1]
        frames[:, :, 0, 0, 7] = dynamic[..., 0]
        return frames

    # sequences that carry their own labels in two pixels
    n = 40
    colour, direction = np.arange(n) % 6, (np.arange(n) // 3) % 2
    videos = np.zeros((n, 3, 16, 16, 1), np.float32)
    videos[:, :, 0, 6, 0], videos[:, :, 0, 7, 0] = colour[:, None], direction[:, None]
    report = evaluate_toy(monkeypatch, colour_direction_judge(), videos, {"colour": colour, "direction": direction},
                          colour_direction_means, decode, 1)
    assert report["results"]["swap/colour"]["acc"]["mean"] == 1.0
    assert report["results"]["swap/direction"]["acc"]["mean"] == 1.0
    assert report["results"]["fixed_dynamic/direction"]["acc"]["mean"] == 1.0
    # direction is 21 vs 19 sequences; IS and the entropies come from 19 of each (class-balanced),
    # so a perfect judge gives H(y) = log 2 exactly (over all 40 it would be 0.6919).
    assert abs(report["results"]["fixed_dynamic/direction"]["h_y"]["mean"] - np.log(2)) < 1e-6
    assert abs(report["results"]["fixed_dynamic/direction"]["is"]["mean"] - 2.0) < 1e-6


def test_the_judge_trains_on_a_fresh_training_split_each_epoch_when_the_data_can_draw_one(tmp_path):
    data = small_data()
    seeds = []

    def resample(seed):
        seeds.append(seed)
        videos, labels = shapes.render(len(data.train.sequences), seed, size=16)
        return cdsvae.Split(videos, labels)
    data.resample_train = resample
    cdsvae.train_judge(data, "cpu", epochs=3, out=tmp_path / "judge.pt", show_progress=False)
    assert len(seeds) == 2 and len(set(seeds)) == 2 and 1 not in seeds   # new draws, never the test seed


def test_eval_cli_writes_json_and_rejects_a_bad_judge(tmp_path):
    data_args = ["--frame-size", "16"]
    result = runner.invoke(cdsvae.app, ["judge", *data_args, "--epochs", "1", "-o", str(tmp_path / "j.pt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), frames=8, static_dim=4, dynamic_dim=2, feature_dim=8,
                        hidden_dim=8, conv_width=4)
    cdsvae.save_checkpoint(cdsvae.CDSVAE(cfg), tmp_path / "m.pt")
    result = runner.invoke(cdsvae.app, ["eval", "--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "j.pt"),
                                        *data_args, "-o", str(tmp_path / "report.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"] == 1 and report["refine_steps"] == 0
    result = runner.invoke(cdsvae.app, ["eval", "--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "j.pt"),
                                        *data_args, "--refine-steps", "2", "-o", str(tmp_path / "refined.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    refined = json.loads((tmp_path / "refined.json").read_text())
    assert refined["refine_steps"] == 2 and refined["results"] != report["results"]
    result = runner.invoke(cdsvae.app, ["eval", "--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "j.pt"),
                                        *data_args, "--refine-steps", "-1", "-o", str(tmp_path / "bad.json"), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error: --refine-steps must be 0 or more, got -1")
    assert not (tmp_path / "bad.json").exists()
    result = runner.invoke(cdsvae.app, ["eval", "--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "m.pt"),
                                        *data_args, "--device", "cpu"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "not a cdsvae judge" in result.output
    # a judge of other factors (the shapes judge with its colour head renamed skin): one line, not a KeyError
    payload = torch.load(tmp_path / "j.pt", weights_only=True)
    rename = lambda name: name.replace("colour", "skin")  # noqa: E731
    payload["classes"] = {rename(f): names for f, names in payload["classes"].items()}
    payload["kinds"] = {rename(f): kind for f, kind in payload["kinds"].items()}
    payload["state_dict"] = {rename(k): v for k, v in payload["state_dict"].items()}
    torch.save(payload, tmp_path / "other.pt")
    result = runner.invoke(cdsvae.app, ["eval", "--ckpt", str(tmp_path / "m.pt"), "--judge", str(tmp_path / "other.pt"),
                                        *data_args, "--device", "cpu", "-o", str(tmp_path / "other.json")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "the data has no skin; expected a judge trained on this data" in result.output
    assert not (tmp_path / "other.json").exists()


def test_all_static_accuracy_counts_generations_with_every_static_factor_right(monkeypatch):
    """Two static factors, each drawn wrong for a different, overlapping set of sequences: the
    joint accuracy is the share right on both (not the product or the minimum of the two)."""
    class Oracle(torch.nn.Module):
        """A perfect judge: colour in pixel (0, 5), shape in (0, 6), direction in (0, 7)."""

        def forward(self, x):
            pixels = x[:, 0, 0, 0].long()
            one_hot = torch.nn.functional.one_hot
            return {"colour": one_hot(pixels[:, 5], 6).float() * 50, "shape": one_hot(pixels[:, 6], 4).float() * 50,
                    "direction": one_hot(pixels[:, 7], 2).float() * 50}

    judge = Oracle()
    judge.classes = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "direction": shapes.DIRECTIONS}
    judge.kinds = {"colour": "static", "shape": "static", "direction": "dynamic"}
    judge.eval = lambda: judge

    def encode(x):                                   # s: index, colour, shape
        return SimpleNamespace(static_mean=x[:, 0, 0, 0, 4:7], dynamic_mean=x[:, :, 0, 0, 7:8])

    def decode(static, dynamic):
        """Draws the colour wrong for sequences 0-9 and the shape wrong for 5-16."""
        index = static[:, 0]
        frames = torch.zeros(static.shape[0], dynamic.shape[1], 1, 16, 16)
        frames[:, :, 0, 0, 5] = ((static[:, 1] + (index < 10).float()) % 6)[:, None]
        frames[:, :, 0, 0, 6] = ((static[:, 2] + ((index >= 5) & (index < 17)).float()) % 3)[:, None]
        frames[:, :, 0, 0, 7] = dynamic[..., 0]
        return frames

    n = 40
    colour, shape, direction = np.arange(n) % 6, (np.arange(n) // 2) % 3, (np.arange(n) // 3) % 2
    videos = np.zeros((n, 3, 16, 16, 1), np.float32)
    videos[:, :, 0, 4, 0], videos[:, :, 0, 5, 0] = np.arange(n)[:, None], colour[:, None]
    videos[:, :, 0, 6, 0], videos[:, :, 0, 7, 0] = shape[:, None], direction[:, None]
    labels = {"colour": colour, "shape": shape, "direction": direction}
    report = evaluate_toy(monkeypatch, judge, videos, labels, encode, decode, 3, repeat=2)
    assert report["results"]["fixed_static/colour"]["acc"]["mean"] == 30 / 40
    assert report["results"]["fixed_static/shape"]["acc"]["mean"] == 28 / 40
    for name in ("fixed_static", "swap"):            # sequences 0-16 have a factor wrong
        assert report["all_static"][name] == {"mean": 23 / 40, "std": 0.0}
    assert "fixed_dynamic" not in report["all_static"]
    assert "| fixed_static/all static factors right | 0.575 ± 0.000 | | | |" in cdsvae.evaluation_table(report)
