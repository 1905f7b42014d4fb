"""Conventions: the normal frame of the Caffe weights after import, the frame recorded and
enforced in checkpoints, and the SfSNet <-> DPR light conversions against an independent
implementation of DPR's sphere-rendering recipe (../shared/data/README.md)."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import caffe_reference as cr
from sfs_fast import build_model, sh, weights
from sfs_fast.importers import import_caffe_h5

# The DPR spheres are reference data outside the project (not shipped, not read by default):
# point SFS_FAST_REFERENCE_DATA at a folder holding sh_reference/dpr_spheres to run that check.
DPR_SPHERES = Path(os.environ.get("SFS_FAST_REFERENCE_DATA", "/nonexistent")) / "sh_reference" / "dpr_spheres"


# --------------------------------------------------------------------------------------
# The Caffe weights' frame


def test_caffe_normal_channels_follow_the_synthetic_png_encoding(tmp_path):
    """SfSNet's synthetic normal PNGs hold (x, y, z) as (R, G, B) = (n + 1) / 2; Caffe read
    them with OpenCV as (B, G, R), so its raw Nconv0 output is (z, y, x) in [0, 1]. A Caffe
    network whose Nconv0 outputs that encoding of a known normal everywhere must come out as
    that normal, channel 0 = x, after import (Change_Form swap + 2x - 1, nothing else)."""
    layers = cr.deploy_layers()
    blobs = cr.random_blobs(layers, seed=11)
    n = np.array([0.48, -0.6, 0.64])  # x, y, z: unit, all components distinct
    png_rgb = (n + 1) / 2
    blobs["Nconv0"] = [np.zeros_like(blobs["Nconv0"][0]), png_rgb[::-1].astype(np.float32).copy()]
    model = import_caffe_h5(cr.write_caffe_h5(tmp_path / "frame.h5", blobs, layers), shading_backend="reference")
    with torch.no_grad():
        normal = model(torch.rand(1, 3, 32, 32))["normal"]
    np.testing.assert_allclose(normal[0, :, 5, 7].numpy(), n, atol=1e-6)
    assert float((normal - torch.tensor(n, dtype=torch.float32).view(1, 3, 1, 1)).abs().max()) < 1e-5
    # The frame is written into every checkpoint, and said the same way everywhere.
    assert sh.CONVENTION["normal_frame"].startswith("x: image right") and "y: image up" in sh.NORMAL_FRAME


def test_synthetic_training_data_is_in_the_frame():
    """sfs-data synth (what the demo weights and sfs-train learn from) writes normals in
    NORMAL_FRAME: the top of a face points up (+y), its right side right (+x), almost all of it
    towards the viewer (+z), decoded as the loader does, (png - 128) / 128."""
    from sfs_fast.training.synth import render_batch

    batch = render_batch(np.random.default_rng(0), 4, size=48)
    n, mask = (batch["normal"].astype(np.float64) - 128) / 128, batch["mask"] > 127

    def mean(rows=slice(None), cols=slice(None)):
        return n[:, rows, cols][mask[:, rows, cols]].mean(0)

    assert mean(rows=slice(0, 16))[1] > 0.2 and mean(rows=slice(32, 48))[1] < -0.2
    assert mean(cols=slice(32, 48))[0] > 0.2 and mean(cols=slice(0, 16))[0] < -0.2
    assert (n[mask][:, 2] > 0).mean() > 0.98  # all but silhouette pixels of turned heads


def test_checkpoints_record_and_enforce_the_frame(tmp_path):
    path = weights.save(build_model(0), tmp_path / "m0.safetensors")
    meta = weights.read_metadata(path)
    assert meta["convention"]["normal_frame"] == sh.NORMAL_FRAME
    # A checkpoint that says another frame is refused, not mirrored silently.
    raw = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    raw["convention"] = json.dumps(dict(meta["convention"], normal_frame="x: image right; y: image down"))
    save_file({k: v.contiguous() for k, v in build_model(0).state_dict().items()}, str(path), metadata=raw)
    with pytest.raises(weights.CheckpointError, match="normal frame"):
        weights.load(path)


# --------------------------------------------------------------------------------------
# DPR's recipe, written here from its description (not with sfs_fast.sh)


def _dpr_basis(x, y, z):
    """DPR order [1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2], real SH times the Lambertian
    attenuation pi, 2pi/3, pi/4 per band."""
    a0, a1, a2 = math.pi, 2 * math.pi / 3, math.pi / 4
    k0, k1 = 1 / math.sqrt(4 * math.pi), math.sqrt(3 / (4 * math.pi))
    k2, k20, k22 = math.sqrt(15 / (4 * math.pi)), math.sqrt(5 / (16 * math.pi)), math.sqrt(15 / (16 * math.pi))
    return np.stack([a0 * k0 * np.ones_like(x), a1 * k1 * y, a1 * k1 * z, a1 * k1 * x, a2 * k2 * x * y,
                     a2 * k2 * y * z, a2 * k20 * (3 * z * z - 1), a2 * k2 * x * z, a2 * k22 * (x * x - y * y)], -1)


def _dpr_grid(size=256):
    x, z = np.meshgrid(np.linspace(-1, 1, size), np.linspace(1, -1, size))
    valid = x**2 + z**2 <= 1
    y = np.where(valid, -np.sqrt(np.clip(1 - x**2 - z**2, 0, None)), 0.0)
    return np.where(valid, x, 0.0), y, np.where(valid, z, 0.0), valid


def _dpr_shading(light9_dpr, size=256):
    x, y, z, valid = _dpr_grid(size)
    return _dpr_basis(x, y, z) @ (0.7 * np.asarray(light9_dpr)), valid


def _picture(shading, valid):
    s = np.minimum(shading, np.percentile(shading, 95))
    s = (s - s.min()) / (s.max() - s.min())
    return (255 * s).astype(np.uint8) * valid


def _our_shading(light27, size=256):
    """The same sphere, with normals in our frame (x right, y up, z towards the viewer):
    (x, y, z) = (x_dpr, z_dpr, -y_dpr)."""
    xd, yd, zd, valid = _dpr_grid(size)
    normal = torch.from_numpy(np.stack([xd, zd, -yd]))[None]
    light = torch.from_numpy(0.7 * np.asarray(light27))[None]
    return sh.shade(normal, light)[0].numpy(), valid


LIGHTS = np.random.default_rng(4).normal(0, 0.5, (3, 9)) + np.array([1.0] + [0.0] * 8)


@pytest.mark.parametrize("light9", LIGHTS)
def test_dpr_light_converts_to_ours_through_the_frame(light9):
    ours = sh.dpr_light_to_sfsnet(light9)
    assert ours.shape == (27,) and np.array_equal(ours[:9], ours[18:])
    expected, valid = _dpr_shading(light9)
    got, _ = _our_shading(ours)
    # On the sphere (unit normals); outside it DPR shades zero normals, where 3z^2 - 1 and
    # our 2z^2 - x^2 - y^2 differ, so only the disc is a statement about lights.
    for c in range(3):
        np.testing.assert_allclose(got[c][valid], expected[valid], atol=1e-12)
    # Not vacuous: the order-only conversion (no frame) shades another sphere.
    mirrored, _ = _our_shading(sh.grey_light(sh.dpr_to_sfsnet(light9)))
    assert np.abs(mirrored[0][valid] - expected[valid]).max() > 1e-2


def test_our_light_converts_to_dpr_and_back():
    rng = np.random.default_rng(8)
    light27 = np.tile(rng.normal(0, 0.5, 9), 3) + rng.normal(0, 0.05, 27)
    dpr = sh.sfsnet_light_to_dpr(light27)
    grey = light27.reshape(3, 9).mean(0)
    expected, valid = _our_shading(np.tile(grey, 3))
    got, _ = _dpr_shading(dpr)
    np.testing.assert_allclose(got[valid], expected[0][valid], atol=1e-12)
    np.testing.assert_allclose(sh.dpr_light_to_sfsnet(dpr), np.tile(grey, 3), atol=1e-12)


def test_light_from_the_right_stays_on_the_right():
    """A light from the picture's right (+x in our frame) lights the right of DPR's sphere."""
    ours = np.zeros(9)
    ours[0], ours[2] = 1.0, 1.0  # ambient + x
    shading, valid = _dpr_shading(sh.sfsnet_light_to_dpr(np.tile(ours, 3)))
    left, right = shading[128, 40], shading[128, 215]
    assert right > left + 0.5
    up = np.zeros(9)
    up[0], up[3] = 1.0, 1.0  # ambient + y: light from above
    shading, _ = _dpr_shading(sh.sfsnet_light_to_dpr(np.tile(up, 3)))
    assert shading[40, 128] > shading[215, 128] + 0.5


def test_light_file_reader_takes_dprs_format(tmp_path):
    light9 = LIGHTS[0]
    path = tmp_path / "rotate_light_00.txt"
    np.savetxt(path, light9)  # DPR's files: 9 values, one a line
    np.testing.assert_allclose(sh.read_light(path), sh.dpr_light_to_sfsnet(light9), atol=1e-15)
    path.write_text("\n".join(["1.0"] * 10))
    with pytest.raises(ValueError, match="27 \\(SfSNet\\) or 9 \\(DPR\\)"):
        sh.read_light(path)


@pytest.mark.skipif(not DPR_SPHERES.is_dir(), reason="DPR reference spheres are outside the project")
def test_dpr_reference_spheres_through_the_reader():
    """Where the reference data is present: DPR's own light files, read by read_light, shade
    our-frame normals into DPR's own pictures with 0 grey levels of difference."""
    from PIL import Image

    for light_file in sorted(DPR_SPHERES.glob("rotate_light_*.txt")):
        picture = np.asarray(Image.open(light_file.with_name(light_file.name.replace("rotate", "sphere")
                                                              .replace(".txt", ".png"))).convert("L"))
        shading, valid = _our_shading(sh.read_light(light_file))
        assert np.array_equal(_picture(shading[0], valid), picture), light_file.name
