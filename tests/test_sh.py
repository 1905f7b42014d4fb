"""The SH convention and the reference shading op against independent float64 NumPy."""

import numpy as np
from kernel_checks import numpy_shade
import pytest
import torch

from sfs_fast import sh
from sfs_fast.kernels import sh_shade


def numpy_shading(normal, light, residue=None, albedo=None, normalize=True, beta=0.0):
    """The tests' independent float64 NumPy implementation (tests/kernel_checks.py)."""
    return numpy_shade(np.asarray(normal), np.asarray(light), residue, albedo, normalize, beta)


def test_constants_match_spec():
    assert sh.C1 == pytest.approx(0.8862269254527579, abs=1e-15)
    assert sh.C2 == pytest.approx(1.0233267079464883, abs=1e-15)
    assert sh.C3 == pytest.approx(0.24770795610037571, abs=1e-15)
    assert sh.C4 == pytest.approx(0.8580855308097834, abs=1e-15)
    assert sh.C5 == pytest.approx(0.4290427654048917, abs=1e-15)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_residue,with_albedo,beta", [
    (False, False, 0.0), (False, True, 0.0), (True, False, 0.0), (True, True, 0.0), (True, True, 1.0)])
def test_reference_matches_numpy(normalize, with_residue, with_albedo, beta):
    g = torch.Generator().manual_seed(1)
    b, h, w = 3, 7, 5
    normal = torch.randn(b, 3, h, w, generator=g) * 2.0
    normal[0, :, 0, 0] = 0.0  # a zero-length normal
    normal[1, :, 2, 3] = torch.tensor([1e-9, 0.0, -1e-9])  # a tiny one
    light = torch.randn(b, 27, generator=g)
    residue = torch.randn(b, 3, h, w, generator=g) if with_residue else None
    albedo = torch.rand(b, 3, h, w, generator=g) if with_albedo else None
    shading, recon = sh_shade(normal, light, residue, albedo, normalize=normalize, beta=beta, backend="reference")
    ref_s, ref_r = numpy_shading(normal.numpy(), light.numpy(),
                                 None if residue is None else residue.numpy(),
                                 None if albedo is None else albedo.numpy(), normalize, beta)
    assert shading.dtype == torch.float32
    np.testing.assert_allclose(shading.numpy(), ref_s, rtol=1e-5, atol=1e-5)
    if with_albedo:
        np.testing.assert_allclose(recon.numpy(), ref_r, rtol=1e-5, atol=1e-5)
    else:
        assert recon is None


def test_reference_float64_is_float64_exact():
    g = torch.Generator().manual_seed(2)
    normal = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    light = torch.randn(2, 27, generator=g, dtype=torch.float64)
    shading, _ = sh_shade(normal, light, backend="reference")
    assert shading.dtype == torch.float64
    np.testing.assert_allclose(shading.numpy(), numpy_shading(normal.numpy(), light.numpy())[0], rtol=1e-12, atol=1e-12)


def test_half_inputs_accumulate_in_float32():
    g = torch.Generator().manual_seed(3)
    normal = torch.randn(2, 3, 8, 8, generator=g)
    light = torch.randn(2, 27, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        shading, _ = sh_shade(normal.to(dtype), light.to(dtype), backend="reference")
        assert shading.dtype == dtype
        ref = numpy_shading(normal.to(dtype).double().numpy(), light.to(dtype).double().numpy())[0]
        err = np.abs(shading.double().numpy() - ref).max() / np.abs(ref).max()
        assert err <= 1e-2


def test_empty_batch():
    shading, recon = sh_shade(torch.zeros(0, 3, 4, 4), torch.zeros(0, 27), albedo=torch.zeros(0, 3, 4, 4))
    assert shading.shape == (0, 3, 4, 4) and recon.shape == (0, 3, 4, 4)


def _sphere(size=33):
    """Unit normals of a hemisphere facing +z, and its validity mask."""
    t = torch.linspace(-1, 1, size, dtype=torch.float64)
    y, x = torch.meshgrid(-t, t, indexing="ij")
    r2 = x * x + y * y
    valid = r2 <= 1
    z = torch.sqrt(torch.clamp(1 - r2, min=0))
    return torch.stack([x, y, z])[None], valid


def test_sphere_pure_ambient_is_constant():
    n, valid = _sphere()
    light = torch.zeros(1, 27, dtype=torch.float64)
    light[0, [0, 9, 18]] = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    shading, _ = sh_shade(n, light, normalize=False)
    for c, l0 in enumerate((0.5, 1.0, 2.0)):
        assert torch.allclose(shading[0, c][valid], torch.full_like(shading[0, c][valid], sh.C1 * l0))


@pytest.mark.parametrize("coeff,axis", [(1, 2), (2, 0), (3, 1)])  # L10 ~ z, L11e ~ x, L11o ~ y
def test_sphere_first_order_axes(coeff, axis):
    n, valid = _sphere()
    light = torch.zeros(1, 27, dtype=torch.float64)
    light[0, [coeff, 9 + coeff, 18 + coeff]] = 0.8
    shading, _ = sh_shade(n, light, normalize=False)
    expected = sh.C2 * 0.8 * n[0, axis]
    assert torch.allclose(shading[0, 1][valid], expected[valid], atol=1e-12)


def test_sphere_second_order_terms():
    n, valid = _sphere()
    x, y, z = n[0]
    expectations = {
        4: sh.C3 * (2 * z * z - x * x - y * y),
        5: sh.C4 * x * z,
        6: sh.C4 * y * z,
        7: sh.C5 * (x * x - y * y),
        8: sh.C4 * x * y,
    }
    for coeff, expected in expectations.items():
        light = torch.zeros(1, 27, dtype=torch.float64)
        light[0, 18 + coeff] = 1.0  # the blue block only
        shading, _ = sh_shade(n, light, normalize=False)
        assert torch.allclose(shading[0, 2][valid], expected[valid], atol=1e-12)
        assert torch.count_nonzero(shading[0, :2]) == 0


def test_dpr_order_conversion():
    dpr = np.arange(9.0)  # [1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2]
    ours = sh.dpr_to_sfsnet(dpr)
    # ours: [1, z, x, y, 3z^2-1, xz, yz, x^2-y^2, xy]
    np.testing.assert_array_equal(ours, [0, 2, 3, 1, 6, 7, 5, 8, 4])
    assert sh.grey_light(ours).shape == (27,)
    with pytest.raises(ValueError):
        sh.dpr_to_sfsnet(np.zeros(8))


def test_light_file_roundtrip(tmp_path):
    light = np.random.default_rng(0).normal(size=27)
    path = tmp_path / "x_light.txt"
    sh.write_light(path, light)
    text = path.read_text()
    assert text.count("\t") == 26 and text.endswith("\n") and text.count("\n") == 1
    np.testing.assert_allclose(sh.read_light(path), light, rtol=1e-8)


def test_light_file_reads_original_formats(tmp_path):
    one_line = tmp_path / "a.txt"
    one_line.write_text("\t".join(["0.5"] * 27) + "\n")
    column = tmp_path / "b.txt"  # np.savetxt of a [27] vector writes one value per line
    np.savetxt(column, np.full(27, 0.25), fmt="%.18e", delimiter="\t")
    assert sh.read_light(one_line).tolist() == [0.5] * 27
    assert sh.read_light(column).tolist() == [0.25] * 27


@pytest.mark.parametrize("content", ["1\t2\t3\n", "a\tb\n", "\t".join(["nan"] * 27)])
def test_light_file_rejects_bad_content(tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.txt"):
        sh.read_light(path)


@pytest.mark.parametrize("kwargs,name", [
    (dict(normal=torch.zeros(2, 4, 3, 3)), "normal"),
    (dict(light=torch.zeros(2, 26)), "light"),
    (dict(light=torch.zeros(3, 27)), "light"),
    (dict(residue=torch.zeros(2, 3, 3, 4)), "residue"),
    (dict(albedo=torch.zeros(2, 3, 3, 3, dtype=torch.float64)), "albedo"),
    (dict(backend="nope"), "backend"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(normal=torch.zeros(2, 3, 3, 3), light=torch.zeros(2, 27), residue=None, albedo=None, backend="reference")
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sh_shade(args.pop("normal"), args.pop("light"), args.pop("residue"), args.pop("albedo"), **args)
