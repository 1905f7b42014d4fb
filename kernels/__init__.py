"""The fused SH-plus-residue shading op.

    shading, recon = sh_shade(normal, light, residue=None, albedo=None, *,
                              normalize=True, beta=0.0, backend="auto")

- ``normal`` ``[B,3,H,W]``: raw network output (normalized inside when ``normalize``).
- ``light`` ``[B,27]``: R|G|B blocks of 9 SH coefficients (see :mod:`sfs_fast.sh`).
- ``residue``, ``albedo`` ``[B,3,H,W]`` or None.
- ``shading = Y(n/|n|) . L_c + residue``; ``recon = shading * (albedo - beta * residue)``
  (None without albedo).

float32, float16, bfloat16 (and float64, for gradient checks) in; accumulation in float32;
the output has the input dtype. Shape, dtype or device mismatches raise ``ValueError``
naming the argument.

Backends (``backend=``): ``reference`` (plain PyTorch, :mod:`.reference`; what ONNX export
traces), ``compile`` (torch.compile of the reference), and three fused one-pass kernels behind
the single ``torch.library`` op ``sfs_fast::sh_shade`` (:mod:`._ops`: ``register_fake``
and ``register_autograd``; its backward is the op ``sfs_fast::sh_shade_backward``): ``cpu`` (C++
with OpenMP and SIMD, :mod:`.cpu`), ``triton`` (:mod:`.triton_sh_shade`) and ``cuda``
(:mod:`.cuda_sh_shade`, compiled on first use), thin launchers over :mod:`._launch`. ``auto``
takes the first available entry of ``SHADING_AUTO_ORDER`` for the tensors' device (:mod:`.dispatch`):
cpu on CPU tensors, triton on CUDA tensors. ``BACKENDS`` names them all.

Example::

    >>> n = torch.randn(2, 3, 8, 8); L = torch.randn(2, 27)
    >>> shading, recon = sh_shade(n, L, albedo=torch.rand(2, 3, 8, 8))
    >>> shading.shape
    torch.Size([2, 3, 8, 8])
"""
from __future__ import annotations

from sfs_fast.kernels.dispatch import SHADING_AUTO_ORDER, BACKENDS, available_backends, check_args, resolve_backend
from sfs_fast.kernels.dispatch import run as _run
from sfs_fast.kernels.reference import sh_shade_reference

__all__ = ["sh_shade", "sh_shade_reference", "BACKENDS", "SHADING_AUTO_ORDER", "available_backends", "resolve_backend",
           "check_args"]


def sh_shade(normal, light, residue=None, albedo=None, *, normalize=True, beta=0.0, backend="auto"):
    """Fused SH shading plus residue and reconstruction; see the module docstring.

    ``normal``, ``residue``, ``albedo`` ``[B,3,H,W]``, ``light`` ``[B,27]``; returns
    ``(shading, recon)``, both ``[B,3,H,W]`` (``recon`` is None without albedo).
    """
    check_args(normal, light, residue, albedo, backend)
    name = resolve_backend(backend, normal.device)
    return _run(name, normal, light, residue, albedo, bool(normalize), float(beta))
