"""Fused symmetric cosine-similarity InfoNCE, eq. (7)-(8), tiled.

Reference: ``cdsvae.contrastive_mi``. The 2B rows u (both views, L2-normalised) have logits
s_ij = u_i . u_j / tau with the diagonal masked; row i's positive is its other view p(i). The
forward kernel streams column blocks past each row block with an online logsumexp, so only the
per-row ``lse_i`` and positive logit leave the chip: the 2B x 2B matrix never exists in memory.

Backward, for row terms r_i = s_i,p(i) - lse_i with upstream gradients g_i and P = softmax:

    dL/du_k = (1/tau) [ (g_k + g_p(k)) u_p(k) - sum_j (g_k P_kj + g_j P_jk) u_j ]

Since s is symmetric, P_jk = exp(s_kj - lse_j): one more streaming pass recomputes the tiles from
``lse`` and accumulates both sums. L2 normalisation (and its gradient) stays in PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MASKED = -1.0e30   # a finite "minus infinity": exp(MASKED - m) is exactly 0, never NaN


@triton.jit
def _similarity_tile(u_ptr, rows, cols, row_ok, col_ok, N, D, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """s = u_rows . u_cols / tau for one tile, with the diagonal and padding masked."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        a = tl.load(u_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(u_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    valid = col_ok[None, :] & row_ok[:, None] & (cols[None, :] != rows[:, None])
    return tl.where(valid, s * scale, MASKED), valid


@triton.jit
def _infonce_fwd_kernel(u_ptr, lse_ptr, positive_ptr, N, HALF, D, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    partner = tl.where(rows < HALF, rows + HALF, rows - HALF)
    running_max = tl.full((BLOCK_M,), MASKED, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, valid = _similarity_tile(u_ptr, rows, cols, row_ok, cols < N, N, D, scale,
                                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        positive += tl.sum(tl.where(cols[None, :] == partner[:, None], s, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.where(valid, tl.exp(s - new_max[:, None]), 0.0), axis=1)
        running_max = new_max
    tl.store(lse_ptr + rows, running_max + tl.log(tl.where(row_ok, running_sum, 1.0)), mask=row_ok)
    tl.store(positive_ptr + rows, positive, mask=row_ok)


@triton.jit
def _infonce_bwd_kernel(u_ptr, lse_ptr, grad_ptr, du_ptr, N, HALF, D, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    out_dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ok = out_dims < D
    lse_rows = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad_rows = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s, valid = _similarity_tile(u_ptr, rows, cols, row_ok, col_ok, N, D, scale,
                                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        lse_cols = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
        grad_cols = tl.load(grad_ptr + cols, mask=col_ok, other=0.0)
        weight = grad_rows[:, None] * tl.exp(s - lse_rows[:, None]) \
            + grad_cols[None, :] * tl.exp(s - lse_cols[None, :])
        weight = tl.where(valid, weight, 0.0)
        u_cols = tl.load(u_ptr + cols[:, None] * D + out_dims[None, :],
                         mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        acc += tl.dot(weight, u_cols, input_precision=PRECISION)
    partner = tl.where(rows < HALF, rows + HALF, rows - HALF)
    grad_partner = tl.load(grad_ptr + partner, mask=row_ok, other=0.0)
    u_partner = tl.load(u_ptr + partner[:, None] * D + out_dims[None, :],
                        mask=row_ok[:, None] & out_ok[None, :], other=0.0)
    du = scale * ((grad_rows + grad_partner)[:, None] * u_partner - acc)
    tl.store(du_ptr + rows[:, None] * D + out_dims[None, :], du, mask=row_ok[:, None] & out_ok[None, :])


def _blocks(dim: int):
    block_d = min(64, max(16, triton.next_power_of_2(dim)))
    return 64, 64, block_d


class InfoNCERows(torch.autograd.Function):
    """Unit rows (2B, D) -> the 2B row terms log softmax_i(positive) = s_i,p(i) - lse_i."""

    @staticmethod
    def forward(ctx, units, tau, precision):
        units = units.contiguous()
        N, D = units.shape
        lse = torch.empty(N, device=units.device, dtype=torch.float32)
        positive = torch.empty_like(lse)
        block_m, block_n, block_d = _blocks(D)
        _infonce_fwd_kernel[(triton.cdiv(N, block_m),)](
            units, lse, positive, N, N // 2, D, 1.0 / tau,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision)
        ctx.save_for_backward(units, lse)
        ctx.tau, ctx.precision = tau, precision
        return positive - lse

    @staticmethod
    def backward(ctx, grad_rows):
        units, lse = ctx.saved_tensors
        N, D = units.shape
        d_units = torch.empty_like(units)
        block_m, block_n, block_d = _blocks(D)
        _infonce_bwd_kernel[(triton.cdiv(N, block_m), triton.cdiv(D, block_d))](
            units, lse, grad_rows.float().contiguous(), d_units, N, N // 2, D, 1.0 / ctx.tau,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=ctx.precision)
        return d_units, None, None


def contrastive_mi(anchor: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """Same result as ``cdsvae.contrastive_mi``: log(2B - 1) + mean_i log softmax_i(positive)."""
    precision = "ieee" if anchor.dtype == torch.float32 else "tf32"
    units = F.normalize(torch.cat([anchor, positive]).float(), dim=1)
    rows = InfoNCERows.apply(units, tau, precision)
    return math.log(max(units.shape[0] - 1, 1)) + rows.mean()
