"""Faces in the wild: detect, align and mask every face of a photo, and put results back.

Every method expects a tight, upright 128x128 face crop framed like the SfSNet demo crops.
This module turns any photo into such crops and maps results back onto the photo:

- :func:`detect_faces`: YuNet (OpenCV ``cv2.FaceDetectorYN``, the model shipped in
  ``sfs_fast/data/yunet/``, MIT licence, Shiqi Yu 2020): per face a box, 5 landmarks
  (right eye, left eye, nose tip, right and left mouth corner; "right" is the subject's
  right, on the image's left) and a score.
- :func:`align_transform`, :func:`warp_face`: a similarity transform (rotation, uniform
  scale, translation; no shear, no mirror) from the 5 landmarks to :data:`TEMPLATE`, the
  mean YuNet landmarks of the 19 SfSNet demo crops (``tools/derive_face_template.py``).
- :func:`template_mask`: the mask used when the user gives none, the majority of the 13
  SfSNet demo masks brought into template coordinates (same tool).
- :func:`is_face_crop`: the ``auto`` rule, whether a picture already is a tight crop.
- :func:`paste`: a 128x128 result blended back into the full photo through the warped,
  feathered mask; pixels outside it are the input's, exactly.
- :func:`preset_light`, :func:`read_any_light`, :func:`relight`, :func:`light_steps`:
  relighting with the package's one SH implementation (:func:`sfs_fast.kernels.sh_shade`).

Coordinates: pixel centres at integer coordinates (OpenCV's convention, and YuNet's);
a transform ``M`` is a float64 ``[2,3]`` matrix taking picture points ``(x, y, 1)`` to crop
points. Pictures are RGB ``uint8 [H,W,3]`` unless said otherwise.

OpenCV is an optional dependency (``pip install sfs_fast[faces]``), imported on first use.
"""
from __future__ import annotations

import contextlib

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfs_fast import sh

CROP_SIZE = 128
DATA_DIR = Path(__file__).parent / "data"
YUNET_PATH = DATA_DIR / "yunet" / "face_detection_yunet_2023mar.onnx"
TEMPLATE_MASK_PATH = DATA_DIR / "face_template_mask.png"

# Measured on this machine kind (see sfs_fast/data/yunet/README.md): YuNet handles faces of
# about 10-300 px, close-ups at full size gave duplicate boxes, so the long side is shrunk to
# 640; 0.6-0.7 kept every face of a six-person group photo where 0.9 lost two.
DETECT_SIZE = 640
SCORE_THRESHOLD = 0.65
NMS_THRESHOLD = 0.3

# YuNet's landmarks in the SfSNet crop framing, 128x128 pixels (x, y), in YuNet's order:
# right eye, left eye, nose tip, right mouth corner, left mouth corner. Printed by
# tools/derive_face_template.py: per crop the median over 4 detection scales of YuNet's
# (refined, as detect_faces gives them) landmarks on the 19 SfSNet demo crops, averaged over
# the crops, then made mirror-symmetric about the crop's centre column x = 63.5 (the data's
# own axis was x = AXIS_MEASURED, a pixel left of it). Spread over the crops (std, px): eyes
# 4-7, nose 5-7, mouth 4-6; each crop's own landmarks land within 2.3 px (median; 5.2 px
# worst) of the template after its best similarity fit (numbers of the last run).
TEMPLATE = np.array([
    [43.90, 45.42],
    [83.10, 45.42],
    [63.50, 67.82],
    [46.59, 84.94],
    [80.41, 84.94],
], dtype=np.float64)
AXIS_MEASURED = 62.28

FACES_EXTRA_HINT = "face detection needs OpenCV: pip install 'sfs_fast[faces]' (opencv-python-headless>=4.8)"


def _cv2():
    """OpenCV, imported on first use so that the core imports without it."""
    try:
        import cv2
    except ImportError:
        raise ImportError(FACES_EXTRA_HINT) from None
    # OpenCV 5 prints a "Targets are not supported by the new graph engine" warning per detector
    # on stderr; it is harmless, and the commands' stderr is for their own one-line reports
    with contextlib.suppress(AttributeError):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return cv2


# --------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class Face:
    """One detected face, in the picture's pixel coordinates.

    Attributes:
        box: ``(x, y, w, h)`` of the face box (may reach past the picture's edges).
        landmarks: float64 ``[5,2]``: right eye, left eye, nose, right and left mouth corner.
        score: YuNet's confidence in [0, 1].
    """

    box: tuple
    landmarks: np.ndarray
    score: float

    @property
    def size(self) -> float:
        """The box's longer side in pixels (what ``min_face_size`` compares with)."""
        return float(max(self.box[2], self.box[3]))

    def to_json(self) -> dict:
        """Box, landmarks and score as plain lists (for the manifest), rounded to 0.01 px."""
        return {"box": [round(float(v), 2) for v in self.box],
                "landmarks": np.round(self.landmarks, 2).tolist(),
                "score": round(float(self.score), 4)}


_DETECTORS = threading.local()  # FaceDetectorYN keeps its input size: one per thread


def _detector(score_threshold: float, nms_threshold: float):
    cache = getattr(_DETECTORS, "cache", None)
    if cache is None:
        cache = _DETECTORS.cache = {}
    key = (float(score_threshold), float(nms_threshold))
    if key not in cache:
        cv2 = _cv2()
        model = np.frombuffer(YUNET_PATH.read_bytes(), dtype=np.uint8)
        # loaded from bytes: works from zipped or read-only installs, any OpenCV >= 4.8
        cache[key] = cv2.FaceDetectorYN.create("onnx", model, np.zeros(0, np.uint8), (320, 320),
                                               key[0], key[1], 5000)
    return cache[key]


def _detect_size(width: int, height: int, detect_size: int | None) -> tuple:
    """The size YuNet sees: the long side shrunk to ``detect_size``, never enlarged."""
    long_side = max(width, height)
    if not detect_size or long_side <= detect_size:
        return width, height, 1.0
    scale = detect_size / long_side
    return max(1, round(width * scale)), max(1, round(height * scale)), scale


def detect_faces(rgb: np.ndarray, *, score_threshold: float = SCORE_THRESHOLD,
                 max_faces: int | None = None, min_face_size: float = 0.0,
                 detect_size: int | None = DETECT_SIZE, refine: bool = True,
                 nms_threshold: float = NMS_THRESHOLD) -> list:
    """Find the faces of a picture.

    Args:
        rgb: ``uint8 [H,W,3]`` RGB picture.
        score_threshold: YuNet's minimum score.
        max_faces: keep at most this many (the largest); None keeps all.
        min_face_size: drop faces whose box's longer side is below this, in the picture's
            pixels (before any shrinking).
        detect_size: shrink the long side to this before detecting (None: as is).
        refine: measure each face's landmarks again on an upright crop around it
            (:func:`refine_landmarks`).
    Returns:
        list of :class:`Face` in the picture's coordinates, largest box first (ties: left
        to right), so ``face0`` is the main subject.

    Example::

        >>> faces = detect_faces(np.zeros((240, 320, 3), np.uint8))
        >>> faces
        []
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected a uint8 [H,W,3] picture, got {rgb.dtype} {rgb.shape}")
    faces = [f for f in _yunet(rgb, detect_size, score_threshold, nms_threshold) if f.size >= min_face_size]
    faces.sort(key=lambda f: (-f.box[2] * f.box[3], f.box[0]))
    faces = faces if max_faces is None else faces[:max_faces]
    if refine:
        faces = [refine_landmarks(rgb, f, score_threshold, nms_threshold) for f in faces]
    return faces


def _yunet(rgb: np.ndarray, detect_size, score_threshold: float, nms_threshold: float) -> list:
    """One YuNet pass over ``rgb`` (shrunk to ``detect_size``): Faces in ``rgb``'s pixels."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    dw, dh, scale = _detect_size(w, h, detect_size)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        bgr = cv2.resize(bgr, (dw, dh), interpolation=cv2.INTER_AREA)
    det = _detector(score_threshold, nms_threshold)
    det.setInputSize((dw, dh))
    _, rows = det.detect(bgr)
    if rows is None:
        return []
    # shrinking maps pixel centres as u' = (u + 0.5) * scale - 0.5
    return [_face_from_row(r, scale) for r in rows]


# The refinement crop: 256 px with the template scaled by 1.5 about the centre, so the face
# is upright, about 150 px tall (YuNet's sweet spot) and has context around it.
REFINE_SIZE = 256
REFINE_SCALE = 1.5


def refine_landmarks(rgb: np.ndarray, face: Face, score_threshold: float = SCORE_THRESHOLD,
                     nms_threshold: float = NMS_THRESHOLD) -> Face:
    """A face's landmarks measured again on an upright, well-sized crop around it.

    YuNet's landmarks on small faces (about 60 px after the 640 shrink) lean toward upright:
    a face tilted by 20 degrees measured as 9. The crop that the first landmarks align
    (:data:`REFINE_SIZE`, template scaled by :data:`REFINE_SCALE`) shows the face nearly
    upright at a size YuNet measures well; the detection there nearest the crop's centre
    gives the landmarks, mapped back into the picture. The box and score stay the first
    pass's; when the crop shows no face the first landmarks are kept.

    Args:
        rgb: ``uint8 [H,W,3]``; face: a first-pass :class:`Face`.
    Returns:
        :class:`Face`.
    """
    centre = (REFINE_SIZE - 1) / 2.0
    target = (TEMPLATE - (CROP_SIZE - 1) / 2.0) * REFINE_SCALE + centre
    m = similarity(face.landmarks, target)
    crop = warp_face(rgb, m, REFINE_SIZE)
    found = _yunet(np.ascontiguousarray(crop), None, score_threshold, nms_threshold)
    if not found:
        return face
    best = min(found, key=lambda f: np.linalg.norm(f.landmarks.mean(0) - target.mean(0)))
    if np.linalg.norm(best.landmarks.mean(0) - target.mean(0)) > 0.25 * REFINE_SIZE:
        return face  # a different face of the crop, not this one
    return Face(box=face.box, landmarks=apply(invert(m), best.landmarks), score=face.score)


def _face_from_row(row: np.ndarray, scale: float) -> Face:
    """YuNet's 15 values (box 4, landmarks 10, score) at the detection scale -> a Face."""
    row = row.astype(np.float64)
    x, y, w, h = row[:4]
    box = ((x + 0.5) / scale - 0.5, (y + 0.5) / scale - 0.5, w / scale, h / scale)
    return Face(box=tuple(float(v) for v in box), landmarks=(row[4:14].reshape(5, 2) + 0.5) / scale - 0.5,
                score=float(row[14]))


# --------------------------------------------------------------------------------------
# Alignment


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst.

    Solves ``dst ~ [[a, -b], [b, a]] @ src + t`` in closed form (no reflection can come out,
    which a general affine fit of 5 noisy points might allow).

    Args:
        src, dst: ``[N,2]`` points, N >= 2.
    Returns:
        float64 ``[2,3]`` matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    denom = (s * s).sum()
    if denom <= 0:
        raise ValueError("similarity: the source points coincide")
    a = (s * d).sum() / denom
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / denom
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a ``[2,3]`` affine transform (float64 ``[2,3]``)."""
    a = np.linalg.inv(m[:, :2])
    return np.hstack([a, -a @ m[:, 2:]])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[N,2]`` points through a ``[2,3]`` transform -> ``[N,2]``."""
    points = np.asarray(points, np.float64)
    return points @ m[:, :2].T + m[:, 2]


def transform_params(m: np.ndarray) -> dict:
    """Scale, rotation and translation of a ``[2,3]`` similarity transform.

    ``rotation_deg`` is the angle the transform turns the picture by, clockwise on screen
    positive (image y points down): a face tilted counter-clockwise by r degrees is turned
    upright by about +r.
    """
    return {"scale": float(math.hypot(m[0, 0], m[1, 0])),
            "rotation_deg": float(math.degrees(math.atan2(m[1, 0], m[0, 0]))),
            "translation": [float(m[0, 2]), float(m[1, 2])]}


def align_transform(landmarks: np.ndarray, template: np.ndarray = None) -> np.ndarray:
    """The picture -> crop transform of a face: similarity from its 5 landmarks ``[5,2]`` to
    the template's (default :data:`TEMPLATE`). Returns float64 ``[2,3]``."""
    return similarity(landmarks, TEMPLATE if template is None else template)


def warp_face(picture: np.ndarray, m: np.ndarray, size: int = CROP_SIZE, *,
              interpolation: str = "linear", border: str = "replicate") -> np.ndarray:
    """Warp a picture (``[H,W,C]`` or ``[H,W]``, any dtype OpenCV warps) into the crop.

    When the face shrinks by more than 2x, the crop is rendered at k times the size and
    area-averaged down (k = the shrink factor, rounded up, at most 8), so a large face does
    not alias; the k-times transform is offset by ``(k-1)/2`` so pixel centres stay exact.

    Args:
        m: picture -> crop ``[2,3]``.
        interpolation: ``linear`` or ``nearest``.
        border: ``replicate`` (pictures) or ``zero`` (masks, validity).
    Returns:
        ``[size,size(,C)]`` of the input's dtype.
    """
    cv2 = _cv2()
    flags = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[interpolation]
    mode = {"replicate": cv2.BORDER_REPLICATE, "zero": cv2.BORDER_CONSTANT}[border]
    scale = transform_params(m)["scale"]
    k = 1 if scale >= 0.5 or interpolation == "nearest" else min(8, math.ceil(1.0 / scale))
    mk = m * k
    mk[:, 2] += (k - 1) / 2.0
    out = cv2.warpAffine(picture, mk, (size * k, size * k), flags=flags, borderMode=mode, borderValue=0)
    if k > 1:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out


# --------------------------------------------------------------------------------------
# Masks and aligned crops

_TEMPLATE_MASK = None


def template_mask() -> np.ndarray:
    """The mask of a face in template coordinates, float32 ``[128,128]`` in {0, 1}: the
    majority of the 13 SfSNet demo masks (and their mirror images) aligned to the template
    (``tools/derive_face_template.py``; 6338 face pixels, x 22..105, y 23..114)."""
    global _TEMPLATE_MASK
    if _TEMPLATE_MASK is None:
        from PIL import Image

        with Image.open(TEMPLATE_MASK_PATH) as im:
            _TEMPLATE_MASK = np.asarray(im.convert("L"), np.float32) / 255.0
    return _TEMPLATE_MASK.copy()


def face_mask(m: np.ndarray, picture_shape: tuple, user_mask: np.ndarray | None = None) -> np.ndarray:
    """A face's mask in crop coordinates, float32 ``[128,128]`` in [0, 1].

    Args:
        m: picture -> crop ``[2,3]``.
        picture_shape: ``(H, W, ...)`` of the picture.
        user_mask: float ``[H,W]`` in [0,1] for the whole picture (warped with the face), or
            None for :func:`template_mask`.
    Crop pixels that come from outside the picture (a face at the edge) are 0 either way.
    """
    h, w = picture_shape[:2]
    inside = warp_face(np.ones((h, w), np.float32), m, border="zero")
    if user_mask is None:
        mask = template_mask()
    else:
        if user_mask.shape[:2] != (h, w):
            raise ValueError(f"user_mask: expected [{h},{w}] like the picture, got {list(user_mask.shape)}")
        mask = warp_face(np.asarray(user_mask, np.float32), m, border="zero")
    return np.clip(mask * inside, 0.0, 1.0)


@dataclass
class AlignedFace:
    """One face ready for the model.

    Attributes:
        face: the detection (:class:`Face`).
        matrix: picture -> crop float64 ``[2,3]``; :func:`invert` maps results back.
        image: float32 ``[3,128,128]`` RGB in [0, 1].
        mask: float32 ``[128,128]`` in [0, 1].
    """

    face: Face
    matrix: np.ndarray
    image: np.ndarray
    mask: np.ndarray

    def meta(self) -> dict:
        """Manifest fields: box, landmarks, score, transform (both ways) and its parameters."""
        return {**self.face.to_json(),
                "transform": np.round(self.matrix, 6).tolist(),
                "inverse": np.round(invert(self.matrix), 6).tolist(),
                **{k: (round(v, 4) if isinstance(v, float) else [round(t, 3) for t in v])
                   for k, v in transform_params(self.matrix).items()}}


def align_faces(rgb: np.ndarray, faces: list, user_mask: np.ndarray | None = None) -> list:
    """Aligned 128x128 crops of ``faces`` (from :func:`detect_faces`) of picture ``rgb``
    ``uint8 [H,W,3]``; ``user_mask`` float ``[H,W]`` or None. Returns [:class:`AlignedFace`]."""
    out = []
    for face in faces:
        m = align_transform(face.landmarks)
        crop = warp_face(rgb, m).astype(np.float32).transpose(2, 0, 1) / 255.0
        out.append(AlignedFace(face, m, np.ascontiguousarray(crop), face_mask(m, rgb.shape, user_mask)))
    return out


# --------------------------------------------------------------------------------------
# auto: is the picture already a tight face crop?

AUTO_MAX_SIDE = 256       # px: the long side of a crop (the SfSNet crops are 128)
AUTO_MAX_ASPECT = 1.1     # long side / short side
AUTO_SCALE_RANGE = (0.7, 1.4)     # the picture's own face vs the template's size
AUTO_MAX_ROTATION = 15.0  # degrees
AUTO_MAX_SHIFT = 20.0     # px at 128, of the landmarks' centre from the template's


def is_face_crop(width: int, height: int, faces: list) -> tuple:
    """The ``--faces auto`` rule: use the picture as it is (as ``--faces off`` would), or
    detect and align its faces.

    A picture is used as it is when all of these hold:
    - its long side is at most ``AUTO_MAX_SIDE`` (256) px and long/short <= 1.1;
    - YuNet found no face (a tight crop can cut the chin or brow off so that the detector
      misses it; a small square picture is then taken for a crop), or exactly one face whose
      alignment transform, measured on the picture's centred square resized to 128 px (what
      ``--faces off`` feeds the model), is close to identity: scale in [0.7, 1.4],
      rotation within 15 degrees, the landmarks' centre within 20 px of the template's
      (the 19 SfSNet crops measure scale 0.82-1.20, rotation within 7 degrees, shift
      up to 14.7 px).

    Args:
        width, height: the picture's size.
        faces: what :func:`detect_faces` found on it.
    Returns:
        ``(as_is, reason)``: a bool and a short reason for the manifest.
    """
    long_side, short_side = max(width, height), min(width, height)
    if long_side > AUTO_MAX_SIDE or long_side > AUTO_MAX_ASPECT * short_side:
        return False, f"{width}x{height} is not a small square crop"
    if not faces:
        return True, "small square picture, no face detected: used as a crop"
    if len(faces) > 1:
        return False, f"{len(faces)} faces"
    side = short_side
    left, top = (width - side) // 2, (height - side) // 2
    lm = (faces[0].landmarks - (left, top) + 0.5) * CROP_SIZE / side - 0.5
    p = transform_params(align_transform(lm))
    shift = float(np.linalg.norm(apply(align_transform(lm), lm.mean(0)[None])[0] - lm.mean(0)))
    ok = (AUTO_SCALE_RANGE[0] <= p["scale"] <= AUTO_SCALE_RANGE[1]
          and abs(p["rotation_deg"]) <= AUTO_MAX_ROTATION and shift <= AUTO_MAX_SHIFT)
    what = f"scale {p['scale']:.2f}, rotation {p['rotation_deg']:.1f} deg, shift {shift:.1f} px"
    return ok, ("framed like a crop: " if ok else "not framed like a crop: ") + what


# --------------------------------------------------------------------------------------
# One picture: full-resolution reading and the per-picture decision

FACE_MODES = ("auto", "detect", "off")


def load_picture(path, max_pixels: int | None = None) -> np.ndarray:
    """A picture at full resolution, upright, as ``uint8 [H,W,3]`` RGB, read the way
    :func:`sfs_fast.images.load_image` reads it (format by content, EXIF orientation, any
    mode, the size limit); raises :class:`sfs_fast.images.ImageError` with a one-line reason."""
    from PIL import Image, ImageOps

    from sfs_fast import images

    im = images._open(path, max_pixels or images.DEFAULT_MAX_PIXELS)
    try:
        with im:
            im.load()
            rgb = images._to_rgb8(ImageOps.exif_transpose(im))
            return np.ascontiguousarray(np.asarray(rgb, np.uint8))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        if isinstance(exc, images.ImageError):
            raise
        raise images.ImageError(f"cannot decode: {exc}") from None


def load_picture_mask(path, size: tuple, max_pixels: int | None = None) -> np.ndarray:
    """A user's mask for a whole picture, scaled to the picture's ``size`` ``(W, H)``:
    float32 ``[H,W]`` in [0, 1]; alpha where it varies, else grey (as ``images.load_mask``)."""
    from PIL import Image, ImageOps

    from sfs_fast import images

    im = images._open(path, max_pixels or images.DEFAULT_MAX_PIXELS)
    try:
        with im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                grey = im.convert("RGBA").getchannel("A") if images._alpha_varies(im) else im.convert("L")
            else:
                grey = images._to_rgb8(im).convert("L")
            if grey.size != tuple(size):
                grey = grey.resize(tuple(size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if isinstance(exc, images.ImageError):
            raise
        raise images.ImageError(f"mask cannot be decoded: {exc}") from None
    return np.asarray(grey, np.float32) / 255.0


@dataclass
class FacePlan:
    """What to feed the model for one picture.

    Attributes:
        as_is: use the whole picture as ``--faces off`` does (a tight crop already).
        faces: the aligned faces otherwise (:class:`AlignedFace`), possibly empty.
        reason: why: the :func:`is_face_crop` reason, or ``"no face found"``.
    """

    as_is: bool
    faces: list
    reason: str


def plan_faces(rgb: np.ndarray, mode: str = "auto", *, max_faces: int | None = None,
               min_face_size: float = 0.0, user_mask: np.ndarray | None = None,
               score_threshold: float = SCORE_THRESHOLD) -> FacePlan:
    """The ``--faces`` decision for one picture ``uint8 [H,W,3]``.

    ``off``: as it is. ``detect``: every face found (at most ``max_faces``, boxes at least
    ``min_face_size`` px), aligned and masked. ``auto``: as it is when :func:`is_face_crop`
    says so, else as ``detect``. No face is a plan with no faces and reason "no face found".
    """
    if mode not in FACE_MODES:
        raise ValueError(f"faces: expected one of {FACE_MODES}, got {mode!r}")
    if mode == "off":
        return FacePlan(True, [], "--faces off")
    found = detect_faces(rgb, score_threshold=score_threshold, min_face_size=min_face_size)
    if mode == "auto":
        as_is, reason = is_face_crop(rgb.shape[1], rgb.shape[0], found)
        if as_is:
            return FacePlan(True, [], reason)
    if not found:
        return FacePlan(False, [], f"no face found (YuNet score >= {score_threshold:g}"
                        + (f", box >= {min_face_size:g} px)" if min_face_size else ")"))
    found = found if max_faces is None else found[:max_faces]
    return FacePlan(False, align_faces(rgb, found, user_mask), f"{len(found)} face(s) detected")


# --------------------------------------------------------------------------------------
# Back on the photo

FEATHER_PX = 4.0  # crop pixels: the mask is eroded by this and blurred over about as much


def feather(mask: np.ndarray, radius: float = FEATHER_PX) -> np.ndarray:
    """Soft paste weights from a crop mask ``[128,128]`` -> float32 ``[128,128]`` in [0,1].

    The mask is eroded by ``radius`` and then blurred (sigma ``radius / 2``), so the soft
    edge stays inside the face; weights below 1/255 are set to 0, so "outside the feathered
    mask" is a well-defined set of pixels that the paste leaves untouched.
    """
    cv2 = _cv2()
    hard = (np.asarray(mask, np.float32) >= 0.5).astype(np.uint8)
    r = max(0, int(round(radius)))
    if r:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        hard = cv2.erode(hard, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = hard.astype(np.float32)
    if radius > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), radius / 2.0, borderType=cv2.BORDER_CONSTANT)
    alpha[alpha < 1.0 / 255.0] = 0.0
    return alpha


def _roi(m_inv: np.ndarray, size: int, width: int, height: int):
    """The picture rectangle ``(x0, y0, x1, y1)`` that the crop square covers, or None."""
    corners = apply(m_inv, [[-1, -1], [size, -1], [-1, size], [size, size]])
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return None if x0 >= x1 or y0 >= y1 else (x0, y0, x1, y1)


def paste(picture: np.ndarray, pieces: list) -> tuple:
    """Blend 128x128 results back into the full-resolution picture.

    Args:
        picture: ``uint8 [H,W,3]`` the original RGB photo.
        pieces: ``[(matrix, result, alpha)]`` per face: picture -> crop ``[2,3]``, the result
            float ``[3,128,128]`` in [0,1] (a recon, a display shading), and the paste
            weights ``[128,128]`` (:func:`feather` of the face's mask).
    Returns:
        ``(composite, weight)``: ``uint8 [H,W,3]`` and the float32 ``[H,W]`` total weight;
        wherever the weight is 0 the composite is the input, exactly.
    """
    cv2 = _cv2()
    h, w = picture.shape[:2]
    out = picture.copy()
    weight = np.zeros((h, w), np.float32)
    for m, result, alpha in pieces:
        roi = _roi(invert(m), CROP_SIZE, w, h)
        if roi is None:
            continue
        x0, y0, x1, y1 = roi
        # warpAffine with WARP_INVERSE_MAP samples the crop at m @ (roi pixel + offset)
        m_roi = np.hstack([m[:, :2], (m[:, :2] @ [x0, y0] + m[:, 2])[:, None]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        size = (x1 - x0, y1 - y0)
        res = np.nan_to_num(np.asarray(result, np.float32).transpose(1, 2, 0)) * 255.0
        res = cv2.warpAffine(np.ascontiguousarray(res), m_roi, size, flags=flags, borderValue=0)
        a = cv2.warpAffine(np.asarray(alpha, np.float32), m_roi, size, flags=flags, borderValue=0)
        a = np.clip(a, 0.0, 1.0)
        region = out[y0:y1, x0:x1]
        blended = region + a[..., None] * (res - region)
        # only pixels with weight > 0 are written: the rest stay the input's bytes
        touched = a > 0
        region[touched] = np.clip(np.rint(blended[touched]), 0, 255).astype(np.uint8)
        weight[y0:y1, x0:x1] = np.maximum(weight[y0:y1, x0:x1], a)
    return out, weight


# --------------------------------------------------------------------------------------
# Relighting

# Directions in the normal frame (x image-right, y image-up, z toward the viewer), unit
# vectors; "left" lights the face from the image's left (the subject's right side).
PRESET_DIRECTIONS = {
    "front": (0.0, 0.0, 1.0),
    "left": (-1.0 / math.sqrt(2.0), 0.0, 1.0 / math.sqrt(2.0)),
    "right": (1.0 / math.sqrt(2.0), 0.0, 1.0 / math.sqrt(2.0)),
    "top": (0.0, 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0)),
}
PRESET_AMBIENT = 0.3   # shading of the ambient term alone
PRESET_STRENGTH = 0.7  # intensity of the distant light (peak shading about 0.74 above ambient)


def preset_light(name: str, *, like=None, ambient: float = PRESET_AMBIENT,
                 strength: float = PRESET_STRENGTH) -> np.ndarray:
    """A named light: ambient plus one distant white light from ``PRESET_DIRECTIONS[name]``.

    A distant light of intensity ``I`` from unit direction ``d`` has SH coefficients
    ``I * Y_k(d)`` (the standard normalised real SH); :mod:`sfs_fast.sh`'s basis holds the
    Lambertian attenuation ``A_l`` in its constants, so ``Y_k(d) = basis_k(d) / A_l``. The
    ambient adds ``ambient / C1`` to L00. With ``like`` (a ``[27]`` light, e.g. the one the
    model estimated) each channel is scaled so its L00 matches ``like``'s: the photo keeps
    its colour and overall brightness and only the direction changes.

    Returns:
        float64 ``[27]`` (R|G|B blocks, SfSNet order).
    """
    import torch

    if name not in PRESET_DIRECTIONS:
        raise ValueError(f"light: unknown preset {name!r} (choose from {', '.join(PRESET_DIRECTIONS)})")
    d = torch.tensor(PRESET_DIRECTIONS[name], dtype=torch.float64)
    band = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
    coeffs = sh.sh_basis(d, 0).numpy() / np.asarray(sh.ATTENUATION)[band] * strength
    coeffs[0] += ambient / sh.C1
    light = sh.grey_light(coeffs)
    if like is not None:
        like = np.asarray(like, np.float64).reshape(sh.N_LIGHT)
        for c in range(3):
            if like[9 * c] > 0:
                light[9 * c:9 * c + 9] *= like[9 * c] / light[9 * c]
    return light


def read_any_light(path) -> np.ndarray:
    """A light file: 27 values (SfSNet: R|G|B blocks, SfSNet order) or 9 values (DPR: one
    grey light in DPR's order and frame), read by :func:`sfs_fast.sh.read_light` (which
    converts DPR's with the frame, not only the order). Returns float64 ``[27]``; any other
    content raises ValueError with one line."""
    return sh.read_light(path)


def resolve_light(spec: str, *, like=None) -> np.ndarray:
    """``--light``: an existing file (:func:`read_any_light`) or a preset name
    (:func:`preset_light`, scaled to ``like`` when given). Returns float64 ``[27]``."""
    if Path(spec).is_file():
        return read_any_light(spec)
    if spec in PRESET_DIRECTIONS:
        return preset_light(spec, like=like)
    raise ValueError(f"light: {spec!r} is neither a light file nor a preset ({', '.join(PRESET_DIRECTIONS)})")


def relight(normal, albedo, light, residue=None, *, beta: float = 0.0):
    """Recombine a decomposition under a new SH light with the package's shading op.

    ``shading = Y(n) . light + residue`` and ``recon = shading * (albedo - beta * residue)``,
    exactly what the models compute (pass ``residue=None`` to drop it; ``beta`` is the
    model's, 1 for method 4).

    Args:
        normal: ``[B,3,H,W]`` unit normals; albedo, residue: ``[B,3,H,W]`` (residue or None).
        light: ``[B,27]`` or ``[27]`` (broadcast over the batch).
    Returns:
        ``(shading, recon)`` float32 tensors ``[B,3,H,W]``.
    """
    import torch

    from sfs_fast.kernels import sh_shade

    normal = torch.as_tensor(normal, dtype=torch.float32)
    light = torch.as_tensor(light, dtype=torch.float32).reshape(-1, sh.N_LIGHT)
    light = light.expand(normal.shape[0], -1).contiguous()
    albedo = torch.as_tensor(albedo, dtype=torch.float32)
    residue = None if residue is None else torch.as_tensor(residue, dtype=torch.float32)
    return sh_shade(normal, light, residue, albedo, beta=beta if residue is not None else 0.0)


def light_steps(start, end, steps: int) -> np.ndarray:
    """``steps`` lights blended linearly from ``start`` to ``end`` (both ``[27]``, both
    included). Returns float64 ``[steps,27]``."""
    if steps < 2:
        raise ValueError(f"steps: expected at least 2, got {steps}")
    t = np.linspace(0.0, 1.0, steps)[:, None]
    a = np.asarray(start, np.float64).reshape(1, sh.N_LIGHT)
    b = np.asarray(end, np.float64).reshape(1, sh.N_LIGHT)
    return (1.0 - t) * a + t * b
