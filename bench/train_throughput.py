"""Sequences per second of one full optimisation step: ours vs a three-pass step.

Ours (``CDSVAE.forward``) encodes the frames of x and of the motion view in one pass, gets s of
the content view by re-running only the sequence model over permuted frame features, and never
decodes an augmented view. The three-pass step is what the released code does: the whole model
(encode, posterior, prior, decode) once for x, once for the content view and once for the motion
view, then the same objective, in plain PyTorch (``CDSVAE_REFERENCE=1``, no Triton kernels, as
the released code). Both steps compute the augmentations on the fly from the same functions,
both run forward + backward + Adam, both on the same model. On CUDA a third row, ``ours_reference``,
is our step without the Triton kernels, so the two sources of speed can be told apart.

    python bench/train_throughput.py                    # paper Sprites config, batch 32, CPU
    python bench/train_throughput.py --batch 128 --device cuda

Prints one JSON line per step kind and the ratios; run all in one process so they share the
machine's state. With bf16 available (CUDA, or a CPU with native bf16) an ``ours_bf16`` row runs
our step under bf16 autocast beside the fp32 one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

# bench/kernels.py shares its name with the project's ``kernels`` package: keep bench/ off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import cdsvae  # noqa: E402


def three_pass_loss(model: cdsvae.CDSVAE, x: torch.Tensor) -> torch.Tensor:
    """The straightforward step: the full model once per view (three encodes, three decodes)."""
    cfg = model.cfg
    B, T = x.shape[:2]
    order = cdsvae.content_order(B, T, device=x.device)
    content_view = torch.stack([x[b, order[b]] for b in range(B)])
    motion_view = cdsvae.motion_augment(x)

    def full_model(view):
        features = model.encode_frames(view)
        static_mean, static_logvar = model.static_posterior(features)
        static = cdsvae.reparameterize(static_mean, static_logvar, torch.randn_like(static_mean))
        eps = torch.randn(B, T, cfg.dynamic_dim, device=x.device)
        dynamic, dynamic_mean, dynamic_logvar = model.dynamic_posterior(features, eps)
        prior_mean, prior_logvar = model.dynamic_prior(dynamic)
        recon = model.decode(static, dynamic)
        return (static, static_mean, static_logvar, dynamic, dynamic_mean, dynamic_logvar,
                prior_mean, prior_logvar, recon)

    (static, static_mean, static_logvar, dynamic, dynamic_mean, dynamic_logvar,
     prior_mean, prior_logvar, recon) = full_model(x)
    static_content_mean = full_model(content_view)[1]
    motion_mean = full_model(motion_view)[4]
    recon_term = (recon - x).pow(2).sum() / B
    kl_s = cdsvae.gaussian_kl(static_mean, static_logvar, torch.zeros_like(static_mean),
                              torch.zeros_like(static_logvar)).sum() / B
    kl_z = cdsvae.gaussian_kl(dynamic_mean, dynamic_logvar, prior_mean, prior_logvar).sum() / B
    mi_sx = cdsvae.contrastive_mi(static_mean, static_content_mean, cfg.tau)
    mi_zx = cdsvae.contrastive_mi(dynamic_mean.flatten(1), motion_mean.flatten(1), cfg.tau)
    mi_zs = cdsvae.mws_mi_zs(static, static_mean, static_logvar, dynamic, dynamic_mean,
                             dynamic_logvar, cfg.dataset_size)
    return recon_term + cfg.alpha * (kl_s + kl_z) - cfg.beta * (mi_sx + mi_zx) + cfg.gamma * mi_zs


@contextlib.contextmanager
def reference_kernels():
    """Run the PyTorch reference instead of the Triton kernels (kernels.use_triton reads this)."""
    previous = os.environ.get("CDSVAE_REFERENCE")
    os.environ["CDSVAE_REFERENCE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CDSVAE_REFERENCE"]
        else:
            os.environ["CDSVAE_REFERENCE"] = previous


def time_steps(model, optimizer, x, loss_fn, steps: int, warmup: int, device) -> float:
    def step():
        loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two steps this often")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    # The paper's Sprites configuration: 8 frames of 3x64x64, s 256, z 32, frame feature 128,
    # LSTM 256, conv width 64.
    cfg = cdsvae.Config(frame_shape=(3, 64, 64), frames=8, static_dim=256, dynamic_dim=32,
                        feature_dim=128, hidden_dim=256, conv_width=64)
    model = cdsvae.CDSVAE(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 8, 3, 64, 64, device=device)

    ours_loss = lambda batch: model(batch)[0]  # noqa: E731
    three_pass = lambda batch: three_pass_loss(model, batch)  # noqa: E731
    steps = {"ours": (ours_loss, contextlib.nullcontext), "three_pass": (three_pass, reference_kernels)}
    if device.type == "cuda":
        steps["ours_reference"] = (ours_loss, reference_kernels)
    # bf16 autocast rows (the objective stays fp32 inside forward): on CUDA, and on a CPU with
    # native bf16 only; without it oneDNN has no bf16 LSTM (cdsvae.resolve_precision refuses it).
    bf16 = device.type == "cuda" or cdsvae.cpu_has_native_bf16()
    if bf16:
        steps["ours_bf16"] = (ours_loss, lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    else:
        print(json.dumps({"step": "ours_bf16", "skipped": "this CPU has no native bf16 (avx512_bf16/amx_bf16)"}))
    timings = {name: [] for name in steps}
    for _ in range(args.rounds):   # interleave, so drift in machine load hits all alike
        for name, (loss_fn, context) in steps.items():
            with context():
                timings[name].append(time_steps(model, optimizer, x, loss_fn, args.steps, args.warmup, device))
    best = {name: min(values) for name, values in timings.items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for name, seconds in best.items():
        print(json.dumps({"step": name, "batch": args.batch, "seconds_per_step": round(seconds, 4),
                          "sequences_per_second": round(args.batch / seconds, 2)}))
    ratios = {"speedup_ours_over_three_pass": round(best["three_pass"] / best["ours"], 2)}
    if "ours_bf16" in best:
        ratios["speedup_bf16_over_fp32"] = round(best["ours"] / best["ours_bf16"], 2)
    print(json.dumps({**ratios, "device": machine, "native_bf16": bf16, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
