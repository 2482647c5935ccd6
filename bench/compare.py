"""C-DSVAE vs the DSVAE baseline (MI terms off) on one dataset, at the same budget.

    python bench/compare.py sm-mnist --data-dir ../shared/data/mnist --out runs/compare_sm_mnist
    python bench/compare.py fsdd --data-dir runs/fsdd --out runs/compare_fsdd   # after cdsvae prepare

Both models use the dataset's preset (``cdsvae.PRESETS``), the same seed, data and number of
epochs. Prints a markdown table (latent probes on posterior samples and means; speaker
verification EERs for speech) and writes ``results.json`` to ``--out``.
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


def fmt(value):
    return "-" if value is None else f"{value:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    data = cdsvae.load_dataset(args.dataset, args.data_dir)
    epochs = args.epochs or cdsvae.PRESETS[data.name]["epochs"]
    results = {}
    for name, mi in (("C-DSVAE", "contrastive"), ("DSVAE", "off")):
        cfg = cdsvae.Config(**{**cdsvae.PRESETS[data.name], "epochs": epochs},
                            frame_shape=data.frame_shape, frames=data.train.sequences.shape[1], mi=mi)
        results[name] = cdsvae.train(cfg, data, args.out / name, args.device)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": results}, indent=2))

    first = next(iter(results.values()))
    print(f"{data.name}, {epochs} epochs, {machine}")
    if "probe" in first:
        chance = first["probe"]["chance"]
        print(f"\nchance: static {fmt(chance['static'])}, dynamic {fmt(chance['dynamic'])}\n")
        print("| model | probe on | " + " | ".join(KEYS) + " | train s |")
        print("|---|---|" + "---|" * (len(KEYS) + 1))
        for name, summary in results.items():
            for block, label in (("probe", "samples"), ("probe_posterior_means", "means")):
                values = " | ".join(fmt(summary[block][k]) for k in KEYS)
                print(f"| {name} | {label} | {values} | {summary['train_seconds']:.0f} |")
    if "speaker_verification" in first:
        print("\n| model | EER of s (low is good) | EER of z (high is good) | pairs |\n|---|---|---|---|")
        for name, summary in results.items():
            sv = summary["speaker_verification"]
            print(f"| {name} | {sv['eer_s']:.3f} | {sv['eer_z']:.3f} | {sv['pairs']} |")


if __name__ == "__main__":
    main()
