"""What the fused-backend launchers (:mod:`.cpu`, :mod:`.cuda_sh_shade`, :mod:`.triton_sh_shade`)
share: contiguous inputs and new outputs, raw pointers, the compiled kernels' dtype codes, the
light-gradient partial-sum buffer and the launch-grid batch limit.

Every launcher makes each input contiguous once, passes the light in the accumulation type
(float32, float64 for float64 tensors) and gets the light gradient back as per-tile partial
sums ``[B, tiles, 27]`` that :meth:`BackwardCall.grad_light` reduces once (no atomics, the same
answer for any thread count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# The dtype switch of the compiled kernels (csrc/sh_shade_impl.h, cuda/sh_shade_kernels.cu).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

# The GPU launchers put the batch on the grid's second axis, limited to 2^16 - 1 blocks.
MAX_GRID_BATCH = 65535


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type of the kernels for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ptr(t: Optional[torch.Tensor]) -> int:
    """The data pointer the compiled kernels take; 0 stands for an absent buffer."""
    return 0 if t is None else t.data_ptr()


def contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def check_grid_batch(normal: torch.Tensor) -> None:
    """Refuse a batch one GPU launch cannot hold (ValueError naming ``normal``)."""
    if normal.shape[0] > MAX_GRID_BATCH:
        raise ValueError(f"normal: batch {normal.shape[0]} exceeds {MAX_GRID_BATCH}, the most one launch "
                         "takes; split it")


def tile_count(h: int, w: int, geometry: Tuple[int, int]) -> int:
    """Tiles of ``geometry = (block_h, block_w)`` pixels that cover an ``h x w`` image."""
    if len(geometry) != 2 or not all(isinstance(v, int) and v > 0 for v in geometry):
        raise ValueError(f"geometry: expected two positive ints (block_h, block_w), got {geometry!r}")
    block_h, block_w = geometry
    return -(-h // block_h) * -(-w // block_w)


@dataclass
class _Inputs:
    """Contiguous ``[B,3,H,W]`` inputs of a launch, ``light [B,27]`` in the accumulation type."""
    normal: torch.Tensor
    light: torch.Tensor
    residue: Optional[torch.Tensor]
    albedo: Optional[torch.Tensor]


@dataclass
class ForwardCall(_Inputs):
    """A forward's inputs and its new contiguous outputs."""
    shading: torch.Tensor
    recon: Optional[torch.Tensor]


def forward_call(normal, light, residue, albedo) -> ForwardCall:
    normal = normal.contiguous()
    shading = torch.empty_like(normal)
    return ForwardCall(normal, light.to(acc_dtype(normal.dtype)).contiguous(), contiguous(residue),
                       contiguous(albedo), shading, None if albedo is None else torch.empty_like(shading))


@dataclass
class BackwardCall(_Inputs):
    """A backward's inputs, contiguous incoming gradients and new gradient buffers, all
    ``[B,3,H,W]`` but ``partial`` (``[B, tiles, 27]``, accumulation type)."""
    grad_shading: torch.Tensor
    grad_recon: Optional[torch.Tensor]
    grad_normal: torch.Tensor
    grad_residue: Optional[torch.Tensor]
    grad_albedo: Optional[torch.Tensor]
    partial: torch.Tensor
    light_dtype: torch.dtype

    def grad_light(self) -> torch.Tensor:
        """The light gradient ``[B,27]`` in the light's dtype: the partial sums reduced once."""
        return self.partial.sum(1).to(self.light_dtype)


def backward_call(normal, light, residue, albedo, grad_shading, grad_recon, tiles: int) -> BackwardCall:
    """Prepare a backward whose kernel writes ``tiles`` partial light sums per image.

    ``grad_recon`` is used only with ``albedo`` (None there means zeros, as autograd passes it
    when ``recon`` was unused); without ``albedo`` it is dropped.
    """
    normal = normal.contiguous()
    dtype = normal.dtype
    grad_shading = grad_shading.to(dtype).contiguous()
    if albedo is None:
        grad_recon = None
    else:
        grad_recon = torch.zeros_like(normal) if grad_recon is None else grad_recon.to(dtype).contiguous()
    acc = acc_dtype(dtype)
    # An empty image launches nothing: zeros, so the reduced light gradient is 0, not garbage.
    alloc = torch.zeros if normal.numel() == 0 else torch.empty
    partial = alloc(normal.shape[0], tiles, 27, dtype=acc, device=normal.device)
    return BackwardCall(normal, light.to(acc).contiguous(), contiguous(residue), contiguous(albedo), grad_shading,
                        grad_recon, torch.empty_like(normal),
                        None if residue is None else torch.empty_like(normal),
                        None if albedo is None else torch.empty_like(normal), partial, light.dtype)
