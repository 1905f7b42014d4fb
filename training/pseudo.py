"""Pseudo labels of real faces (SPEC B.4.2): run a trained model over face images and write
the decomposition in the layout the CelebA pseudo-label CSVs index.

    <out>/<split>/<key>_{face,albedo,normal,shading,recon}.png, <key>_light.txt
    <out>/<split>/readme.txt (mean L1 reconstruction error), <out>/<split>.csv

Normals are stored as ``round(n * 128 + 128)`` so that the loader's ``(png - 128) / 128``
gives them back (the Illum copies stored the raw normal with negatives clipped, B.7.10).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfs_fast.atomic import atomic_destination
from sfs_fast.sh import format_light
from sfs_fast.training.data import IMAGE_SIZE, _open_rgb, _to_tensor, generate_pseudo_csv

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _load_model(weights, method, device):
    from sfs_fast.weights import load_any

    model = load_any(weights, method=method)
    if hasattr(model, "spec") and not model.spec.light:
        raise ValueError(f"{weights}: method {model.method} predicts no SH light; pseudo labels need one")
    model.config.shading_backend = "auto"
    return model.to(device).eval()


def _runner(model):
    """The Decomposer for SfSNet-type models (the one inference path); SkipNet runs as is."""
    if hasattr(model, "spec"):
        from sfs_fast.decomposer import Decomposer

        dec = Decomposer(model, backend="fused", device=next(model.parameters()).device.type)
        return dec.decompose

    def run(x):
        with torch.inference_mode():
            return {k: v.float().cpu() for k, v in model(x.to(next(model.parameters()).device)).items()}

    return run


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not p.name.startswith("."))


def _save(path: Path, chw: torch.Tensor):
    """``[3,H,W]`` in [0,1] as an 8-bit PNG, atomically (the temporary name keeps ``.png``
    last, which tells PIL the format)."""
    arr = (chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    with atomic_destination(path) as tmp:
        Image.fromarray(arr).save(tmp)


def write_pseudo_labels(weights, celeba_dir, out, *, method=None, batch_size=16, device="cpu"):
    """Label every image under ``celeba_dir`` (``train/`` and ``test/`` kept as splits, else
    everything goes to ``train``). Returns ``({split: count}, mean L1 recon error)``."""
    celeba_dir, out = Path(celeba_dir), Path(out)
    if not celeba_dir.is_dir():
        raise ValueError(f"{celeba_dir}: no such folder")
    splits = {s: _images(celeba_dir / s) for s in ("train", "test") if (celeba_dir / s).is_dir()}
    if not splits:
        splits = {"train": _images(celeba_dir)}
    if not any(splits.values()):
        raise ValueError(f"{celeba_dir}: no images found")
    model = _load_model(weights, method, torch.device(device))
    run = _runner(model)
    errors = []
    counts = {}
    for split, files in splits.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        split_errors = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            faces = torch.stack([_to_tensor(_open_rgb(p, IMAGE_SIZE)) for p in chunk])
            outs = run(faces)
            for j, src in enumerate(chunk):
                key = f"{start + j:06d}"
                _save(folder / f"{key}_face.png", faces[j])
                _save(folder / f"{key}_albedo.png", outs["albedo"][j])
                _save(folder / f"{key}_shading.png", outs["shading"][j])
                _save(folder / f"{key}_recon.png", outs["recon"][j])
                normal = ((outs["normal"][j] * 128.0 + 128.0).round().clamp(0, 255) / 255.0)
                _save(folder / f"{key}_normal.png", normal)
                (folder / f"{key}_light.txt").write_text(format_light(outs["light"][j].double().numpy()))
                split_errors.append(float((outs["recon"][j] - faces[j]).abs().mean()))
        (folder / "readme.txt").write_text(
            f"pseudo labels by {weights}\nimages: {len(files)}\nmean L1 recon error: {np.mean(split_errors):.6f}\n")
        counts[split] = len(files)
        errors += split_errors
    generate_pseudo_csv(out)
    return counts, float(np.mean(errors))
