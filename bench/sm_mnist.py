"""C-DSVAE vs the DSVAE baseline (MI terms off) on Stochastic Moving MNIST, same budget.

    python bench/sm_mnist.py --data-dir ../shared/data/mnist --epochs 10 --out runs/bench_sm_mnist

Both models use the ``sm-mnist`` preset (32x32 frames, 15 frames; see ``cdsvae.PRESETS``), the
same seed, data and number of epochs. Prints a markdown table of the latent probes (posterior
samples, and posterior means) and writes ``results.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

# bench/kernels.py shares its name with the project's ``kernels`` package: keep bench/ off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import cdsvae  # noqa: E402

KEYS = ("s_static", "s_dynamic", "z_static", "z_dynamic")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=cdsvae.PRESETS["sm-mnist"]["epochs"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_sm_mnist"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    data = cdsvae.load_dataset("sm-mnist", args.data_dir)
    results = {}
    for name, mi in (("C-DSVAE", "contrastive"), ("DSVAE", "off")):
        cfg = cdsvae.Config(**{**cdsvae.PRESETS["sm-mnist"], "epochs": args.epochs},
                            frame_shape=data.frame_shape, frames=data.train.sequences.shape[1], mi=mi)
        results[name] = cdsvae.train(cfg, data, args.out / name, args.device)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": results}, indent=2))

    chance = next(iter(results.values()))["probe"]["chance"]
    print(f"SM-MNIST, {args.epochs} epochs, {machine}; chance: static {chance['static']:.3f}, "
          f"dynamic {chance['dynamic']:.3f}\n")
    print("| model | probe on | " + " | ".join(KEYS) + " | train s |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    for name, summary in results.items():
        for block, label in (("probe", "samples"), ("probe_posterior_means", "means")):
            values = " | ".join(f"{summary[block][k]:.3f}" for k in KEYS)
            print(f"| {name} | {label} | {values} | {summary['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
