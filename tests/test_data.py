"""Data readers and CSVs: complete-sample indexing with the fixed `name` column, seeded
read_first, the loader's conventions (normal (png-128)/128, binary masks, ones without a
mask, labels), pseudo labels that read back as what the model predicted, CelebA CSVs."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from sfs_fast import build_model
from sfs_fast import weights as W
from sfs_fast.training import data as D
from sfs_fast.training import synth


# Tiny tensors: on a busy 2-core machine one thread measured much faster than two.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    synth.write_dataset(out, 6, seed=1, test_fraction=0.34)
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_keeps_only_complete_samples(syn, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(syn, root)
    victim = next((root / "train").glob("*/*_depth_*.png"))
    victim.unlink()
    counts = D.generate_dataset_csv(root)
    assert counts == {"train": 3, "test": 2}
    rows = _rows(root / "train.csv")
    assert all(victim.name.split("_")[0] not in r["face"] for r in rows)
    for r in rows:
        folder, name = r["light"].split("/")
        ident, _, a, b = name[:-4].split("_")
        assert r["name"] == f"{folder}_{ident}_{a}_{b}"
    assert D.detect_layout(root) == "synthetic"


def test_read_first_is_seeded():
    rows = list(range(100))
    a = D.read_first_rows(rows, 10, seed=1)
    assert a == D.read_first_rows(rows, 10, seed=1)
    assert a != D.read_first_rows(rows, 10, seed=2)
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert D.read_first_rows(rows, None, seed=1) == rows
    assert D.read_first_rows(rows, 1000, seed=1) == rows


def test_dataset_sample_conventions(syn):
    samples = D.load_samples(syn / "train.csv", synthetic=True)
    ds = D.FaceDataset(samples)
    item = ds[0]
    assert item["face"].shape == (3, 128, 128) and 0 <= item["face"].min() and item["face"].max() <= 1
    assert item["mask"].shape == (1, 128, 128) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["light"].shape == (27,) and item["label"].item() == 1.0
    png = np.asarray(Image.open(samples[0].normal), dtype=np.float32)
    expected = (torch.from_numpy(png).permute(2, 0, 1) - 128.0) / 128.0
    assert torch.equal(item["normal"], expected)
    light = np.array(open(samples[0].light).read().split(), dtype=np.float64)
    assert torch.allclose(item["light"].double(), torch.from_numpy(light), atol=1e-6)


def test_splits_seeded(syn):
    a = D.build_splits(syn, seed=3, validation_split=34.0)
    b = D.build_splits(syn, seed=3, validation_split=34.0)
    assert [s.name for s in a.train.samples] == [s.name for s in b.train.samples]
    assert len(a.val) == 1 and len(a.train) == 3 and len(a.test) == 2
    assert len(a.real_albedo) == 4
    with pytest.raises(ValueError, match="no such"):
        D.build_splits(syn / "nope")


def test_pseudo_labels_round_trip(syn, tmp_path, calibrated_model):
    from sfs_fast.training.pseudo import write_pseudo_labels

    model = calibrated_model(0)
    W.save(model, tmp_path / "m0.safetensors")
    faces = tmp_path / "celeba" / "train" / "celebA_00" / "all"
    faces.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(faces / f"{i:06d}.jpg")
    assert D.detect_layout(tmp_path / "celeba") == "celeba"
    assert D.generate_celeba_csv(tmp_path / "celeba") == {"train": 3}

    counts, mean_l1 = write_pseudo_labels(tmp_path / "m0.safetensors", tmp_path / "celeba", tmp_path / "pseudo",
                                          batch_size=2)
    assert counts == {"train": 3} and np.isfinite(mean_l1)
    written = sorted(p.name for p in (tmp_path / "pseudo" / "train").iterdir())
    assert len(written) == 3 * 6 + 1 and "readme.txt" in written  # no temporary left beside them
    assert D.detect_layout(tmp_path / "pseudo") == "pseudo"
    rows = _rows(tmp_path / "pseudo" / "train.csv")
    assert len(rows) == 3 and all(r["mask"] == "None" and r["depth"] == "None" for r in rows)
    splits = D.build_splits(None, tmp_path / "pseudo", validation_split=0.0)
    ds = splits.train
    item = ds[0]
    assert item["label"].item() == 0.0 and torch.equal(item["mask"], torch.ones(1, 128, 128))
    # The stored labels are what the model predicts for the stored face (within 8 bits).
    pred = W.load(tmp_path / "m0.safetensors")(item["face"][None])
    row = next(r for r in rows if r["name"] == ds.samples[0].name)
    assert ds.samples[0].face.endswith(row["face"])
    assert (item["normal"] - pred["normal"][0]).abs().max() <= 1 / 128 + 1e-4
    assert (item["albedo"] - pred["albedo"][0].clamp(0, 1)).abs().max() <= 1 / 255 + 1e-4
    assert torch.allclose(item["light"], pred["light"][0], atol=1e-5)


def test_cli_csv(syn, tmp_path, capsys):
    from sfs_fast.training.cli import data_main

    assert data_main(["csv", str(syn)]) == 0
    assert "synthetic layout" in capsys.readouterr().out
    assert data_main(["csv", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sfs-data csv: error:")
    assert data_main(["pseudo", "--weights", str(tmp_path / "none.safetensors"), str(syn), str(tmp_path / "o")]) == 1
