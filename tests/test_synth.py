"""Procedural data: the written files are exactly consistent (face = albedo x shading of the
stored normal under the stored light, checked with an independent float64 SH renderer),
masks are binary, normals unit, output deterministic for a seed, lights realistic."""
import csv
import subprocess
import sys

import numpy as np
from kernel_checks import numpy_shade
import pytest
from PIL import Image

from sfs_fast.atomic import TEMP_PREFIX
from sfs_fast.training import synth


def independent_shading(normal, light):
    """float64 SfSNet-convention SH shading (the tests' independent NumPy reference).
    normal ``[H,W,3]`` unit, light ``[27]`` -> ``[H,W,3]``."""
    chw = np.asarray(normal, np.float64).transpose(2, 0, 1)[None]
    shading, _ = numpy_shade(chw, np.asarray(light, np.float64)[None], None, None, False, 0.0)
    return shading[0].transpose(1, 2, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = synth.write_dataset(out, 5, seed=7, test_fraction=0.4)
    return out, counts


def _read(path, mode=None):
    img = Image.open(path)
    return np.asarray(img.convert(mode) if mode else img, dtype=np.float64)


def _rows(out, split):
    with open(out / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_csv(dataset):
    out, counts = dataset
    assert counts == {"train": 3, "test": 2}
    rows = _rows(out, "train") + _rows(out, "test")
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"", "albedo", "normal", "depth", "mask", "face", "light", "name"}
        folder, name = row["face"].split("/")
        ident, kind, a, b = name[:-4].split("_")
        assert kind == "face" and len(ident) == 6
        assert row["name"] == f"{folder}_{ident}_{a}_{b}"  # the fixed `name` column
    # Every file went through sfs_fast.atomic and was renamed into place: 6 per sample + 2 CSVs.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(TEMP_PREFIX)]
    assert len(files) == 6 * 5 + 2


def test_face_is_albedo_times_shading(dataset):
    out, _ = dataset
    for split in ("train", "test"):
        for row in _rows(out, split):
            base = out / split
            face = _read(base / row["face"])
            albedo = _read(base / row["albedo"]) / 255.0
            normal = (_read(base / row["normal"]) - 128.0) / 128.0
            normal = normal / (np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-8)
            light = np.array((base / row["light"]).read_text().split(), dtype=np.float64)
            assert light.shape == (27,)
            expected = np.clip(albedo * independent_shading(normal, light), 0.0, 1.0) * 255.0
            # Within 8-bit rounding (plus float32 arithmetic in the renderer).
            assert np.abs(face - expected).max() <= 0.5 + 2e-3
            # The image is not trivially dark or saturated.
            mask = _read(base / row["mask"]) > 0
            assert 0.1 < face[mask].mean() / 255.0 < 0.9


def test_masks_binary_normals_unit(dataset):
    out, _ = dataset
    for row in _rows(out, "train"):
        mask = _read(out / "train" / row["mask"])
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0.0, 255.0}
        inside = mask > 0
        assert 0.2 < inside.mean() < 0.95
        normal = (_read(out / "train" / row["normal"]) - 128.0) / 128.0
        norms = np.linalg.norm(normal, axis=-1)
        # One 8-bit step is 1/128 per component.
        assert np.abs(norms[inside] - 1.0).max() < 0.02
        # Facing the viewer on average, with variety (a shaped surface, not a plane).
        assert normal[inside][:, 2].mean() > 0.5
        assert normal[inside][:, 0].std() > 0.1 and normal[inside][:, 1].std() > 0.1


def test_deterministic_for_seed():
    a = next(synth.generate(2, seed=11))[1]
    b = next(synth.generate(2, seed=11))[1]
    c = next(synth.generate(2, seed=12))[1]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["face"], c["face"])


def test_lights_like_sfsnet_files():
    rng = np.random.default_rng(0)
    lights = synth.draw_lights(rng, 4000).reshape(-1, 3, 9)
    grey = lights.mean(1)
    # Mean and spread of the SfSNet files (constants in synth.py), loosely.
    np.testing.assert_allclose(grey.mean(0), synth.LIGHT_MEAN, atol=0.03)
    assert np.all(lights[:, :, 0] > 0)
    # Red is, on average, the strongest channel of the ambient term, as in the files.
    assert lights[:, 0, 0].mean() > lights[:, 1, 0].mean() > lights[:, 2, 0].mean()
    check = synth.shading_range_check(0, 200)
    assert check["negative"] < 0.02 and check["above_one"] < 0.2


def test_cli_synth_and_bad_input(tmp_path, capsys):
    from sfs_fast.training.cli import data_main

    assert data_main(["synth", str(tmp_path / "d"), "--n", "2", "--seed", "1", "--test-fraction", "0"]) == 0
    assert (tmp_path / "d" / "train.csv").is_file()
    assert len(list((tmp_path / "d" / "train").glob("*/*_face_*.png"))) == 2
    bad = subprocess.run([sys.executable, "-c", "import sys; from sfs_fast.training.cli import data_main; "
                          "sys.exit(data_main(sys.argv[1:]))", "synth", str(tmp_path / "e"), "--n", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "e").exists()
