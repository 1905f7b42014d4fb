"""sfs-interpolate: the per-picture dump and the lighting strips, checked against an SH
renderer written here in float64 NumPy (independent of sfs_fast.sh and the op)."""
import json

import numpy as np
from kernel_checks import numpy_shade
import pytest
import torch
from PIL import Image

from sfs_fast.cli import interpolate as cli
from sfs_fast.cli.common import EXIT_OK, EXIT_PARTIAL
from pictures import face_like


def sh_render(normal, light):
    """float64 SfSNet-convention SH shading of unit normals ``[3,H,W]`` under ``[27]``."""
    normal = np.asarray(normal, np.float64)[None]
    return numpy_shade(normal, np.asarray(light, np.float64)[None], None, None, False, 0.0)[0][0]


def test_relight_strip_matches_numpy_reference():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(3, 16, 16))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    albedo = rng.random((3, 16, 16))
    la, lb = rng.normal(size=27), rng.normal(size=27)
    shading, recon = cli.relight_strip(torch.tensor(n, dtype=torch.float32), torch.tensor(albedo, dtype=torch.float32),
                                       la, lb, 5)
    assert shading.shape == recon.shape == (5, 3, 16, 16)
    for k, t in enumerate(np.linspace(0, 1, 5)):
        ref = sh_render(n, (1 - t) * la + t * lb)
        np.testing.assert_allclose(shading[k].numpy(), ref, atol=2e-5)
        np.testing.assert_allclose(recon[k].numpy(), ref * albedo, atol=2e-5)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for k in range(3):
        Image.fromarray(face_like(128, 128 + 16 * k, k)).save(root / f"face{k}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint3(tmp_path_factory):
    from conftest import calibrate_batchnorm
    from sfs_fast import build_model, weights

    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model(3), steps=1, batch=2)
    with torch.no_grad():
        model.normal_gen_model.conv3.bias[2] += 1.5  # |n| ~ 1, as a trained model
    path = tmp_path_factory.mktemp("ckpt") / "m3.safetensors"
    weights.save(model, path)
    return str(path)


def test_dump_and_strips_method3(faces, checkpoint3, tmp_path, capsys):
    from sfs_fast import Decomposer
    from sfs_fast.images import load_image
    from sfs_fast.sh import read_light

    out = tmp_path / "out"
    code = cli.main([str(faces), str(out), "--weights", checkpoint3, "--steps", "4", "--backend", "eager", "--json"])
    assert code == EXIT_OK
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] == 3 and summary["strips"]
    for i in range(3):
        for kind in ("face", "normal", "albedo", "shading", "recon", "residual", "updated-shading", "relight"):
            assert (out / f"{i}_{kind}.png").is_file(), (i, kind)
        assert (out / f"{i}_light.txt").is_file()
    assert not (out / "0_updated-albedo.png").exists()  # method 4 only
    assert (out / "inputs.txt").read_text().splitlines()[0].endswith("face0.png")

    # the light file is the model's light; the strip's ends use A's light and B's light
    dec = Decomposer(weights=checkpoint3, backend="eager")
    x = np.stack([load_image(faces / f"face{k}.png")[0] for k in range(3)])
    ref = dec.decompose(x)
    lights = [read_light(out / f"{i}_light.txt") for i in range(3)]
    np.testing.assert_allclose(lights[0], ref["light"][0].numpy(), rtol=1e-6, atol=1e-7)
    strip = np.asarray(Image.open(out / "0_relight.png")).astype(np.float64) / 255
    top, left = strip.shape[0] - (2 * 130 + 2), strip.shape[1] - (4 * 130 + 2)  # the label bands
    assert top > 0 and left > 0 and strip[:top].min() < 0.5 and strip[top:, :left].min() < 0.5
    normal, albedo = ref["normal"][0].numpy(), ref["albedo"][0].numpy()
    for col, light in ((0, lights[0]), (3, lights[1])):  # next picture's light at the end
        recon = np.clip(sh_render(normal, light) * albedo, 0, 1).transpose(1, 2, 0)
        tile = strip[top + 132:top + 260, left + 2 + col * 130: left + 130 + col * 130]
        assert np.abs(tile - recon).max() <= 1 / 255 + 1e-3


def test_light_file_target_and_method2(faces, tmp_path, capsys):
    light = np.zeros(27)
    light[[0, 9, 18]] = 1.0
    (tmp_path / "L.txt").write_text("\t".join(map(str, light)))
    (tmp_path / "in").mkdir()
    Image.fromarray(face_like(64, 64)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"")
    code = cli.main([str(tmp_path / "in"), str(tmp_path / "o"), "--method", "0", "--light", str(tmp_path / "L.txt"),
                     "--steps", "3"])
    err = capsys.readouterr().err
    assert code == EXIT_PARTIAL and "b.png" in err and "Traceback" not in err
    strip = np.asarray(Image.open(tmp_path / "o" / "0_relight.png"))
    assert strip.shape[0] > 262 and strip.shape[1] > 3 * 130 + 2  # 3 frames, labelled
    code = cli.main([str(tmp_path / "in" / "a.png"), str(tmp_path / "o2"), "--method", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_OK and "no SH light" in err
    assert (tmp_path / "o2" / "0_recon.png").is_file()
    assert not (tmp_path / "o2" / "0_light.txt").exists() and not (tmp_path / "o2" / "0_relight.png").exists()
