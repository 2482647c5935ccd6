"""What the prior's draws of s show, beside draws from a density fitted to the training split's s.

``cdsvae sample`` draws s ~ p(s) = N(0, I) (eq. 1). Where the training sequences' posteriors
cover that Gaussian unevenly (clusters, one per kind of content, with gaps between them), many
draws land between clusters and decode to something the judge cannot name. This diagnostic
scores, with a judge, sequences whose z_1:T comes from its prior and whose s comes from

- ``prior``: what ``cdsvae sample`` and ``eval``'s sampled protocol draw: N(0, I), with
  ``--static-prior K`` its learned mixture, or the mixture ``cdsvae fit-prior`` stored;
- ``prior at t``: N(0, t^2 I), the paper's prior drawn cooler (``--temperatures``);
- ``fitted K``: a mixture of K diagonal Gaussians fitted ex post to the posterior means of s of
  the training split (Ghosh et al. 2020's ex-post density estimation), as ``cdsvae fit-prior``
  fits it (``cdsvae.fit_priors``: with glyphs, to each glyph's part of s); K 1 is a single
  Gaussian with the means' own mean and spread.

Per static and dynamic factor: IS, H(y|x), H(y) of the judge's predictions, and the share of
draws whose every static factor the judge names with probability over 0.9. For video, also how
far each draw's centre of mass moves from the first frame to the last (pixels, horizontally),
beside the test split's own sequences. Diagnostic only: the model and ``sample`` are unchanged.

    python bench/prior_draws.py --ckpt RUN/last.pt --judge J [--data sm-mnist --data-dir MNIST] \
        [--components 1 10 50] [--temperatures 0.8] [--count 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdsvae  # noqa: E402


def horizontal_travel(frames: torch.Tensor) -> torch.Tensor:
    """(N,): how far the centre of mass of each sequence's frames (N, T, C, H, W) moves
    horizontally from the first frame to the last, in pixels."""
    mass = frames.float().sum(2)                                                    # (N, T, H, W)
    columns = torch.arange(mass.shape[-1], dtype=mass.dtype) + 0.5
    x = (mass.sum(2) * columns).sum(-1) / mass.sum((2, 3)).clamp_min(1e-6)          # (N, T)
    return (x[:, -1] - x[:, 0]).abs()


def judged(judge, frames: torch.Tensor, batch_size: int = 250) -> dict:
    """The judge's metrics of ``frames``: per factor (IS, H(y|x), H(y)) and ``sure``, the share
    whose every static factor the judge names with probability over 0.9."""
    batches = [cdsvae.judge_probabilities(judge, frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)]
    probabilities = {f: np.concatenate([b[f] for b in batches]) for f in judge.classes}
    row = {f: (cdsvae.inception_score(p), cdsvae.entropy_yx(p), cdsvae.entropy_y(p)) for f, p in probabilities.items()}
    static = [p.max(1) > 0.9 for f, p in probabilities.items() if judge.kinds[f] == "static"]
    row["sure"] = float(np.all(static, axis=0).mean()) if static else float("nan")
    return row


@torch.no_grad()
def prior_draws(model, judge, train_sequences, count: int, components, seed: int = 0, batch_size: int = 250,
                temperatures=()) -> dict:
    """Per source of s ("prior", "prior at t", "fitted K"): ``judged`` metrics of ``count``
    decoded draws (z_1:T from its prior) and, for video, their horizontal travel."""
    model.eval()
    sources = {"prior": ("prior", None), **{f"prior at {t:g}": ("cooler", float(t)) for t in temperatures}}
    sources.update({f"fitted {k}": ("fitted", cdsvae.fit_priors(model, train_sequences, k, "cpu", seed,
                                                                       first_step=False)[0])
                    for k in components})
    rows = {}
    for name, (kind, parameters) in sources.items():
        generator = torch.Generator().manual_seed(seed)
        if kind == "prior":
            static = cdsvae.sample_static(model, count, generator)
        elif kind == "cooler":
            static = parameters * torch.randn(count, model.cfg.static_dim, generator=generator)
        else:
            static = cdsvae.mixture_sample(parameters, model.cfg.static_parts, count, generator)
        dynamic = cdsvae.sample_dynamic(model, count, model.cfg.frames, generator)
        frames = torch.cat([model.decode(static[i:i + batch_size], dynamic[i:i + batch_size])
                            for i in range(0, count, batch_size)])
        rows[name] = judged(judge, frames)
        if model.cfg.is_video:
            rows[name]["travel"] = horizontal_travel(frames)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--judge", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--components", type=int, nargs="*", default=[1, 10, 50])
    parser.add_argument("--temperatures", type=float, nargs="*", default=[])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = cdsvae.load_checkpoint(args.ckpt)
    data = cdsvae.load_dataset(args.data, args.data_dir, size=model.cfg.frame_shape[-1], seed=model.cfg.seed)
    judge = cdsvae.load_judge(args.judge, factors=data.kinds)
    cdsvae.expect_same_frames(data, model, judge)
    rows = prior_draws(model, judge, data.train.sequences, args.count, args.components, args.seed,
                       temperatures=args.temperatures)
    factors = list(judge.classes)
    print("| s from | " + " | ".join(f"{f}: IS / H(y|x) / H(y)" for f in factors)
          + " | every static factor named (p > 0.9) | travel, px: median (share under half the test split's median) |")
    print("|---|" + "---|" * (len(factors) + 2))
    real_median = None
    if model.cfg.is_video:
        real = horizontal_travel(cdsvae.to_frames(data.test.sequences, "cpu"))
        real_median = float(real.median())
        test_row = judged(judge, cdsvae.to_frames(data.test.sequences, "cpu"))
        rows = {"the test split (real)": {**test_row, "travel": real}, **rows}
    for name, row in rows.items():
        travel = row.get("travel")
        moved = (f"{float(travel.median()):.1f} ({float((travel < real_median / 2).float().mean()):.3f})"
                 if travel is not None else "-")
        print(f"| {name} | " + " | ".join("{:.2f} / {:.3f} / {:.3f}".format(*row[f]) for f in factors)
              + f" | {row['sure']:.3f} | {moved} |", flush=True)


if __name__ == "__main__":
    main()
