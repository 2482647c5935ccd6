"""Does ``torch.compile`` pay on CPU? One process: the eager training step, then the compiled one.

The step is the full ``CDSVAE.forward`` + backward + Adam of ``cdsvae train``, at the settings of
``--scale cpu`` for Sprites 32x32 (``--config`` picks another preset/scale). Compilation happens
in the first compiled steps, and its time counts: the report gives the compile seconds (the
first compiled step minus a steady one), the steady seconds per step of both, and how many steps
each fits in a ``--budget``-minute run at these measured rates.

    python bench/compile_cpu.py                   # one thread: what one core of a study gets
    python bench/compile_cpu.py --threads 2
    python bench/compile_cpu.py --precision bf16  # the step under bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import cdsvae  # noqa: E402


def timed_step(net, optimizer, x, bf16: bool = False) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):   # as cdsvae train --precision bf16
        loss, _ = net(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sprites")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--frame-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=60.0, help="minutes of the run to compare")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the step under bf16 autocast, as --precision auto picks on a CPU with native bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {k: v for k, v in cdsvae.preset(args.dataset, args.scale).items() if k != "epochs"}
    channels = 1 if args.dataset == "sm-mnist" else 3
    cfg = cdsvae.Config(**settings, frame_shape=(channels, args.frame_size, args.frame_size), frames=args.frames)
    x = torch.rand(cfg.batch_size, args.frames, channels, args.frame_size, args.frame_size)
    rows, bf16 = {}, args.precision == "bf16"
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = cdsvae.CDSVAE(cfg).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        net = torch.compile(model) if name == "compiled" else model
        first = [timed_step(net, optimizer, x, bf16) for _ in range(3)]       # compilation happens here
        steady = sorted(timed_step(net, optimizer, x, bf16) for _ in range(args.steps))[args.steps // 2]
        overhead = max(0.0, sum(first) - 3 * steady)
        rows[name] = {"step": name, "seconds_per_step": round(steady, 4), "first_three_steps_s": round(sum(first), 2),
                      "compile_s": round(overhead, 2),
                      f"steps_in_{args.budget:g}_min": int(max(0.0, 60 * args.budget - overhead) / steady)}
        print(json.dumps(rows[name]), flush=True)
    print(json.dumps({"speedup_per_step": round(rows["eager"]["seconds_per_step"] / rows["compiled"]["seconds_per_step"], 3),
                      "config": f"{args.dataset} --scale {args.scale}, {args.frame_size}x{args.frame_size}, batch {cfg.batch_size}",
                      "threads": args.threads, "precision": args.precision, "machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
