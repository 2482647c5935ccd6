"""Each Triton kernel against eager PyTorch and torch.compile, forward + backward.

    python bench/kernels.py                 # on a GPU: triton.testing.do_bench timings
    python bench/kernels.py --dry-run       # anywhere: tiny sizes, checks the script runs

- lstm_sample: the fused T-step rollout vs an eager loop of nn.LSTMCell + nn.Linear + sampling
  (the way one writes it in PyTorch) and vs torch.compile of that loop; B = 128, H = 256,
  latent 32, input projection precomputed; T = 8 and 15.
- infonce: the tiled symmetric InfoNCE vs eager matmul + logsumexp (cdsvae.contrastive_mi) and
  vs torch.compile of it; D = 256, B = 128, 4096 and (fused only) 16384.

Prints one JSON line per case: milliseconds per forward + backward, speedups, achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# This file is named like the project's ``kernels`` package: keep its own folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton is first imported

import cdsvae  # noqa: E402


class EagerRollout(nn.Module):
    """The dynamic posterior as one would write it in eager PyTorch."""

    def __init__(self, hidden, latent):
        super().__init__()
        self.cell = nn.LSTMCell(latent, hidden)     # gets [z_{t-1}] on top of the precomputed gates
        self.head = nn.Linear(hidden, 2 * latent)

    def forward(self, input_gates, eps):
        batch, frames, _ = input_gates.shape
        latent = self.head.out_features // 2
        z = input_gates.new_zeros(batch, latent)
        h = c = input_gates.new_zeros(batch, self.cell.hidden_size)
        outputs = []
        for t in range(frames):
            gates = input_gates[:, t] + z @ self.cell.weight_ih.T + h @ self.cell.weight_hh.T
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            mean, logvar = self.head(h).chunk(2, 1)
            z = mean + torch.exp(0.5 * logvar) * eps[:, t]
            outputs.append(z)
        return torch.stack(outputs, 1)


def timer(dry_run):
    if dry_run:
        def measure(fn):
            fn()
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3
        return measure
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200)


def forward_backward(fn, inputs):
    def run():
        out = fn()
        loss = out.sum() if out.dim() else out
        torch.autograd.grad(loss, inputs, allow_unused=True)
    return run


def bench_lstm(measure, device, dry_run):
    from kernels.lstm_sample import lstm_sample_rollout

    batch, hidden, latent = (3, 16, 4) if dry_run else (128, 256, 32)
    for frames in (8, 15):
        torch.manual_seed(0)
        eager = EagerRollout(hidden, latent).to(device)
        compiled = eager if dry_run else torch.compile(eager)
        input_gates = torch.randn(batch, frames, 4 * hidden, device=device, requires_grad=True)
        eps = torch.randn(batch, frames, latent, device=device)
        recurrent = torch.cat([eager.cell.weight_ih, eager.cell.weight_hh], 1).detach().requires_grad_()
        head_w = eager.head.weight.detach().clone().requires_grad_()
        head_b = eager.head.bias.detach().clone().requires_grad_()
        params = [input_gates, recurrent, head_w, head_b]
        fused_ms = measure(forward_backward(
            lambda: lstm_sample_rollout(input_gates, recurrent, head_w, head_b, eps)[0], params))
        eager_params = [input_gates, *eager.parameters()]
        eager_ms = measure(forward_backward(lambda: eager(input_gates, eps), eager_params))
        compiled_ms = measure(forward_backward(lambda: compiled(input_gates, eps), eager_params))
        flops = 3 * frames * batch * (2 * 4 * hidden * (latent + hidden) + 2 * 2 * latent * hidden)
        print(json.dumps({"kernel": "lstm_sample", "B": batch, "H": hidden, "latent": latent, "T": frames,
                          "fused_ms": round(fused_ms, 4), "eager_ms": round(eager_ms, 4),
                          "compile_ms": round(compiled_ms, 4),
                          "speedup_vs_eager": round(eager_ms / fused_ms, 2),
                          "speedup_vs_compile": round(compiled_ms / fused_ms, 2),
                          "fused_tflops": round(flops / fused_ms / 1e9, 3)}))


def bench_infonce(measure, device, dry_run):
    from kernels.infonce import contrastive_mi as fused_mi

    dim = 16 if dry_run else 256
    compiled_mi = cdsvae.contrastive_mi if dry_run else torch.compile(cdsvae.contrastive_mi)
    for batch in ((4, 9) if dry_run else (128, 4096, 16384)):
        torch.manual_seed(0)
        anchor = torch.randn(batch, dim, device=device, requires_grad=True)
        positive = torch.randn(batch, dim, device=device, requires_grad=True)
        inputs = [anchor, positive]
        fused_ms = measure(forward_backward(lambda: fused_mi(anchor, positive, 0.5), inputs))
        rows = 2 * batch
        flops = 3 * 2 * rows * rows * dim             # forward, and a backward of two passes
        record = {"kernel": "infonce", "B": batch, "D": dim, "fused_ms": round(fused_ms, 4),
                  "fused_tflops": round(flops / fused_ms / 1e9, 3)}
        if batch <= 4096:  # eager holds the 2B x 2B matrix; past that, only the fused kernel runs
            eager_ms = measure(forward_backward(lambda: cdsvae.contrastive_mi(anchor, positive, 0.5), inputs))
            compiled_ms = measure(forward_backward(lambda: compiled_mi(anchor, positive, 0.5), inputs))
            record.update(eager_ms=round(eager_ms, 4), compile_ms=round(compiled_ms, 4),
                          speedup_vs_eager=round(eager_ms / fused_ms, 2),
                          speedup_vs_compile=round(compiled_ms / fused_ms, 2))
        print(json.dumps(record))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU interpreter allowed")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (or --dry-run)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                      "torch": torch.__version__}))
    measure = timer(args.dry_run)
    bench_lstm(measure, device, args.dry_run)
    bench_infonce(measure, device, args.dry_run)


if __name__ == "__main__":
    main()
