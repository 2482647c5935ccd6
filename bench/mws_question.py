"""The MWS question of issue #11: which I(z;s) estimate, measured on a trained checkpoint.

Three minibatch-weighted-sampling estimates of I(z;s) on the same test batch (z_1:T sampled from
the posterior, s sampled), beside the ceiling log(B N) that every MWS estimate is bounded by
(log q(z, s) - log q(z) - log q(s) <= log(B N) when the diagonal dominates every logsumexp):

- per step (what training uses): q(z_t | x_j) along x_j's own sampled rollout, averaged over t;
- per step along mean rollouts: q(z_t | x_j) along x_j's mean rollout (eps = 0);
- trajectory: the paper's I(z_1:T; s), log q(z^i_1:T | x_j) = sum_t log q(z^i_t | z^i_<t, x_j),
  x_j's posterior LSTM teacher-forced with sequence i's own samples: B^2 rollouts, exact, too
  costly to train with (B times the dynamic posterior's work).

    python bench/mws_question.py --ckpt RUN/last.pt --data-dir SPRITES32 [--batch 64] [--seed 0]
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cdsvae  # noqa: E402


def teacher_forced_posterior(model, features, dynamic):
    """q(z_t | z_<t, x_<=t) of every sequence j's features fed every sequence i's samples:
    (mean, logvar) of shape (B_i, B_j, T, Dz)."""
    posterior = model.dynamic_posterior
    B, T = features.shape[:2]
    gates = posterior.input_proj(features)                                   # (Bj, T, 4H)
    hidden = posterior.recurrent.weight.shape[0] // 4
    means, logvars = [], []
    for i in range(B):
        fed = dynamic[i].expand(B, T, -1)                                     # i's samples, for every j
        h = features.new_zeros(B, hidden)
        c = features.new_zeros(B, hidden)
        z_prev = features.new_zeros(B, fed.shape[-1])
        step_means, step_logvars = [], []
        for t in range(T):
            g = gates[:, t] + torch.cat([z_prev, h], 1) @ posterior.recurrent.weight.T
            i_g, f_g, g_g, o_g = g.chunk(4, 1)
            c = torch.sigmoid(f_g) * c + torch.sigmoid(i_g) * torch.tanh(g_g)
            h = torch.sigmoid(o_g) * torch.tanh(c)
            mean, logvar = posterior.head(h).chunk(2, 1)
            step_means.append(mean), step_logvars.append(logvar)
            z_prev = fed[:, t]
        means.append(torch.stack(step_means, 1))
        logvars.append(torch.stack(step_logvars, 1))
    return torch.stack(means), torch.stack(logvars)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = cdsvae.load_checkpoint(args.ckpt).eval()
    data = cdsvae.load_dataset(None, args.data_dir)
    x = cdsvae.to_frames(data.test.sequences[:args.batch], "cpu")
    B, N = x.shape[0], model.cfg.dataset_size
    features = model.encode_frames(x)
    q = model.sample_posterior(x, features)
    s_terms = (q.static, q.static_mean, q.static_logvar)
    per_step = cdsvae.mws_mi_zs(*s_terms, q.dynamic, q.dynamic_mean, q.dynamic_logvar, N).item()
    _, mean_rollout, mean_logvar = model.dynamic_posterior(features, torch.zeros_like(q.dynamic))
    per_step_mean = cdsvae.mws_mi_zs(*s_terms, q.dynamic, mean_rollout, mean_logvar, N).item()

    means, logvars = teacher_forced_posterior(model, features, q.dynamic)          # (Bi, Bj, T, Dz)
    own = torch.arange(B)
    deviation = (means[own, own] - q.dynamic_mean).abs().max().item()    # i fed its own samples
    assert deviation < 1e-4, f"teacher forcing does not reproduce the posterior ({deviation})"
    pair_dynamic = cdsvae.log_gaussian(q.dynamic.unsqueeze(1), means, logvars).sum((-1, -2))   # (Bi, Bj)
    pair_static = cdsvae.log_gaussian(q.static.unsqueeze(1), q.static_mean.unsqueeze(0),
                                      q.static_logvar.unsqueeze(0)).sum(-1)
    log_norm = math.log(B * N)
    log_q_s = torch.logsumexp(pair_static, 1) - log_norm
    log_q_z = torch.logsumexp(pair_dynamic, 1) - log_norm
    log_q_joint = torch.logsumexp(pair_static + pair_dynamic, 1) - log_norm
    trajectory = (log_q_joint - log_q_z - log_q_s).mean().item()
    # how often a sequence's own x_j dominates: the share of rows whose diagonal is the max
    dominant = lambda pair: (pair.argmax(1) == torch.arange(B)).float().mean().item()  # noqa: E731
    print(f"checkpoint {args.ckpt}, test batch B = {B}, N = {N}, ceiling log(B N) = {log_norm:.3f}")
    print(f"  per step, along each x_j's sampled rollout (training's): {per_step:.3f}")
    print(f"  per step, along each x_j's mean rollout:                {per_step_mean:.3f}")
    print(f"  trajectory I(z_1:T; s), teacher-forced (exact, B^2):    {trajectory:.3f}")
    print(f"  rows whose own x_i is the densest: s {dominant(pair_static):.3f}, "
          f"z_1:T {dominant(pair_dynamic):.3f}")


if __name__ == "__main__":
    main()
