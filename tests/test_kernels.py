"""Each Triton kernel against its PyTorch reference in cdsvae.py: values and gradients.

On a machine without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py); on a GPU they run the compiled kernels.
"""
import pytest
import torch

import cdsvae
import kernels

triton = pytest.importorskip("triton")
from kernels import infonce, lstm_sample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 tight; bf16 loose (inputs rounded to bf16, the reference computed in fp32 from them).
TOLERANCE = {torch.float32: dict(atol=2e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def rollout_inputs(batch, frames, hidden, latent, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype).requires_grad_()

    return (make(batch, frames, 4 * hidden), make(4 * hidden, latent + hidden, scale=0.3),
            make(2 * latent, hidden, scale=0.3), make(2 * latent, scale=0.5),
            torch.randn(batch, frames, latent, generator=generator).to(DEVICE, dtype))


def compare(fused_outputs, reference_outputs, inputs, dtype):
    tolerance = TOLERANCE[dtype]
    for fused, reference in zip(fused_outputs, reference_outputs):
        torch.testing.assert_close(fused.float(), reference.float(), **tolerance)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE)
               for i, o in enumerate(reference_outputs)]
    differentiable = [x for x in inputs if x.requires_grad]
    grads_fused = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(fused_outputs, weights)), differentiable)
    grads_reference = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(reference_outputs, weights)), differentiable)
    for fused, reference in zip(grads_fused, grads_reference):
        scale = max(1.0, reference.float().abs().max().item())
        torch.testing.assert_close(fused.float() / scale, reference.float() / scale, **tolerance)


@pytest.mark.parametrize("frames", [1, 8, 15, 20])
@pytest.mark.parametrize("batch,hidden,latent", [(1, 16, 3), (5, 33, 17), (18, 20, 8)])
def test_lstm_sample_matches_reference_fp32(batch, frames, hidden, latent):
    inputs = rollout_inputs(batch, frames, hidden, latent, torch.float32)
    fused = lstm_sample.lstm_sample_rollout(*inputs)
    reference = cdsvae.lstm_sample_rollout(*inputs)
    compare(fused, reference, inputs, torch.float32)


@pytest.mark.parametrize("frames", [1, 8])
def test_lstm_sample_matches_reference_bf16(frames):
    inputs = rollout_inputs(7, frames, 24, 5, torch.bfloat16)
    fused = lstm_sample.lstm_sample_rollout(*inputs)
    assert all(o.dtype == torch.bfloat16 for o in fused)
    as_float = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    reference = cdsvae.lstm_sample_rollout(*as_float)
    tolerance = TOLERANCE[torch.bfloat16]
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f.float(), r, **tolerance)
    weights = [torch.randn(o.shape).to(DEVICE) for o in reference]
    fused_grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(fused, weights)), inputs[:4])
    reference_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(reference, weights)), as_float[:4])
    for f, r in zip(fused_grads, reference_grads):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(f.float() / scale, r / scale, **tolerance)


@pytest.mark.parametrize("batch,dim", [(1, 3), (2, 16), (7, 33), (40, 100), (65, 256)])
def test_infonce_matches_reference_fp32(batch, dim):
    generator = torch.Generator().manual_seed(batch)
    anchor = torch.randn(batch, dim, generator=generator).to(DEVICE).requires_grad_()
    positive = (anchor.detach() + 0.5 * torch.randn(batch, dim, generator=generator).to(DEVICE)).requires_grad_()
    fused = infonce.contrastive_mi(anchor, positive, 0.5)
    reference = cdsvae.contrastive_mi(anchor, positive, 0.5)
    compare([fused], [reference], [anchor, positive], torch.float32)


def test_infonce_matches_reference_bf16():
    generator = torch.Generator().manual_seed(0)
    anchor = torch.randn(9, 48, generator=generator).to(DEVICE, torch.bfloat16).requires_grad_()
    positive = torch.randn(9, 48, generator=generator).to(DEVICE, torch.bfloat16).requires_grad_()
    fused = infonce.contrastive_mi(anchor, positive, 0.5)
    reference = cdsvae.contrastive_mi(anchor, positive, 0.5)   # computes in fp32 from the bf16 inputs
    compare([fused], [reference], [anchor, positive], torch.bfloat16)


def test_dispatch_serves_cpu_tensors_from_the_reference(monkeypatch):
    assert not kernels.use_triton(torch.zeros(1))
    if torch.cuda.is_available():
        assert kernels.use_triton(torch.zeros(1, device="cuda"))
        monkeypatch.setenv("CDSVAE_REFERENCE", "1")
        assert not kernels.use_triton(torch.zeros(1, device="cuda"))


def test_model_uses_the_kernels_where_dispatched(monkeypatch):
    """Forcing the dispatch on (interpreter on CPU) gives the same loss as the reference path."""
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(3, 16, 16), static_dim=6, dynamic_dim=3, feature_dim=8,
                        hidden_dim=10, conv_width=4, dataset_size=100)
    model = cdsvae.CDSVAE(cfg).to(DEVICE).eval()
    x = torch.rand(4, 5, 3, 16, 16, device=DEVICE)
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: False)
    torch.manual_seed(1)
    reference_loss, _ = model(x)
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: True)
    torch.manual_seed(1)
    fused_loss, _ = model(x)
    torch.testing.assert_close(fused_loss, reference_loss, atol=1e-3, rtol=1e-5)
