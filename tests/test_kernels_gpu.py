"""The cuda and triton backends on a CUDA device vs the float64 NumPy reference (forward and
backward, fp32/fp16/bf16/fp64). Run by bench/gpu_check.sh; skipped without CUDA."""
import pytest
import torch

from kernel_checks import DTYPES, check_backward, check_forward

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_gpu_forward(backend, dtype, seed):
    check_forward(backend, dtype, 300 + seed, "cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_gpu_backward(backend, dtype, seed):
    check_backward(backend, dtype, 400 + seed, "cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_image_matches_cpu_backend(backend):
    """A 512x512 batch with every input: the GPU kernels agree with the cpu kernels."""
    g = torch.Generator().manual_seed(0)
    n, L = torch.randn(2, 3, 512, 512, generator=g), torch.randn(2, 27, generator=g)
    r, a = 0.1 * torch.randn(2, 3, 512, 512, generator=g), torch.rand(2, 3, 512, 512, generator=g)
    want = torch.ops.sfs_fast.sh_shade(n, L, r, a, True, 1.0, "cpu")
    got = torch.ops.sfs_fast.sh_shade(n.cuda(), L.cuda(), r.cuda(), a.cuda(), True, 1.0, backend)
    for w, x in zip(want, got):
        assert torch.allclose(x.cpu(), w, atol=1e-5, rtol=1e-5)


def test_gpu_compile_fullgraph():
    from sfs_fast.kernels import sh_shade

    torch._dynamo.reset()
    n, L = torch.randn(2, 3, 16, 24, device="cuda"), torch.randn(2, 27, device="cuda")
    a = torch.rand(2, 3, 16, 24, device="cuda")

    def fn(n, L, a):
        s, rc = sh_shade(n, L, None, a)
        return s + rc

    assert torch.allclose(torch.compile(fn, fullgraph=True)(n, L, a), fn(n, L, a), atol=1e-5, rtol=1e-5)
