"""Images in and out: reading any common picture into the model's 128x128 RGB input, masks,
and writing the decomposition as pictures.

Reading (:func:`load_image`):
- the format is recognised by content (Pillow), never by the file extension;
- EXIF orientation is applied (``ImageOps.exif_transpose``), so phone pictures come upright;
- grey, grey+alpha, palette, RGBA, CMYK, 16-bit and 32-bit grey become 8-bit RGB (16-bit
  values are scaled, not clipped; alpha is dropped: transparent pixels keep their colour);
- pictures with more than ``max_pixels`` pixels (declared in the header, so decompression
  bombs are refused before any decoding) raise :class:`ImageError`;
- any size and aspect: ``fit="crop"`` keeps the centred square of side min(W, H),
  ``fit="pad"`` pads the picture with black to a centred square of side max(W, H); the
  square is resized to 128x128 (antialiased). The square's box in the upright picture's
  pixel coordinates ``(left, top, right, bottom)`` is returned (negative or beyond the
  picture for ``pad``).

Writing: every file goes to a temporary name in its destination folder and is renamed into
place (:func:`atomic_write`), so an interrupted run never leaves a half-written output.
Display mappings (documented in the command's help):
- normal: unit xyz in [-1, 1] mapped to RGB ``(n + 1) / 2``;
- albedo, recon: clipped to [0, 1];
- shading: divided by its maximum over the (masked) picture, so the brightest pixel is white;
- residue (signed): ``0.5 + r / (2 max|r|)``, so zero is mid-grey.
"""
from __future__ import annotations

import math
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sfs_fast.atomic import TEMP_PREFIX, atomic_write, remove_stale_temporaries

INPUT_SIZE = 128
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: a 10000x10000 scan still passes
FITS = ("crop", "pad")
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())

Box = tuple  # (left, top, right, bottom) in the upright picture's pixels


class ImageError(ValueError):
    """A file that cannot be used as an input picture; the message is the one-line reason."""


# --------------------------------------------------------------------------------------
# Reading


def _open(path, max_pixels: int) -> Image.Image:
    """Open ``path`` (format by content) and check its declared size before decoding."""
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file (a pipe, socket or device)")  # opening a pipe would block
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns (and past 2x raises) on pictures above its own bomb limit; our
            # limit is checked explicitly below with a clear reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large to decode ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError("not a picture Pillow can read (unknown or corrupt format)") from None
    except FileNotFoundError:
        raise ImageError("no such file (or a dangling link)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot open: {exc.strerror or exc}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"too large: {w}x{h} = {w * h / 1e6:.0f} Mpixels exceeds the limit of "
                         f"{max_pixels / 1e6:.0f} Mpixels (--max-pixels)")
    return im


def _draft(im: Image.Image, size: int) -> float:
    """Let JPEG decode at a reduced scale that still leaves the short side >= ``size``.
    Returns the factor from the decoded size back to the full size."""
    w, h = im.size
    if im.format != "JPEG" or min(w, h) <= 2 * size:
        return 1.0
    scale = size / min(w, h)
    im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    return w / im.size[0]


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16/32-bit grey is scaled to 8 bits (Pillow's own
    ``convert`` clips it at 255)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            a = a.astype(np.float64)
            finite = a[np.isfinite(a)]
            top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
            a = np.nan_to_num(a / top * 255.0)
        elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a.astype(np.float64) / 257.0  # 65535 -> 255
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def square_box(width: int, height: int, fit: str = "crop") -> Box:
    """The centred square of a ``width x height`` picture: side min (``crop``) or max
    (``pad``); ``(left, top, right, bottom)`` in pixels, possibly outside for ``pad``."""
    if fit not in FITS:
        raise ValueError(f"fit: expected one of {FITS}, got {fit!r}")
    side = min(width, height) if fit == "crop" else max(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def _fit(im: Image.Image, box: Box, size: int, resample) -> Image.Image:
    """Crop ``box`` (Pillow pads outside the picture with zeros) and resize to ``size``."""
    if box != (0, 0) + im.size:
        im = im.crop(box)
    if im.size != (size, size):
        im = im.resize((size, size), resample, reducing_gap=3.0)
    return im


def load_image(path, *, fit: str = "crop", size: int = INPUT_SIZE,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    """Read a picture for the model.

    Returns ``(image, box, full_size)``: ``image`` float32 ``[3,size,size]`` RGB in [0,1];
    ``box`` the square taken from the upright picture (see :func:`square_box`);
    ``full_size`` ``(W, H)`` of the upright picture. Raises :class:`ImageError` with a
    one-line reason for anything unusable.
    """
    im = _open(path, max_pixels)
    try:
        with im:
            scale = _draft(im, size)
            im.load()
            im = ImageOps.exif_transpose(im)
            full = (round(im.size[0] * scale), round(im.size[1] * scale))
            rgb = _to_rgb8(im)
            box = square_box(*rgb.size, fit=fit)
            out = _fit(rgb, box, size, Image.Resampling.BICUBIC)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        # truncated or corrupt data shows up only when the pixels are decoded
        raise ImageError(f"cannot decode: {exc}") from None
    box = tuple(int(round(v * scale)) for v in box)
    arr = np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(arr), box, full


def load_mask(path, box: Box, full_size, *, size: int = INPUT_SIZE,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask for a picture: the same crop as the picture (``box`` given in the
    picture's pixels, ``full_size`` its ``(W, H)``; the mask may have another resolution and
    is scaled to match), resized to ``size``. Returns float32 ``[size,size]`` in [0,1]
    (anti-aliased edges kept); outside the picture (padding) it is 0."""
    im = _open(path, max_pixels)
    try:
        with im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                grey = im.convert("RGBA").getchannel("A") if _alpha_varies(im) else im.convert("L")
            else:
                grey = _to_rgb8(im).convert("L")
            sx = grey.size[0] / full_size[0]
            sy = grey.size[1] / full_size[1]
            mbox = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
            out = _fit(grey, mbox, size, Image.Resampling.BILINEAR)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"mask cannot be decoded: {exc}") from None
    return np.asarray(out, dtype=np.float32) / 255.0


def _alpha_varies(im: Image.Image) -> bool:
    alpha = im.convert("RGBA").getchannel("A")
    lo, hi = alpha.getextrema()
    return lo != hi


# --------------------------------------------------------------------------------------
# Display mappings: float maps [3,H,W] -> uint8 [H,W,3]


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


def normal_to_rgb(normal, mask=None) -> np.ndarray:
    """Unit normals ``[3,H,W]`` in [-1,1] -> uint8 RGB ``(n + 1) / 2``; masked-out pixels black."""
    a = (np.asarray(normal, dtype=np.float32) + 1.0) * 0.5
    return _to_uint8(_apply(a, mask))


def unit_to_rgb(image, mask=None) -> np.ndarray:
    """Albedo, recon, face: ``[3,H,W]`` in [0,1] (clipped) -> uint8 RGB."""
    return _to_uint8(_apply(np.asarray(image, dtype=np.float32), mask))


def shading_to_rgb(shading, mask=None, scale: float | None = None) -> np.ndarray:
    """Shading ``[3,H,W]`` (any positive range) divided by its maximum over the (masked)
    picture, or by ``scale`` when given (to share one scale across a strip)."""
    a = _apply(np.asarray(shading, dtype=np.float32), mask)
    if scale is None:
        scale = float(np.nanmax(a)) if a.size else 0.0
    return _to_uint8(a / scale if scale > 0 and math.isfinite(scale) else np.zeros_like(a))


def residue_to_rgb(residue, mask=None) -> np.ndarray:
    """Signed residue ``[3,H,W]`` -> uint8 RGB ``0.5 + r / (2 max|r|)`` (zero is mid-grey)."""
    a = _apply(np.asarray(residue, dtype=np.float32), mask)
    top = float(np.nanmax(np.abs(a))) if a.size else 0.0
    a = 0.5 + a / (2.0 * top) if top > 0 and math.isfinite(top) else np.full_like(a, 0.5)
    if mask is not None:
        a = a * mask  # the background stays black, not grey
    return _to_uint8(a)


def _apply(a: np.ndarray, mask) -> np.ndarray:
    return a if mask is None else a * np.asarray(mask, dtype=np.float32)[None]


def grid(rows, pad: int = 2, col_labels=None, row_labels=None) -> np.ndarray:
    """Contact sheet: ``rows`` is a list of rows, each a list of uint8 ``[H,W,3]`` tiles of
    one size (a missing tile may be None, left white). ``col_labels`` / ``row_labels``: text
    above each column / left of each row. Returns uint8 ``[top + R*(H+pad)+pad,
    left + C*(W+pad)+pad, 3]`` on a white background (``top``, ``left``: the label bands, 0
    without labels)."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("grid: no tiles")
    h, w = tiles[0].shape[:2]
    ncols = max(len(row) for row in rows)
    font = _label_font() if col_labels or row_labels else None
    top = _text_size(font, "Ag")[1] + 2 * pad if col_labels else 0
    left = max(_text_size(font, str(t))[0] for t in row_labels) + 2 * pad if row_labels else 0
    sheet = np.full((top + len(rows) * (h + pad) + pad, left + ncols * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is not None:
                y, x = top + pad + r * (h + pad), left + pad + c * (w + pad)
                sheet[y:y + h, x:x + w] = tile
    if font is None:
        return sheet
    return _draw_labels(sheet, font, col_labels, row_labels, (h, w, pad, top, left))


def step_labels(steps: int) -> list[str]:
    """Column labels of a strip of ``steps`` frames blended from t = 0 to t = 1."""
    return [f"t={i / (steps - 1):.2f}" for i in range(steps)]


def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default(size=11)


def _text_size(font, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text)
    return int(x1 - min(x0, 0)), int(y1 - min(y0, 0))


def _draw_labels(sheet: np.ndarray, font, col_labels, row_labels, geometry) -> np.ndarray:
    """Column labels centred over their tiles, row labels centred beside theirs, in black."""
    from PIL import ImageDraw

    h, w, pad, top, left = geometry
    im = Image.fromarray(sheet)
    draw = ImageDraw.Draw(im)
    for c, text in enumerate(col_labels or ()):
        tw, _ = _text_size(font, str(text))
        draw.text((left + pad + c * (w + pad) + (w - tw) // 2, pad), str(text), fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels or ()):
        _, th = _text_size(font, str(text))
        draw.text((pad, top + pad + r * (h + pad) + (h - th) // 2), str(text), fill=(0, 0, 0), font=font)
    return np.asarray(im)


# --------------------------------------------------------------------------------------
# Writing


def save_png(path, rgb: np.ndarray, compress_level: int = 1) -> Path:
    """Write uint8 ``[H,W,3]`` (or ``[H,W]``) as PNG, atomically. Level 1 compresses fast;
    the files are ~10% larger than at Pillow's default."""
    im = Image.fromarray(np.ascontiguousarray(rgb))
    return atomic_write(path, lambda f: im.save(f, format="PNG", compress_level=compress_level))


def save_npy(path, array) -> Path:
    """Write a float array as ``.npy``, atomically."""
    a = np.ascontiguousarray(array)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False))


def save_text(path, text: str) -> Path:
    """Write a text file (UTF-8), atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def is_picture(path) -> bool:
    """Whether Pillow recognises ``path``'s content as a picture (header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Exception:  # noqa: BLE001 - any failure means "not a picture we can read"
        return False


__all__ = [
    "INPUT_SIZE", "DEFAULT_MAX_PIXELS", "FITS", "IMAGE_EXTENSIONS", "TEMP_PREFIX", "ImageError",
    "load_image", "load_mask", "square_box", "normal_to_rgb", "unit_to_rgb", "shading_to_rgb",
    "residue_to_rgb", "grid", "step_labels", "atomic_write", "save_png", "save_npy", "save_text",
    "remove_stale_temporaries", "is_picture",
]
