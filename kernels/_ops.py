"""The fused backends behind one ``torch.library`` op: ``sfs_fast::sh_shade`` and its backward
``sfs_fast::sh_shade_backward``, with ``register_fake`` (shapes for torch.compile/export) and
``register_autograd``.

``reference`` and ``compile`` never go through these ops (ONNX export traces the reference).
Absent optional outputs are empty ``[0]`` tensors, because a custom op cannot return None;
:func:`fused` turns them back into None.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

FUSED_BACKENDS = ("cpu", "triton", "cuda")


def _impl(backend):
    """The launcher module (``forward``/``backward`` on tensors) of a fused backend; imported on
    first use, because importing triton or preparing the CUDA build costs seconds."""
    if backend == "cpu":
        from sfs_fast.kernels import cpu as mod
    elif backend == "triton":
        from sfs_fast.kernels import triton_sh_shade as mod
    elif backend == "cuda":
        from sfs_fast.kernels import cuda_sh_shade as mod
    else:
        raise ValueError(f"backend: {backend!r} is not a fused backend; choose from {', '.join(FUSED_BACKENDS)}")
    return mod


def _absent(ref):
    return ref.new_empty((0,))


def _full(ref):
    return torch.empty_like(ref, memory_format=torch.contiguous_format)


@torch.library.custom_op("sfs_fast::sh_shade", mutates_args=())
def sh_shade_op(normal: torch.Tensor, light: torch.Tensor, residue: Optional[torch.Tensor],
                albedo: Optional[torch.Tensor], normalize: bool, beta: float,
                backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(shading [B,3,H,W], recon [B,3,H,W] or [0] without albedo)``."""
    shading, recon = _impl(backend).forward(normal, light, residue, albedo, normalize, beta)
    return shading, (_absent(normal) if recon is None else recon)


@sh_shade_op.register_fake
def _(normal, light, residue, albedo, normalize, beta, backend):
    shading = _full(normal)
    return shading, (_full(normal) if albedo is not None else _absent(normal))


@torch.library.custom_op("sfs_fast::sh_shade_backward", mutates_args=())
def sh_shade_backward_op(normal: torch.Tensor, light: torch.Tensor, residue: Optional[torch.Tensor],
                         albedo: Optional[torch.Tensor], grad_shading: torch.Tensor,
                         grad_recon: Optional[torch.Tensor], normalize: bool, beta: float,
                         backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: grads of (normal, light [B,27], residue or [0], albedo or [0])."""
    gn, gl, gres, galb = _impl(backend).backward(normal, light, residue, albedo, grad_shading, grad_recon,
                                                 normalize, beta)
    # Absent grads are distinct empty tensors: custom-op outputs may not alias each other.
    return gn, gl, (_absent(normal) if gres is None else gres), (_absent(normal) if galb is None else galb)


@sh_shade_backward_op.register_fake
def _(normal, light, residue, albedo, grad_shading, grad_recon, normalize, beta, backend):
    return (_full(normal), _full(light), _full(normal) if residue is not None else _absent(normal),
            _full(normal) if albedo is not None else _absent(normal))


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
    gn, gl, gres, galb = sh_shade_backward_op(normal, light, residue, albedo, grad_shading, grad_recon,
                                              ctx.normalize, ctx.beta, ctx.backend)
    return (gn, gl, gres if residue is not None else None, galb if albedo is not None else None,
            None, None, None)


sh_shade_op.register_autograd(_backward, setup_context=_setup_context)


def _launcher_alone(*tensors) -> bool:
    """Whether a call may go to the launcher without the op: plain tensors, no gradient to
    record, no torch.compile/export trace and no dispatch mode (make_fx, FakeTensorMode,
    FlopCounterMode) that must see the op. The op's first call imports torch._dynamo (and
    through it triton): torch wraps every custom-op kernel in ``torch._disable_dynamo``, about
    1.5 s of a one-picture ``sfs-decompose`` run that inference never needs."""
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


def fused(backend):
    """``run(normal, light, residue, albedo, normalize, beta) -> (shading, recon or None)`` through
    the op with ``backend`` (one of :data:`FUSED_BACKENDS`); inference calls that nothing traces
    run the same launcher directly (:func:`_launcher_alone`)."""
    def run(normal, light, residue, albedo, normalize, beta):
        if _launcher_alone(normal, light, residue, albedo):
            return _impl(backend).forward(normal, light, residue, albedo, normalize, beta)
        shading, recon = sh_shade_op(normal, light, residue, albedo, normalize, beta, backend)
        return shading, (recon if albedo is not None else None)
    run.__name__ = f"sh_shade_{backend}"
    return run
