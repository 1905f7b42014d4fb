"""The ``triton`` backend: forward kernel, backward kernel, launchers (in that order).

Programs are 2-D tiles of ``BLOCK_H x BLOCK_W`` pixels, one program per tile per image
(grid ``(tiles_h * tiles_w, B)``). The backward writes each program's 27 light-gradient sums
to ``partial[B, tiles, 27]``, reduced once by the launcher (no atomics). Accumulation is
float32 (float64 for float64 tensors); the launchers' tensor preparation is :mod:`._launch`'s.

On a machine without a GPU it runs under the Triton interpreter: set ``TRITON_INTERPRET=1``
before triton is imported; then it takes CPU tensors (that is how its tests run).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (Linux x86-64 GPU installs)
    triton = None

from sfs_fast.sh import C1, C2, C3, C4, C5, NORMAL_EPS

from sfs_fast.kernels._launch import backward_call, check_grid_batch, forward_call, tile_count


def available(device: torch.device) -> bool:
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _basis(x, y, z):
        y0 = tl.full(x.shape, C1, x.dtype)
        y1 = C2 * z
        y2 = C2 * x
        y3 = C2 * y
        y4 = C3 * (2.0 * z * z - x * x - y * y)
        y5 = C4 * x * z
        y6 = C4 * y * z
        y7 = C5 * (x * x - y * y)
        y8 = C4 * x * y
        return y0, y1, y2, y3, y4, y5, y6, y7, y8

    @triton.jit
    def _dot9(lp, y0, y1, y2, y3, y4, y5, y6, y7, y8, ACC: tl.constexpr):
        return (tl.load(lp + 0).to(ACC) * y0 + tl.load(lp + 1).to(ACC) * y1 + tl.load(lp + 2).to(ACC) * y2
                + tl.load(lp + 3).to(ACC) * y3 + tl.load(lp + 4).to(ACC) * y4 + tl.load(lp + 5).to(ACC) * y5
                + tl.load(lp + 6).to(ACC) * y6 + tl.load(lp + 7).to(ACC) * y7 + tl.load(lp + 8).to(ACC) * y8)

    @triton.jit
    def _tile(H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        tiles_w = (W + BLOCK_W - 1) // BLOCK_W
        t = tl.program_id(0)
        rows = (t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = (t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs = rows[:, None] * W + cols[None, :]
        mask = (rows[:, None] < H) & (cols[None, :] < W)
        return offs, mask

    @triton.jit
    def _unit(normal_ptr, offs, mask, HW, NORMALIZE: tl.constexpr, ACC: tl.constexpr):
        x = tl.load(normal_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(normal_ptr + HW + offs, mask=mask, other=0.0).to(ACC)
        z = tl.load(normal_ptr + 2 * HW + offs, mask=mask, other=0.0).to(ACC)
        if NORMALIZE:
            r = tl.sqrt(x * x + y * y + z * z)
            inv_d = 1.0 / (r + NORMAL_EPS)
            inv_r = tl.where(r > 0.0, 1.0 / tl.where(r > 0.0, r, 1.0), 0.0)
        else:
            inv_d = tl.full(x.shape, 1.0, ACC)
            inv_r = tl.full(x.shape, 0.0, ACC)
        return x, y, z, inv_d, inv_r

    @triton.jit
    def _forward_kernel(normal_ptr, light_ptr, residue_ptr, albedo_ptr, shading_ptr, recon_ptr, H, W, beta,
                        HAS_RESIDUE: tl.constexpr, HAS_ALBEDO: tl.constexpr, NORMALIZE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        HW = H * W
        base = b * 3 * HW
        offs, mask = _tile(H, W, BLOCK_H, BLOCK_W)
        x, y, z, inv_d, inv_r = _unit(normal_ptr + base, offs, mask, HW, NORMALIZE, ACC)
        y0, y1, y2, y3, y4, y5, y6, y7, y8 = _basis(x * inv_d, y * inv_d, z * inv_d)
        for c in tl.static_range(3):
            p = base + c * HW + offs
            s = _dot9(light_ptr + b * 27 + 9 * c, y0, y1, y2, y3, y4, y5, y6, y7, y8, ACC)
            if HAS_RESIDUE:
                res = tl.load(residue_ptr + p, mask=mask, other=0.0).to(ACC)
                s += res
            tl.store(shading_ptr + p, s.to(shading_ptr.dtype.element_ty), mask=mask)
            if HAS_ALBEDO:
                refl = tl.load(albedo_ptr + p, mask=mask, other=0.0).to(ACC)
                if HAS_RESIDUE:
                    refl -= beta * res
                tl.store(recon_ptr + p, (s * refl).to(recon_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_light_partial(pp, g, y0, y1, y2, y3, y4, y5, y6, y7, y8):
        tl.store(pp + 0, tl.sum(tl.sum(g * y0, 1), 0))
        tl.store(pp + 1, tl.sum(tl.sum(g * y1, 1), 0))
        tl.store(pp + 2, tl.sum(tl.sum(g * y2, 1), 0))
        tl.store(pp + 3, tl.sum(tl.sum(g * y3, 1), 0))
        tl.store(pp + 4, tl.sum(tl.sum(g * y4, 1), 0))
        tl.store(pp + 5, tl.sum(tl.sum(g * y5, 1), 0))
        tl.store(pp + 6, tl.sum(tl.sum(g * y6, 1), 0))
        tl.store(pp + 7, tl.sum(tl.sum(g * y7, 1), 0))
        tl.store(pp + 8, tl.sum(tl.sum(g * y8, 1), 0))

    @triton.jit
    def _backward_kernel(normal_ptr, light_ptr, residue_ptr, albedo_ptr, grad_shading_ptr, grad_recon_ptr,
                         grad_normal_ptr, grad_residue_ptr, grad_albedo_ptr, partial_ptr, H, W, beta,
                         HAS_RESIDUE: tl.constexpr, HAS_ALBEDO: tl.constexpr, NORMALIZE: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        tiles = tl.num_programs(0)
        HW = H * W
        base = b * 3 * HW
        offs, mask = _tile(H, W, BLOCK_H, BLOCK_W)
        x, y, z, inv_d, inv_r = _unit(normal_ptr + base, offs, mask, HW, NORMALIZE, ACC)
        ux = x * inv_d
        uy = y * inv_d
        uz = z * inv_d
        y0, y1, y2, y3, y4, y5, y6, y7, y8 = _basis(ux, uy, uz)
        lw1 = tl.zeros_like(ux)
        lw2 = tl.zeros_like(ux)
        lw3 = tl.zeros_like(ux)
        lw4 = tl.zeros_like(ux)
        lw5 = tl.zeros_like(ux)
        lw6 = tl.zeros_like(ux)
        lw7 = tl.zeros_like(ux)
        lw8 = tl.zeros_like(ux)
        pbase = partial_ptr + (b * tiles + tl.program_id(0)) * 27
        for c in tl.static_range(3):
            p = base + c * HW + offs
            lp = light_ptr + b * 27 + 9 * c
            g = tl.load(grad_shading_ptr + p, mask=mask, other=0.0).to(ACC)
            if HAS_ALBEDO:
                s = _dot9(lp, y0, y1, y2, y3, y4, y5, y6, y7, y8, ACC)
                refl = tl.load(albedo_ptr + p, mask=mask, other=0.0).to(ACC)
                if HAS_RESIDUE:
                    res = tl.load(residue_ptr + p, mask=mask, other=0.0).to(ACC)
                    s += res
                    refl -= beta * res
                grc = tl.load(grad_recon_ptr + p, mask=mask, other=0.0).to(ACC)
                g += grc * refl
                tl.store(grad_albedo_ptr + p, (grc * s).to(grad_albedo_ptr.dtype.element_ty), mask=mask)
                if HAS_RESIDUE:
                    tl.store(grad_residue_ptr + p, (g - beta * grc * s).to(grad_residue_ptr.dtype.element_ty),
                             mask=mask)
            elif HAS_RESIDUE:
                tl.store(grad_residue_ptr + p, g.to(grad_residue_ptr.dtype.element_ty), mask=mask)
            _store_light_partial(pbase + 9 * c, g, y0, y1, y2, y3, y4, y5, y6, y7, y8)
            lw1 += g * tl.load(lp + 1).to(ACC)
            lw2 += g * tl.load(lp + 2).to(ACC)
            lw3 += g * tl.load(lp + 3).to(ACC)
            lw4 += g * tl.load(lp + 4).to(ACC)
            lw5 += g * tl.load(lp + 5).to(ACC)
            lw6 += g * tl.load(lp + 6).to(ACC)
            lw7 += g * tl.load(lp + 7).to(ACC)
            lw8 += g * tl.load(lp + 8).to(ACC)
        gx = C2 * lw2 - 2.0 * C3 * ux * lw4 + C4 * uz * lw5 + 2.0 * C5 * ux * lw7 + C4 * uy * lw8
        gy = C2 * lw3 - 2.0 * C3 * uy * lw4 + C4 * uz * lw6 - 2.0 * C5 * uy * lw7 + C4 * ux * lw8
        gz = C2 * lw1 + 4.0 * C3 * uz * lw4 + C4 * ux * lw5 + C4 * uy * lw6
        if NORMALIZE:
            # u = n / (|n| + eps): du/dn = I/d - n n^T / (d^2 |n|); the second term is 0 at n = 0.
            proj = (gx * x + gy * y + gz * z) * inv_d * inv_d * inv_r
            gx = gx * inv_d - x * proj
            gy = gy * inv_d - y * proj
            gz = gz * inv_d - z * proj
        out = grad_normal_ptr + base + offs
        tl.store(out, gx.to(grad_normal_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HW, gy.to(grad_normal_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 2 * HW, gz.to(grad_normal_ptr.dtype.element_ty), mask=mask)


BLOCK_H, BLOCK_W = 8, 64


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(b, h, w):
    return (tile_count(h, w, (BLOCK_H, BLOCK_W)), b)


def forward(normal, light, residue, albedo, normalize: bool, beta: float):
    """``[B,3,H,W]`` normal/residue/albedo, ``[B,27]`` light -> (shading, recon or None), contiguous."""
    check_grid_batch(normal)
    c = forward_call(normal, light, residue, albedo)
    b, _, h, w = c.normal.shape
    if c.shading.numel() == 0:
        return c.shading, c.recon
    _forward_kernel[_grid(b, h, w)](
        c.normal, c.light, c.residue, c.albedo, c.shading, c.recon, h, w, float(beta),
        HAS_RESIDUE=c.residue is not None, HAS_ALBEDO=c.albedo is not None, NORMALIZE=bool(normalize),
        ACC=_acc(c.normal.dtype), BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return c.shading, c.recon


def backward(normal, light, residue, albedo, grad_shading, grad_recon, normalize: bool, beta: float):
    """Gradients ``(normal [B,3,H,W], light [B,27], residue or None, albedo or None)``."""
    check_grid_batch(normal)
    b, _, h, w = normal.shape
    grid = _grid(b, h, w)
    c = backward_call(normal, light, residue, albedo, grad_shading, grad_recon, tiles=grid[0])
    if c.normal.numel() > 0:
        _backward_kernel[grid](
            c.normal, c.light, c.residue, c.albedo, c.grad_shading, c.grad_recon, c.grad_normal, c.grad_residue,
            c.grad_albedo, c.partial, h, w, float(beta),
            HAS_RESIDUE=c.residue is not None, HAS_ALBEDO=c.albedo is not None, NORMALIZE=bool(normalize),
            ACC=_acc(c.normal.dtype), BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return c.grad_normal, c.grad_light(), c.grad_residue, c.grad_albedo
