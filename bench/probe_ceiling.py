"""What the package's probe can read from an order-free pair of glyph codes, however clean.

With ``--glyphs 2`` s is two parts, one per digit, in no fixed order, and ``cdsvae.probe`` reads
``digit_low`` and ``digit_high`` from it with one MLP of one hidden layer per label. This
diagnostic feeds that probe synthetic s of the same layout whose cleanness is known: each part is
its digit's centre (a fixed draw of N(0, I), ``--part-dim`` numbers) plus sigma times N(0, I)
noise, the two parts in random order, the digits drawn uniformly. For each sigma it prints the
package's probe (s_static: the mean over the two labels) beside the set probes of
``bench/set_probe.py`` (one classifier shared by the parts, linear or of one hidden layer of 128:
how cleanly each part holds its digit), the quantities that script measures on a model's s. So a
model's set probes say where the package's probe can be expected on codes that clean.

    python bench/probe_ceiling.py [--sigmas 0 1 1.5 2] [--part-dim 32] [--train 7000 --test 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

import cdsvae  # noqa: E402   (before this folder is on the path: bench/kernels.py would shadow the kernels package)

sys.path.append(str(Path(__file__).resolve().parent))
from set_probe import set_probe_accuracy  # noqa: E402   (beside this file)


def synthetic_pairs(count: int, sigma: float, centres: np.ndarray, rng: np.random.Generator):
    """``count`` order-free pairs: s (count, 2 D) as two parts centre[digit] + sigma N(0, I) in
    random order, and the labels (digit_low, digit_high)."""
    digits = rng.integers(0, len(centres), size=(count, 2))
    parts = centres[digits] + sigma * rng.standard_normal((count, 2, centres.shape[1]))
    return parts.reshape(count, -1).astype(np.float32), digits.min(1), digits.max(1)


def ceiling(sigma: float, part_dim: int = 32, train: int = 7000, test: int = 2000, seed: int = 0) -> dict:
    """The package's probe and both set probes (linear, one hidden layer) on synthetic pairs at ``sigma``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, part_dim))
    train_s, train_low, train_high = synthetic_pairs(train, sigma, centres, rng)
    test_s, test_low, test_high = synthetic_pairs(test, sigma, centres, rng)
    low = cdsvae.probe_accuracy(train_s, train_low, test_s, test_low, 10)
    high = cdsvae.probe_accuracy(train_s, train_high, test_s, test_high, 10)
    linear = set_probe_accuracy(train_s, train_low, train_high, test_s, test_low, test_high, hidden=0)
    shared = set_probe_accuracy(train_s, train_low, train_high, test_s, test_low, test_high)
    return {"sigma": sigma, "probe_low": low, "probe_high": high, "s_static": (low + high) / 2,
            "linear_per_part": linear["s_static"], "set_probe": shared["s_static"], "set_probe_both": shared["both"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5])
    parser.add_argument("--part-dim", type=int, default=32)
    parser.add_argument("--train", type=int, default=7000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| sigma | linear set probe: s_static | set probe: s_static (both right) | package's probe: s_static (low / high) |")
    print("|---|---|---|---|")
    for sigma in args.sigmas:
        row = ceiling(sigma, args.part_dim, args.train, args.test, args.seed)
        print(f"| {sigma:g} | {row['linear_per_part']:.3f} | {row['set_probe']:.3f} ({100 * row['set_probe_both']:.1f}%) | {row['s_static']:.3f} "
              f"({row['probe_low']:.3f} / {row['probe_high']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
