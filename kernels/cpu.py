"""The ``cpu`` backend: tensors in, the C++ kernels of ``kernels/csrc`` (module ``_cpu``) on raw buffers.

Each input is made contiguous once; outputs are new contiguous tensors of the input dtype
(:mod:`._launch`). The kernels write one light-gradient partial sum per image row, so a row is
this backend's tile: ``partial [B, H, 27]``, reduced once (deterministic for any thread count).
"""
from __future__ import annotations

import torch

from sfs_fast.kernels._launch import DTYPE_CODES, backward_call, forward_call, ptr

try:
    from sfs_fast.kernels import _cpu
except ImportError as exc:  # the optional extension was not built
    _cpu = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None


def available(device: torch.device) -> bool:
    return _cpu is not None and device.type == "cpu"


def _sync_threads():
    # The extension links its own OpenMP runtime; follow torch's thread setting.
    n = torch.get_num_threads()
    if _cpu.max_threads() != n:
        _cpu.set_threads(n)


def forward(normal, light, residue, albedo, normalize: bool, beta: float):
    """``[B,3,H,W]`` normal/residue/albedo, ``[B,27]`` light -> (shading, recon or None), contiguous."""
    c = forward_call(normal, light, residue, albedo)
    b, _, h, w = c.normal.shape
    _sync_threads()
    _cpu.forward(DTYPE_CODES[c.normal.dtype], b, h, w, ptr(c.normal), ptr(c.light), ptr(c.residue), ptr(c.albedo),
                 float(beta), bool(normalize), ptr(c.shading), ptr(c.recon))
    return c.shading, c.recon


def backward(normal, light, residue, albedo, grad_shading, grad_recon, normalize: bool, beta: float):
    """Gradients ``(normal [B,3,H,W], light [B,27], residue or None, albedo or None)``.

    ``grad_recon`` is used only when ``albedo`` is given (it may be None otherwise).
    """
    c = backward_call(normal, light, residue, albedo, grad_shading, grad_recon, tiles=normal.shape[2])
    b, _, h, w = c.normal.shape
    _sync_threads()
    _cpu.backward(DTYPE_CODES[c.normal.dtype], b, h, w, ptr(c.normal), ptr(c.light), ptr(c.residue), ptr(c.albedo),
                  float(beta), bool(normalize), ptr(c.grad_shading), ptr(c.grad_recon), ptr(c.grad_normal),
                  ptr(c.grad_residue), ptr(c.grad_albedo), ptr(c.partial))
    return c.grad_normal, c.grad_light(), c.grad_residue, c.grad_albedo
