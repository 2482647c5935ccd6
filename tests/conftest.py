"""Test-wide setup: without a GPU, Triton kernels run in the interpreter (correctness only).

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the test modules import the kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
