"""The ``cuda`` backend: the CUDA C++ kernels of ``kernels/cuda/``, compiled on first use.

``torch.utils.cpp_extension.load`` builds ``sh_shade_kernels.cu`` and its pybind11 binding
once per machine into a cache folder (``$SFS_FAST_CUDA_BUILD_DIR``, else
``$TORCH_EXTENSIONS_DIR`` / torch's default), then reuses it. Kernels take raw device pointers
and the current stream; tensors are made contiguous once, like the cpu backend.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = [SOURCE_DIR / "sh_shade_binding.cpp", SOURCE_DIR / "sh_shade_kernels.cu"]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_module = None
_lock = threading.Lock()


def available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.version.cuda is not None


def load():
    """Compile (first call on a machine, about 20-60 s) or load the cached extension module."""
    global _module
    with _lock:
        if _module is None:
            from torch.utils.cpp_extension import load as cpp_load

            build_dir = os.environ.get("SFS_FAST_CUDA_BUILD_DIR")
            if build_dir:
                os.makedirs(build_dir, exist_ok=True)
            _module = cpp_load(name="sfs_fast_sh_shade_cuda", sources=[str(s) for s in SOURCES],
                               build_directory=build_dir, extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3"],
                               verbose=False)
    return _module


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _contig(t):
    return None if t is None else t.contiguous()


MAX_BATCH = 65535  # the batch is the launch grid's second axis (grid.y), limited to 2^16 - 1


def _check_batch(normal):
    if normal.shape[0] > MAX_BATCH:
        raise ValueError(f"normal: batch {normal.shape[0]} exceeds {MAX_BATCH}, the most one launch takes; split it")


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def forward(normal, light, residue, albedo, normalize: bool, beta: float):
    """``[B,3,H,W]`` normal/residue/albedo, ``[B,27]`` light -> (shading, recon or None), contiguous."""
    mod = load()
    _check_batch(normal)
    normal, residue, albedo = _contig(normal), _contig(residue), _contig(albedo)
    light = light.to(_acc_dtype(normal.dtype)).contiguous()
    b, _, h, w = normal.shape
    shading = torch.empty_like(normal, memory_format=torch.contiguous_format)
    recon = None if albedo is None else torch.empty_like(shading)
    with torch.cuda.device(normal.device):
        mod.forward(DTYPE_CODES[normal.dtype], b, h, w, _ptr(normal), _ptr(light), _ptr(residue), _ptr(albedo),
                    float(beta), bool(normalize), _ptr(shading), _ptr(recon), _stream(normal.device))
    return shading, recon


def backward(normal, light, residue, albedo, grad_shading, grad_recon, normalize: bool, beta: float):
    """Gradients ``(normal [B,3,H,W], light [B,27], residue or None, albedo or None)``."""
    mod = load()
    _check_batch(normal)
    normal, residue, albedo = _contig(normal), _contig(residue), _contig(albedo)
    grad_shading = grad_shading.to(normal.dtype).contiguous()
    if albedo is not None:
        grad_recon = torch.zeros_like(albedo) if grad_recon is None else grad_recon.to(normal.dtype).contiguous()
    else:
        grad_recon = None
    acc = _acc_dtype(normal.dtype)
    light_acc = light.to(acc).contiguous()
    b, _, h, w = normal.shape
    grad_normal = torch.empty_like(normal)
    grad_residue = None if residue is None else torch.empty_like(normal)
    grad_albedo = None if albedo is None else torch.empty_like(normal)
    tiles = ((h + 7) // 8) * ((w + 31) // 32)  # the kernels' 8 x 32 tiles
    partial = torch.empty(b, tiles, 27, dtype=acc, device=normal.device)
    with torch.cuda.device(normal.device):
        mod.backward(DTYPE_CODES[normal.dtype], b, h, w, _ptr(normal), _ptr(light_acc), _ptr(residue),
                     _ptr(albedo), float(beta), bool(normalize), _ptr(grad_shading), _ptr(grad_recon),
                     _ptr(grad_normal), _ptr(grad_residue), _ptr(grad_albedo), _ptr(partial),
                     _stream(normal.device))
    return grad_normal, partial.sum(1).to(light.dtype), grad_residue, grad_albedo
