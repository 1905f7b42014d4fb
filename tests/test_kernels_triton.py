"""The triton backend vs the float64 NumPy reference, forward and backward.

Runs on CUDA tensors where a GPU is present, else on CPU tensors under the Triton interpreter
(only when TRITON_INTERPRET=1 was set before triton was imported; test_kernels.py runs this
file that way in a subprocess). Skipped otherwise.
"""
import os

import pytest
import torch

from kernel_checks import DTYPES, check_backward, check_forward

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_triton_forward(dtype, seed):
    check_forward("triton", dtype, 100 + seed, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_triton_backward(dtype, seed):
    check_backward("triton", dtype, 200 + seed, DEVICE)


def test_auto_is_triton_on_cuda():
    if DEVICE != "cuda":
        pytest.skip("CUDA only")
    from sfs_fast.kernels import resolve_backend
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
