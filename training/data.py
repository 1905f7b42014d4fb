"""Training data: CSV indexes and readers for the SfSNet synthetic layout and CelebA with
pseudo labels (SPEC B.4).

CSV columns (written with an unnamed index column first, as the original pandas CSVs):

- synthetic: ``albedo, normal, depth, mask, face, light, name``; paths relative to
  ``<root>/<split>/`` (e.g. ``0003/000041_face_1_3.png``); ``name`` is the sample key
  ``<folder>_<id>_<a>_<b>`` (the original filled it with the previous row's light path, B.7.9).
- CelebA pseudo labels: the same columns with ``depth`` and ``mask`` = ``None``; paths
  relative to the CSV's folder (absolute paths from the original CSVs work too).
- raw CelebA: ``face, name``.

A sample is a dict of tensors: ``face``, ``albedo`` ``[3,H,W]`` in [0,1]; ``normal``
``[3,H,W]`` = ``(png - 128) / 128``; ``mask`` ``[1,H,W]`` in {0,1} (ones without a mask);
``light`` ``[27]``; ``label`` ``[1]`` (1 synthetic, 0 CelebA pseudo label; method 7).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfs_fast.atomic import atomic_destination
from sfs_fast.sh import read_light

SYN_KINDS = ("albedo", "normal", "depth", "mask", "face", "light")
COLUMNS = SYN_KINDS + ("name",)
IMAGE_SIZE = 128


# --------------------------------------------------------------------------------------
# CSV writing (the original generate_dataset_csv / generate_*_csv)


def _write_csv_atomic(path: Path, columns, rows) -> None:
    """``rows`` (dicts) as a CSV with a leading unnamed index column, written atomically."""
    with atomic_destination(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([""] + list(columns))
        for i, row in enumerate(rows):
            writer.writerow([i] + [row[c] for c in columns])


def synthetic_rows(split_dir) -> list[dict]:
    """Index the complete samples of one split folder ``<root>/<split>/<folder>/...``.

    A sample is complete when all six kinds exist for its key ``<folder>_<id>_<a>_<b>``.
    """
    split_dir = Path(split_dir)
    found: dict[str, dict] = {}
    for path in sorted(split_dir.glob("*/*_*_*_*.*")):
        if path.name.startswith("."):
            continue
        parts = path.stem.split("_")
        if len(parts) != 4 or parts[1] not in SYN_KINDS:
            continue
        ident, kind, a, b = parts
        key = f"{path.parent.name}_{ident}_{a}_{b}"
        found.setdefault(key, {})[kind] = f"{path.parent.name}/{path.name}"
    rows = []
    for key in sorted(found):
        entry = found[key]
        if all(kind in entry for kind in SYN_KINDS):
            rows.append({**entry, "name": key})  # the fixed `name` column (SPEC B.7.9)
    return rows


def generate_dataset_csv(root) -> dict:
    """Write ``<root>/train.csv`` and ``<root>/test.csv`` for the splits that exist;
    returns ``{split: number of rows}``. Raises ValueError when no split has a sample."""
    root = Path(root)
    counts = {}
    for split in ("train", "test"):
        if (root / split).is_dir():
            rows = synthetic_rows(root / split)
            _write_csv_atomic(root / f"{split}.csv", COLUMNS, rows)
            counts[split] = len(rows)
    if not counts or not any(counts.values()):
        raise ValueError(f"{root}: no synthetic samples found (expected {root}/train/<folder>/<id>_face_<a>_<b>.png ...)")
    return counts


def generate_celeba_csv(root) -> dict:
    """Raw CelebA: ``<root>/<split>/<part>/all/*.jpg`` -> ``<root>/<split>.csv`` (face, name)."""
    root = Path(root)
    counts = {}
    for split in ("train", "test"):
        files = sorted((root / split).glob("*/all/*.jpg")) if (root / split).is_dir() else []
        if files:
            rows = [{"face": str(p.relative_to(root)), "name": p.stem} for p in files]
            _write_csv_atomic(root / f"{split}.csv", ("face", "name"), rows)
            counts[split] = len(rows)
    if not counts:
        raise ValueError(f"{root}: no CelebA images found (expected {root}/train/<part>/all/*.jpg)")
    return counts


def pseudo_rows(split_dir, root) -> list[dict]:
    """Index pseudo labels ``<split_dir>/<key>_{albedo,normal,face}.png`` + ``<key>_light.txt``."""
    split_dir, root = Path(split_dir), Path(root)
    rows = []
    for face in sorted(split_dir.glob("*_face.png")):
        key = face.name[: -len("_face.png")]
        files = {k: split_dir / f"{key}_{k}.png" for k in ("albedo", "normal", "face")}
        files["light"] = split_dir / f"{key}_light.txt"
        if all(p.is_file() for p in files.values()):
            row = {k: str(p.relative_to(root)) for k, p in files.items()}
            rows.append({**row, "depth": "None", "mask": "None", "name": key})
    return rows


def generate_pseudo_csv(root) -> dict:
    """``<root>/<split>/`` pseudo-label files -> ``<root>/<split>.csv`` (paths relative to root)."""
    root = Path(root)
    counts = {}
    for split in ("train", "test"):
        if (root / split).is_dir():
            rows = pseudo_rows(root / split, root)
            if rows:
                _write_csv_atomic(root / f"{split}.csv", COLUMNS, rows)
                counts[split] = len(rows)
    if not counts:
        raise ValueError(f"{root}: no pseudo-label samples found (expected {root}/train/<key>_face.png ...)")
    return counts


def detect_layout(root) -> str:
    """``synthetic``, ``pseudo`` or ``celeba`` by the files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            continue
        if next(d.glob("*/*_face_*_*.png"), None) is not None:
            return "synthetic"
        if next(d.glob("*_face.png"), None) is not None:
            return "pseudo"
        if next(d.glob("*/all/*.jpg"), None) is not None:
            return "celeba"
    raise ValueError(f"{root}: found neither the synthetic layout, pseudo labels nor CelebA under train/ or test/")


def write_csvs(root, layout: str = "auto") -> tuple[str, dict]:
    """``sfs-data csv``: write the CSVs of ``root``; returns ``(layout, counts)``."""
    layout = detect_layout(root) if layout == "auto" else layout
    writer = {"synthetic": generate_dataset_csv, "pseudo": generate_pseudo_csv, "celeba": generate_celeba_csv}
    if layout not in writer:
        raise ValueError(f"layout: expected auto, synthetic, pseudo or celeba, got {layout!r}")
    return layout, writer[layout](root)


# --------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Sample:
    """One row with resolved paths (None where the CSV says ``None``)."""

    face: str
    albedo: str
    normal: str
    light: str
    mask: str | None
    name: str
    label: float  # 1.0 synthetic, 0.0 CelebA pseudo label


def read_csv_rows(csv_path) -> list[dict]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: no such CSV (write it with `sfs-data csv {csv_path.parent}`)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("albedo", "normal", "face", "light") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _resolve(value: str, bases) -> str | None:
    if value in ("", "None", "nan"):
        return None
    p = Path(value)
    if p.is_absolute():
        return str(p)
    for base in bases:
        if (base / p).exists():
            return str(base / p)
    return str(bases[0] / p)


def read_first_rows(rows: list, read_first: int | None, seed: int) -> list:
    """``read_first`` rows sampled without replacement with the run's seed, in file order
    (SPEC A.8: the original sampled with a fixed 100, unseeded, or took the first rows)."""
    if read_first is None or read_first < 0 or read_first >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(rows), size=read_first, replace=False))
    return [rows[i] for i in keep]


def load_samples(csv_path, *, synthetic: bool, read_first: int | None = None, seed: int = 1) -> list[Sample]:
    """Rows of one CSV as :class:`Sample` s. Synthetic paths are taken relative to
    ``<csv folder>/<split>/`` (split = the CSV's stem), pseudo-label paths relative to the
    CSV's folder."""
    csv_path = Path(csv_path)
    rows = read_first_rows(read_csv_rows(csv_path), read_first, seed)
    root = csv_path.parent
    bases = [root / csv_path.stem, root] if synthetic else [root, root / csv_path.stem]
    samples = []
    for i, row in enumerate(rows):
        paths = {k: _resolve(row.get(k, "None"), bases) for k in ("face", "albedo", "normal", "light", "mask")}
        for k in ("face", "albedo", "normal", "light"):
            if paths[k] is None:
                raise ValueError(f"{csv_path}: row {i} has no {k}")
        samples.append(Sample(paths["face"], paths["albedo"], paths["normal"], paths["light"], paths["mask"],
                              row.get("name") or str(i), 1.0 if synthetic else 0.0))
    return samples


def _open_rgb(path, size: int) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    img = img.convert("RGB")
    if img.size != (size, size):
        # Shorter side to `size` (bilinear) then a centre crop, as Resize(128) on square crops.
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC image -> float ``[C,H,W]`` in [0,1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class FaceDataset(torch.utils.data.Dataset):
    """Samples as dicts of tensors (see the module docstring)."""

    def __init__(self, samples: list[Sample], size: int = IMAGE_SIZE):
        self.samples = list(samples)
        self.size = size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        face = _to_tensor(_open_rgb(s.face, self.size))
        albedo = _to_tensor(_open_rgb(s.albedo, self.size))
        normal_u8 = np.asarray(_open_rgb(s.normal, self.size), dtype=np.float32)
        normal = (torch.from_numpy(normal_u8.copy()).permute(2, 0, 1) - 128.0) / 128.0
        if s.mask is None:
            mask = torch.ones(1, self.size, self.size)
        else:
            m = _open_rgb(s.mask, self.size).convert("L")
            mask = (torch.from_numpy(np.asarray(m, dtype=np.uint8).copy()) >= 128).float()[None]
        light = torch.from_numpy(read_light(s.light)).float()
        return {"face": face, "albedo": albedo, "normal": normal, "mask": mask, "light": light,
                "label": torch.tensor([s.label])}


@dataclass
class Splits:
    train: FaceDataset
    val: FaceDataset | None
    test: FaceDataset | None
    real_albedo: FaceDataset | None  # synthetic-only pool of "real" albedos for GAN methods


def build_splits(syn_data=None, celeba_data=None, *, read_first=None, seed: int = 1,
                 validation_split: float = 2.0, test_read_first: int = 100) -> Splits:
    """Train/val/test datasets as the original ``train()`` built them (SPEC B.4.4).

    Train and val come from ``<syn>/train.csv`` (+ ``<celeba>/train.csv``), split with
    ``validation_split`` percent for validation by a generator seeded with ``seed``; the test
    set is ``test_read_first`` rows of each ``test.csv`` that exists.
    """
    if syn_data is None and celeba_data is None:
        raise ValueError("no training data: give --syn_data and/or --celeba_data")
    pool: list[Sample] = []
    test: list[Sample] = []
    real: list[Sample] = []
    for root, synthetic in ((syn_data, True), (celeba_data, False)):
        if root is None:
            continue
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root}: no such data directory")
        train_rows = load_samples(root / "train.csv", synthetic=synthetic, read_first=read_first, seed=seed)
        pool += train_rows
        if synthetic:
            real += train_rows
        if (root / "test.csv").is_file():
            test += load_samples(root / "test.csv", synthetic=synthetic, read_first=test_read_first, seed=seed)
    if not pool:
        raise ValueError("no training samples in the given CSVs")
    n_val = int(validation_split * len(pool) / 100.0)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [pool[i] for i in order[:n_val]]
    train = [pool[i] for i in order[n_val:]]
    return Splits(FaceDataset(train), FaceDataset(val) if val else None, FaceDataset(test) if test else None,
                  FaceDataset(real) if real else None)
