"""Sample images the core needs: the example faces shipped with the package and procedural
face-like pictures. The ``auto`` precision check, ``sfs-bench`` and the int8 calibration of
:mod:`sfs_fast.export.quantize` all draw from here.

    example_faces()                        # [6,3,128,128] float32, the bundled faces
    face_like_images(4, np.random.default_rng(0))
    check_images(8)                        # what auto checks a path on (torch tensor)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

INPUT_SIZE = 128
# The example faces of examples/faces, as package data (attribution in its README.md)
EXAMPLES = Path(__file__).resolve().parent / "data" / "examples"
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def face_like_images(batch: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic ``[batch,3,128,128]`` float32 pictures in [0,1] with face statistics: a
    smooth background, a skin-coloured ellipse lit by a random Lambertian light (sphere-like
    normals), darker eye and mouth blobs and a little noise. For calibration and checks of
    low-precision paths, whose activation ranges should look like real use."""
    s = INPUT_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) * 2 - 1
    out = np.empty((batch, 3, s, s), np.float32)
    for i in range(batch):
        out[i] = _one_face(rng, xx, yy)
    return out


def _one_face(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    bg = rng.uniform(0.05, 0.9, 3).astype(np.float32)
    grad = rng.uniform(-0.2, 0.2, 2).astype(np.float32)
    img = bg[:, None, None] + grad[0] * xx + grad[1] * yy
    cx, cy = rng.uniform(-0.1, 0.1, 2)
    ax, ay = rng.uniform(0.55, 0.75), rng.uniform(0.7, 0.9)
    u, v = (xx - cx) / ax, (yy - cy) / ay
    r2 = u * u + v * v
    inside = r2 < 1
    nz = np.sqrt(np.clip(1 - r2, 0, 1))
    light = rng.normal(size=3)
    light[2] = abs(light[2]) + 0.5
    light /= np.linalg.norm(light)
    lambert = np.clip(u * light[0] + v * light[1] + nz * light[2], 0, 1)
    skin = np.array([rng.uniform(0.55, 0.95), rng.uniform(0.35, 0.75), rng.uniform(0.25, 0.6)], np.float32)
    face = skin[:, None, None] * (0.25 + 0.85 * lambert)
    for ex, ey, rx, ry, dark in ((-0.35, -0.2, 0.15, 0.07, 0.35), (0.35, -0.2, 0.15, 0.07, 0.35),
                                 (0.0, 0.45, 0.3, 0.08, 0.6)):
        blob = ((u - ex) / rx) ** 2 + ((v - ey) / ry) ** 2 < 1
        face = np.where(blob, face * dark, face)
    img = np.where(inside, face, img)
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def example_faces() -> np.ndarray:
    """The bundled example faces (masks left out) as ``[N,3,128,128]`` float32, sorted by
    file name."""
    from sfs_fast.images import load_image

    paths = [p for p in sorted(EXAMPLES.iterdir())
             if "mask" not in p.stem and p.suffix.lower() in PICTURE_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"{EXAMPLES}: the example faces are missing from this installation")
    return np.stack([load_image(p)[0] for p in paths])


def check_images(count: int = 8, seed: int = 0) -> torch.Tensor:
    """The images ``auto`` and ``sfs-bench accuracy`` check a path on: up to ``count - 2``
    example faces, then procedural faces, ``[count,3,128,128]`` float32. They share nothing
    with the int8 calibration set of :mod:`sfs_fast.export.quantize` beyond the example
    faces."""
    faces = example_faces()[: max(count - 2, 0)]
    synth = face_like_images(count - len(faces), np.random.default_rng(10_000 + seed))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([faces, synth]).astype(np.float32)))
