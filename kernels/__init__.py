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

Example::

    >>> n = torch.randn(2, 3, 8, 8); L = torch.randn(2, 27)
    >>> shading, recon = sh_shade(n, L, albedo=torch.rand(2, 3, 8, 8))
    >>> shading.shape
    torch.Size([2, 3, 8, 8])
"""
from __future__ import annotations

import torch

from .reference import sh_shade_reference

__all__ = ["sh_shade", "sh_shade_reference", "BACKENDS", "available_backends", "check_args"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_args(normal, light, residue, albedo, backend):
    """Validate the op's arguments; raise ValueError naming the offending one."""
    if not isinstance(normal, torch.Tensor) or normal.dim() != 4 or normal.shape[1] != 3:
        raise ValueError(f"normal: expected a [B,3,H,W] tensor, got {_describe(normal)}")
    if normal.dtype not in FLOAT_DTYPES:
        raise ValueError(f"normal: unsupported dtype {normal.dtype}")
    b = normal.shape[0]
    if not isinstance(light, torch.Tensor) or light.dim() != 2 or light.shape[1] != 27:
        raise ValueError(f"light: expected a [B,27] tensor, got {_describe(light)}")
    if light.shape[0] != b:
        raise ValueError(f"light: batch {light.shape[0]} does not match normal's batch {b}")
    for name, t in (("light", light), ("residue", residue), ("albedo", albedo)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if name != "light" and t.shape != normal.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match normal's {tuple(normal.shape)}")
        if t.dtype != normal.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match normal's {normal.dtype}")
        if t.device != normal.device:
            raise ValueError(f"{name}: device {t.device} does not match normal's {normal.device}")
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend: unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}"
    return type(t).__name__


def _compiled_reference():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(sh_shade_reference, dynamic=False)
    return _COMPILED


_COMPILED = None


def _run_compile(normal, light, residue, albedo, normalize, beta):
    return _compiled_reference()(normal, light, residue, albedo, normalize, beta)


# name -> (is_available(device) -> bool, implementation)
BACKENDS = {
    "reference": (lambda device: True, sh_shade_reference),
    "compile": (lambda device: True, _run_compile),
}

# Preference order of "auto", per device type; the first available one is used.
AUTO_ORDER = {"cpu": ["reference"], "cuda": ["reference"]}


def available_backends(device="cpu"):
    """Names of the backends that run on ``device`` here."""
    device = torch.device(device)
    return [name for name, (ok, _) in BACKENDS.items() if ok(device)]


def resolve_backend(backend, device):
    if backend != "auto":
        ok, _ = BACKENDS[backend]
        if not ok(device):
            raise ValueError(f"backend: {backend!r} is not available on {device}")
        return backend
    for name in AUTO_ORDER.get(device.type, ["reference"]):
        if name in BACKENDS and BACKENDS[name][0](device):
            return name
    return "reference"


def sh_shade(normal, light, residue=None, albedo=None, *, normalize=True, beta=0.0, backend="auto"):
    """Fused SH shading plus residue and reconstruction; see the module docstring.

    Returns ``(shading, recon)``, both ``[B,3,H,W]`` (``recon`` is None without albedo).
    """
    check_args(normal, light, residue, albedo, backend)
    name = resolve_backend(backend, normal.device)
    return BACKENDS[name][1](normal, light, residue, albedo, bool(normalize), float(beta))
