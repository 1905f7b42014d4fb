"""Spherical-harmonics lighting: the one place that defines the convention.

Convention (SfSNet, SPEC B.2.1): 9 second-order real SH basis functions with the
Lambertian attenuation ``pi * [1, 2/3, 1/4]`` folded into the constants, in the order

    [L00, L10 (z), L11e (x), L11o (y), L20, L21e (xz), L21o (yz), L22e (x^2 - y^2), L22o (xy)]

A light is 27 floats: three blocks of 9 coefficients that light the R, G and B channels.
Shading of channel ``c`` is ``sum_k Y_k(n) * light[9c + k]`` for a unit normal ``n``.

This module is a leaf: it imports only torch and numpy.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

ATTENUATION = (math.pi, 2.0 * math.pi / 3.0, math.pi / 4.0)

C1 = ATTENUATION[0] / math.sqrt(4.0 * math.pi)  # 0.886226925...
C2 = ATTENUATION[1] * math.sqrt(3.0 / (4.0 * math.pi))  # 1.023326707...
C3 = ATTENUATION[2] * 0.5 * math.sqrt(5.0 / (4.0 * math.pi))  # 0.247707956...
C4 = ATTENUATION[2] * 3.0 * math.sqrt(5.0 / (12.0 * math.pi))  # 0.858085530...
C5 = ATTENUATION[2] * 3.0 * math.sqrt(5.0 / (48.0 * math.pi))  # 0.429042765...

SH_ORDER = ("L00", "L10_z", "L11e_x", "L11o_y", "L20", "L21e_xz", "L21o_yz", "L22e_x2-y2", "L22o_xy")
N_COEFFS = 9
N_LIGHT = 27
CHANNELS = ("R", "G", "B")

# Index map from the DPR / shtools order [1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2]
# to the SfSNet order above: l_sfsnet = l_dpr[DPR_TO_SFSNET].
DPR_TO_SFSNET = (0, 2, 3, 1, 6, 7, 5, 8, 4)

# Per-pixel epsilon added to |n| before dividing (Caffe's Norm layer and SPEC A.3).
NORMAL_EPS = 1e-8

CONVENTION = {
    "sh_order": list(SH_ORDER),
    "sh_channel_blocks": "R|G|B, 9 each",
    "sh_attenuation": "pi*[1, 2/3, 1/4] folded into the basis constants",
    "normal": "unit (x, y, z) per pixel, channels 0..2 of the normal map",
}


def sh_basis(normal: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The 9 SH basis values of (already unit) normals.

    Args:
        normal: tensor with the 3 components ``(x, y, z)`` along ``dim``, e.g. ``[B,3,H,W]``.
        dim: the component dimension.
    Returns:
        tensor of the same shape with 9 instead of 3 along ``dim`` (SfSNet order).

    >>> sh_basis(torch.tensor([[0.0, 0.0, 1.0]]))[0, :3]
    tensor([0.8862, 1.0233, 0.0000])
    """
    x, y, z = normal.unbind(dim)
    ones = torch.ones_like(x)
    basis = (
        C1 * ones,
        C2 * z,
        C2 * x,
        C2 * y,
        C3 * (2.0 * z * z - x * x - y * y),
        C4 * x * z,
        C4 * y * z,
        C5 * (x * x - y * y),
        C4 * x * y,
    )
    return torch.stack(basis, dim)


def normalize_normal(normal: torch.Tensor) -> torch.Tensor:
    """``n / (|n| + 1e-8)`` over channel dim 1 of ``[B,3,H,W]``.

    Written as ``sqrt(sum(n*n))`` rather than ``F.normalize``: the latter takes a slow
    vector-norm path over the channel dimension of NCHW tensors on the CPU.
    """
    norm = (normal * normal).sum(1, keepdim=True).sqrt()
    return normal / (norm + NORMAL_EPS)


def shade(unit_normal: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """SH shading of unit normals ``[B,3,H,W]`` under lights ``[B,27]`` -> ``[B,3,H,W]``.

    Written with a batched matmul so that it exports to plain ONNX operators.
    """
    b, _, h, w = unit_normal.shape
    basis = sh_basis(unit_normal, 1).reshape(b, N_COEFFS, h * w)
    coeffs = light.reshape(b, 3, N_COEFFS)
    return torch.matmul(coeffs, basis).reshape(b, 3, h, w)


def dpr_to_sfsnet(light9) -> np.ndarray:
    """Reorder 9 coefficients from the DPR/shtools order to the SfSNet order."""
    light9 = np.asarray(light9, dtype=np.float64).reshape(-1)
    if light9.shape != (N_COEFFS,):
        raise ValueError(f"light: expected 9 coefficients, got {light9.size}")
    return light9[list(DPR_TO_SFSNET)]


def grey_light(light9) -> np.ndarray:
    """A 27-value light that uses the same 9 coefficients for R, G and B."""
    light9 = np.asarray(light9, dtype=np.float64).reshape(-1)
    if light9.shape != (N_COEFFS,):
        raise ValueError(f"light: expected 9 coefficients, got {light9.size}")
    return np.tile(light9, 3)


def read_light(path: str | os.PathLike) -> np.ndarray:
    """Read a light file: 27 floats separated by tabs or other whitespace (one line, or one
    value a line as ``np.savetxt`` of a column writes them). Returns float64 ``[27]``."""
    text = Path(path).read_text()
    try:
        values = np.array([float(tok) for tok in text.split()], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: not a light file ({exc})") from None
    if values.size != N_LIGHT or not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: expected 27 finite SH coefficients, found {values.size} values")
    return values


def format_light(light) -> str:
    """The light-file line: 27 tab-separated floats and a newline."""
    values = np.asarray(light, dtype=np.float64).reshape(-1)
    if values.size != N_LIGHT:
        raise ValueError(f"light: expected 27 values, got {values.size}")
    return "\t".join(f"{v:.9g}" for v in values) + "\n"


def write_light(path: str | os.PathLike, light) -> None:
    """Write one light (27 values, R|G|B blocks) as one tab-separated line."""
    Path(path).write_text(format_light(light))
