"""The mesh face generator (training/face_synth.py): the rasterizer against analytic shapes,
the stored layers' contracts (unit normals facing the viewer, face = albedo x SH shading
with the non-SH effects off, a highlight lands in the residue with them on), determinism,
and the files `sfs-data synth --generator mesh` writes read back by the training loader."""
import math

import numpy as np
import pytest
import torch
from kernel_checks import numpy_shade

from sfs_fast.training import face_synth as fs

PLAIN = fs.FaceSynthOptions(size=64, specular=False, occlusion=False, shadows=False, camera=False)


def decode(normal_u8):
    n = (normal_u8.astype(np.float64) - 128.0) / 128.0
    return n, np.linalg.norm(n, axis=-1)


def test_rasterize_single_triangle_coverage_and_linear_attribute():
    pts = np.array([[10.2, 8.7, 1.0], [52.9, 14.1, 2.0], [21.3, 47.6, 3.0]])
    tri, bary = fs.rasterize(pts, np.array([[0, 1, 2]]), 64, 64)
    covered = tri == 0
    (x0, y0), (x1, y1), (x2, y2) = pts[:, :2]
    area = 0.5 * abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0))
    perimeter = sum(math.dist(pts[i, :2], pts[(i + 1) % 3, :2]) for i in range(3))
    # Pixel-centre sampling: the count differs from the area by at most ~half the boundary.
    assert abs(covered.sum() - area) < 0.5 * perimeter
    # A linear attribute is reproduced exactly at the pixel centres.
    f = lambda x, y: 2.0 * x - 3.0 * y + 1.0  # noqa: E731
    attr = f(pts[:, 0], pts[:, 1])[:, None]
    got = fs.interpolate(attr, np.array([[0, 1, 2]]), tri, bary)[..., 0]
    rows, cols = np.nonzero(covered)
    np.testing.assert_allclose(got[rows, cols], f(cols + 0.5, rows + 0.5), atol=1e-9)
    assert np.all(got[~covered] == 0.0) and not covered[0, 0] and covered[20, 20]


def uv_sphere(radius, centre, n_lat=24, n_lon=48):
    """Vertices, unit normals and outward counter-clockwise triangles of a UV sphere (y up)."""
    lat = np.linspace(0.0, math.pi, n_lat + 1)
    lon = np.linspace(0.0, 2 * math.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    n = np.stack([np.sin(la) * np.cos(lo), np.cos(la), np.sin(la) * np.sin(lo)], -1).reshape(-1, 3)
    idx = np.arange((n_lat + 1) * n_lon).reshape(n_lat + 1, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, 1)
    c, d = idx[1:], np.roll(idx[1:], -1, 1)
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([b, d, c], -1).reshape(-1, 3)])
    return centre + radius * n, n, faces


def test_rasterize_sphere_zbuffer_and_normals():
    verts, normals, faces = uv_sphere(20.0, np.array([32.0, 32.0, 0.0]))
    points = np.stack([verts[:, 0], 64.0 - verts[:, 1], verts[:, 2]], 1)  # rows run down
    tri, bary = fs.rasterize(points, faces, 64, 64)
    covered = tri >= 0
    assert abs(covered.sum() / (math.pi * 20.0 ** 2) - 1.0) < 0.03
    got = fs.interpolate(normals, faces, tri, bary)
    got /= np.linalg.norm(got, axis=-1, keepdims=True).clip(1e-12)
    rows, cols = np.nonzero(covered)
    x, y = (cols + 0.5 - 32.0) / 20.0, (64.0 - rows - 0.5 - 32.0) / 20.0
    inner = x * x + y * y < 0.8  # away from the grazing rim, where facets dominate
    truth = np.stack([x, y, np.sqrt(np.clip(1 - x * x - y * y, 0, 1))], -1)
    angle = np.degrees(np.arccos(np.clip((got[rows, cols] * truth).sum(-1), -1, 1)))
    # The z-buffer keeps the front half (a back triangle would give n_z < 0) ...
    assert got[rows, cols, 2].min() > 0.0
    # ... and interpolated normals follow the sphere.
    assert angle[inner].mean() < 1.0 and angle[inner].max() < 4.0


def test_mesh_parsed_with_uvs_through_faces():
    mesh = fs.load_mesh()
    assert mesh.verts.shape == (468, 3) and mesh.faces.shape == (898, 3) and mesh.uv.shape == (468, 2)
    # u follows x and v follows y (the mesh README); landmark 10 (forehead) high, 152 (chin) low.
    assert np.corrcoef(mesh.uv[:, 0], mesh.verts[:, 0])[0, 1] > 0.98
    assert mesh.uv[fs.FOREHEAD, 1] > 0.85 and mesh.uv[fs.CHIN, 1] < 0.1
    n = fs.vertex_normals(mesh.verts, mesh.faces)
    assert n[fs.NOSE_TIP, 2] > 0.9 and 0 < mesh.mouth_tris.sum() < 40


@pytest.fixture(scope="module")
def samples():
    opts = fs.FaceSynthOptions(size=128)
    return [fs.render_sample(np.random.default_rng([5, i]), opts) for i in range(4)]


def test_normals_unit_facing_viewer_and_framing(samples):
    for s in samples:
        mask = s["mask"][0] > 0
        assert set(np.unique(s["mask"][0])) <= {0, 255}
        n, norm = decode(s["normal"][0])
        assert np.abs(norm[mask] - 1.0).max() < 0.02  # one 8-bit step per component
        assert n[mask][:, 2].min() > 0.0 and n[mask][:, 2].mean() > 0.6
        # Framed like the SfSNet crops (mask about 83 x 92 px, centred, eyes near row 45).
        rows, cols = np.nonzero(mask)
        assert 55 < cols.max() - cols.min() < 105 and 65 < rows.max() - rows.min() < 110
        assert 45 < cols.mean() < 83 and 52 < rows.mean() < 88


def test_plain_face_is_albedo_times_sh_shading():
    s = fs.render_sample(np.random.default_rng(1), PLAIN, lights_per_face=2)
    for j in range(2):
        n, _ = decode(s["normal"][j])
        shading, _ = numpy_shade(n.transpose(2, 0, 1)[None], s["light"][j][None], None, None, True, 0.0)
        expected = np.clip(s["albedo"][j] / 255.0 * shading[0].transpose(1, 2, 0), 0.0, 1.0) * 255.0
        assert np.abs(s["face"][j] - expected).max() <= 0.5 + 2e-3
    assert not np.array_equal(s["face"][0], s["face"][1])  # a new light, the same face
    np.testing.assert_array_equal(s["albedo"][0], s["albedo"][1])


def test_highlight_lands_in_the_residue():
    geom = fs.render_face(np.random.default_rng(2), PLAIN)
    light = np.tile([0.6, 0.45, 0.2, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0], 3)
    albedo = geom["albedo"] / 255.0
    usable = (geom["mask"] > 0) & (albedo.min(-1) > 0.2)

    def residue(options):
        face = fs.light_face(np.random.default_rng(3), geom, light, options)
        res = face["face"] / 255.0 / np.maximum(albedo, 1e-3) - face["sh_shading"]
        return res.mean(-1)

    plain = residue(PLAIN)
    shiny = residue(fs.FaceSynthOptions(size=64, specular=True, occlusion=False, shadows=False, camera=False))
    assert np.abs(plain[usable]).max() < 0.5 / 255 / 0.2 + 1e-3  # rounding only
    n, _ = decode(geom["normal"])
    d, _ = fs.light_direction(light)
    half = (d + [0, 0, 1]) / np.linalg.norm(d + [0, 0, 1])
    peak = np.where(usable, n @ half, -1.0)
    r, c = np.unravel_index(np.argmax(peak), peak.shape)
    assert shiny[r, c] > 0.02 and shiny[usable].min() > -1e-2  # a highlight only adds light
    # Residue, as a trainer derives it from loaded tensors, agrees with the float one.
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()  # noqa: E731
    face = fs.light_face(np.random.default_rng(3), geom, light, fs.FaceSynthOptions(size=64, occlusion=False, shadows=False, camera=False))
    got = fs.residue_target(t(face["face"] / 255.0), t(albedo), t(decode(geom["normal"])[0]), torch.tensor(light)[None].float())
    assert abs(float(got[0, :, r, c].mean()) - shiny[r, c]) < 0.01


def test_non_sh_effects_darken_occluded_and_shadowed_pixels():
    geom = fs.render_face(np.random.default_rng(4), PLAIN)
    ao = fs.occlusion(geom["depth_px"], 0.5)
    assert 0.5 <= ao.min() and ao.max() <= 1.0 and ao[geom["mask"] > 0].min() < 0.95
    side = fs.cast_shadow(geom["depth_px"], np.array([0.9, 0.0, 0.3]) / math.hypot(0.9, 0.3))
    assert side[geom["mask"] > 0].max() > 0.5  # the nose shades the far cheek
    assert fs.cast_shadow(geom["depth_px"], np.array([0.0, 0.0, 1.0])).max() == 0.0


def test_deterministic_per_seed_and_independent_of_n():
    a = next(fs.generate(2, seed=3, size=32))[1]
    b = next(fs.generate(2, seed=3, size=32))[1]
    one = next(fs.generate(1, seed=3, size=32))[1]
    other = next(fs.generate(1, seed=4, size=32))[1]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key][:1], one[key])
    assert not np.array_equal(one["face"], other["face"])


def test_lights_mirrored_left_right():
    lights = fs.draw_face_lights(np.random.default_rng(0), 4000).reshape(-1, 3, 9)
    assert np.all(lights[:, :, 0] > 0)
    assert abs(lights[:, :, 2].mean()) < 0.02  # the x term, biased in the 20 files, is balanced
    np.testing.assert_allclose(lights.mean(1)[:, 1].mean(), 0.18, atol=0.02)  # z term: as the files


def test_cli_mesh_layout_read_by_the_trainer(tmp_path):
    from sfs_fast.training.cli import data_main
    from sfs_fast.training.data import FaceDataset, load_samples

    out = tmp_path / "mesh"
    assert data_main(["synth", str(out), "--n", "4", "--size", "64", "--test-fraction", "0.25", "--generator", "mesh"]) == 0
    train = load_samples(out / "train.csv", synthetic=True)
    test = load_samples(out / "test.csv", synthetic=True)
    assert len(train) == 3 and len(test) == 1
    item = FaceDataset(train, size=64)[0]
    assert item["face"].shape == (3, 64, 64) and item["normal"].shape == (3, 64, 64)
    assert item["light"].shape == (27,) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert 0.15 < float(item["mask"].mean()) < 0.8
    assert len(list((out / "train").glob("*/*_depth_1_1.png"))) == 3
