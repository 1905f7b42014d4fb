"""sfs_fast.faces: detection, alignment, masks, the auto rule, paste-back and relighting.

Real faces come from pictures with a licence: matplotlib's ``grace_hopper.jpg`` (public
domain) and the bundled SfSNet crops in ``examples/faces`` (MIT-style, see its README).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

cv2 = pytest.importorskip("cv2")
cbook = pytest.importorskip("matplotlib.cbook")

from sfs_fast import faces as F  # noqa: E402
from sfs_fast import sh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "faces"
H, W = 768, 1024
# (scale, rotation in degrees counter-clockwise on screen, centre) of each copy
PLACEMENTS = [(0.45, 0, (170, 192)), (0.5, 20, (512, 192)), (0.4, -20, (853, 192)),
              (0.55, 10, (170, 576)), (0.35, -10, (512, 576)), (0.5, 0, (853, 576))]


def rgb_of(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def hopper():
    return rgb_of(cbook.get_sample_data("grace_hopper.jpg"))


def background(rng, h=H, w=W) -> np.ndarray:
    """A smooth brown gradient with sensor-like noise: no structure a detector could take
    for a face."""
    xx = np.mgrid[0:h, 0:w][1]
    base = (60 + 80 * xx / w)[..., None] * np.array([1.0, 0.9, 0.8])
    return np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def place(canvas, src, scale, degrees, centre):
    """Draw ``src`` rotated and scaled about its centre onto ``canvas`` at ``centre``.
    Returns the placement transform src -> canvas ``[2,3]``."""
    h, w = src.shape[:2]
    p = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, scale)
    p[:, 2] += np.asarray(centre, np.float64) - ((w - 1) / 2, (h - 1) / 2)
    size = (canvas.shape[1], canvas.shape[0])
    warped = cv2.warpAffine(src, p, size, flags=cv2.INTER_LINEAR)
    cover = cv2.warpAffine(np.ones((h, w), np.float32), p, size)
    canvas[cover > 0.999] = warped[cover > 0.999]
    return p


@pytest.fixture(scope="module")
def group(hopper):
    """Six copies of Grace Hopper at known scales and rotations on a 1024x768 canvas."""
    canvas = background(np.random.default_rng(0))
    placements = [place(canvas, hopper, s, r, c) for s, r, c in PLACEMENTS]
    return canvas, placements


@pytest.fixture(scope="module")
def hopper_face(hopper):
    faces = F.detect_faces(hopper)
    assert len(faces) == 1
    return faces[0]


# --------------------------------------------------------------------------------------
# Detection


def test_group_photo_every_face_once_aligned_like_the_template(group, hopper_face):
    canvas, placements = group
    found = F.detect_faces(canvas)
    assert len(found) == len(PLACEMENTS)
    base = F.transform_params(F.align_transform(hopper_face.landmarks))
    eye_gap = np.linalg.norm(hopper_face.landmarks[0] - hopper_face.landmarks[1])
    matched = set()
    for face in found:
        centre = face.landmarks.mean(0)
        dist = [np.linalg.norm(F.apply(p, hopper_face.landmarks).mean(0) - centre) for p in placements]
        k = int(np.argmin(dist))
        scale, degrees, _ = PLACEMENTS[k]
        assert dist[k] < 0.25 * eye_gap * scale, "a box far from every placed face"
        matched.add(k)
        m = F.align_transform(face.landmarks)
        eyes = F.apply(m, face.landmarks)[:2]
        assert np.abs(eyes - F.TEMPLATE[:2]).max() < 3.0
        p = F.transform_params(m)
        # the alignment undoes the known placement: a face turned counter-clockwise by r
        # degrees is turned back clockwise, +r in transform_params
        assert p["rotation_deg"] == pytest.approx(base["rotation_deg"] + degrees, abs=5.0)
        assert p["scale"] == pytest.approx(base["scale"] / scale, rel=0.1)
    assert matched == set(range(len(PLACEMENTS))), "a face found twice, another missed"


def test_max_faces_and_min_face_size(group):
    canvas, _ = group
    every = F.detect_faces(canvas)
    sizes = [f.box[2] * f.box[3] for f in every]
    assert sizes == sorted(sizes, reverse=True), "largest first"
    two = F.detect_faces(canvas, max_faces=2)
    assert [f.box for f in two] == [f.box for f in every[:2]]
    smallest = min(f.size for f in every)
    bigger = F.detect_faces(canvas, min_face_size=smallest + 1)
    assert len(bigger) == len(every) - 1 and all(f.size > smallest for f in bigger)


def test_noise_and_landscape_have_no_face():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    rows = np.linspace(0, 1, 480)[:, None, None]
    sky = np.array([110, 160, 230]) * (1 - rows) + np.array([200, 220, 240]) * rows
    landscape = np.where(rows > 0.6, np.array([60, 110, 50]), sky) + rng.normal(0, 6, (480, 1, 3))
    landscape = np.broadcast_to(landscape, (480, 640, 3)).clip(0, 255).astype(np.uint8)
    assert F.detect_faces(noise) == []
    assert F.detect_faces(np.ascontiguousarray(landscape)) == []


def test_bad_picture_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        F.detect_faces(np.zeros((64, 64, 3), np.float32))


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"sfs_fast\[faces\]"):
        F._cv2()


# --------------------------------------------------------------------------------------
# Alignment


def blobs(points, shape) -> np.ndarray:
    """A grey picture with a bright Gaussian dot (sigma 3 px) at each of ``points``."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img = np.zeros(shape, np.float64)
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0 ** 2))
    return (255 * img).astype(np.float32)


def centroids(img, points, radius=8) -> np.ndarray:
    """Intensity centroids of ``img`` around each of ``points``."""
    out = []
    for x, y in points:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = img[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1].astype(np.float64)
        yy, xx = np.mgrid[0:win.shape[0], 0:win.shape[1]]
        out.append((x0 + (xx * win).sum() / win.sum(), y0 + (yy * win).sum() / win.sum()))
    return np.array(out)


@pytest.mark.parametrize("scale", [0.4, 1.6])  # shrinking (supersampled) and enlarging
def test_transform_round_trip_and_warp(scale):
    a = math.radians(20)
    m_true = np.array([[scale * math.cos(a), -scale * math.sin(a), 30.0],
                       [scale * math.sin(a), scale * math.cos(a), -40.0]])
    picture_points = F.apply(F.invert(m_true), F.TEMPLATE)
    m = F.align_transform(picture_points)
    np.testing.assert_allclose(m, m_true, atol=1e-9)
    np.testing.assert_allclose(F.apply(F.invert(m), F.apply(m, picture_points)), picture_points, atol=1e-9)
    h = int(picture_points[:, 1].max() + 60)
    w = int(picture_points[:, 0].max() + 60)
    assert picture_points.min() > 20, "the dots must lie inside the picture"
    # the dots' size scales with the face, so draw them in crop space's proportions
    picture = blobs(picture_points, (h, w)) if scale >= 1 else cv2.warpAffine(
        blobs(F.TEMPLATE, (128, 128)), F.invert(m_true), (w, h), flags=cv2.INTER_LINEAR)
    crop = F.warp_face(picture, m, border="zero")
    assert np.abs(centroids(crop, F.TEMPLATE) - F.TEMPLATE).max() < 1.0


def test_rotated_face_is_aligned_upright(hopper, hopper_face):
    h, w = hopper.shape[:2]
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 20, 1.0)
    turned = cv2.warpAffine(hopper, rot, (w, h), borderMode=cv2.BORDER_REFLECT)
    faces = F.detect_faces(turned)
    assert len(faces) == 1
    upright, aligned = F.align_faces(hopper, [hopper_face])[0], F.align_faces(turned, faces)[0]
    eyes = F.apply(aligned.matrix, faces[0].landmarks)[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 3.0, "eyes level in the crop"
    base = F.transform_params(upright.matrix)["rotation_deg"]
    assert F.transform_params(aligned.matrix)["rotation_deg"] == pytest.approx(base + 20, abs=4.0)
    # the crop is the upright face's: compared on blurred crops (YuNet's landmarks jitter by
    # a few pixels, which fine texture would amplify), much closer than the tilted face
    inside = upright.mask > 0.5
    tilted = F.warp_face(turned, upright.matrix).astype(np.float32).transpose(2, 0, 1) / 255

    def blurred_diff(image):
        a, b = (cv2.GaussianBlur(x.transpose(1, 2, 0), (0, 0), 2) for x in (image, upright.image))
        return np.abs(a - b).mean(-1)[inside].mean()

    assert blurred_diff(aligned.image) < 0.5 * blurred_diff(tilted)
    # with the exact landmarks (the upright ones turned by the known rotation) the two warps
    # agree to interpolation error: the transforms compose as they should
    exact = F.similarity(F.apply(rot, hopper_face.landmarks), F.TEMPLATE)
    crop = F.warp_face(turned, exact).astype(np.float32).transpose(2, 0, 1) / 255
    assert np.abs(crop - upright.image).mean(0)[inside].mean() < 0.02


# --------------------------------------------------------------------------------------
# Masks


def test_template_mask_is_a_face_shape():
    mask = F.template_mask()
    assert mask.shape == (128, 128) and set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(mask, mask[:, ::-1])
    area = mask.sum() / mask.size
    assert 0.3 < area < 0.5
    for x, y in F.TEMPLATE:  # eyes, nose and mouth are inside, the corners outside
        assert mask[int(round(y)), int(round(x))] == 1
    assert mask[:8, :8].sum() == 0 and mask[:8, -8:].sum() == 0


def test_face_mask_user_mask_and_picture_edge(hopper, hopper_face):
    m = F.align_transform(hopper_face.landmarks)
    user = np.zeros(hopper.shape[:2], np.float32)
    user[:, : hopper.shape[1] // 2] = 1.0  # the image-left half of the photo
    warped = F.face_mask(m, hopper.shape, user)
    split = F.apply(m, [[hopper.shape[1] / 2 - 0.5, hopper_face.landmarks[2, 1]]])[0, 0]
    assert warped[64, : int(split) - 2].min() == 1 and warped[64, int(split) + 2:].max() == 0
    # a face whose crop reaches past the picture: the outside part is masked out
    s = F.transform_params(m)["scale"]
    shifted = np.array([[s, 0, 64.0], [0, s, m[1, 2]]])  # picture x = 0 lands at crop x = 64
    edge = F.face_mask(shifted, hopper.shape)
    assert edge[:, :63].max() == 0 and edge[:, 70:].sum() > 500
    with pytest.raises(ValueError, match="user_mask"):
        F.face_mask(m, hopper.shape, np.ones((5, 5), np.float32))


# --------------------------------------------------------------------------------------
# auto


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*face*.png")))
def test_auto_takes_the_bundled_crops_as_they_are(name):
    rgb = rgb_of(EXAMPLES / name)
    as_is, reason = F.is_face_crop(rgb.shape[1], rgb.shape[0], F.detect_faces(rgb))
    assert as_is, reason


def test_auto_detects_in_photos(hopper, group, hopper_face):
    assert not F.is_face_crop(hopper.shape[1], hopper.shape[0], [hopper_face])[0]
    assert not F.is_face_crop(W, H, F.detect_faces(group[0]))[0]
    # a small square picture with a small face off-centre is not a crop either
    small = cv2.resize(hopper, (200, 234))[17:217]
    faces = F.detect_faces(small)
    assert len(faces) == 1
    as_is, reason = F.is_face_crop(200, 200, faces)
    assert not as_is and "scale" in reason


# --------------------------------------------------------------------------------------
# Paste-back


def test_paste_changes_only_pixels_inside_the_feathered_masks(group):
    canvas, _ = group
    aligned = F.align_faces(canvas, F.detect_faces(canvas))
    rng = np.random.default_rng(2)
    pieces = [(a.matrix, rng.random((3, 128, 128)), F.feather(a.mask)) for a in aligned]
    out, weight = F.paste(canvas, pieces)
    assert out.shape == canvas.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[weight == 0], canvas[weight == 0])
    changed = (out != canvas).any(-1)
    assert changed[weight >= 0.5].mean() > 0.9, "the faces were pasted"
    # every changed pixel is near a face: within its box grown by half its size
    near = np.zeros(weight.shape, bool)
    for a in aligned:
        x, y, w, h = a.face.box
        near[max(0, int(y - h / 2)):int(y + 1.5 * h), max(0, int(x - w / 2)):int(x + 1.5 * w)] = True
    assert not changed[~near].any()


def test_paste_of_the_crop_itself_gives_the_photo_back(hopper, hopper_face):
    # a smooth picture survives picture -> 128 crop (shrunk 2x) -> picture, so what is left
    # is misregistration: half a pixel of it would show as several grey levels
    smooth = cv2.GaussianBlur(hopper, (0, 0), 3)
    a = F.align_faces(smooth, [hopper_face])[0]
    out, weight = F.paste(smooth, [(a.matrix, a.image, F.feather(a.mask))])
    full = weight == 1
    assert full.sum() > 5000
    err = np.abs(out.astype(int) - smooth.astype(int))[full].mean()
    assert err < 1.0


def test_feather_stays_inside_the_mask():
    mask = F.template_mask()
    alpha = F.feather(mask)
    assert alpha[mask == 0].max() < 0.5 and alpha.max() == pytest.approx(1.0)
    assert ((alpha > 0) & (alpha < 1)).sum() > 100, "a soft edge"


# --------------------------------------------------------------------------------------
# Relighting


def sphere_normals(size=128):
    """Unit normals of a sphere filling the picture, in the normal frame (x image-right,
    y image-up, z toward the viewer) ``[1,3,H,W]``, and its mask ``[H,W]``."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size]
    x, y = (xx - c) / (c + 1), (c - yy) / (c + 1)
    inside = x * x + y * y < 1
    z = np.sqrt(np.clip(1 - x * x - y * y, 0, None))
    n = np.stack([x, y, z]) * inside
    return torch.from_numpy(n[None].astype(np.float32)), inside


@pytest.mark.parametrize("name,brighter", [("left", "left"), ("right", "right"), ("top", "top")])
def test_preset_directions(name, brighter):
    normal, inside = sphere_normals()
    shading, _ = F.relight(normal, torch.ones_like(normal), F.preset_light(name))
    g = shading[0].mean(0).numpy()
    halves = {"left": (g[:, :64], inside[:, :64]), "right": (g[:, 64:], inside[:, 64:]),
              "top": (g[:64], inside[:64]), "bottom": (g[64:], inside[64:])}
    other = {"left": "right", "right": "left", "top": "bottom"}[brighter]
    lit, dark = (halves[k][0][halves[k][1]].mean() for k in (brighter, other))
    assert lit > 1.5 * dark
    front, _ = F.relight(normal, torch.ones_like(normal), F.preset_light("front"))
    f = front[0].mean(0).numpy()
    np.testing.assert_allclose(f, f[:, ::-1], atol=1e-5)
    assert f[64, 64] == pytest.approx(F.PRESET_AMBIENT + F.PRESET_STRENGTH * 1.0625, abs=1e-3)


def test_preset_like_keeps_the_colour_and_brightness():
    like = np.tile([0.8, 0.1, 0.2, 0.0, -0.1, 0, 0, 0.05, 0], 3) * np.repeat([1.0, 0.8, 0.6], 9)
    light = F.preset_light("left", like=like)
    np.testing.assert_allclose(light[[0, 9, 18]], like[[0, 9, 18]])
    assert light[2] < 0 and light[11] < 0, "light from the image's left: negative x coefficient"


@pytest.fixture(scope="module")
def demo_decomposition(hopper, hopper_face):
    from sfs_fast import weights

    path = weights.default_weights(3)
    if path is None:
        pytest.skip("no bundled method-3 weights")
    model = weights.load(path).eval()
    crop = F.align_faces(hopper, [hopper_face])[0]
    with torch.no_grad():
        return model, model(torch.from_numpy(crop.image)[None]), crop.mask > 0.5


def test_relight_with_the_estimated_light_reproduces_the_reconstruction(demo_decomposition):
    model, out, _ = demo_decomposition
    shading, recon = F.relight(out["normal"], out["albedo"], out["light"], out["residue"], beta=model.beta)
    torch.testing.assert_close(recon, out["recon"], atol=1e-5, rtol=0)
    torch.testing.assert_close(shading, out["shading"], atol=1e-5, rtol=0)
    dropped, recon_drop = F.relight(out["normal"], out["albedo"], out["light"])
    torch.testing.assert_close(dropped, out["sh_shading"], atol=1e-5, rtol=0)
    assert (recon_drop - recon).abs().max() > 1e-3, "dropping the residue changes the picture"


@pytest.mark.xfail(strict=True, reason="on the Grace Hopper crop the bundled weights of 2026-12-02 give normals "
                   "that the left preset lights on the right (left/right 0.96 vs the right preset's 1.06); "
                   "the old demo weights passed; not yet understood")
def test_side_presets_brighten_that_half_of_the_model_shading(demo_decomposition):
    """On the normals the bundled weights estimate for a real photo (not a sphere), the
    ``left`` preset lights the image-left half of the face more, relative to the right half,
    than the ``right`` preset does (face-mask pixels of each half, mean over the colours).
    Relative, because estimated normals lean: on this photo the bundled weights' normals
    face a little to the right overall."""
    _, out, inside = demo_decomposition

    def left_over_right(name):
        shading, _ = F.relight(out["normal"], out["albedo"], F.preset_light(name, like=out["light"][0].numpy()))
        g = shading[0].mean(0).numpy()
        return g[:, :64][inside[:, :64]].mean() / g[:, 64:][inside[:, 64:]].mean()

    assert left_over_right("left") > 1.02 * left_over_right("right")


def test_light_files_27_and_9_values(tmp_path):
    light27 = np.arange(27) / 10.0
    sh.write_light(tmp_path / "a.txt", light27)
    np.testing.assert_allclose(F.read_any_light(tmp_path / "a.txt"), light27)
    dpr = np.array([1.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # [1, y, z, x, xy, yz, 3z2-1, xz, x2-y2]
    (tmp_path / "d.txt").write_text("\n".join(str(v) for v in dpr) + "\n")
    np.testing.assert_allclose(F.read_any_light(tmp_path / "d.txt"), sh.dpr_light_to_sfsnet(dpr))
    (tmp_path / "bad.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="27 .* or 9"):
        F.read_any_light(tmp_path / "bad.txt")
    np.testing.assert_allclose(F.resolve_light(str(tmp_path / "a.txt")), light27)
    np.testing.assert_allclose(F.resolve_light("top"), F.preset_light("top"))
    with pytest.raises(ValueError, match="neither a light file nor a preset"):
        F.resolve_light("sideways")


def test_light_steps():
    a, b = np.zeros(27), np.arange(27.0)
    steps = F.light_steps(a, b, 5)
    assert steps.shape == (5, 27)
    np.testing.assert_allclose(steps[0], a)
    np.testing.assert_allclose(steps[-1], b)
    np.testing.assert_allclose(steps[2], b / 2)
    with pytest.raises(ValueError, match="steps"):
        F.light_steps(a, b, 1)


# --------------------------------------------------------------------------------------
# The template's derivation


def shared_faces():
    """The 19 SfSNet crops of the reference data, only where SFS_FAST_REFERENCE_DATA names it
    (they are not read by default: the project's tests run without them)."""
    candidate = Path(os.environ.get("SFS_FAST_REFERENCE_DATA", "/nonexistent")) / "faces"
    return candidate if candidate.is_dir() else None


@pytest.mark.slow
@pytest.mark.skipif(shared_faces() is None, reason="needs SFS_FAST_REFERENCE_DATA/faces (the 19 SfSNet crops)")
def test_template_and_mask_are_what_the_tool_derives(tmp_path):
    mask_path = tmp_path / "mask.png"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "derive_face_template.py"), str(shared_faces()),
                          "--write-mask", str(mask_path)], capture_output=True, text=True, check=True)
    line = next(l for l in run.stdout.splitlines() if l.startswith("TEMPLATE = "))
    printed = np.array(eval(line.split("=", 1)[1]))  # noqa: S307 - our own tool's output
    np.testing.assert_allclose(printed, F.TEMPLATE, atol=0.005)
    np.testing.assert_array_equal(rgb_of(mask_path)[..., 0] / 255.0, F.template_mask())


# --------------------------------------------------------------------------------------
# One picture


def test_plan_faces_modes(tmp_path, hopper, group):
    crop = rgb_of(EXAMPLES / "1_face.png")
    assert F.plan_faces(crop, "auto").as_is
    assert F.plan_faces(hopper, "off").as_is
    detected = F.plan_faces(crop, "detect")
    assert not detected.as_is and len(detected.faces) == 1
    auto = F.plan_faces(hopper, "auto")
    assert not auto.as_is and len(auto.faces) == 1 and auto.faces[0].image.shape == (3, 128, 128)
    assert len(F.plan_faces(group[0], "auto", max_faces=4).faces) == 4
    empty = F.plan_faces(np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert not empty.as_is and empty.faces == [] and empty.reason.startswith("no face found")
    with pytest.raises(ValueError, match="faces"):
        F.plan_faces(crop, "sometimes")
    meta = auto.faces[0].meta()
    assert set(meta) >= {"box", "landmarks", "score", "transform", "inverse", "scale", "rotation_deg"}
    np.testing.assert_allclose(np.array(meta["inverse"]) @ np.vstack([meta["transform"], [0, 0, 1]]),
                               np.eye(3)[:2], atol=1e-4)


def test_load_picture_full_resolution_and_mask(tmp_path, hopper):
    Image.fromarray(hopper).save(tmp_path / "h.png")
    np.testing.assert_array_equal(F.load_picture(tmp_path / "h.png"), hopper)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    from sfs_fast.images import ImageError

    with pytest.raises(ImageError):
        F.load_picture(tmp_path / "bad.png")
    mask = np.zeros((300, 256), np.uint8)
    mask[:, :128] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")  # half the picture's resolution
    full = F.load_picture_mask(tmp_path / "m.png", (512, 600))
    assert full.shape == (600, 512) and full[:, :250].min() == 1 and full[:, 262:].max() == 0


def test_bench_faces_photos_and_bad_counts(capsys):
    from sfs_fast.bench import faces as bench_faces
    from sfs_fast.bench.cli import main

    for n in (1, 6):
        photo = bench_faces.group_photo(n)
        assert photo.shape == (768, 1024, 3) and len(F.detect_faces(photo)) == n
    assert main(["faces", "--faces", "9"]) == 2
    assert "--faces" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_faces_runs_and_checks(capsys):
    from sfs_fast.bench.cli import main

    assert main(["faces", "--faces", "1,6", "--runs", "1", "--warmup", "0", "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "detect" in out and "face work / model" in out
