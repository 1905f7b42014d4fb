"""Derive the face-alignment template and the template mask from the SfSNet demo crops.

    python tools/derive_face_template.py ../shared/data/faces [--write-mask sfs_fast/data/face_template_mask.png]

The official weights were trained on crops framed like the 19 SfSNet demo crops
(``with_masks/*_face.png``, ``no_masks/*_face.png``, 128x128), so the template is where
YuNet puts its 5 landmarks on those crops:

1. per crop, YuNet's landmarks as ``faces.detect_faces`` gives them (refined on an upright
   256 px crop around the face, the way every photo's faces are measured) at 4 scales (the crop resized to 128, 192, 256 and 320 px,
   faces of ~100-300 px, the sizes it meets after the 640 shrink), mapped back to 128 px and
   the median taken per coordinate (one scale's jitter does not decide);
2. the mean over the 19 crops;
3. mirror-symmetric about the crop's centre column x = 63.5 (eyes and mouth corners as
   mirrored pairs, the nose on the axis), so an upright frontal face is aligned upright and
   centred; the data's own axis is printed beside it.

The template mask: each of the 13 demo masks (512x512, the crop's framing) is area-resized
to 128, moved into template coordinates with the same similarity transform the pipeline
would use for that crop's landmarks, and the 13 and their 13 mirror images are combined by
majority (a pixel is face where more than 13 of the 26 cover it more than half); the result is written as an 8-bit PNG.
Prints the numbers pasted into ``sfs_fast/faces.py``. The refinement of step 1 aligns with
the stored template, so the derivation is a fixed point: it was rerun with its own output
pasted in until the output stopped changing (4 runs; the first, unrefined, landmarks gave
``[[43.57, 45.30], [83.43, 45.30], [63.50, 68.13], [46.38, 86.66], [80.62, 86.66]]``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sfs_fast import faces

SCALES = (128, 192, 256, 320)
MIRROR = (1, 0, 2, 4, 3)  # YuNet's order with right and left swapped


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def crop_landmarks(rgb: np.ndarray) -> np.ndarray:
    """Median over SCALES of YuNet's landmarks on one crop, in its own pixels ``[5,2]``."""
    import cv2

    size = rgb.shape[1]
    found = []
    for s in SCALES:
        img = rgb if s == size else cv2.resize(rgb, (s, s), interpolation=cv2.INTER_CUBIC)
        dets = faces.detect_faces(img, detect_size=None)
        if len(dets) != 1:
            raise SystemExit(f"expected one face at {s} px, found {len(dets)}")
        # resizing maps pixel centres as u' = (u + 0.5) * s / size - 0.5
        found.append((dets[0].landmarks + 0.5) * size / s - 0.5)
    return np.median(np.stack(found), axis=0)


def symmetrize(points: np.ndarray, axis: float) -> np.ndarray:
    """Average the points with their mirror image about the column x = axis."""
    mirrored = points[list(MIRROR)].copy()
    mirrored[:, 0] = 2 * axis - mirrored[:, 0]
    return (points + mirrored) / 2


def template_mask(mask_paths, landmarks, template) -> np.ndarray:
    """Majority of the demo masks in template coordinates: uint8 ``[128,128]`` 0/255."""
    import cv2

    votes = np.zeros((faces.CROP_SIZE, faces.CROP_SIZE), np.int32)
    for path, lm in zip(mask_paths, landmarks):
        m = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
        m = cv2.resize(m, (faces.CROP_SIZE, faces.CROP_SIZE), interpolation=cv2.INTER_AREA)
        warped = faces.warp_face(m, faces.similarity(lm, template), border="zero")
        votes += warped > 0.5
    # the template is symmetric about the centre column, so a left-right flip is an exact
    # mirror: counting the mirrored masks too makes the mask symmetric (26 votes)
    votes = votes + votes[:, ::-1]
    return np.where(votes > len(mask_paths), 255, 0).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("faces_dir", type=Path, help="../shared/data/faces (with_masks/, no_masks/)")
    p.add_argument("--write-mask", type=Path, help="where to write the template mask PNG")
    args = p.parse_args(argv)
    crops = sorted(args.faces_dir.glob("*/*_face.png"))
    if len(crops) != 19:
        print(f"error: expected the 19 SfSNet crops under {args.faces_dir}, found {len(crops)}", file=sys.stderr)
        return 1
    lms = np.stack([crop_landmarks(load_rgb(c)) for c in crops])
    mean = lms.mean(0)
    axis = float(np.mean([(mean[0, 0] + mean[1, 0]) / 2, mean[2, 0], (mean[3, 0] + mean[4, 0]) / 2]))
    # rounded as stored in sfs_fast/faces.py, so the mask below is the stored template's
    template = np.round(symmetrize(mean, (faces.CROP_SIZE - 1) / 2), 2)
    print(f"crops: {len(crops)}; per-landmark std over crops (px): {np.round(lms.std(0), 2).tolist()}")
    print(f"mean landmarks: {np.round(mean, 2).tolist()}; measured axis x = {axis:.2f}")
    print("TEMPLATE = [" + ", ".join(f"[{x:.2f}, {y:.2f}]" for x, y in template) + "]")
    residuals = [np.abs(faces.apply(faces.similarity(lm, template), lm) - template).max() for lm in lms]
    print(f"max landmark residual after aligning each crop (px): median {np.median(residuals):.2f}, "
          f"max {np.max(residuals):.2f}")
    masked = [c for c in crops if c.with_name(c.name.replace("_face", "_mask")).is_file()]
    mask = template_mask([c.with_name(c.name.replace("_face", "_mask")) for c in masked],
                         [lms[crops.index(c)] for c in masked], template)
    ys, xs = np.nonzero(mask)
    print(f"template mask from {len(masked)} masks: {int((mask > 0).sum())} px, "
          f"x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()}")
    if args.write_mask:
        Image.fromarray(mask).save(args.write_mask)
        print(f"wrote {args.write_mask}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
