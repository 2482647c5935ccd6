"""Triton kernels for the hot loops of C-DSVAE, each beside its ``torch.autograd.Function``.

- ``lstm_sample``: the dynamic posterior's whole T-step rollout in one launch: LSTM step, Gaussian
  heads and the reparameterized sample that feeds the next step (reference:
  ``cdsvae.lstm_sample_rollout``).
- ``infonce``: the symmetric cosine-similarity InfoNCE of eq. (7)-(8), tiled so the 2B x 2B
  similarity matrix never exists in memory (reference: ``cdsvae.contrastive_mi``).

One dispatch point, ``use_triton``: CUDA tensors take the Triton path, CPU tensors the PyTorch
reference; ``CDSVAE_REFERENCE=1`` forces the reference on GPU too. Where triton is not installed
(e.g. macOS) everything runs on the reference. Tests run the kernels on CPU with
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # no wheel for this platform
    HAS_TRITON = False


def use_triton(tensor) -> bool:
    """Whether the fused kernels serve this tensor."""
    return HAS_TRITON and tensor.is_cuda and os.environ.get("CDSVAE_REFERENCE", "0") != "1"
