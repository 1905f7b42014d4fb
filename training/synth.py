"""Procedural face data in the SfSNet synthetic layout (SPEC A.10, B.4.1).

Each sample is a head-shaped height field (an ellipsoid with a nose, eye sockets, brow ridge,
cheeks, lips and chin, random in size and position, turned by a random pose), a skin-tone
albedo with low-frequency variation and darker brows, eyes and lips, and a second-order SH
light drawn from the statistics of the SfSNet synthetic light files. The face image is
rendered with the project's own op :func:`sfs_fast.kernels.sh_shade` from exactly the
normal and albedo that are written, so that on the files

    face = round(255 * clip(albedo_png / 255 * shading(normal_png, light_txt), 0, 1))

with ``normal = (normal_png - 128) / 128`` normalized per pixel (the loader's convention).

Axes of the normals: x to the right of the image, y up, z towards the viewer.

Layout written by :func:`write_dataset`::

    <out>/{train,test}/<folder>/<id>_{face,albedo,normal,depth,mask}_<a>_<b>.png
    <out>/{train,test}/<folder>/<id>_light_<a>_<b>.txt
    <out>/train.csv, <out>/test.csv          (sfs_fast.training.data.generate_dataset_csv)

``<id>`` numbers the face (shape and albedo), ``<b>`` its light (``lights_per_face``), ``<a>`` is 1.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sfs_fast.atomic import atomic_destination
from sfs_fast.kernels import sh_shade
from sfs_fast.sh import write_light, format_light

# --------------------------------------------------------------------------------------
# Light statistics of the 20 light files of the SfSNet synthetic set (bhushan23/SfSNet-PyTorch
# data/0003), measured once and written down here so that nothing reads those files at run
# time. A light is modelled as grey 9-vector g ~ N(LIGHT_MEAN, LIGHT_COV) (SfSNet order; the
# covariance keeps the strong couplings between first- and second-order terms that a
# directional light makes), per-channel tint t_c ~ N(TINT_MEAN, TINT_STD) with the measured
# R-B anti-correlation, and a small per-channel residue: light_c = t_c * g + r_c.

LIGHT_MEAN = (0.5587, 0.1802, -0.1677, 0.0188, -0.1347, -0.0409, 0.0171, -0.0215, -0.0183)
LIGHT_COV = (
    (0.0191, 0.0004, -0.0065, -0.0042, 0.0032, 0.0048, -0.0011, -0.0018, 0.0057),
    (0.0004, 0.0028, -0.0012, 0.0020, -0.0002, -0.0011, 0.0004, 0.0012, -0.0024),
    (-0.0065, -0.0012, 0.0513, -0.0005, 0.0251, 0.0006, -0.0068, -0.0222, -0.0004),
    (-0.0042, 0.0020, -0.0005, 0.0163, 0.0017, -0.0008, 0.0047, 0.0005, -0.0137),
    (0.0032, -0.0002, 0.0251, 0.0017, 0.0268, 0.0019, -0.0037, -0.0166, 0.0031),
    (0.0048, -0.0011, 0.0006, -0.0008, 0.0019, 0.0035, -0.0008, -0.0031, 0.0030),
    (-0.0011, 0.0004, -0.0068, 0.0047, -0.0037, -0.0008, 0.0037, 0.0050, -0.0060),
    (-0.0018, 0.0012, -0.0222, 0.0005, -0.0166, -0.0031, 0.0050, 0.0230, -0.0052),
    (0.0057, -0.0024, -0.0004, -0.0137, 0.0031, 0.0030, -0.0060, -0.0052, 0.0184),
)
LIGHT_MIN = (0.279, 0.057, -0.637, -0.306, -0.433, -0.162, -0.090, -0.432, -0.238)
LIGHT_MAX = (0.891, 0.291, 0.173, 0.232, 0.273, 0.085, 0.128, 0.292, 0.326)
TINT_MEAN = (1.163, 0.956, 0.881)
TINT_STD = (0.135, 0.058, 0.113)
TINT_CORR = ((1.0, -0.56, -0.90), (-0.56, 1.0, 0.15), (-0.90, 0.15, 1.0))
CHANNEL_RESIDUE_STD = (0.048, 0.017, 0.058, 0.021, 0.025, 0.016, 0.014, 0.049, 0.025)

# Skin tones (linear-ish RGB albedo in [0, 1]), light to dark; a face's base colour is a
# random point on this polyline.
SKIN_TONES = (
    (0.93, 0.78, 0.68),
    (0.87, 0.68, 0.56),
    (0.76, 0.56, 0.43),
    (0.62, 0.43, 0.31),
    (0.46, 0.31, 0.22),
    (0.32, 0.21, 0.15),
)
HAIR_TONES = ((0.08, 0.06, 0.05), (0.25, 0.16, 0.09), (0.45, 0.32, 0.18), (0.60, 0.50, 0.35))

BATCH = 20  # faces per vectorized batch (each batch has its own seeded generator)
KINDS_PNG = ("face", "albedo", "normal", "depth", "mask")


def _psd_sqrt(cov) -> np.ndarray:
    """A matrix square root of a (rounded, possibly slightly indefinite) covariance."""
    w, v = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    return v * np.sqrt(np.clip(w, 1e-8, None))


_LIGHT_SQRT = _psd_sqrt(LIGHT_COV)
_TINT_SQRT = _psd_sqrt(np.asarray(TINT_CORR) * np.outer(TINT_STD, TINT_STD))


def draw_lights(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` SH lights ``[n,27]`` (R|G|B blocks, SfSNet order) drawn like the SfSNet files.

    Values are rounded to what the light file stores, so that a file read back is the
    light that rendered the face.
    """
    grey = np.asarray(LIGHT_MEAN) + rng.standard_normal((n, 9)) @ _LIGHT_SQRT.T
    # Widen the measured range a little: 20 files do not show the tails.
    lo, hi = np.asarray(LIGHT_MIN), np.asarray(LIGHT_MAX)
    pad = 0.1 * (hi - lo)
    grey = np.clip(grey, lo - pad, hi + pad)
    grey[:, 0] = np.clip(grey[:, 0], 0.3, 1.0)  # ambient stays positive and not blinding
    tint = np.asarray(TINT_MEAN) + rng.standard_normal((n, 3)) @ _TINT_SQRT.T
    tint = np.clip(tint, 0.6, 1.5)
    residue = rng.standard_normal((n, 3, 9)) * np.asarray(CHANNEL_RESIDUE_STD) * 0.5
    light = (tint[:, :, None] * grey[:, None, :] + residue).reshape(n, 27)
    return np.array([[float(v) for v in format_light(row).split()] for row in light])


def _gauss(u, v, cx, cy, sx, sy):
    """Axis-aligned Gaussian bumps ``[B,H,W]``: u ``[1,W]`` (columns), v ``[H,1]`` (rows);
    cx..sy scalars or ``[B,1,1]``. Separable, so two 1-D exponentials and one product."""
    gu = torch.exp(-0.5 * ((u - cx) / sx) ** 2)  # [B,1,W]
    gv = torch.exp(-0.5 * ((v - cy) / sy) ** 2)  # [B,H,1]
    return gv * gu


def _f32(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _col(rng, n, lo, hi):
    return torch.from_numpy(rng.uniform(lo, hi, n).astype(np.float32)).reshape(n, 1, 1)


def _rotation(yaw, pitch, roll) -> torch.Tensor:
    """Rotation matrices ``[B,3,3]`` (about y, then x, then z), angles in radians ``[B]``."""
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    z, o = torch.zeros_like(yaw), torch.ones_like(yaw)
    ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(-1, 3, 3)
    rx = torch.stack([o, z, z, z, cp, -sp, z, sp, cp], -1).reshape(-1, 3, 3)
    rz = torch.stack([cr, -sr, z, sr, cr, z, z, z, o], -1).reshape(-1, 3, 3)
    return rz @ rx @ ry


def _smooth_noise(rng, n, channels, size, cells=4, std=1.0) -> torch.Tensor:
    """Low-frequency noise ``[n,channels,size,size]``: a ``cells`` x ``cells`` random grid,
    bicubic-upsampled."""
    grid = _f32(rng.standard_normal((n, channels, cells, cells)) * std)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)


class _Face(NamedTuple):
    """One batch of drawn head shapes: height ``z`` and ``mask`` ``[B,H,W]``, pose angles
    ``[B]`` (radians) and where the features sit (``[B,1,1]`` each), which the albedo uses."""

    z: torch.Tensor
    mask: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor
    roll: torch.Tensor
    fx: torch.Tensor  # feature centre
    fy: torch.Tensor
    rx: torch.Tensor  # head half-width
    eye_dx: torch.Tensor
    eye_y: torch.Tensor
    mouth_y: torch.Tensor


def _draw_heads(rng, n, u, v) -> _Face:
    """Height fields of ``n`` heads on the grid ``u`` ``[1,W]``, ``v`` ``[H,1]``: a flattened
    ellipsoid plus nose, eye sockets, cheeks, brow ridge, lips, mouth line and chin."""
    cx, cy = _col(rng, n, -0.06, 0.06), _col(rng, n, -0.10, 0.02)
    rx, ry = _col(rng, n, 0.58, 0.74), _col(rng, n, 0.78, 0.95)
    depth_scale = _col(rng, n, 0.55, 0.85) * rx
    e = 1.0 - ((u - cx) / rx) ** 2 - ((v - cy) / ry) ** 2
    inside = e.clamp(min=0.0)
    z = depth_scale * inside.sqrt()
    fade = (inside * 6.0).clamp(max=1.0)  # features vanish towards the silhouette

    yaw = _f32(rng.uniform(-0.45, 0.45, n))
    pitch = _f32(rng.uniform(-0.25, 0.25, n))
    roll = _f32(rng.uniform(-0.15, 0.15, n))
    # Turning the head moves the nose and mouth towards the turned side.
    shift = (torch.sin(yaw) * 0.22).reshape(n, 1, 1)
    lift = (torch.sin(pitch) * 0.15).reshape(n, 1, 1)
    fx, fy = cx + shift, cy + lift  # the face's feature centre
    eye_dx = rx * _col(rng, n, 0.40, 0.50)
    eye_y = fy + ry * _col(rng, n, 0.12, 0.22)
    mouth_y = fy - ry * _col(rng, n, 0.45, 0.55)

    nose_amp = _col(rng, n, 0.10, 0.20)
    feats = nose_amp * _gauss(u, v, fx, fy - 0.02, _col(rng, n, 0.06, 0.09), _col(rng, n, 0.16, 0.22))
    feats = feats + 0.5 * nose_amp * _gauss(u, v, fx, fy - 0.15, 0.07, 0.06)  # nose tip
    socket = _col(rng, n, 0.04, 0.09)
    for side in (-1.0, 1.0):
        feats = feats - socket * _gauss(u, v, fx + side * eye_dx, eye_y, 0.10, 0.07)
        feats = feats + _col(rng, n, 0.015, 0.04) * _gauss(u, v, fx + side * rx * 0.50, fy - 0.12, 0.14, 0.12)
    feats = feats + _col(rng, n, 0.01, 0.035) * _gauss(u, v, fx, eye_y + 0.12, 0.32, 0.04)  # brow ridge
    feats = feats + _col(rng, n, 0.015, 0.035) * _gauss(u, v, fx, mouth_y, 0.14, 0.045)  # lips
    feats = feats - 0.02 * _gauss(u, v, fx, mouth_y, 0.12, 0.012)  # mouth line
    feats = feats + _col(rng, n, 0.01, 0.04) * _gauss(u, v, fx, mouth_y - 0.22, 0.12, 0.08)  # chin
    return _Face(z + feats * fade, e > 0.03, yaw, pitch, roll, fx, fy, rx, eye_dx, eye_y, mouth_y)


def _normals(face: _Face, size: int) -> torch.Tensor:
    """Unit normals ``[B,3,H,W]`` of the height field, turned by the pose; (0, 0, 1) outside."""
    step = 2.0 / size
    dz_dv, dz_du = torch.gradient(face.z, spacing=step, dim=(1, 2))
    dz_dv = -dz_dv  # rows run down, v runs up
    normal = torch.stack([-dz_du, -dz_dv, torch.ones_like(face.z)], 1)
    normal = normal / (normal * normal).sum(1, keepdim=True).sqrt()
    rot = _rotation(face.yaw, face.pitch, face.roll)
    normal = torch.einsum("bij,bjhw->bihw", rot, normal)
    wall = torch.tensor([0.0, 0.0, 1.0], dtype=normal.dtype).reshape(1, 3, 1, 1)
    return torch.where(face.mask[:, None], normal, wall)


def _draw_albedo(rng, face: _Face, u, v, size: int) -> torch.Tensor:
    """Albedo ``[B,3,H,W]`` in [0,1]: skin tone + low-frequency variation, redder cheeks,
    darker brows/eyes/lips, a random background outside the mask."""
    dt, n = torch.float32, face.z.shape[0]
    fx, fy, rx, eye_dx, eye_y, mouth_y = face.fx, face.fy, face.rx, face.eye_dx, face.eye_y, face.mouth_y
    tones = torch.tensor(SKIN_TONES, dtype=dt)
    t = _f32(rng.uniform(0, len(SKIN_TONES) - 1, n))
    i0 = t.floor().long().clamp(max=len(SKIN_TONES) - 2)
    frac = (t - i0).reshape(n, 1)
    skin = tones[i0] * (1 - frac) + tones[i0 + 1] * frac
    skin = skin * _f32(rng.uniform(0.9, 1.05, (n, 1))) + _f32(rng.normal(0, 0.02, (n, 3)))
    albedo = skin.reshape(n, 3, 1, 1) * (1.0 + _smooth_noise(rng, n, 3, size, 4, 0.05) + _smooth_noise(rng, n, 1, size, 8, 0.03))
    hair = torch.tensor(HAIR_TONES, dtype=dt)[torch.from_numpy(rng.integers(0, len(HAIR_TONES), n))].reshape(n, 3, 1, 1)
    red = torch.tensor([1.0, -0.3, -0.3], dtype=dt).reshape(1, 3, 1, 1)
    for side in (-1.0, 1.0):
        cheek = _gauss(u, v, fx + side * rx * 0.5, fy - 0.15, 0.12, 0.10)[:, None]
        albedo = albedo + red * 0.06 * _col(rng, n, 0.0, 1.0)[:, None] * cheek
        brow = _gauss(u, v, fx + side * eye_dx, eye_y + 0.11, 0.12, 0.025)[:, None]
        albedo = albedo + (hair - albedo) * (_col(rng, n, 0.5, 0.9)[:, None] * brow)
        eye = _gauss(u, v, fx + side * eye_dx, eye_y, 0.06, 0.025)[:, None]
        albedo = albedo + (0.25 * hair + 0.1 - albedo) * (0.7 * eye)
    lip_tone = skin.reshape(n, 3, 1, 1) * torch.tensor([0.80, 0.48, 0.50], dtype=dt).reshape(1, 3, 1, 1)
    lips = _gauss(u, v, fx, mouth_y, 0.13, 0.035)[:, None]
    albedo = albedo + (lip_tone - albedo) * (_col(rng, n, 0.5, 0.85)[:, None] * lips)
    back = _f32(rng.uniform(0.1, 0.9, (n, 3, 1, 1))) * (1.0 + _smooth_noise(rng, n, 3, size, 3, 0.15))
    return torch.where(face.mask[:, None], albedo, back).clamp(0.0, 1.0)


def render_batch(rng: np.random.Generator, n: int, size: int = 128, lights_per_face: int = 1) -> dict:
    """Draw ``n`` faces (each under ``lights_per_face`` lights) and render them.

    Returns a dict of NumPy arrays, ``m = n * lights_per_face`` samples:
    ``face``, ``albedo``, ``normal`` uint8 ``[m,H,W,3]``; ``mask``, ``depth`` uint8 ``[m,H,W]``;
    ``light`` float64 ``[m,27]``.
    """
    dt = torch.float32
    lin = (torch.arange(size, dtype=dt) + 0.5) / size * 2.0 - 1.0
    u, v = lin.reshape(1, size), -lin.reshape(size, 1)  # u right (columns), v up (rows)
    # The draws run in this order (shape, then albedo, then lights): the data of a seed is fixed.
    face = _draw_heads(rng, n, u, v)
    normal = _normals(face, size)
    albedo = _draw_albedo(rng, face, u, v, size)
    mask = face.mask

    # Quantize first and render from exactly what is stored.
    albedo_u8 = (albedo * 255.0).round().to(torch.uint8)
    normal_u8 = (normal * 128.0 + 128.0).round().clamp(0, 255).to(torch.uint8)
    depth = torch.where(mask, face.z, torch.zeros_like(face.z))
    depth_u8 = (depth / depth.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6) * 255.0).round().to(torch.uint8)

    k = lights_per_face
    lights = draw_lights(rng, n * k)
    albedo_q = (albedo_u8.to(dt) / 255.0).repeat_interleave(k, 0)
    normal_q = ((normal_u8.to(dt) - 128.0) / 128.0).repeat_interleave(k, 0)
    _, recon = sh_shade(normal_q, _f32(lights), None, albedo_q, normalize=True)
    face_u8 = (recon.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

    def hwc(t):
        return t.permute(0, 2, 3, 1).contiguous().numpy()

    return {
        "face": hwc(face_u8),
        "albedo": hwc(albedo_u8.repeat_interleave(k, 0)),
        "normal": hwc(normal_u8.repeat_interleave(k, 0)),
        "mask": (mask.to(torch.uint8) * 255).repeat_interleave(k, 0).numpy(),
        "depth": depth_u8.repeat_interleave(k, 0).numpy(),
        "light": lights,
    }


def generate(n: int, seed: int = 0, size: int = 128, lights_per_face: int = 1):
    """Yield ``(first_face_index, arrays)`` batches for ``n`` faces; see :func:`render_batch`
    for the arrays. Deterministic for ``(n, seed, size, lights_per_face)``.

    Renders single-threaded: the tensors are small, and on a shared CPU two threads measured
    about 4x slower than one (thread hand-offs dominate).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, n, BATCH):
            count = min(BATCH, n - start)
            # One generator per batch, keyed by the batch index.
            rng = np.random.default_rng([seed, start // BATCH])
            yield start, render_batch(rng, count, size, lights_per_face)
    finally:
        torch.set_num_threads(threads)


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def write_dataset(out, n: int, seed: int = 0, size: int = 128, test_fraction: float = 0.1,
                  lights_per_face: int = 1, faces_per_folder: int = 100, progress=None,
                  generator: str = "procedural", light_tint: float = 1.0) -> dict:
    """Write ``n`` faces (x ``lights_per_face``) to ``out`` in the synthetic layout and the
    CSVs. The last ``round(n * test_fraction)`` faces go to ``test/``. Files are written under
    a temporary name and renamed, so an interrupted run leaves no half-written file.
    ``generator``: ``procedural`` (this module) or ``mesh`` (:mod:`.face_synth`);
    ``light_tint``: the mesh generator's :attr:`~.face_synth.FaceSynthOptions.light_tint`.
    Returns ``{"train": rows, "test": rows}``."""
    from sfs_fast.training.data import generate_dataset_csv
    from sfs_fast.training import face_synth

    if generator not in ("procedural", "mesh"):
        raise ValueError(f"--generator: expected mesh or procedural, got {generator!r}")
    if light_tint != 1.0 and generator != "mesh":
        raise ValueError("--light-tint: only the mesh generator has it")
    if generator == "mesh":
        options = face_synth.FaceSynthOptions(light_tint=float(light_tint))
        batches = functools.partial(face_synth.generate, options=options)
    else:
        batches = generate

    if n < 1:
        raise ValueError(f"--n: need at least one sample, got {n}")
    if size < 16:
        raise ValueError(f"--size: need at least 16 pixels, got {size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test-fraction: expected a value in [0, 1), got {test_fraction}")
    out = Path(out)
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    k = lights_per_face

    def write_sample(arrays, j, face_id):
        split = "train" if face_id < n_train else "test"
        folder = out / split / f"{face_id // faces_per_folder:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{face_id:06d}_{{kind}}_1_{j % k + 1}"
        for kind in KINDS_PNG:
            # The temporary name ends in .png too: PIL picks the format from it.
            with atomic_destination(folder / (stem.format(kind=kind) + ".png")) as tmp:
                _save_png(tmp, arrays[kind][j])
        with atomic_destination(folder / (stem.format(kind="light") + ".txt")) as tmp:
            write_light(tmp, arrays["light"][j])

    # PNG encoding releases the GIL: write one batch while the next one renders.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for start, arrays in batches(n, seed, size, k):
            for fut in pending:
                fut.result()
            pending = [pool.submit(write_sample, arrays, j, start + j // k) for j in range(arrays["face"].shape[0])]
            if progress is not None:
                progress(min(start + BATCH, n))
        for fut in pending:
            fut.result()
    return generate_dataset_csv(out)


def shading_range_check(rng_seed: int = 0, n: int = 200) -> dict:
    """Diagnostics of drawn lights on a frontal hemisphere: the fraction of negative and of
    saturating (> 1) shading values. Used by the tests to keep the lights sensible."""
    rng = np.random.default_rng(rng_seed)
    lights = torch.from_numpy(draw_lights(rng, n))
    theta = torch.linspace(0, math.pi / 2 * 0.9, 16, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, 32, dtype=torch.float64)
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    normal = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], 0)[None].expand(n, 3, 16, 32)
    shading, _ = sh_shade(normal.contiguous(), lights, normalize=True)
    return {"negative": float((shading < 0).double().mean()), "above_one": float((shading > 1).double().mean())}
