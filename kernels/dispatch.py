"""Argument checks and the choice of a backend: which backends run on a device here, what
``auto`` means, and the one warning when the C++ kernels are missing.

:data:`BACKENDS` is the one list of shading backend names; ``auto`` takes the first available
entry of :data:`SHADING_AUTO_ORDER` for the tensors' device.
"""
from __future__ import annotations

import os
import warnings

import torch

from sfs_fast.kernels._ops import fused
from sfs_fast.kernels.reference import sh_shade_reference

# Preference order of "auto", per device type; the first available one is used.
SHADING_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_optional(name, t, normal):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if name != "light" and t.shape != normal.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match normal's {tuple(normal.shape)}")
    if t.dtype != normal.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} does not match normal's {normal.dtype}")
    if t.device != normal.device:
        raise ValueError(f"{name}: device {t.device} does not match normal's {normal.device}")


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
        _check_optional(name, t, normal)
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend: unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")


_COMPILED = None


def _run_compile(normal, light, residue, albedo, normalize, beta):
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(sh_shade_reference, dynamic=False)
    return _COMPILED(normal, light, residue, albedo, normalize, beta)


_WARNED = []


def _cpu_available(device):
    from sfs_fast.kernels import cpu
    if cpu.IMPORT_ERROR is not None and device.type == "cpu" and not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"sfs_fast: the C++ shading kernels are not built ({cpu.IMPORT_ERROR}); "
                      "backend 'auto' uses the slower reference. Reinstall with a C++ compiler.")
    return cpu.available(device)


def _triton_available(device):
    # Cheap answers first: importing triton costs seconds, and on a CPU its kernels run only
    # under the interpreter (TRITON_INTERPRET=1, set before the module is imported).
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    from sfs_fast.kernels import triton_sh_shade
    return triton_sh_shade.available(device)


def _cuda_available(device):
    from sfs_fast.kernels import cuda_sh_shade
    return cuda_sh_shade.available(device)


def _always(device):
    return True


# name -> (is_available(device) -> bool, run(normal, light, residue, albedo, normalize, beta))
_TABLE = {
    "reference": (_always, sh_shade_reference),
    "compile": (_always, _run_compile),
    "cpu": (_cpu_available, fused("cpu")),
    "triton": (_triton_available, fused("triton")),
    "cuda": (_cuda_available, fused("cuda")),
}
BACKENDS = tuple(_TABLE)  # ("reference", "compile", "cpu", "triton", "cuda")


def available_backends(device="cpu"):
    """Names of the backends that run on ``device`` here, in :data:`BACKENDS` order."""
    device = torch.device(device)
    return [name for name in BACKENDS if _TABLE[name][0](device)]


def resolve_backend(backend, device):
    """The backend name that runs for ``backend`` (``auto`` or a name) on ``device``."""
    device = torch.device(device)
    if backend != "auto":
        if not _TABLE[backend][0](device):
            raise ValueError(f"backend: {backend!r} is not available on {device}")
        return backend
    for name in SHADING_AUTO_ORDER.get(device.type, ("reference",)):
        if _TABLE[name][0](device):
            return name
    return "reference"


def run(name, normal, light, residue, albedo, normalize, beta):
    """Call backend ``name`` (a resolved name, not ``auto``)."""
    return _TABLE[name][1](normal, light, residue, albedo, normalize, beta)
