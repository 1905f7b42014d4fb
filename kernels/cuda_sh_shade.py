"""The ``cuda`` backend: the CUDA C++ kernels of ``kernels/cuda/``, compiled on first use.

``torch.utils.cpp_extension.load`` builds ``sh_shade_kernels.cu`` and its pybind11 binding
once per machine into a cache folder (``$SFS_FAST_CUDA_BUILD_DIR``, else
``$TORCH_EXTENSIONS_DIR`` / torch's default), then reuses it. Kernels take raw device pointers
and the current stream; tensors are prepared by :mod:`._launch`, like the cpu backend. The
backward's partial-sum buffer is sized from the tile geometry the compiled module reports
(:func:`tile_geometry`), never from a copy of it here.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from sfs_fast.kernels._launch import DTYPE_CODES, backward_call, check_grid_batch, forward_call, ptr, tile_count

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = [SOURCE_DIR / "sh_shade_binding.cpp", SOURCE_DIR / "sh_shade_kernels.cu"]

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
            # The .cu includes ../csrc/sh_basis.h (shipped as package data); ninja tracks it.
            _module = cpp_load(name="sfs_fast_sh_shade_cuda", sources=[str(s) for s in SOURCES],
                               build_directory=build_dir, extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3"],
                               verbose=False)
    return _module


def tile_geometry(module) -> tuple:
    """``(block_h, block_w)``: the pixels of one thread block's tile, as ``module`` reports it."""
    report = getattr(module, "tile_geometry", None)
    if report is None:
        raise RuntimeError("the cached CUDA shading module predates tile_geometry(); delete its build folder "
                           "so that it is rebuilt from the current sources")
    geometry = tuple(report())
    tile_count(1, 1, geometry)  # raises on a malformed report
    return geometry


def light_partial_tiles(module, h: int, w: int) -> int:
    """Partial light sums per image the module's backward writes for an ``h x w`` image."""
    return tile_count(h, w, tile_geometry(module))


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def forward(normal, light, residue, albedo, normalize: bool, beta: float):
    """``[B,3,H,W]`` normal/residue/albedo, ``[B,27]`` light -> (shading, recon or None), contiguous."""
    mod = load()
    check_grid_batch(normal)
    c = forward_call(normal, light, residue, albedo)
    b, _, h, w = c.normal.shape
    with torch.cuda.device(c.normal.device):
        mod.forward(DTYPE_CODES[c.normal.dtype], b, h, w, ptr(c.normal), ptr(c.light), ptr(c.residue),
                    ptr(c.albedo), float(beta), bool(normalize), ptr(c.shading), ptr(c.recon),
                    _stream(c.normal.device))
    return c.shading, c.recon


def backward(normal, light, residue, albedo, grad_shading, grad_recon, normalize: bool, beta: float):
    """Gradients ``(normal [B,3,H,W], light [B,27], residue or None, albedo or None)``."""
    mod = load()
    check_grid_batch(normal)
    b, _, h, w = normal.shape
    c = backward_call(normal, light, residue, albedo, grad_shading, grad_recon,
                      tiles=light_partial_tiles(mod, h, w))
    with torch.cuda.device(c.normal.device):
        # The binding refuses a partial sized for other tiles than the kernels' (no overrun).
        mod.backward(DTYPE_CODES[c.normal.dtype], b, h, w, ptr(c.normal), ptr(c.light), ptr(c.residue),
                     ptr(c.albedo), float(beta), bool(normalize), ptr(c.grad_shading), ptr(c.grad_recon),
                     ptr(c.grad_normal), ptr(c.grad_residue), ptr(c.grad_albedo), ptr(c.partial),
                     c.partial.shape[1], _stream(c.normal.device))
    return c.grad_normal, c.grad_light(), c.grad_residue, c.grad_albedo
