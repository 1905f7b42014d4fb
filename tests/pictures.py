"""Test helpers that write pictures of every awkward kind (good and bad) into a folder."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_png_raw(path, arr=None, *, bitdepth=8, colortype=2, width=None, height=None):
    """A PNG written by hand (signature, IHDR, one IDAT, IEND), independent of Pillow's
    encoder: 16-bit RGB, or a header that declares any size (``arr`` None)."""
    if arr is not None:
        height, width = arr.shape[:2]
        dtype = ">u2" if bitdepth == 16 else "u1"
        raw = b"".join(b"\x00" + np.ascontiguousarray(arr[r]).astype(dtype).tobytes() for r in range(height))
    else:
        raw = b"\x00" * 64

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bitdepth, colortype, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))


def face_like(h, w, seed=0):
    """A smooth colourful uint8 picture ``[h,w,3]`` (not noise: JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
             for _ in range(3)]
    return (np.stack(chans, -1) * 255).astype(np.uint8)


def make_mixed_folder(root: Path) -> tuple[dict, dict]:
    """Write good and bad inputs under ``root``.

    Returns ``(good, bad)``: relative path -> description (good) or expected reason
    fragment (bad)."""
    root.mkdir(parents=True, exist_ok=True)
    good, bad = {}, {}

    Image.fromarray(face_like(120, 160, 1)).save(root / "wide rgb.png")
    good["wide rgb.png"] = "non-square RGB, space in the name"
    Image.fromarray(face_like(128, 128, 2)).save(root / "visage été.png")
    good["visage été.png"] = "unicode name"
    Image.fromarray((face_like(64, 64, 3)[..., 0].astype(np.uint16) * 257)).save(root / "grey16.png")
    good["grey16.png"] = "16-bit grey"
    write_png_raw(root / "rgb16.png", face_like(48, 40, 4).astype(np.uint16) * 257, bitdepth=16, colortype=2)
    good["rgb16.png"] = "16-bit RGB"
    Image.fromarray(face_like(64, 64, 5)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    good["palette.png"] = "palette"
    rgba = np.dstack([face_like(64, 64, 6), np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "rgba.png")
    good["rgba.png"] = "RGBA"
    Image.fromarray(face_like(90, 70, 7)[..., 1]).save(root / "grey.jpg", quality=95)
    good["grey.jpg"] = "grey JPEG"
    Image.fromarray(face_like(64, 64, 8)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = "CMYK JPEG"
    im = Image.fromarray(face_like(80, 120, 9))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(root / "exif rotated.jpg", exif=exif, quality=95)
    good["exif rotated.jpg"] = "EXIF orientation 6"
    Image.fromarray(face_like(128, 128, 10)).save(root / "masked.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 64:192] = 255
    Image.fromarray(mask).save(root / "masked_mask.png")
    good["masked.png"] = "mask beside"
    Image.fromarray(face_like(128, 128, 11)).save(root / "jpeg named png.png", format="JPEG")
    good["jpeg named png.png"] = "format by content"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(face_like(100, 100, 12)).save(root / "sub" / "nested.jpg", quality=90)
    good["sub/nested.jpg"] = "nested"
    Image.fromarray(face_like(50, 50, 13)).save(root / "sub" / "deeper" / "deep.webp")
    good["sub/deeper/deep.webp"] = "nested twice, WebP"

    jpeg = root / "sub" / "nested.jpg"
    (root / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    bad["truncated.jpg"] = ""
    (root / "zero.png").write_bytes(b"")
    bad["zero.png"] = "empty"
    (root / "text.png").write_text("this is not a picture\n")
    bad["text.png"] = "not a picture"
    write_png_raw(root / "huge.png", None, width=60000, height=60000)
    bad["huge.png"] = "too large"
    os.symlink(root / "missing-target.png", root / "dangling.png")
    bad["dangling.png"] = "no such file"
    os.mkfifo(root / "pipe.png")
    bad["pipe.png"] = "not a regular file"
    (root / "notes.txt").write_text("not an input: no picture extension\n")
    return good, bad
