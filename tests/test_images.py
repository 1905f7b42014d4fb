"""sfs_fast.images: reading every kind of picture, crop/pad boxes, masks, display mappings,
atomic writes. Expected values are computed here independently (NumPy, hand-written PNGs)."""
import os

import numpy as np
import pytest
from PIL import Image

from sfs_fast import images
from pictures import face_like, write_png_raw


def _plain(arr):
    """The loader's output for a square 128x128 8-bit RGB picture is the picture itself."""
    return arr.astype(np.float32).transpose(2, 0, 1) / 255.0


def test_square_rgb_is_read_exactly(tmp_path):
    arr = face_like(128, 128)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, box, full = images.load_image(tmp_path / "a.png")
    assert x.dtype == np.float32 and x.shape == (3, 128, 128)
    np.testing.assert_array_equal(x, _plain(arr))
    assert box == (0, 0, 128, 128) and full == (128, 128)


def test_format_by_content_not_extension(tmp_path):
    arr = face_like(128, 128)
    Image.fromarray(arr).save(tmp_path / "really_a_png.jpg", format="PNG")
    x, _, _ = images.load_image(tmp_path / "really_a_png.jpg")
    np.testing.assert_array_equal(x, _plain(arr))  # lossless, so not decoded as JPEG


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    x, _, _ = images.load_image(tmp_path / "g16.png")
    expected = np.rint(values / 257.0) / 255.0
    for c in range(3):
        np.testing.assert_allclose(x[c], expected, atol=1e-6)
    assert x.max() == 1.0 and np.median(x) == pytest.approx(0.5, abs=0.01)


def test_16bit_rgb_hand_written_png(tmp_path):
    arr16 = (np.random.default_rng(0).random((128, 128, 3)) * 65535).astype(np.uint16)
    write_png_raw(tmp_path / "rgb16.png", arr16, bitdepth=16, colortype=2)
    x, _, _ = images.load_image(tmp_path / "rgb16.png")
    # 16 -> 8 bits may truncate or round: within one grey level of the exact value
    np.testing.assert_allclose(x, arr16.transpose(2, 0, 1) / 65535.0, atol=1.0 / 255 + 1e-6)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    arr = face_like(128, 128)
    src = Image.fromarray(arr)
    if mode == "L":
        src, expected = src.convert("L"), np.repeat(np.asarray(src.convert("L"))[..., None], 3, -1)
    elif mode == "LA":
        src = src.convert("LA")
        expected = np.repeat(np.asarray(src)[..., :1], 3, -1)
    elif mode == "P":
        src = src.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        pal = np.asarray(src.getpalette(), np.uint8).reshape(-1, 3)
        expected = pal[np.asarray(src)]
    elif mode == "RGBA":
        alpha = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1))
        src = Image.fromarray(np.dstack([arr, alpha]))
        expected = arr  # alpha dropped, colour kept
    else:
        src = src.convert("CMYK")
        cmyk = np.asarray(src).astype(np.float64)
        expected = np.rint(255.0 - np.minimum(255.0, cmyk[..., :3] + cmyk[..., 3:]))
    ext = "jpg" if mode == "CMYK" else "png"
    src.save(tmp_path / f"m.{ext}", **({"quality": 100} if ext == "jpg" else {}))
    x, _, _ = images.load_image(tmp_path / f"m.{ext}")
    tol = 6 / 255 if ext == "jpg" else 1e-6
    np.testing.assert_allclose(x, np.asarray(expected, np.float64).transpose(2, 0, 1) / 255.0, atol=tol)


def test_exif_orientation_applied(tmp_path):
    # stored 80 wide x 40 high, red with a blue block at the stored top-left corner;
    # orientation 6 means "rotate 90 degrees clockwise to display": the block goes top-right
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[..., 0] = 255
    arr[:20, :20] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif)
    x, box, full = images.load_image(tmp_path / "rot.png", fit="pad")
    assert full == (40, 80)  # upright: 40 wide, 80 high
    assert box == (-20, 0, 60, 80)
    # upright picture occupies columns 32..96 of the 128 square (pad 20/80*128 = 32 each side)
    top_right = x[:, 5, 90]
    top_left = x[:, 5, 40]
    np.testing.assert_allclose(top_right, [0, 0, 1], atol=0.05)
    np.testing.assert_allclose(top_left, [1, 0, 0], atol=0.05)
    np.testing.assert_array_equal(x[:, :, :30], 0)  # black padding


@pytest.mark.parametrize("fit,box", [("crop", (50, 0, 150, 100)), ("pad", (0, -50, 200, 150))])
def test_crop_and_pad_box(tmp_path, fit, box):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:150] = (0, 0, 255)
    arr[:, 150:] = (0, 255, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x, got_box, full = images.load_image(tmp_path / "wide.png", fit=fit)
    assert got_box == box and full == (200, 100)
    assert images.square_box(200, 100, fit) == box
    if fit == "crop":
        np.testing.assert_allclose(x[:, 10:-10, 10:-10], np.array([0, 0, 1.0])[:, None, None] * np.ones((1, 108, 108)),
                                   atol=1e-6)
    else:
        np.testing.assert_array_equal(x[:, :30], 0)  # top quarter is padding
        np.testing.assert_allclose(x[:, 64, 5], [1, 0, 0], atol=1e-6)
        np.testing.assert_allclose(x[:, 64, 64], [0, 0, 1], atol=1e-6)
        np.testing.assert_allclose(x[:, 64, 122], [0, 1, 0], atol=1e-6)


def test_large_jpeg_draft_keeps_full_coordinates(tmp_path):
    arr = face_like(1000, 2000)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(arr).save(tmp_path / "big.png")
    xj, boxj, fullj = images.load_image(tmp_path / "big.jpg")
    xp, boxp, fullp = images.load_image(tmp_path / "big.png")
    assert fullj == fullp == (2000, 1000)
    assert boxp == (500, 0, 1500, 1000)
    assert max(abs(a - b) for a, b in zip(boxj, boxp)) <= 8  # draft scale rounding
    assert np.abs(xj - xp).mean() < 0.02


@pytest.mark.parametrize("kind,reason", [
    ("zero", "empty"), ("text", "not a picture"), ("truncated", "cannot"), ("huge", "too large"),
    ("dir", "directory"), ("dangling", "no such file"), ("pipe", "not a regular file"), ("limit", "too large"),
])
def test_bad_inputs_raise_image_error(tmp_path, kind, reason):
    p = tmp_path / "x.png"
    if kind == "zero":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("hello")
    elif kind == "truncated":
        Image.fromarray(face_like(200, 200)).save(tmp_path / "ok.jpg")
        data = (tmp_path / "ok.jpg").read_bytes()
        p = tmp_path / "x.jpg"
        p.write_bytes(data[: len(data) // 3])
    elif kind == "huge":
        write_png_raw(p, None, width=50000, height=50000)
    elif kind == "dir":
        p.mkdir()
    elif kind == "dangling":
        os.symlink(tmp_path / "nowhere.png", p)
    elif kind == "pipe":
        os.mkfifo(p)
    elif kind == "limit":
        Image.fromarray(face_like(100, 100)).save(p)
    with pytest.raises(images.ImageError, match=reason):
        images.load_image(p, max_pixels=5000 if kind == "limit" else images.DEFAULT_MAX_PIXELS)


def test_mask_follows_crop_at_its_own_resolution(tmp_path):
    # picture 200x100 (crop box 50..150); mask at 4x the resolution, 1 in the right half
    m = np.zeros((400, 800), np.uint8)
    m[:, 400:] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = images.load_mask(tmp_path / "m.png", (50, 0, 150, 100), (200, 100))
    assert mask.shape == (128, 128) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask[:, :60], 0)
    np.testing.assert_array_equal(mask[:, 68:], 1)
    padded = images.load_mask(tmp_path / "m.png", (0, -50, 200, 150), (200, 100))
    np.testing.assert_array_equal(padded[:30], 0)  # outside the picture


def test_display_mappings():
    n = np.zeros((3, 2, 2), np.float32)
    n[2] = 1.0
    n[:, 0, 0] = (-1, 0, 0)
    rgb = images.normal_to_rgb(n)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[1, 1]) == (128, 128, 255) and tuple(rgb[0, 0]) == (0, 128, 128)
    s = np.array([0.5, 2.0, 1.0, 0.0], np.float32).reshape(1, 2, 2).repeat(3, 0)
    assert images.shading_to_rgb(s)[0, 1, 0] == 255 and images.shading_to_rgb(s)[0, 0, 0] == 64
    r = np.array([-2.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 2, 2).repeat(3, 0)
    out = images.residue_to_rgb(r)[..., 0].ravel()
    assert list(out) == [0, 128, 191, 255]
    mask = np.array([[1, 0], [1, 1]], np.float32)
    assert images.residue_to_rgb(r, mask)[0, 1, 0] == 0
    assert images.unit_to_rgb(np.full((3, 2, 2), 1.7, np.float32)).min() == 255


def test_grid_layout():
    t = np.full((4, 5, 3), 7, np.uint8)
    sheet = images.grid([[t, t, t], [t, None]], pad=1)
    assert sheet.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert sheet[1, 1, 0] == 7 and sheet[6, 1, 0] == 7 and sheet[6, 7, 0] == 255 and sheet[5, 1, 0] == 255


def test_grid_labels_sit_in_bands_beside_the_tiles():
    t = np.full((20, 30, 3), 7, np.uint8)
    plain = images.grid([[t, t], [t, t]])
    sheet = images.grid([[t, t], [t, t]], col_labels=["face", "normal"], row_labels=["method 0", "method 7"])
    top, left = sheet.shape[0] - plain.shape[0], sheet.shape[1] - plain.shape[1]
    assert top > 5 and left > 20
    assert np.array_equal(sheet[top:, left:], plain)  # the tiles are where they were, shifted
    assert sheet[:top].min() < 128 and sheet[top:, :left].min() < 128  # some dark text in each band
    assert images.step_labels(3) == ["t=0.00", "t=0.50", "t=1.00"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "a.png"

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        images.atomic_write(target, broken)
    assert list((tmp_path / "out").iterdir()) == []
    images.save_png(target, face_like(8, 8))
    np.testing.assert_array_equal(np.asarray(Image.open(target)), face_like(8, 8))
    stale = tmp_path / "out" / f"{images.TEMP_PREFIX}123-b.png"
    stale.write_bytes(b"x")
    assert images.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
