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
the single ``torch.library`` op ``sfs_fast::sh_shade`` (with ``register_fake`` and
``register_autograd``; its backward is the op ``sfs_fast::sh_shade_backward``): ``cpu`` (C++
with OpenMP and SIMD, :mod:`.cpu`), ``triton`` (:mod:`.triton_sh_shade`) and ``cuda``
(:mod:`.cuda_sh_shade`, compiled on first use). ``auto`` takes the first available entry of
``AUTO_ORDER`` for the tensors' device: cpu on CPU tensors, triton on CUDA tensors.

Example::

    >>> n = torch.randn(2, 3, 8, 8); L = torch.randn(2, 27)
    >>> shading, recon = sh_shade(n, L, albedo=torch.rand(2, 3, 8, 8))
    >>> shading.shape
    torch.Size([2, 3, 8, 8])
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

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


# --------------------------------------------------------------------------------------
# The fused backends behind one torch.library op. "reference" and "compile" never go through
# it (ONNX export traces the reference). Absent optional outputs are empty [0] tensors,
# because a custom op cannot return None.
# --------------------------------------------------------------------------------------

def _fused_impl(backend):
    """The module implementing ``forward``/``backward`` on tensors for a fused backend."""
    if backend == "cpu":
        from . import cpu as mod
    elif backend == "triton":
        from . import triton_sh_shade as mod
    elif backend == "cuda":
        from . import cuda_sh_shade as mod
    else:
        raise ValueError(f"backend: {backend!r} is not a fused backend")
    return mod


def _empty_like_absent(ref):
    return ref.new_empty((0,))


@torch.library.custom_op("sfs_fast::sh_shade", mutates_args=())
def _sh_shade_op(normal: torch.Tensor, light: torch.Tensor, residue: Optional[torch.Tensor],
                 albedo: Optional[torch.Tensor], normalize: bool, beta: float,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(shading [B,3,H,W], recon [B,3,H,W] or [0] without albedo)``."""
    shading, recon = _fused_impl(backend).forward(normal, light, residue, albedo, normalize, beta)
    return shading, (_empty_like_absent(normal) if recon is None else recon)


@_sh_shade_op.register_fake
def _(normal, light, residue, albedo, normalize, beta, backend):
    shading = torch.empty_like(normal, memory_format=torch.contiguous_format)
    recon = torch.empty_like(shading) if albedo is not None else normal.new_empty((0,))
    return shading, recon


@torch.library.custom_op("sfs_fast::sh_shade_backward", mutates_args=())
def _sh_shade_backward_op(normal: torch.Tensor, light: torch.Tensor, residue: Optional[torch.Tensor],
                          albedo: Optional[torch.Tensor], grad_shading: torch.Tensor,
                          grad_recon: Optional[torch.Tensor], normalize: bool, beta: float,
                          backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: grads of (normal, light [B,27], residue or [0], albedo or [0])."""
    gn, gl, gres, galb = _fused_impl(backend).backward(normal, light, residue, albedo, grad_shading,
                                                       grad_recon, normalize, beta)
    # Absent grads are distinct empty tensors: custom-op outputs may not alias each other.
    return (gn, gl, _empty_like_absent(normal) if gres is None else gres,
            _empty_like_absent(normal) if galb is None else galb)


@_sh_shade_backward_op.register_fake
def _(normal, light, residue, albedo, grad_shading, grad_recon, normalize, beta, backend):
    full = torch.empty_like(normal, memory_format=torch.contiguous_format)
    return (full, torch.empty_like(light, memory_format=torch.contiguous_format),
            torch.empty_like(full) if residue is not None else normal.new_empty((0,)),
            torch.empty_like(full) if albedo is not None else normal.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    normal, light, residue, albedo, normalize, beta, backend = inputs
    ctx.save_for_backward(normal, light, residue, albedo)
    ctx.normalize, ctx.beta, ctx.backend = normalize, beta, backend


def _backward(ctx, grad_shading, grad_recon):
    normal, light, residue, albedo = ctx.saved_tensors
    if grad_shading is None:
        grad_shading = torch.zeros_like(normal)
    if albedo is None:
        grad_recon = None
    elif grad_recon is None:
        grad_recon = torch.zeros_like(albedo)
    gn, gl, gres, galb = _sh_shade_backward_op(normal, light, residue, albedo, grad_shading, grad_recon,
                                               ctx.normalize, ctx.beta, ctx.backend)
    return (gn, gl, gres if residue is not None else None, galb if albedo is not None else None,
            None, None, None)


_sh_shade_op.register_autograd(_backward, setup_context=_setup_context)


def _fused(backend):
    def run(normal, light, residue, albedo, normalize, beta):
        shading, recon = _sh_shade_op(normal, light, residue, albedo, normalize, beta, backend)
        return shading, (recon if albedo is not None else None)
    run.__name__ = f"sh_shade_{backend}"
    return run


def _cpu_available(device):
    from . import cpu
    if cpu.IMPORT_ERROR is not None and device.type == "cpu" and not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"sfs_fast: the C++ shading kernels are not built ({cpu.IMPORT_ERROR}); "
                      "backend 'auto' uses the slower reference. Reinstall with a C++ compiler.")
    return cpu.available(device)


_WARNED = []


def _triton_available(device):
    # Cheap answers first: importing triton costs seconds, and on a CPU its kernels run only
    # under the interpreter (TRITON_INTERPRET=1, set before the module is imported).
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    from . import triton_sh_shade
    return triton_sh_shade.available(device)


def _cuda_available(device):
    from . import cuda_sh_shade as cuda
    return cuda.available(device)


# name -> (is_available(device) -> bool, implementation)
BACKENDS = {
    "reference": (lambda device: True, sh_shade_reference),
    "compile": (lambda device: True, _run_compile),
    "cpu": (_cpu_available, _fused("cpu")),
    "triton": (_triton_available, _fused("triton")),
    "cuda": (_cuda_available, _fused("cuda")),
}

# Preference order of "auto", per device type; the first available one is used.
AUTO_ORDER = {"cpu": ["cpu", "reference"], "cuda": ["triton", "cuda", "reference"]}


def available_backends(device="cpu"):
    """Names of the backends that run on ``device`` here."""
    device = torch.device(device)
    return [name for name, (ok, _) in BACKENDS.items() if ok(device)]


def resolve_backend(backend, device):
    """The backend name that runs for ``backend`` (``auto`` or a name) on ``device``."""
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
