"""Synthetic faces with real face geometry, in the SfSNet synthetic layout (issue 15).

The face is MediaPipe's canonical face model (468 vertices = the Face Mesh landmarks, UVs,
898 triangles; ``sfs_fast/data/canonical_face_model.obj``, Apache-2.0, see its NOTICE),
varied per face (smooth random deformations, proportions, mouth/smile/brow expressions),
posed (yaw, pitch, roll), framed like the SfSNet 128x128 crops and rasterized here with a
small NumPy z-buffer at ``supersample`` x the output size (then box-downsampled). Around it:
skull-shaped hair, a neck, shoulders and a cluttered background, all with normals so that
the whole picture is lit by the same SH light. Albedo is painted in UV space (skin tone,
lips, brows, eyes, freckles, blotches, stubble) by landmark index.

Per sample the stored layers (quantized first, the SH shading computed from exactly what is
stored, with :func:`sfs_fast.kernels.sh_shade`):

    sh_shading = shade(normal_png, light_txt)                      the SH target
    face_linear = albedo * (sh_shading - shadow * directional) * ao + specular
    face = camera(face_linear)            white balance, gamma, blur, noise, JPEG

With every non-SH effect off (``FaceSynthOptions(specular=False, occlusion=False,
shadows=False, camera=False)``) ``face = round(255 * clip(albedo * sh_shading))``, the
contract of :mod:`sfs_fast.training.synth`.

**The residue target.** The SfSNet layout has no file for it; a trainer derives it from the
stored files as ``residue = face / albedo - sh_shade(normal, light)`` inside the mask
(:func:`residue_target`). It holds the specular highlights, occlusion, cast shadows and
camera effects, which SH cannot represent.

Axes: normals x right, y up, z toward the viewer (``sfs_fast.sh.CONVENTION``); the mesh's
own axes are the same (+x the subject's left = the viewer's right, +y chin to forehead,
+z toward the viewer), so no flip is needed. The camera is orthographic.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from sfs_fast.kernels import sh_shade
from sfs_fast.training.synth import BATCH, HAIR_TONES, SKIN_TONES, draw_lights

# --------------------------------------------------------------------------------------
# Landmark indices of the Face Mesh topology (facts of the published mesh, checked against
# the vertex positions of canonical_face_model.obj: 33/263 are the outer eye corners at
# x = -/+4.45, 61/291 the mouth corners, 13/14 the inner lips, 152 the chin, 10 the forehead).

LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
# Brows as closed outlines: upper edge outer -> inner, then the lower edge back.
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
NOSE_TIP, CHIN, FOREHEAD = 4, 152, 10
RIGHT_CHEEK, LEFT_CHEEK = 50, 280
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
EYE_CORNERS = (33, 133, 263, 362)

# --------------------------------------------------------------------------------------
# Framing of the SfSNet crops, measured on the 13 crops with masks in ../shared/data/faces/
# (masks resized to 128 bilinear, >= 128): mask box x 22..104 (std 6), y 26..117 (std 4),
# width 83 +- 7, height 92 +- 7, centroid (63, 68). Eye centres and chin were read off four
# crops (10, 1, 4, 7) on an 8-pixel grid: eye line at row 44-45 (51 on a tilted head),
# pupils 38-42 px apart, chin at rows 117-122. With the mesh's pupil distance of 6.3 cm
# (centres of 33-133 and 263-362) and eye-to-chin 12.1 cm both give ~6.3 px/cm at 128; at
# that scale the SfSNet masks stop ~3.3 cm above the eye line and ~6.6 cm either side of
# the nose (the mesh itself reaches 5.6 cm up and 7.7 cm sideways): MASK_TOP_CM, MASK_SIDE_CM.
# Checked on 40 generated masks: at 6.3 px/cm they came out 86 x 98 px (x 20..105, y 23..119),
# ~4% larger than the crops' masks, so the scale is 6.1 (the mask numbers are from 13 crops,
# the eye reading from 4); at 6.1: 84 x 95 px, centroid (63, 69).
PX_PER_CM = 6.1 / 128.0  # of the output size
EYE_ROW = 45.0 / 128.0
EYE_COL = 64.0 / 128.0
MASK_TOP_CM = 3.4  # above the eye line (mesh y of the eye corners = 2.66)
MASK_SIDE_CM = 6.6

# Pose ranges (radians): in-the-wild crops are mostly near-frontal, some turned well away.
YAW_STD, YAW_MAX = math.radians(16.0), math.radians(42.0)
PITCH_STD, PITCH_MAX = math.radians(8.0), math.radians(22.0)
ROLL_STD, ROLL_MAX = math.radians(6.0), math.radians(18.0)

TEXTURE = 128  # UV texture side in texels (the face spans ~100 px at the 2x render)
MOUTH_INSIDE = (0.28, 0.09, 0.09)
IRIS_TONES = ((0.20, 0.11, 0.06), (0.33, 0.20, 0.10), (0.22, 0.30, 0.38), (0.25, 0.30, 0.18))
CLOTH_TONES = ((0.1, 0.1, 0.12), (0.8, 0.8, 0.82), (0.2, 0.3, 0.6), (0.5, 0.1, 0.1), (0.3, 0.45, 0.3), (0.6, 0.5, 0.35))


@dataclass(frozen=True)
class FaceSynthOptions:
    """What goes into the face image beyond albedo x SH shading (each switch on by default),
    the output size and the supersampling factor of the rasterizer."""
    size: int = 128
    supersample: int = 2
    specular: bool = True
    occlusion: bool = True
    shadows: bool = True
    camera: bool = True
    # How much of the SfSNet files' per-channel light tint is kept: 1 as in the files (warm on
    # average, red DC 1.3x blue), 0 grey lights. Photos are white-balanced, and a network
    # trained on the files' tints explains part of the skin colour as light colour.
    light_tint: float = 1.0


# --------------------------------------------------------------------------------------
# The mesh


@dataclass(frozen=True)
class Mesh:
    """The canonical face: ``verts`` ``[V,3]`` cm, ``uv`` ``[V,2]`` (per vertex), ``faces``
    ``[F,3]`` vertex indices, ``mouth_tris`` ``[F]`` bool (the triangles that close the mouth,
    all three corners on the inner lip line)."""
    verts: np.ndarray
    uv: np.ndarray
    faces: np.ndarray
    mouth_tris: np.ndarray


def parse_obj(text: str) -> Mesh:
    """Parse the ``v``/``vt``/``f v/vt`` records of the canonical model. A face's vt index is
    not its v index (see the mesh README), so per-vertex UVs are gathered through the ``f``
    records."""
    verts, uvs, faces, face_uv = [], [], [], []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(p) for p in parts[1:4]])
        elif parts[0] == "vt":
            uvs.append([float(p) for p in parts[1:3]])
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:4]]
            faces.append([int(c[0]) - 1 for c in corners])
            face_uv.append([int(c[1]) - 1 for c in corners])
    verts, uvs = np.asarray(verts, np.float64), np.asarray(uvs, np.float64)
    faces, face_uv = np.asarray(faces, np.int64), np.asarray(face_uv, np.int64)
    uv = np.zeros((len(verts), 2))
    uv[faces.ravel()] = uvs[face_uv.ravel()]
    inner = np.zeros(len(verts), bool)
    inner[list(LIPS_INNER)] = True
    return Mesh(verts, uv, faces, inner[faces].all(1))


@functools.lru_cache(maxsize=1)
def load_mesh() -> Mesh:
    """The canonical face model shipped in ``sfs_fast/data`` (parsed once per process)."""
    text = resources.files("sfs_fast").joinpath("data/canonical_face_model.obj").read_text()
    return parse_obj(text)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals ``[V,3]`` (unit) of a counter-clockwise mesh."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    face_n = np.cross(b - a, c - a)  # length = 2 * area: larger triangles weigh more
    acc = np.zeros_like(verts)
    for k in range(3):
        np.add.at(acc, faces[:, k], face_n)
    return acc / np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------
# The rasterizer


def rasterize(points: np.ndarray, faces: np.ndarray, height: int, width: int, cull: bool = False):
    """Z-buffer rasterization of triangles at pixel centres.

    Args:
        points: ``[V,3]``: column, row (pixels, the pixel (i, j) has its centre at (j + 0.5,
            i + 0.5)) and depth (larger = nearer the viewer).
        faces: ``[F,3]`` vertex indices.
        height, width: image size.
        cull: skip back-facing triangles (clockwise on screen as seen with y up, i.e.
            counter-clockwise in row-down pixel coordinates): a speed-up for a surface seen
            from outside, whose back faces are hidden anyway.

    Returns:
        ``(tri, bary)``: ``[H,W]`` int64 index of the visible triangle (-1: none) and
        ``[H,W,3]`` float barycentric weights of its corners (0 where none).
    """
    tri_pts = points[faces]  # [F,3,3]
    x, y, zc = tri_pts[..., 0], tri_pts[..., 1], tri_pts[..., 2]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    ok = (area < -1e-12) if cull else (np.abs(area) > 1e-12)
    inv = np.where(ok, 1.0 / np.where(ok, area, 1.0), 0.0)
    # Barycentric weights and depth are affine in the pixel position: b_k = ax*px + ay*py + a1,
    # with corner k's weight = the signed area of the sub-triangle opposite it / area.
    coef = np.empty((len(faces), 3, 3))  # [triangle, (b0, b1, z), (ax, ay, a1)]
    for k, (i, j) in enumerate(((1, 2), (2, 0))):
        coef[:, k, 0] = (y[:, i] - y[:, j]) * inv
        coef[:, k, 1] = (x[:, j] - x[:, i]) * inv
        coef[:, k, 2] = (x[:, i] * y[:, j] - x[:, j] * y[:, i]) * inv
    b2 = np.array([0.0, 0.0, 1.0]) - coef[:, 0] - coef[:, 1]
    coef[:, 2] = coef[:, 0] * zc[:, :1] + coef[:, 1] * zc[:, 1:2] + b2 * zc[:, 2:]
    # Scanlines: each (triangle, pixel row) pair gets the exact column span where the row's
    # centre line crosses the triangle, so only covered pixels are generated.
    r0 = np.clip(np.ceil(y.min(1) - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.floor(y.max(1) - 0.5), -1, height - 1).astype(np.int64)
    rows_per = np.where(ok, np.maximum(r1 - r0 + 1, 0), 0)
    pt = np.repeat(np.arange(len(faces)), rows_per)
    prow = r0[pt] + np.arange(pt.size) - np.repeat(np.cumsum(rows_per) - rows_per, rows_per)
    yc = prow + 0.5
    lo, hi = np.full(pt.size, np.inf), np.full(pt.size, -np.inf)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        ya, yb, xa, xb = y[pt, i], y[pt, j], x[pt, i], x[pt, j]
        crosses = (np.minimum(ya, yb) <= yc) & (yc <= np.maximum(ya, yb)) & (ya != yb)
        xe = xa + (yc - ya) * (xb - xa) / np.where(ya != yb, yb - ya, 1.0)
        lo = np.where(crosses, np.minimum(lo, xe), lo)
        hi = np.where(crosses, np.maximum(hi, xe), hi)
    c0 = np.clip(np.ceil(np.where(np.isfinite(lo), lo, 0.0) - 0.5), 0, width).astype(np.int64)
    c1 = np.clip(np.floor(np.where(np.isfinite(hi), hi, -1.0) - 0.5), -1, width - 1).astype(np.int64)
    count = np.maximum(c1 - c0 + 1, 0)
    pair = np.repeat(np.arange(pt.size), count)
    t, row = pt[pair], prow[pair]
    col = c0[pair] + np.arange(pair.size) - np.repeat(np.cumsum(count) - count, count)
    vals = np.einsum("nkj,nj->nk", coef[t], np.stack([col + 0.5, row + 0.5, np.ones(t.size)], 1))
    bary = np.stack([vals[:, 0], vals[:, 1], 1.0 - vals[:, 0] - vals[:, 1]], 1)
    z = vals[:, 2]
    pix = row * width + col
    # One sort on pixel + (a depth rank in [0, 1)): per pixel, the nearest comes first.
    span = max(float(np.ptp(z)) if z.size else 0.0, 1e-12)
    order = np.argsort(pix + 0.999 * (z.max(initial=0.0) - z) / span)
    sorted_pix = pix[order]
    first = order[np.r_[True, sorted_pix[1:] != sorted_pix[:-1]]] if pix.size else order
    tri = np.full(height * width, -1, np.int64)
    out_bary = np.zeros((height * width, 3))
    tri[pix[first]] = t[first]
    out_bary[pix[first]] = bary[first]
    return tri.reshape(height, width), out_bary.reshape(height, width, 3)


def interpolate(attr: np.ndarray, faces: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Barycentric interpolation of a vertex attribute ``[V,C]`` over a raster
    (:func:`rasterize`): ``[H,W,C]``, zeros where no triangle is visible."""
    flat_tri = tri.reshape(-1)
    visible = np.flatnonzero(flat_tri >= 0)
    corners = attr[faces[flat_tri[visible]]]  # [P,3,C], visible pixels only
    out = np.zeros((flat_tri.size, attr.shape[1]))
    out[visible] = np.einsum("pk,pkc->pc", bary.reshape(-1, 3)[visible], corners)
    return out.reshape(tri.shape + (attr.shape[1],))


# --------------------------------------------------------------------------------------
# Shape: identity, expression, pose


def _bump(verts: np.ndarray, centre, sigma: float) -> np.ndarray:
    """Gaussian weight ``[V]`` of each vertex around ``centre`` (cm)."""
    d2 = ((verts - np.asarray(centre)) ** 2).sum(1)
    return np.exp(-0.5 * d2 / sigma ** 2)


def identity_shape(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A new identity ``[V,3]``: overall proportions, then a few smooth Gaussian-bump
    displacements, mirrored across x = 0 (faces are nearly symmetric) plus a small
    asymmetric part, then nose, jaw and cheek variations at their landmarks."""
    v = base * rng.normal(1.0, [0.05, 0.045, 0.08])  # width, height, depth
    disp = np.zeros_like(v)
    for _ in range(6):
        c = base[rng.integers(len(base))]
        sigma = rng.uniform(2.0, 4.5)
        d = rng.normal(0.0, 0.35, 3)
        mirror = c * [-1, 1, 1], d * [-1, 1, 1]
        disp += _bump(base, c, sigma)[:, None] * d + _bump(base, mirror[0], sigma)[:, None] * mirror[1]
        disp += 0.25 * _bump(base, c, sigma)[:, None] * rng.normal(0.0, 0.2, 3)
    v = v + disp
    nose = _bump(base, base[NOSE_TIP], 1.8)[:, None]
    v = v + nose * [0.0, rng.normal(0, 0.25), rng.normal(0, 0.4)]  # nose length, prominence
    v[:, 0] *= 1.0 + nose[:, 0] * rng.normal(0, 0.12)  # nose width
    jaw = np.clip((-base[:, 1] - 3.0) / 5.0, 0.0, 1.0)  # 0 above the mouth, 1 at the chin
    v[:, 0] *= 1.0 + jaw * rng.normal(0, 0.07)  # narrow or square jaw
    v[:, 1] -= jaw * rng.normal(0, 0.4)  # long or short chin
    for idx in (RIGHT_CHEEK, LEFT_CHEEK):  # fuller or flatter cheeks
        v += _bump(base, base[idx], 2.0)[:, None] * [0.0, 0.0, rng.normal(0, 0.3)]
    return v


def expression(rng: np.random.Generator, base: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Mouth opening (a jaw drop of the lower face, the inner lips part), smile (mouth
    corners up and out) and brow raise/frown, weighted by distance to their landmarks in the
    canonical shape ``base``."""
    v = verts.copy()
    y_mouth = 0.5 * (base[13, 1] + base[14, 1])
    open_cm = rng.choice([0.0, rng.uniform(0.1, 1.6)], p=[0.6, 0.4])
    below = np.clip((y_mouth - base[:, 1]) / 0.6, 0.0, 1.0)  # 0 at the lip line, 1 below
    hinge = np.exp(-0.5 * (base[:, 0] / 4.5) ** 2)  # the jaw pivots near the ears
    v[:, 1] -= open_cm * below * hinge
    v[:, 2] -= 0.3 * open_cm * below * hinge
    smile = rng.normal(0.25, 0.35)
    for idx, side in ((MOUTH_RIGHT, -1.0), (MOUTH_LEFT, 1.0)):
        w = _bump(base, base[idx], 1.3)[:, None]
        v += w * np.array([side * 0.35, 0.6, -0.1]) * smile
    brow = rng.normal(0.0, 0.35)
    for idx in (105, 334):
        w = _bump(base, base[idx], 1.6)[:, None]
        v += w * np.array([0.0, brow, 0.0])
    return v


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``[3,3]`` head rotation: yaw about y (positive turns the face to the viewer's
    right), pitch about x (positive tilts the chin up), roll about z."""
    cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def draw_pose(rng: np.random.Generator) -> np.ndarray:
    """``[3]`` yaw, pitch, roll in radians (clipped normals, SfSNet-crop-like ranges)."""
    std = np.array([YAW_STD, PITCH_STD, ROLL_STD])
    return np.clip(rng.normal(0.0, std), -np.array([YAW_MAX, PITCH_MAX, ROLL_MAX]), [YAW_MAX, PITCH_MAX, ROLL_MAX])


# --------------------------------------------------------------------------------------
# Albedo in UV space

U = TEXTURE / 256.0  # sizes below are in texels of a 256 texture, scaled by U


def _uv_px(mesh: Mesh, indices) -> np.ndarray:
    """``[N,2]`` texel positions (column, row) of landmarks: v runs up, rows run down."""
    uv = mesh.uv[list(indices)]
    return np.stack([uv[:, 0] * (TEXTURE - 1), (1.0 - uv[:, 1]) * (TEXTURE - 1)], 1)


def _region(draw_fn, blur: float) -> np.ndarray:
    """A soft ``[T,T]`` weight in [0, 1]: ``draw_fn(ImageDraw)`` paints in white on black,
    then a Gaussian blur of ``blur`` 256-texels softens the edge."""
    im = Image.new("L", (TEXTURE, TEXTURE), 0)
    draw_fn(ImageDraw.Draw(im))
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur * U))
    return np.asarray(im, np.float32) / 255.0


def _poly(points) -> list:
    return [tuple(map(float, p)) for p in points]


def _box(centre, rx, ry) -> list:
    return [centre[0] - rx * U, centre[1] - ry * U, centre[0] + rx * U, centre[1] + ry * U]


@functools.lru_cache(maxsize=1)
def static_regions() -> dict:
    """The face regions that depend on the UV layout only (so are drawn once per process):
    ``[T,T]`` float32 weights ``cheeks``, ``lips``, ``brows``, ``eyes`` (the openings),
    ``lashes``, ``beard``, ``tzone``."""
    mesh = load_mesh()
    cheeks = [_uv_px(mesh, [i])[0] for i in (RIGHT_CHEEK, LEFT_CHEEK)]
    chin, mouth, nose, brow_mid = (_uv_px(mesh, [i])[0] for i in (CHIN, 13, NOSE_TIP, 151))
    eyes = [_poly(_uv_px(mesh, e)) for e in (RIGHT_EYE, LEFT_EYE)]
    return {
        "cheeks": _region(lambda d: [d.ellipse(_box(c, 22, 20), 255) for c in cheeks], 12),
        "lips": _region(lambda d: d.polygon(_poly(_uv_px(mesh, LIPS_OUTER)), 255), 1.5),
        "brows": _region(lambda d: [d.polygon(_poly(_uv_px(mesh, b)), 255) for b in (RIGHT_BROW, LEFT_BROW)], 1.5),
        "eyes": _region(lambda d: [d.polygon(e, 255) for e in eyes], 0.7),
        "lashes": _region(lambda d: [d.line(e + e[:1], fill=255, width=max(1, round(2 * U))) for e in eyes], 0.8),
        "beard": _region(lambda d: d.ellipse([chin[0] - 70 * U, mouth[1] - 12 * U, chin[0] + 70 * U, chin[1] + 40 * U], 255), 8),
        "tzone": _region(lambda d: (d.ellipse(_box(nose, 18, 40), 255), d.ellipse(_box(brow_mid, 50, 22), 255)), 10),
    }


def _smooth_noise(rng: np.random.Generator, shape, cells: int) -> np.ndarray:
    """Low-frequency noise of ``shape`` ``(H, W[, C])``: a ``cells`` x ``cells`` normal grid
    upsampled bicubically (zero mean, about unit spread)."""
    h, w = shape[:2]
    grid = rng.standard_normal((cells, cells) + tuple(shape[2:])).astype(np.float32)
    t = torch.from_numpy(grid.reshape(1, cells, cells, -1)).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=True)
    return up[0].permute(1, 2, 0).numpy().reshape(shape)


def _blend(tex: np.ndarray, weight: np.ndarray, colour) -> np.ndarray:
    return tex + (np.asarray(colour, np.float32) - tex) * weight[..., None]


def skin_tone(rng: np.random.Generator) -> np.ndarray:
    """``[3]`` a random point on the light-to-dark polyline of skin albedos, jittered."""
    tones = np.asarray(SKIN_TONES)
    t = rng.uniform(0, len(tones) - 1)
    i = min(int(t), len(tones) - 2)
    base = tones[i] * (1 - (t - i)) + tones[i + 1] * (t - i)
    return np.clip(base * rng.uniform(0.92, 1.05) + rng.normal(0, 0.02, 3), 0.05, 1.0)


def paint_albedo(rng: np.random.Generator, mesh: Mesh, skin, hair) -> tuple:
    """UV textures of one face: albedo ``[T,T,3]`` and specular strength ``[T,T]``.

    Skin tone with low-frequency variation and redder cheeks, lips, brows in the hair
    colour, eyes (sclera, iris, lash line), freckles, blotches and, for some, stubble;
    the oily T-zone (forehead, nose) shines more."""
    reg = static_regions()
    size = (TEXTURE, TEXTURE)
    tex = skin.astype(np.float32) * (1.0 + 0.06 * _smooth_noise(rng, size + (3,), 6) + 0.03 * _smooth_noise(rng, size + (1,), 16))
    red = skin * np.array([1.05, 0.78, 0.78])
    tex = _blend(tex, rng.uniform(0.0, 0.45) * reg["cheeks"], red)
    if rng.random() < 0.25:  # stubble / beard below the mouth line and along the jaw
        grain = np.clip(0.6 + 0.4 * rng.standard_normal(size), 0, 1).astype(np.float32)
        tex = _blend(tex, rng.uniform(0.2, 0.7) * reg["beard"] * grain, hair * 0.8 + skin * 0.2)
    blotches = [(rng.uniform(40, 216, 2) * U, rng.uniform(6, 20)) for _ in range(rng.integers(0, 5))]
    if blotches:  # large faint patches of red
        tex = _blend(tex, rng.uniform(0.1, 0.35) * _region(lambda d: [d.ellipse(_box(c, r, r), 255) for c, r in blotches], 6), red)
    if rng.random() < 0.3:  # freckles around the nose and over the cheeks
        pts = _uv_px(mesh, [NOSE_TIP])[0] + rng.normal(0, [28 * U, 16 * U], (int(rng.integers(10, 120)), 2)) - [0, 12 * U]
        dots = _region(lambda d: [d.ellipse(_box(p, 1.0, 1.0), int(rng.integers(100, 256))) for p in pts], 0.5)
        tex = _blend(tex, dots * rng.uniform(0.3, 0.6), skin * np.array([0.72, 0.55, 0.45]))
    lip = skin * np.array([0.86, 0.55, 0.56]) * rng.uniform(0.8, 1.05)
    tex = _blend(tex, rng.uniform(0.55, 0.9) * reg["lips"], lip)
    tex = _blend(tex, rng.uniform(0.5, 0.95) * reg["brows"], hair)
    tex = _paint_eyes(rng, mesh, tex, reg)
    shine = 0.5 + 0.5 * reg["tzone"]
    return np.clip(tex, 0.0, 1.0), shine


def _paint_eyes(rng: np.random.Generator, mesh: Mesh, tex: np.ndarray, reg: dict) -> np.ndarray:
    """Sclera inside each eye opening, an iris and pupil (same gaze for both eyes), a dark
    lash line along the outline."""
    iris = np.asarray(IRIS_TONES[rng.integers(len(IRIS_TONES))]) * rng.uniform(0.7, 1.2)
    gaze = rng.normal(0, [0.15, 0.08])
    sclera = np.array([0.78, 0.74, 0.72]) * rng.uniform(0.85, 1.0)
    discs = []
    for eye in (RIGHT_EYE, LEFT_EYE):
        pts = _uv_px(mesh, eye)
        span = pts[:, 0].max() - pts[:, 0].min()
        discs.append((pts.mean(0) + gaze * span, 0.22 * span / U))
    tex = _blend(tex, 0.9 * reg["eyes"], sclera)
    tex = _blend(tex, reg["eyes"] * _region(lambda d: [d.ellipse(_box(c, r, r), 255) for c, r in discs], 0.8), iris)
    tex = _blend(tex, reg["eyes"] * _region(lambda d: [d.ellipse(_box(c, 0.4 * r, 0.4 * r), 255) for c, r in discs], 0.5), (0.03, 0.03, 0.03))
    return _blend(tex, 0.7 * reg["lashes"], (0.06, 0.05, 0.05))


def sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest-texel lookup of a ``[T,T,C]`` texture at ``[...,2]`` UVs (the supersampled
    render and the box downsample after it do the filtering)."""
    col = np.clip(np.rint(uv[..., 0] * (TEXTURE - 1)), 0, TEXTURE - 1).astype(np.int64)
    row = np.clip(np.rint((1.0 - uv[..., 1]) * (TEXTURE - 1)), 0, TEXTURE - 1).astype(np.int64)
    return tex[row, col]

# --------------------------------------------------------------------------------------
# The scene around the face: background, shoulders, neck, hair


def _ellipsoid(height: int, width: int, centre, radii, rot: np.ndarray):
    """Front surface of an ellipsoid seen by the orthographic camera.

    Camera coordinates: X = column + 0.5, Y = -(row + 0.5) (up), Z toward the viewer, all
    in pixels. ``centre`` ``[3]``, ``radii`` ``[3]`` (in its own frame), ``rot`` ``[3,3]``
    (own frame -> camera). Returns ``hit`` ``[H,W]`` bool, ``depth`` ``[H,W]`` (Z),
    ``normal`` ``[H,W,3]`` (unit, camera frame) and ``local`` ``[H,W,3]`` (the hit point in
    the ellipsoid's frame, divided by the radii)."""
    # Written per component: the ray offset is separable (columns x rows), so each term is a
    # broadcast of a row and a column vector instead of a [H,W,3] @ [3,3] product.
    dx = (np.arange(width) + 0.5 - centre[0])[None, :]
    dy = (-(np.arange(height) + 0.5) - centre[1])[:, None]
    b = [dx * rot[0, j] + dy * rot[1, j] - centre[2] * rot[2, j] for j in range(3)]  # rot.T @ d0
    a = rot[2]  # rot.T @ (0, 0, 1): the ray direction in the ellipsoid's frame
    inv_r2 = 1.0 / np.asarray(radii, np.float64) ** 2
    qa = float((a * a * inv_r2).sum())
    qb = 2.0 * sum(b[j] * (a[j] * inv_r2[j]) for j in range(3))
    qc = sum(b[j] * b[j] * inv_r2[j] for j in range(3)) - 1.0
    disc = qb * qb - 4.0 * qa * qc
    hit = disc > 0
    t = (-qb + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qa)  # the nearer of the two roots
    q = [b[j] + t * a[j] for j in range(3)]
    g = [q[j] * inv_r2[j] for j in range(3)]  # the gradient in the ellipsoid's frame
    normal = np.stack([g[0] * rot[i, 0] + g[1] * rot[i, 1] + g[2] * rot[i, 2] for i in range(3)], -1)
    normal /= np.maximum(np.sqrt((normal * normal).sum(-1, keepdims=True)), 1e-12)
    q = np.stack(q, -1)
    return hit, centre[2] + t, normal, q / np.asarray(radii)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[S,S,3]`` albedo of the background: a two-colour gradient, a few blurred shapes
    (clutter: shelves, windows, other people), fine noise."""
    c0, c1 = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    angle = rng.uniform(0, 2 * math.pi)
    lin = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.clip(0.5 + math.cos(angle) * lin[None, :] + math.sin(angle) * lin[:, None], 0, 1)[..., None]
    img = Image.fromarray(np.uint8(255 * (c0 + (c1 - c0) * ramp)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 7)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.6, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 3.0) * size / 128))
    back = np.asarray(img, np.float64) / 255.0
    return np.clip(back * (1.0 + 0.04 * rng.standard_normal((size, size, 1))), 0.0, 1.0)


def _paint(layers: dict, hit: np.ndarray, albedo, normal, depth) -> None:
    """Painter's algorithm: ``hit`` pixels of the later layer cover the earlier ones."""
    np.copyto(layers["albedo"], albedo, where=hit[..., None])
    np.copyto(layers["normal"], normal, where=hit[..., None])
    np.copyto(layers["depth"], depth, where=hit)


def _surroundings(rng: np.random.Generator, size: int, place: dict, skin, hair) -> dict:
    """Background, shoulders, neck and hair at the render size ``size``, placed from the
    face's ``place`` (``centre`` [3] camera px of the mesh origin, ``scale`` px/cm, ``rot``
    head rotation). Returns ``albedo`` [S,S,3], ``normal`` [S,S,3], ``depth`` [S,S]."""
    s, c, rot = place["scale"], place["centre"], place["rot"]
    layers = {"albedo": _background(rng, size), "normal": np.zeros((size, size, 3)), "depth": np.full((size, size), c[2] - 40 * s)}
    layers["normal"][..., 2] = 1.0

    def at(offset_cm, r=rot):  # a point given in head cm, in camera px
        return c + s * (r @ np.asarray(offset_cm, np.float64))

    lean = rotation(rng.normal(0, 0.1), 0.0, rng.normal(0, 0.05))
    hit, depth, normal, local = _ellipsoid(size, size, at([0, -25, -5], lean), s * np.array([rng.uniform(16, 22), 11, 9]), lean)
    cloth = np.asarray(CLOTH_TONES[rng.integers(len(CLOTH_TONES))]) * rng.uniform(0.7, 1.1)
    stripes = 1.0 + (0.15 * np.sign(np.sin(local[..., :1] * rng.uniform(8, 40))) if rng.random() < 0.3 else 0.0)
    _paint(layers, hit, np.clip(cloth * stripes * np.ones((size, size, 3)), 0, 1), normal, depth)

    neck_rot = rotation(0.3 * place["pose"][0], 0.0, 0.5 * place["pose"][2])
    hit, depth, normal, local = _ellipsoid(size, size, at([0, -10, -1.5], neck_rot), s * np.array([rng.uniform(4.6, 5.6), 9.0, 4.5]), neck_rot)
    hit &= local[..., 1] < 0.5  # the neck's upper end hides behind the jaw
    _paint(layers, hit, np.clip(skin * 0.93, 0, 1) * np.ones((size, size, 3)), normal, depth)

    bald = rng.random() < 0.08
    long_hair = rng.random() < 0.4
    ry_cm, cy_cm = rng.uniform(10.5, 11.5) + (5.0 if long_hair else 0.0), 1.5 - (5.0 if long_hair else 0.0)
    radii = s * np.array([rng.uniform(7.9, 9.0), ry_cm, rng.uniform(9.5, 10.5)])
    hit, depth, normal, local = _ellipsoid(size, size, at([0, cy_cm, -3.0]), radii, rot)
    y_cm = local[..., 1] * ry_cm + cy_cm  # height on the head, as the mesh's y
    wave = 0.3 * _smooth_noise(rng, (size, size), 6)  # an uneven hair line
    hit &= y_cm + wave > (rng.uniform(-8.0, -4.0) if long_hair else rng.uniform(0.5, 4.0))
    # A fringe for some: hair in front of the forehead, below the top of the face mesh.
    fringe_y = rng.uniform(5.0, 8.5) if not bald and rng.random() < 0.35 else np.inf
    layers["fringe"] = hit & (local[..., 2] > 0) & (y_cm + wave > fringe_y)
    angle = np.arctan2(local[..., 0], local[..., 1] + 1.2)
    # Fine strands along the skull's meridians, bent by noise, over slow brightness changes.
    strands = (1.0 + 0.08 * np.sin(angle * rng.uniform(80, 160) + 3.0 * _smooth_noise(rng, (size, size), 8))
               + 0.12 * _smooth_noise(rng, (size, size), 5))
    colour = skin * 0.95 if bald else hair
    _paint(layers, hit, np.clip(colour * strands[..., None], 0, 1), normal, depth)
    return layers


# --------------------------------------------------------------------------------------
# One face: geometry and albedo


def _place(rng: np.random.Generator, verts: np.ndarray, size: int) -> dict:
    """Pose and framing: rotation, px/cm scale and the camera position of the mesh origin such
    that the eye centre lands where the SfSNet crops have it (with jitter)."""
    pose = draw_pose(rng)
    rot = rotation(*pose)
    scale = PX_PER_CM * size * rng.normal(1.0, 0.06)
    eyes = (verts[list(EYE_CORNERS)] @ rot.T).mean(0) * scale
    target = np.array([EYE_COL * size + rng.normal(0, 0.025 * size), -(EYE_ROW * size + rng.normal(0, 0.02 * size))])
    centre = np.array([target[0] - eyes[0], target[1] - eyes[1], 0.0])
    return {"pose": pose, "rot": rot, "scale": scale, "centre": centre}


def _mask_weight(base: np.ndarray) -> np.ndarray:
    """``[V]`` in [0, 1]: where on the canonical face the SfSNet mask lies (below an arch
    MASK_TOP_CM above the eye corners at the midline, within MASK_SIDE_CM of it), with a 0.3 cm ramp
    so the interpolated edge is smooth."""
    eye_y = base[list(EYE_CORNERS), 1].mean()
    # The masks' upper edge is an arch: flat over the forehead, falling toward the temples.
    limit = eye_y + MASK_TOP_CM - 0.05 * base[:, 0] ** 2
    top = np.clip((limit - base[:, 1]) / 0.3 + 0.5, 0.0, 1.0)
    side = np.clip((MASK_SIDE_CM - np.abs(base[:, 0])) / 0.3 + 0.5, 0.0, 1.0)
    return top * side


def render_face(rng: np.random.Generator, options: FaceSynthOptions) -> dict:
    """Draw one face (identity, expression, pose, albedo, surroundings) and rasterize it.

    Returns, at the output size ``S``: ``albedo`` uint8 ``[S,S,3]``, ``normal`` uint8
    ``[S,S,3]`` (round(128 n + 128)), ``mask`` uint8 ``[S,S]`` (0/255), ``depth`` uint8
    ``[S,S]`` (the face's depth in the mask, scaled to 1..255), ``depth_px`` float ``[S,S]``
    (scene depth in output pixels, for occlusion and shadows) and ``shine`` float ``[S,S]``
    (specular strength: 0 off the face)."""
    mesh = load_mesh()
    k = options.supersample
    big = options.size * k
    verts = expression(rng, mesh.verts, identity_shape(rng, mesh.verts))
    place = _place(rng, verts, big)
    cam = verts @ place["rot"].T * place["scale"] + place["centre"]
    points = np.stack([cam[:, 0], -cam[:, 1], cam[:, 2]], 1)  # column, row, depth
    tri, bary = rasterize(points, mesh.faces, big, big, cull=True)
    face = tri >= 0
    flat_tri = tri.reshape(-1)
    vis = np.flatnonzero(flat_tri >= 0)  # the work below is per visible sub-pixel only
    corners = mesh.faces[flat_tri[vis]]
    attr = np.concatenate([vertex_normals(cam, mesh.faces), mesh.uv, points[:, 2:], _mask_weight(mesh.verts)[:, None]], 1)
    # float32 is plenty for values that end as 8-bit normals, texel indices and depth in px,
    # and halves the traffic of the largest arrays of a sample.
    w = bary.reshape(-1, 3)[vis].astype(np.float32)
    a32 = attr.astype(np.float32)
    vals = w[:, :1] * a32[corners[:, 0]] + w[:, 1:2] * a32[corners[:, 1]] + w[:, 2:] * a32[corners[:, 2]]
    normal, uv = vals[:, :3], vals[:, 3:5]
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    # A visible surface faces the camera; interpolated normals at a grazing silhouette can
    # tip just past it, which no real pixel does: lift them to n_z >= 0.05.
    normal[:, 2] += np.maximum(0.05 - normal[:, 2], 0.0)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True).clip(1e-12)

    skin = skin_tone(rng)
    hair = np.asarray(HAIR_TONES[rng.integers(len(HAIR_TONES))]) * rng.uniform(0.7, 1.2)
    tex, shine_tex = paint_albedo(rng, mesh, skin, hair)
    texels = sample_texture(np.concatenate([tex, shine_tex[..., None]], -1), uv)
    albedo, shine = texels[:, :3], texels[:, 3:]
    albedo[mesh.mouth_tris[flat_tri[vis]]] = np.asarray(MOUTH_INSIDE) * rng.uniform(0.6, 1.2)
    face_layers = np.concatenate([albedo, normal, vals[:, 5:6], shine, np.ones((len(vis), 1), np.float32),
                                  (vals[:, 6:7] >= 0.5)], 1, dtype=np.float64)
    # Box-filtered face layers (coverage = channel 8): each visible sub-pixel adds 1/k^2 of
    # its values to its output pixel.
    out_pix = (vis // big // k) * options.size + (vis % big) // k
    down = np.stack([np.bincount(out_pix, weights=c, minlength=options.size ** 2) for c in face_layers.T], -1)
    down = down.reshape(options.size, options.size, -1) / (k * k)

    # The surroundings need no antialiasing of their own: drawn at the output size, they fill
    # the part of each pixel the face leaves uncovered.
    small = dict(place, scale=place["scale"] / k, centre=place["centre"] / k)
    layers = _surroundings(rng, options.size, small, skin, hair)
    down = down * ~layers["fringe"][..., None]  # a fringe covers the face
    cover = down[..., 8:9]
    n = down[..., 3:6] + (1.0 - cover) * layers["normal"]
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    albedo_px = down[..., 0:3] + (1.0 - cover) * layers["albedo"]
    mask = down[..., 9] >= 0.5
    depth_px = (down[..., 6] / k + (1.0 - cover[..., 0]) * layers["depth"])
    face_depth = np.where(cover[..., 0] > 0, down[..., 6] / np.maximum(cover[..., 0], 1e-12) / k, 0.0)
    zface = np.where(mask, face_depth, np.inf)
    rel = np.where(mask, face_depth - zface.min() if mask.any() else 0.0, 0.0)
    return {
        "albedo": np.rint(albedo_px * 255.0).clip(0, 255).astype(np.uint8),
        "normal": np.rint(n * 128.0 + 128.0).clip(0, 255).astype(np.uint8),
        "mask": mask.astype(np.uint8) * 255,
        "depth": np.where(mask, 1.0 + 254.0 * rel / max(rel.max(), 1e-6), 0.0).round().astype(np.uint8),
        "depth_px": depth_px,
        "shine": down[..., 7],
    }


# --------------------------------------------------------------------------------------
# Lights and what SH cannot model


def draw_face_lights(rng: np.random.Generator, n: int, tint: float = 1.0) -> np.ndarray:
    """``[n,27]`` lights from :func:`sfs_fast.training.synth.draw_lights` (the SfSNet files'
    statistics), mirrored left-right for half of them.

    Why the mirror: in the 20 SfSNet light files the first-order x term is negative in 13
    (mean x of the unit light direction -0.34, grey x coefficient -0.168 +- 0.221), a bias of
    one folder (0003, faces 41-55) rather than of photos, which are lit from either side;
    flipping the sign of the x-odd terms (x, xz, xy) keeps each light's shape and makes the
    set left-right symmetric (x coefficient 0.00 +- 0.28). The other statistics are the
    files' (grey mean and spread of all nine terms, |first order| / DC 0.61 in the files,
    0.63 drawn), so the sampler is otherwise used as it is.

    ``tint`` < 1 pulls each channel block towards the channel mean (its DC relative to the
    mean DC becomes ``1 + tint * (ratio - 1)``; the grey light is kept)."""
    lights = draw_lights(rng, n).reshape(n, 3, 9)
    flip = rng.random(n) < 0.5
    lights[np.ix_(flip, [0, 1, 2], [2, 5, 8])] *= -1.0
    if tint != 1.0:
        grey = lights.mean(1, keepdims=True)
        lights = grey + tint * (lights - grey)
    return lights.reshape(n, 27)


def light_direction(light: np.ndarray) -> tuple:
    """The dominant direction of a ``[27]`` light: unit ``[3]`` (x, y, z) of the channel-mean
    first-order terms (SfSNet order: index 1 = z, 2 = x, 3 = y) and its strength
    |first order| / DC."""
    grey = np.asarray(light, np.float64).reshape(3, 9).mean(0)
    d = np.array([grey[2], grey[3], grey[1]])
    norm = np.linalg.norm(d)
    return d / max(norm, 1e-12), norm / max(grey[0], 1e-12)


def _shade(normal_u8: np.ndarray, light: np.ndarray) -> np.ndarray:
    """SH shading ``[S,S,3]`` of the stored normal under ``light`` (the package's op, with the
    loader's normal decoding)."""
    n = torch.from_numpy((normal_u8.astype(np.float32) - 128.0) / 128.0).permute(2, 0, 1)[None].contiguous()
    shading, _ = sh_shade(n, torch.from_numpy(np.asarray(light, np.float32))[None], normalize=True)
    return shading[0].permute(1, 2, 0).double().numpy()


def _local_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Box mean of ``[H,W]`` over a ``(2r+1)^2`` window (edge-padded), via summed areas."""
    p = np.pad(a, r + 1, mode="edge")
    c = p.cumsum(0).cumsum(1)
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return s[: a.shape[0], : a.shape[1]] / (k * k)


def occlusion(depth_px: np.ndarray, strength: float) -> np.ndarray:
    """Screen-space ambient occlusion ``[S,S]`` in (0, 1]: a pixel lying below the mean depth
    of its neighbourhood (eye sockets, nose sides, mouth corners, under the chin) sees less
    of the sky."""
    size = depth_px.shape[0]
    r = max(1, round(4 * size / 128))
    diff = _local_mean(depth_px, r) - depth_px
    # A drop of many pixels is a silhouette (the background beside the head), not a crease:
    # no occlusion there, else the head gets a dark halo.
    below = np.where(diff < 4.0 * r, np.clip(diff / (1.5 * r), 0.0, 1.0), 0.0)
    return 1.0 - strength * below


def cast_shadow(depth_px: np.ndarray, direction: np.ndarray, softness: float = 1.5) -> np.ndarray:
    """Screen-space cast shadows ``[S,S]`` in [0, 1] (1 = fully shadowed): march from each
    pixel toward the light over the depth map and look for a surface above the ray (nose on
    the cheek, brows on the eyes, chin on the neck)."""
    size = depth_px.shape[0]
    lxy = math.hypot(direction[0], direction[1])
    if lxy < 0.05:  # a frontal light casts no visible shadow
        return np.zeros_like(depth_px)
    dc, dr, dz = direction[0] / lxy, -direction[1] / lxy, direction[2] / lxy  # per pixel stepped
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    shadow = np.zeros_like(depth_px)
    for t in np.arange(1.0, 16.0 * size / 128 + 1, 1.5 * max(1.0, size / 128)):  # 16 px reach at 128
        rr = np.clip(np.rint(rows + t * dr), 0, size - 1).astype(np.int64)
        cc = np.clip(np.rint(cols + t * dc), 0, size - 1).astype(np.int64)
        above = depth_px[rr, cc] - (depth_px + t * dz) - 0.5
        shadow = np.maximum(shadow, np.clip(above / softness, 0.0, 1.0))
    return shadow


def specular(normal_u8: np.ndarray, light: np.ndarray, shine: np.ndarray, ks: float, power: float) -> np.ndarray:
    """Blinn-Phong highlights ``[S,S,3]`` of the light's dominant direction (viewer along +z),
    tinted by the light's channel ratio and scaled by its directional strength."""
    n = (normal_u8.astype(np.float64) - 128.0) / 128.0
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    d, strength = light_direction(light)
    half = d + np.array([0.0, 0.0, 1.0])
    half /= max(np.linalg.norm(half), 1e-12)
    facing = np.clip((n @ d) / 0.1, 0.0, 1.0)  # no highlight on the side turned away
    lobe = np.clip(n @ half, 0.0, 1.0) ** power * facing
    dc = np.asarray(light, np.float64).reshape(3, 9)[:, 0]
    tint = dc / max(dc.mean(), 1e-12)
    return ks * min(strength, 1.2) * dc.mean() * (shine * lobe)[..., None] * tint


def camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera effects on a linear ``[S,S,3]`` image in [0, 1] -> uint8: white balance, a
    gamma/tone change, optional blur, sensor noise and JPEG compression."""
    gains = np.exp(rng.normal(0.0, 0.06, 3))
    img = np.clip(image * gains / gains.mean(), 0.0, 1.0) ** math.exp(rng.normal(0.0, 0.12))
    size = img.shape[0]
    if rng.random() < 0.4:
        pil = Image.fromarray(np.uint8(np.rint(img * 255.0)))
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 128)), np.float64) / 255.0
    sigma = rng.uniform(0.0, 0.025)
    img = img + rng.normal(0.0, sigma, img.shape) + rng.normal(0.0, sigma * 0.5, img.shape[:2] + (1,))
    out = np.uint8(np.rint(np.clip(img, 0.0, 1.0) * 255.0))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(35, 96)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def light_face(rng: np.random.Generator, geom: dict, light: np.ndarray, options: FaceSynthOptions) -> dict:
    """The face image of a rendered face (:func:`render_face`) under ``light`` ``[27]``:
    ``face`` uint8 ``[S,S,3]`` and the float ``sh_shading`` ``[S,S,3]`` it was built on."""
    sh = _shade(geom["normal"], light)
    shading = sh
    if options.shadows:
        ambient = light.copy().reshape(3, 9)
        ambient[:, 1:] = 0.0  # the DC term alone: what a shadow leaves
        direct = np.maximum(sh - _shade(geom["normal"], ambient.reshape(27)), 0.0)
        d, _ = light_direction(light)
        shading = shading - rng.uniform(0.6, 1.0) * cast_shadow(geom["depth_px"], d)[..., None] * direct
    if options.occlusion:
        shading = shading * occlusion(geom["depth_px"], rng.uniform(0.3, 0.7))[..., None]
    albedo = geom["albedo"].astype(np.float64) / 255.0
    image = albedo * shading
    if options.specular:
        image = image + specular(geom["normal"], light, geom["shine"], rng.uniform(0.1, 0.6), rng.uniform(8.0, 40.0))
    if options.camera:
        face = camera(rng, image)
    else:
        face = np.uint8(np.rint(np.clip(image, 0.0, 1.0) * 255.0))
    return {"face": face, "sh_shading": sh}


# --------------------------------------------------------------------------------------
# Samples, batches, the residue target


def render_sample(rng: np.random.Generator, options: FaceSynthOptions = FaceSynthOptions(), lights_per_face: int = 1) -> dict:
    """One face under ``lights_per_face`` lights: ``face`` uint8 ``[k,S,S,3]``, ``albedo``,
    ``normal`` uint8 ``[k,S,S,3]``, ``mask``, ``depth`` uint8 ``[k,S,S]``, ``light`` float64
    ``[k,27]``, ``sh_shading`` float ``[k,S,S,3]`` (the SH target the face was built on)."""
    geom = render_face(rng, options)
    lights = draw_face_lights(rng, lights_per_face, options.light_tint)
    lit = [light_face(rng, geom, light, options) for light in lights]
    out = {key: np.repeat(geom[key][None], lights_per_face, 0) for key in ("albedo", "normal", "mask", "depth")}
    out["face"] = np.stack([x["face"] for x in lit])
    out["sh_shading"] = np.stack([x["sh_shading"] for x in lit])
    out["light"] = lights
    return out


def generate(n: int, seed: int = 0, size: int = 128, lights_per_face: int = 1, options: FaceSynthOptions | None = None):
    """Yield ``(first_face_index, arrays)`` for ``n`` faces in batches of ``synth.BATCH``,
    the interface of :func:`sfs_fast.training.synth.generate` (arrays: ``face``, ``albedo``,
    ``normal`` ``[m,S,S,3]``, ``mask``, ``depth`` ``[m,S,S]`` uint8, ``light`` ``[m,27]``,
    ``m`` = faces x lights). Face ``i`` draws from its own generator seeded ``(seed, i)``, so
    a face does not depend on the batching or on ``n``."""
    options = replace(options or FaceSynthOptions(), size=size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 128x128 shading calls: thread hand-offs would dominate
    try:
        for start in range(0, n, BATCH):
            samples = [render_sample(np.random.default_rng([seed, i]), options, lights_per_face)
                       for i in range(start, min(start + BATCH, n))]
            keys = ("face", "albedo", "normal", "mask", "depth", "light")
            yield start, {key: np.concatenate([s[key] for s in samples]) for key in keys}
    finally:
        torch.set_num_threads(threads)


def residue_target(face: torch.Tensor, albedo: torch.Tensor, normal: torch.Tensor, light: torch.Tensor,
                   eps: float = 1e-3) -> torch.Tensor:
    """The shading residue a file set implies: ``face / albedo - sh_shade(normal, light)``.

    Args:
        face, albedo: ``[B,3,H,W]`` in [0, 1] (as the loader gives them).
        normal: ``[B,3,H,W]`` decoded ``(png - 128) / 128`` (normalized here, as the op does).
        light: ``[B,27]``.
        eps: albedo floor, so that black pixels do not divide by zero.

    Returns:
        ``[B,3,H,W]``: zero (to rounding) where the face is albedo x SH shading; highlights
        are positive, occlusion and cast shadows negative. Use inside the mask only.
    """
    shading, _ = sh_shade(normal, light, normalize=True)
    return face / albedo.clamp(min=eps) - shading
