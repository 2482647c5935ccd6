"""Fused LSTM rollout with per-step reparameterized sampling: the dynamic posterior of eq. (2).

Reference: ``cdsvae.lstm_sample_rollout``. Every step t computes

    gates_t = input_gates_t + [z_{t-1}, h_{t-1}] @ W^T        (i, f, g, o as in torch.nn.LSTM)
    c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);  h_t = sigmoid(o) tanh(c_t)
    [mean_t, logvar_t] = h_t @ W_head^T + b_head;   z_t = mean_t + exp(logvar_t / 2) eps_t

and z_t feeds step t + 1. The whole T-step rollout is one kernel launch: each program owns a
block of batch rows and walks through time, so the sequential dependency never leaves the chip
between steps. The backward kernel walks back through time the same way and writes the
gradients of the gates and of the head outputs; the weight gradients are then two large matmuls
over all (b, t) at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _add_gate_dots(acc_i, acc_f, acc_g, acc_o, r, w_ptrs, w_mask, gate_stride, PRECISION: tl.constexpr):
    """acc_gate += r @ W_gate^T for the four gates; ``w_ptrs`` point at gate i's rows and each
    next gate's rows lie ``gate_stride`` elements further."""
    acc_i += tl.dot(r, tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32), input_precision=PRECISION)
    acc_f += tl.dot(r, tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0).to(tl.float32), input_precision=PRECISION)
    acc_g += tl.dot(r, tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0).to(tl.float32), input_precision=PRECISION)
    acc_o += tl.dot(r, tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0).to(tl.float32), input_precision=PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _lstm_sample_fwd_kernel(
    gates_in_ptr, w_ptr, head_w_ptr, head_b_ptr, eps_ptr,       # inputs
    z_ptr, mean_ptr, logvar_ptr,                                  # outputs (B, T, DZ)
    h_ptr, c_ptr, act_ptr,                                        # saved fp32 (B, T, H), (B, T, 4H)
    B, T, H, DZ,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    K = DZ + H
    dz_cols = tl.arange(0, BLOCK_DZ)
    dz_ok = dz_cols < DZ
    for t in range(T):
        here = rows * T + t                    # (b, t) row index into (B*T, .) views
        before = rows * T + t - 1
        has_before = row_ok & ((rows * 0 + t) > 0)
        # Phase 1: gates and cell update, one block of hidden units at a time.
        for j0 in range(0, H, BLOCK_H):
            hcols = j0 + tl.arange(0, BLOCK_H)
            h_ok = hcols < H
            tile_ok = row_ok[:, None] & h_ok[None, :]
            in_base = gates_in_ptr + here[:, None] * (4 * H) + hcols[None, :]
            acc_i = tl.load(in_base, mask=tile_ok, other=0.0).to(tl.float32)
            acc_f = tl.load(in_base + H, mask=tile_ok, other=0.0).to(tl.float32)
            acc_g = tl.load(in_base + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
            acc_o = tl.load(in_base + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
            # recurrent input, z part: z_{t-1} @ W[:, :DZ]^T
            for k0 in range(0, DZ, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < DZ
                r = tl.load(z_ptr + before[:, None] * DZ + ks[None, :],
                            mask=has_before[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc_i, acc_f, acc_g, acc_o = _add_gate_dots(
                    acc_i, acc_f, acc_g, acc_o, r, w_ptr + hcols[None, :] * K + ks[:, None],
                    k_ok[:, None] & h_ok[None, :], H * K, PRECISION)
            # recurrent input, h part: h_{t-1} @ W[:, DZ:]^T
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                r = tl.load(h_ptr + before[:, None] * H + ks[None, :],
                            mask=has_before[:, None] & k_ok[None, :], other=0.0)
                acc_i, acc_f, acc_g, acc_o = _add_gate_dots(
                    acc_i, acc_f, acc_g, acc_o, r, w_ptr + hcols[None, :] * K + DZ + ks[:, None],
                    k_ok[:, None] & h_ok[None, :], H * K, PRECISION)
            gate_i, gate_f = _sigmoid(acc_i), _sigmoid(acc_f)
            gate_g, gate_o = _tanh(acc_g), _sigmoid(acc_o)
            c_prev = tl.load(c_ptr + before[:, None] * H + hcols[None, :],
                             mask=has_before[:, None] & h_ok[None, :], other=0.0)
            c = gate_f * c_prev + gate_i * gate_g
            h = gate_o * _tanh(c)
            tl.store(c_ptr + here[:, None] * H + hcols[None, :], c, mask=tile_ok)
            tl.store(h_ptr + here[:, None] * H + hcols[None, :], h, mask=tile_ok)
            act_base = act_ptr + here[:, None] * (4 * H) + hcols[None, :]
            tl.store(act_base, gate_i, mask=tile_ok)
            tl.store(act_base + H, gate_f, mask=tile_ok)
            tl.store(act_base + 2 * H, gate_g, mask=tile_ok)
            tl.store(act_base + 3 * H, gate_o, mask=tile_ok)
        tl.debug_barrier()                     # all of h_t is written before the head reads it
        # Phase 2: Gaussian heads and the reparameterized sample.
        mean = tl.zeros((BLOCK_B, BLOCK_DZ), dtype=tl.float32)
        logvar = tl.zeros((BLOCK_B, BLOCK_DZ), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            h_t = tl.load(h_ptr + here[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & dz_ok[None, :]
            w_mean = tl.load(head_w_ptr + dz_cols[None, :] * H + ks[:, None], mask=w_mask, other=0.0).to(tl.float32)
            w_logvar = tl.load(head_w_ptr + (DZ + dz_cols[None, :]) * H + ks[:, None], mask=w_mask, other=0.0).to(tl.float32)
            mean += tl.dot(h_t, w_mean, input_precision=PRECISION)
            logvar += tl.dot(h_t, w_logvar, input_precision=PRECISION)
        mean += tl.load(head_b_ptr + dz_cols, mask=dz_ok, other=0.0).to(tl.float32)[None, :]
        logvar += tl.load(head_b_ptr + DZ + dz_cols, mask=dz_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = row_ok[:, None] & dz_ok[None, :]
        out_offsets = here[:, None] * DZ + dz_cols[None, :]
        eps = tl.load(eps_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        z = mean + tl.exp(0.5 * logvar) * eps
        tl.store(mean_ptr + out_offsets, mean.to(mean_ptr.dtype.element_ty), mask=out_mask)
        tl.store(logvar_ptr + out_offsets, logvar.to(logvar_ptr.dtype.element_ty), mask=out_mask)
        tl.store(z_ptr + out_offsets, z.to(z_ptr.dtype.element_ty), mask=out_mask)
        tl.debug_barrier()                     # z_t is written before step t + 1 reads it


@triton.jit
def _lstm_sample_bwd_kernel(
    w_ptr, head_w_ptr, eps_ptr, logvar_ptr, c_ptr, act_ptr,       # forward values
    dz_ptr, dmean_ptr, dlogvar_ptr,                               # upstream gradients (B, T, DZ)
    dgates_ptr, dhead_ptr,                                        # outputs (B, T, 4H), (B, T, 2DZ)
    dh_carry_ptr, dc_carry_ptr, dz_carry_ptr,                     # zeroed scratch (B, H), (B, H), (B, DZ)
    B, T, H, DZ,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    K = DZ + H
    dz_cols = tl.arange(0, BLOCK_DZ)
    dz_ok = dz_cols < DZ
    z_mask = row_ok[:, None] & dz_ok[None, :]
    for step in range(T):
        t = T - 1 - step
        here = rows * T + t
        before = rows * T + t - 1
        has_before = row_ok & ((rows * 0 + t) > 0)
        # Head: z_t = mean + exp(logvar / 2) eps, and z_t also fed step t + 1 (dz_carry).
        offsets = here[:, None] * DZ + dz_cols[None, :]
        dz_total = tl.load(dz_ptr + offsets, mask=z_mask, other=0.0) \
            + tl.load(dz_carry_ptr + rows[:, None] * DZ + dz_cols[None, :], mask=z_mask, other=0.0)
        logvar = tl.load(logvar_ptr + offsets, mask=z_mask, other=0.0).to(tl.float32)
        eps = tl.load(eps_ptr + offsets, mask=z_mask, other=0.0).to(tl.float32)
        d_mean = tl.load(dmean_ptr + offsets, mask=z_mask, other=0.0) + dz_total
        d_logvar = tl.load(dlogvar_ptr + offsets, mask=z_mask, other=0.0) \
            + dz_total * 0.5 * tl.exp(0.5 * logvar) * eps
        head_offsets = here[:, None] * (2 * DZ) + dz_cols[None, :]
        tl.store(dhead_ptr + head_offsets, d_mean, mask=z_mask)
        tl.store(dhead_ptr + head_offsets + DZ, d_logvar, mask=z_mask)
        # Phase 1: through h_t and the cell, one block of hidden units at a time.
        for j0 in range(0, H, BLOCK_H):
            hcols = j0 + tl.arange(0, BLOCK_H)
            h_ok = hcols < H
            tile_ok = row_ok[:, None] & h_ok[None, :]
            w_mask = dz_ok[:, None] & h_ok[None, :]
            w_mean = tl.load(head_w_ptr + dz_cols[:, None] * H + hcols[None, :], mask=w_mask, other=0.0).to(tl.float32)
            w_logvar = tl.load(head_w_ptr + (DZ + dz_cols[:, None]) * H + hcols[None, :], mask=w_mask, other=0.0).to(tl.float32)
            carry_offsets = rows[:, None] * H + hcols[None, :]
            dh = tl.load(dh_carry_ptr + carry_offsets, mask=tile_ok, other=0.0) \
                + tl.dot(d_mean, w_mean, input_precision=PRECISION) \
                + tl.dot(d_logvar, w_logvar, input_precision=PRECISION)
            c = tl.load(c_ptr + here[:, None] * H + hcols[None, :], mask=tile_ok, other=0.0)
            c_prev = tl.load(c_ptr + before[:, None] * H + hcols[None, :],
                             mask=has_before[:, None] & h_ok[None, :], other=0.0)
            act_base = act_ptr + here[:, None] * (4 * H) + hcols[None, :]
            gate_i = tl.load(act_base, mask=tile_ok, other=0.0)
            gate_f = tl.load(act_base + H, mask=tile_ok, other=0.0)
            gate_g = tl.load(act_base + 2 * H, mask=tile_ok, other=0.0)
            gate_o = tl.load(act_base + 3 * H, mask=tile_ok, other=0.0)
            tanh_c = _tanh(c)
            dc = tl.load(dc_carry_ptr + carry_offsets, mask=tile_ok, other=0.0) \
                + dh * gate_o * (1.0 - tanh_c * tanh_c)
            tl.store(dc_carry_ptr + carry_offsets, dc * gate_f, mask=tile_ok)
            dgate_base = dgates_ptr + here[:, None] * (4 * H) + hcols[None, :]
            tl.store(dgate_base, dc * gate_g * gate_i * (1.0 - gate_i), mask=tile_ok)
            tl.store(dgate_base + H, dc * c_prev * gate_f * (1.0 - gate_f), mask=tile_ok)
            tl.store(dgate_base + 2 * H, dc * gate_i * (1.0 - gate_g * gate_g), mask=tile_ok)
            tl.store(dgate_base + 3 * H, dh * tanh_c * gate_o * (1.0 - gate_o), mask=tile_ok)
        tl.debug_barrier()                     # all of dgates_t is written before phase 2 reads it
        # Phase 2: d[z_{t-1}, h_{t-1}] = dgates_t @ W, carried to step t - 1.
        for n0 in range(0, K, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            n_ok = ns < K
            acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, 4 * H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < 4 * H
                d_gates = tl.load(dgates_ptr + here[:, None] * (4 * H) + ks[None, :],
                                  mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + ks[:, None] * K + ns[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc += tl.dot(d_gates, w.to(tl.float32), input_precision=PRECISION)
            to_z = row_ok[:, None] & (ns < DZ)[None, :]
            tl.store(dz_carry_ptr + rows[:, None] * DZ + ns[None, :], acc, mask=to_z)
            to_h = row_ok[:, None] & ((ns >= DZ) & n_ok)[None, :]
            tl.store(dh_carry_ptr + rows[:, None] * H + (ns[None, :] - DZ), acc, mask=to_h)
        tl.debug_barrier()                     # the carries are written before step t - 1 reads them


BLOCK_B, BLOCK_H, BLOCK_K = 16, 32, 32


def _block_dz(latent: int) -> int:
    return max(16, triton.next_power_of_2(latent))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class LstmSampleRollout(torch.autograd.Function):
    """``(input_gates, recurrent_weight, head_weight, head_bias, eps) -> (z, mean, logvar)``,
    the same signature and results as ``cdsvae.lstm_sample_rollout``."""

    @staticmethod
    def forward(ctx, input_gates, recurrent_weight, head_weight, head_bias, eps):
        input_gates, recurrent_weight = input_gates.contiguous(), recurrent_weight.contiguous()
        head_weight, head_bias, eps = head_weight.contiguous(), head_bias.contiguous(), eps.contiguous()
        B, T, four_h = input_gates.shape
        H, DZ = four_h // 4, head_weight.shape[0] // 2
        dtype, device = input_gates.dtype, input_gates.device
        z = torch.empty(B, T, DZ, device=device, dtype=dtype)
        mean, logvar = torch.empty_like(z), torch.empty_like(z)
        h = torch.empty(B, T, H, device=device, dtype=torch.float32)
        c = torch.empty_like(h)
        acts = torch.empty(B, T, 4 * H, device=device, dtype=torch.float32)
        grid = (triton.cdiv(B, BLOCK_B),)
        _lstm_sample_fwd_kernel[grid](
            input_gates, recurrent_weight, head_weight, head_bias, eps, z, mean, logvar, h, c, acts,
            B, T, H, DZ, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
            BLOCK_DZ=_block_dz(DZ), PRECISION=_precision(dtype))
        ctx.save_for_backward(recurrent_weight, head_weight, eps, z, logvar, h, c, acts)
        ctx.input_dtype = dtype
        return z, mean, logvar

    @staticmethod
    def backward(ctx, d_z, d_mean, d_logvar):
        recurrent_weight, head_weight, eps, z, logvar, h, c, acts = ctx.saved_tensors
        B, T, DZ = z.shape
        H = h.shape[-1]
        as_float = lambda g: torch.zeros_like(z, dtype=torch.float32) if g is None \
            else g.float().contiguous()  # noqa: E731
        d_z, d_mean, d_logvar = as_float(d_z), as_float(d_mean), as_float(d_logvar)
        d_gates = torch.empty(B, T, 4 * H, device=z.device, dtype=torch.float32)
        d_head = torch.empty(B, T, 2 * DZ, device=z.device, dtype=torch.float32)
        dh_carry = torch.zeros(B, H, device=z.device, dtype=torch.float32)
        dc_carry, dz_carry = torch.zeros_like(dh_carry), torch.zeros(B, DZ, device=z.device)
        _lstm_sample_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            recurrent_weight, head_weight, eps, logvar, c, acts, d_z, d_mean, d_logvar,
            d_gates, d_head, dh_carry, dc_carry, dz_carry, B, T, H, DZ,
            BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_DZ=_block_dz(DZ),
            PRECISION=_precision(ctx.input_dtype))
        # Weight gradients over all (b, t) at once: the recurrent input of step t is
        # [z_{t-1}, h_{t-1}], zero at t = 0.
        previous = torch.cat([z.float(), h], dim=-1)
        previous = torch.nn.functional.pad(previous[:, :-1], (0, 0, 1, 0)).reshape(B * T, -1)
        d_recurrent = d_gates.reshape(B * T, -1).T @ previous
        d_head_weight = d_head.reshape(B * T, -1).T @ h.reshape(B * T, -1)
        d_head_bias = d_head.sum(dim=(0, 1))
        return (d_gates.to(ctx.input_dtype), d_recurrent.to(recurrent_weight.dtype),
                d_head_weight.to(head_weight.dtype), d_head_bias.to(head_weight.dtype), None)


def lstm_sample_rollout(input_gates, recurrent_weight, head_weight, head_bias, eps):
    return LstmSampleRollout.apply(input_gates, recurrent_weight, head_weight, head_bias, eps)
