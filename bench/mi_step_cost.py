"""What each MI term costs per training step: C-DSVAE's step beside DSVAE's and beside variants.

The preset's model for SM-MNIST (``--scale cpu``) on a batch of the real training sequences, one
model per variant, built side by side and stepped in turn (forward, backward, Adam) so that all see
the same machine state; the median of ``--rounds`` steps each, after two warm-up steps.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/mi_step_cost.py --data-dir MNIST

bench/RESULTS.md (twenty-first session): the motion view is about a third of C-DSVAE's step;
(twenty-second) the preset now computes it without gradient (``motion_grad=False``), a cheaper step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import cdsvae  # noqa: E402

VARIANTS = {"C-DSVAE (the preset)": {}, "DSVAE (mi off)": dict(mi="off"),
            "C-DSVAE without the motion view": dict(motion_aug=False),
            "C-DSVAE, I(z;x) along mean rollouts": dict(mi_rollout="mean"),
            "C-DSVAE, the motion view with gradient (the twenty-first session's preset)": dict(motion_grad=True),
            "C-DSVAE, glyphs read beside the others": dict(explain_away=True)}


def step_times(base: dict, variants: dict, x: torch.Tensor, rounds: int, seed: int = 0) -> dict:
    """Seconds per training step (median of ``rounds``) of each variant: ``base`` (Config
    fields) updated by the variant's."""
    runs = {}
    for name, change in variants.items():
        torch.manual_seed(seed)
        model = cdsvae.CDSVAE(cdsvae.Config(**{**base, **change}))
        runs[name] = (model, torch.optim.Adam(model.parameters(), 1e-3), [])

    def step(model, optimizer):
        loss, _ = model(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for model, optimizer, _ in runs.values():
        for _ in range(2):
            step(model, optimizer)
    for _ in range(rounds):
        for model, optimizer, times in runs.values():
            started = time.perf_counter()
            step(model, optimizer)
            times.append(time.perf_counter() - started)
    return {name: sorted(times)[len(times) // 2] for name, (_, _, times) in runs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of MNIST IDX files")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    try:
        data = cdsvae.load_dataset("sm-mnist", args.data_dir)
    except cdsvae.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    base = dict(cdsvae.preset("sm-mnist", "cpu"), frame_shape=data.frame_shape,
                frames=data.train.sequences.shape[1], dataset_size=len(data.train.sequences))
    x = cdsvae.to_frames(data.train.sequences[:args.batch_size], "cpu")
    times = step_times(base, VARIANTS, x, args.rounds)
    reference = times["DSVAE (mi off)"]
    print("| variant | s per step | against DSVAE |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f}× |")


if __name__ == "__main__":
    main()
