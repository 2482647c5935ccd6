"""Test-wide setup: without a GPU, Triton kernels run in the interpreter (correctness only).

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the test modules import the kernels. The ``load_bench`` fixture imports a script of
bench/ (not a package) by its name.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def load_bench():
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
