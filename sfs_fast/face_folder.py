"""Faces in the folder pipeline: the ``prepare`` and ``finish`` hooks of
:func:`sfs_fast.pipeline.decompose_folder` that ``sfs-decompose --faces`` and ``sfs-relight``
run.

- :func:`face_preparer` makes one :class:`~sfs_fast.pipeline.Crop` per face
  (``<stem>_face<k>``, k = 0 for the largest face), with the face's box, landmarks, score and
  transform in the crop's manifest entry; a picture that ``auto`` takes as it is goes through
  the default preparer unchanged (the same crop, the same outputs as ``--faces off``); a
  picture without a face fails with the reason "no face found".
- :func:`paste_finisher` writes, per picture, ``<stem>_paste_recon.png`` and
  ``<stem>_paste_shading.png``: the reconstruction and the display shading blended into the
  full-resolution photo through each face's feathered mask.
- :func:`relight_finisher` recombines each face under a new light (albedo x new SH shading,
  plus the residue when kept) and pastes the result into the photo (``sfs-relight``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfs_fast import faces, images
from sfs_fast.pipeline import Crop, FolderOptions, Item, Picture, prepare_picture


@dataclass(frozen=True)
class FaceOptions:
    """``--faces``, ``--max-faces``, ``--min-face-size``, ``--paste``; ``score_threshold``
    is YuNet's (see :mod:`sfs_fast.faces`)."""

    mode: str = "auto"
    max_faces: int | None = None
    min_face_size: float = 0.0
    paste: bool = False
    score_threshold: float = faces.SCORE_THRESHOLD

    def checked(self) -> FaceOptions:
        if self.mode not in faces.FACE_MODES:
            raise ValueError(f"faces: choose from {', '.join(faces.FACE_MODES)} (got {self.mode!r})")
        if self.max_faces is not None and int(self.max_faces) < 1:
            raise ValueError("max faces must be at least 1")
        if float(self.min_face_size) < 0:
            raise ValueError("min face size must be >= 0")
        return self


@dataclass
class FacePicture(Picture):
    """A :class:`~sfs_fast.pipeline.Picture` that keeps what a ``finish`` hook needs to put
    results back: the full-resolution ``photo`` (uint8 ``[H,W,3]``, only when a hook will
    use it) and per crop the picture -> crop ``matrices`` (float64 ``[2,3]``)."""

    photo: np.ndarray | None = None
    matrices: list = field(default_factory=list)


def box_matrix(box, size: int = faces.CROP_SIZE) -> np.ndarray:
    """The picture -> crop transform of the default preparer's square ``box``
    ``(left, top, right, bottom)`` resized to ``size`` (pixel centres kept exact)."""
    k = size / (box[2] - box[0])
    return np.array([[k, 0.0, (0.5 - box[0]) * k - 0.5], [0.0, k, (0.5 - box[1]) * k - 0.5]])


def _as_is(item: Item, options: FolderOptions, reason: str, keep_photo: bool) -> Picture:
    """The default preparer's picture (byte-identical crop), with the auto reason."""
    plain = prepare_picture(item, options)
    picture = FacePicture(plain.item, plain.crops, plain.meta, plain.error, plain.timings)
    picture.meta["faces"] = {"mode": "as-is", "reason": reason}
    if keep_photo and picture.crops:
        picture.photo = faces.load_picture(item.path, options.max_pixels)
        picture.matrices = [box_matrix(picture.meta["crop"])]
    return picture


def _face_crops(item: Item, plan: faces.FacePlan) -> list:
    crops = []
    for k, aligned in enumerate(plan.faces):
        crops.append(Crop(aligned.image, f"{item.stem}_face{k}", aligned.mask, {"face": k, **aligned.meta()}))
    return crops


def prepare_faces(item: Item, options: FolderOptions, face_options: FaceOptions, keep_photo: bool) -> Picture:
    """One picture's crops under ``face_options`` (see the module docstring). Never raises:
    an unusable picture becomes a Picture without crops and with the reason."""
    if face_options.mode == "off":
        return _as_is(item, options, "--faces off", keep_photo)
    picture = FacePicture(item)
    if item.error:
        picture.error = item.error
        return picture
    t0 = time.perf_counter()
    try:
        photo = faces.load_picture(item.path, options.max_pixels)
        user_mask = None
        if item.mask is not None:
            try:
                user_mask = faces.load_picture_mask(item.mask, photo.shape[1::-1], options.max_pixels)
            except images.ImageError as exc:
                raise images.ImageError(f"mask {item.mask}: {exc}") from None
        plan = faces.plan_faces(photo, face_options.mode, max_faces=face_options.max_faces,
                                min_face_size=face_options.min_face_size, user_mask=user_mask,
                                score_threshold=face_options.score_threshold)
    except images.ImageError as exc:
        picture.error = str(exc)
        return picture
    if plan.as_is:
        picture = _as_is(item, options, plan.reason, keep_photo)
        picture.timings["faces_ms"] = round((time.perf_counter() - t0) * 1e3, 3)  # the look that decided
        return picture
    picture.meta = {"size": [photo.shape[1], photo.shape[0]],
                    "faces": {"mode": face_options.mode, "count": len(plan.faces), "reason": plan.reason}}
    picture.crops = _face_crops(item, plan)
    if not picture.crops:
        picture.error = plan.reason
    if keep_photo:
        picture.photo = photo
        picture.matrices = [a.matrix for a in plan.faces]
    picture.timings["decode_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return picture


def face_preparer(face_options: FaceOptions, keep_photo: bool = False):
    """The ``prepare`` hook for :func:`~sfs_fast.pipeline.decompose_folder`;
    ``keep_photo`` keeps the full-resolution photo for a paste-back ``finish`` hook."""
    face_options = face_options.checked()

    def prepare(item: Item, options: FolderOptions) -> Picture:
        return prepare_faces(item, options, face_options, keep_photo)

    return prepare


# --------------------------------------------------------------------------------------
# finish hooks


def display_shading(shading: np.ndarray, mask) -> np.ndarray:
    """Shading ``[3,128,128]`` scaled as ``STEM_shading.png`` is (brightest masked pixel
    white): float32 ``[3,128,128]`` in [0,1]."""
    return images.shading_to_rgb(shading, mask).transpose(2, 0, 1).astype(np.float32) / 255.0


def _weights(crop: Crop) -> np.ndarray:
    mask = crop.mask if crop.mask is not None else np.ones((faces.CROP_SIZE,) * 2, np.float32)
    return faces.feather(mask)


def write_composites(picture: FacePicture, out_dir: Path, layers: dict) -> list:
    """Paste, per name, one ``[3,128,128]`` result per crop into the photo and write
    ``OUT/<stem>_<name>.png``. ``layers``: name -> list (one per crop). Returns the paths."""
    paths = []
    alphas = [_weights(c) for c in picture.crops]
    for name, results in layers.items():
        pieces = [(m, r, a) for m, r, a in zip(picture.matrices, results, alphas)]
        composite, _ = faces.paste(picture.photo, pieces)
        paths.append(images.save_png(Path(out_dir) / f"{picture.item.stem}_{name}.png", composite))
    return paths


def paste_finisher(out_dir: Path):
    """The ``finish`` hook of ``--paste``: ``<stem>_paste_recon.png`` and
    ``<stem>_paste_shading.png`` per picture."""

    def finish(picture: FacePicture, outputs: list) -> dict:
        if getattr(picture, "photo", None) is None:
            return {}
        layers = {"paste_recon": [np.clip(o["recon"], 0, 1) for o in outputs],
                  "paste_shading": [display_shading(o["shading"], c.mask) for o, c in zip(outputs, picture.crops)]}
        return {"outputs": write_composites(picture, out_dir, layers)}

    return finish


@dataclass(frozen=True)
class RelightOptions:
    """``sfs-relight``'s choices: ``light`` the ``--light`` spec (file or preset name, for
    the manifest), ``target`` the fixed 27-value target (a file, or ``--from``'s light) or
    None for a preset scaled per face to that face's own light, ``residue`` keep/drop,
    ``steps`` the interpolation strip's length (None: no strip), ``beta`` the model's."""

    light: str
    target: np.ndarray | None = None
    residue: str = "keep"
    steps: int | None = None
    beta: float = 0.0


def relight_crop(outputs: dict, target, options: RelightOptions):
    """One face's decomposition under ``target`` ``[27]`` (or ``[S,27]`` for a strip):
    ``(shading, recon)`` float32 NumPy ``[S,3,128,128]``."""
    target = np.asarray(target, np.float32).reshape(-1, 27)
    s = target.shape[0]

    def rep(name):
        return np.broadcast_to(outputs[name], (s,) + outputs[name].shape).copy()

    residue = rep("residue") if options.residue == "keep" and "residue" in outputs else None
    shading, recon = faces.relight(rep("normal"), rep("albedo"), target, residue,
                                   beta=options.beta if residue is not None else 0.0)
    return shading.numpy(), recon.numpy()


def relight_strip_image(outputs: dict, target, options: RelightOptions, mask) -> np.ndarray:
    """The strip from the face's own light to ``target`` in ``options.steps`` frames: row 1
    the shading (one display scale), row 2 the recombined face. uint8 RGB."""
    lights = faces.light_steps(outputs["light"], target, options.steps)
    shading, recon = relight_crop(outputs, lights, options)
    scale = float((shading * (1 if mask is None else mask[None, None])).max())
    return images.grid([[images.shading_to_rgb(x, mask, scale=scale) for x in shading],
                        [images.unit_to_rgb(np.clip(r, 0, 1), mask) for r in recon]],
                       col_labels=images.step_labels(options.steps), row_labels=["shading", "relit"])


def relight_finisher(out_dir: Path, options: RelightOptions):
    """The ``finish`` hook of ``sfs-relight``: per face ``<face stem>_relit_crop.png`` (and
    ``_relight_strip.png`` with steps); per picture ``<stem>_relit.png``, the relit faces
    pasted into the photo."""
    out_dir = Path(out_dir)

    def finish(picture: FacePicture, outputs: list) -> dict:
        paths, relit = [], []
        for crop, o in zip(picture.crops, outputs):
            target = options.target if options.target is not None else faces.preset_light(options.light, like=o["light"])
            _, recon = relight_crop(o, target, options)
            relit.append(np.clip(recon[0], 0, 1))
            paths.append(images.save_png(out_dir / f"{crop.stem}_relit_crop.png",
                                         images.unit_to_rgb(relit[-1], crop.mask)))
            if options.steps:
                strip = relight_strip_image(o, target, options, crop.mask)
                paths.append(images.save_png(out_dir / f"{crop.stem}_relight_strip.png", strip))
        if getattr(picture, "photo", None) is not None:
            paths += write_composites(picture, out_dir, {"relit": relit})
        return {"outputs": paths, "relight": {"light": options.light, "residue": options.residue,
                                              "steps": options.steps}}

    return finish
