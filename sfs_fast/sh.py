"""Spherical-harmonics lighting: the one place that defines the convention.

Convention (SfSNet, SPEC B.2.1): 9 second-order real SH basis functions with the
Lambertian attenuation ``pi * [1, 2/3, 1/4]`` folded into the constants, in the order

    [L00, L10 (z), L11e (x), L11o (y), L20, L21e (xz), L21o (yz), L22e (x^2 - y^2), L22o (xy)]

A light is 27 floats: three blocks of 9 coefficients that light the R, G and B channels.
Shading of channel ``c`` is ``sum_k Y_k(n) * light[9c + k]`` for a unit normal ``n``.
Normals are in :data:`NORMAL_FRAME` (x right, y up, z towards the viewer); DPR/shtools
lights convert both ways with :func:`dpr_light_to_sfsnet` / :func:`sfsnet_light_to_dpr`.

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

# The normal frame of every output and every checkpoint (image as displayed, row 0 at the
# top). It is the frame of `sfs-data synth` (training/synth.py), hence of the demo weights and
# of anything sfs-train writes, and the frame the official Caffe weights come out in after
# import. Evidence for the Caffe weights (SPEC B.1.4, B.4.3):
#  * channel order: the synthetic normal PNGs store (x, y, z) as (R, G, B), encoded
#    (n + 1) / 2; Caffe read them with OpenCV, i.e. as (B, G, R) = (z, y, x), so the raw
#    Nconv0 output is (z, y, x) in [0, 1]; Change_Form swaps channels 0 and 2 back to
#    (x, y, z) and the Norm layer's 2x - 1 (no sign change) restores [-1, 1]. The importer
#    folds exactly that (flip, then 2x - 1) and nothing else: channel 0 of our normal is the
#    R channel of the training PNGs (tests/test_conventions.py checks the fold on a Caffe
#    fixture whose Nconv0 outputs a known PNG encoding).
#  * no mirroring or transposition of the image plane: Python Caffe feeds HWC->CHW with no
#    transpose; the MATLAB demo's permute([2,1,3]) only undoes matcaffe's column-major layout
#    and its imrotate(-90) + fliplr undo it on the outputs, so the network always saw upright
#    faces and its x, y axes are the picture's.
#  * z towards the viewer: the first-order z coefficient of the SfSNet synthetic lights is
#    positive in all 20 files of ../shared/data/sfsnet_synthetic_lights (measured; those files
#    are not in the project): the lights face the visible, camera-facing side.
#  * y up: with x to the right and z towards the viewer, a right-handed frame (the 3DMM /
#    OpenGL camera frame the faces were rendered in) has y up. Not checkable here without the
#    real file: on a frontal face the official weights should give forehead normals y > 0.
NORMAL_FRAME = ("x: image right (increasing column); y: image up (decreasing row); "
                "z: out of the image, towards the viewer (right-handed)")

CONVENTION = {
    "sh_order": list(SH_ORDER),
    "sh_channel_blocks": "R|G|B, 9 each",
    "sh_attenuation": "pi*[1, 2/3, 1/4] folded into the basis constants",
    "normal": "unit (x, y, z) per pixel, channels 0..2 of the normal map",
    "normal_frame": NORMAL_FRAME,
}

# DPR's frame, read off its sphere renderer (../shared/data/README.md): x across columns to
# the right, z up the rows, and the visible hemisphere at y = -sqrt(1 - x^2 - z^2), so y
# points away from the viewer. In our frame's terms: n_dpr = DPR_FRAME @ n_ours, i.e.
# (x_dpr, y_dpr, z_dpr) = (x, -z, y). Lights converted with DPR's order alone (no frame) come
# out mirrored and turned, the peers' complaint (DPR issue 20, StyleFlow issue 41).
DPR_FRAME = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


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
    """Reorder 9 coefficients from the DPR/shtools order to the SfSNet order: the order
    only, axes keep DPR's names (for rendering in DPR's frame); a DPR light for our normals
    is :func:`dpr_light_to_sfsnet`."""
    return _check9(light9)[list(DPR_TO_SFSNET)]


def grey_light(light9) -> np.ndarray:
    """A 27-value light that uses the same 9 coefficients for R, G and B."""
    return np.tile(_check9(light9), 3)


def _unit_sphere_samples(n: int = 64) -> np.ndarray:
    """``[n,3]`` unit vectors spread over the sphere (a Fibonacci lattice, deterministic)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _basis_np(n: np.ndarray) -> np.ndarray:
    return sh_basis(torch.from_numpy(n), dim=1).numpy()


def sh_rotation(rotation) -> np.ndarray:
    """The ``[9,9]`` matrix ``A`` with ``Y(R n) = Y(n) @ A`` (SfSNet order): a light ``c`` given
    in a frame where normals read ``R n`` is ``A @ c`` in ours. Exact, since each SH band
    rotates into itself; solved on sample normals in float64."""
    rotation = np.asarray(rotation, dtype=np.float64)
    n = _unit_sphere_samples()
    a, *_ = np.linalg.lstsq(_basis_np(n), _basis_np(n @ rotation.T), rcond=None)
    return a


def _check9(light9) -> np.ndarray:
    light9 = np.asarray(light9, dtype=np.float64).reshape(-1)
    if light9.shape != (N_COEFFS,):
        raise ValueError(f"light: expected 9 coefficients, got {light9.size}")
    return light9


def dpr_light_to_sfsnet(light9_dpr) -> np.ndarray:
    """A DPR/shtools grey light (9 values, DPR order, DPR frame) -> our 27-value light (R, G
    and B the same) that shades our normals as DPR shades the same surface."""
    in_sfsnet_order = dpr_to_sfsnet(_check9(light9_dpr))
    return grey_light(sh_rotation(DPR_FRAME) @ in_sfsnet_order)


def sfsnet_light_to_dpr(light27, channel_weights=(1 / 3, 1 / 3, 1 / 3)) -> np.ndarray:
    """Our 27-value light -> a DPR/shtools grey light (9 values, DPR order and frame).

    DPR lights one grey channel: the R, G, B blocks are mixed with ``channel_weights``
    (the mean by default; a luminance weighting is a choice the caller can make).
    """
    light27 = np.asarray(light27, dtype=np.float64).reshape(-1)
    if light27.size != N_LIGHT:
        raise ValueError(f"light: expected 27 values, got {light27.size}")
    grey = np.asarray(channel_weights, dtype=np.float64) @ light27.reshape(3, N_COEFFS)
    in_dpr_frame = np.linalg.solve(sh_rotation(DPR_FRAME), grey)
    out = np.empty(N_COEFFS)
    out[list(DPR_TO_SFSNET)] = in_dpr_frame  # inverse of the reordering
    return out


def read_light(path: str | os.PathLike) -> np.ndarray:
    """Read a light file; returns our float64 ``[27]`` light.

    27 floats separated by tabs or other whitespace (the SfSNet format: one line, or one
    value a line as ``np.savetxt`` of a column writes them), or 9 floats (DPR's format, one
    value a line: a grey light in DPR's order and frame, converted with
    :func:`dpr_light_to_sfsnet`).
    """
    text = Path(path).read_text()
    try:
        values = np.array([float(tok) for tok in text.split()], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: not a light file ({exc})") from None
    if values.size not in (N_COEFFS, N_LIGHT) or not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: expected 27 (SfSNet) or 9 (DPR) finite SH coefficients, "
                         f"found {values.size} values")
    return dpr_light_to_sfsnet(values) if values.size == N_COEFFS else values


def format_light(light) -> str:
    """The light-file line: 27 tab-separated floats and a newline."""
    values = np.asarray(light, dtype=np.float64).reshape(-1)
    if values.size != N_LIGHT:
        raise ValueError(f"light: expected 27 values, got {values.size}")
    return "\t".join(f"{v:.9g}" for v in values) + "\n"


def write_light(path: str | os.PathLike, light) -> None:
    """Write one light (27 values, R|G|B blocks) as one tab-separated line."""
    Path(path).write_text(format_light(light))
