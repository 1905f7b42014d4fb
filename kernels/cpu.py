"""The ``cpu`` backend: tensors in, the C++ kernels of ``kernels/csrc`` (module ``_cpu``) on raw buffers.

Each input is made contiguous once; outputs are new contiguous tensors of the input dtype.
The light travels in the accumulation type (float32, or float64 for float64 inputs), and the
light gradient comes back as per-row partial sums ``[B*H, 27]`` that are reduced here once
(deterministic for any thread count).
"""
from __future__ import annotations

import torch

try:
    from . import _cpu
except ImportError as exc:  # the optional extension was not built
    _cpu = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def available(device: torch.device) -> bool:
    return _cpu is not None and device.type == "cpu"


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _sync_threads():
    # The extension links its own OpenMP runtime; follow torch's thread setting.
    n = torch.get_num_threads()
    if _cpu.max_threads() != n:
        _cpu.set_threads(n)


def _contig(t):
    return None if t is None else t.contiguous()


def forward(normal, light, residue, albedo, normalize: bool, beta: float):
    """``[B,3,H,W]`` normal/residue/albedo, ``[B,27]`` light -> (shading, recon or None), contiguous."""
    normal, residue, albedo = _contig(normal), _contig(residue), _contig(albedo)
    light = light.to(_acc_dtype(normal.dtype)).contiguous()
    b, _, h, w = normal.shape
    shading = torch.empty_like(normal, memory_format=torch.contiguous_format)
    recon = None if albedo is None else torch.empty_like(shading)
    _sync_threads()
    _cpu.forward(DTYPE_CODES[normal.dtype], b, h, w, _ptr(normal), _ptr(light), _ptr(residue), _ptr(albedo),
                 float(beta), bool(normalize), _ptr(shading), _ptr(recon))
    return shading, recon


def backward(normal, light, residue, albedo, grad_shading, grad_recon, normalize: bool, beta: float):
    """Gradients ``(normal [B,3,H,W], light [B,27], residue or None, albedo or None)``.

    ``grad_recon`` is used only when ``albedo`` is given (it may be None otherwise).
    """
    normal, residue, albedo = _contig(normal), _contig(residue), _contig(albedo)
    grad_shading = grad_shading.to(normal.dtype).contiguous()
    if albedo is not None:
        grad_recon = torch.zeros_like(albedo) if grad_recon is None else grad_recon.to(normal.dtype).contiguous()
    acc = _acc_dtype(normal.dtype)
    light_acc = light.to(acc).contiguous()
    b, _, h, w = normal.shape
    grad_normal = torch.empty_like(normal)
    grad_residue = None if residue is None else torch.empty_like(normal)
    grad_albedo = None if albedo is None else torch.empty_like(normal)
    partial = torch.empty(b * h, 27, dtype=acc)
    _sync_threads()
    _cpu.backward(DTYPE_CODES[normal.dtype], b, h, w, _ptr(normal), _ptr(light_acc), _ptr(residue), _ptr(albedo),
                  float(beta), bool(normalize), _ptr(grad_shading), _ptr(grad_recon if albedo is not None else None),
                  _ptr(grad_normal), _ptr(grad_residue), _ptr(grad_albedo), _ptr(partial))
    grad_light = partial.view(b, h, 27).sum(1).to(light.dtype)
    return grad_normal, grad_light, grad_residue, grad_albedo
