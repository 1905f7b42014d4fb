"""sfs-relight: relight every face of each picture with a target SH light and paste the
result back into the photo.

The command is argument parsing and one :func:`sfs_fast.pipeline.decompose_folder` call with
the faces preparer (:mod:`sfs_fast.face_folder`) and a ``finish`` hook that recombines and
pastes: the same discovery, batching, atomic writes, manifest and resume as sfs-decompose.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from sfs_fast.cli.common import EXIT_USAGE, CommandError, add_debug_flag, checked_options, make_decomposer, run_command
from sfs_fast.cli.decompose import ProgressBar, print_summary
from sfs_fast.plan import add_plan_arguments

PROG = "sfs-relight"

DESCRIPTION = """\
Relight the faces of photos: each face is found (YuNet), aligned to the SfSNet framing,
decomposed, recombined as albedo x SH shading under the target light (+ the residue of
methods 3-7 with --residue keep, the default) and pasted back into the photo through its
feathered mask; pixels outside the faces stay the photo's, exactly.

--light is a light file, 27 values (SfSNet: R|G|B blocks of 9 in the order [L00, z, x, y,
3z^2-1, xz, yz, x^2-y^2, xy]) or 9 values (DPR: one grey light in DPR's order [1, y, z, x, xy,
yz, 3z^2-1, xz, x^2-y^2] and DPR's frame, converted by sfs_fast.sh.read_light), or a preset: front, left, right, top: ambient 0.3 plus a distant
white light of 0.7 from the direction (0,0,1), (-1,0,1)/sqrt2, (1,0,1)/sqrt2, (0,1,1)/sqrt2 in
the normal frame (x image-right, y up, z toward the viewer; "left" lights the face from the
image's left), each colour channel scaled to the face's own estimated light's L00 (so colour
and brightness stay, the direction changes). --from PHOTO uses the light estimated from the
first (largest) face of another photo instead: light transfer.
"""

EPILOG = """\
outputs (IN's tree mirrored under OUT), per picture STEM and face k:
  STEM_relit.png              the photo with every relit face pasted in (full resolution)
  STEM_face<k>_relit_crop.png the relit 128x128 face (masked)
  STEM_face<k>_relight_strip.png  with --steps N: N frames from the face's own light to the
                              target (row 1 shading, row 2 the face)
  STEM_face<k>_{normal,albedo,shading,residue,recon}.png, _light.txt: the decomposition
  manifest.jsonl              per input: status, faces (box, landmarks, score, transform)
A picture that is already a tight face crop (--faces auto) is used whole (STEM_relit.png,
STEM_relit_crop.png, no _face<k>). A picture without a face fails with "no face found".

exit codes: 0 all succeeded; 1 nothing usable; 2 command-line syntax error; 3 some inputs
failed (e.g. no face found), the others were written.
"""


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.cli.decompose import add_face_arguments

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="folder, picture, or text file listing pictures")
    p.add_argument("output", metavar="OUT", help="output folder (created; mirrors IN's tree)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--light", metavar="FILE|NAME", help="light file (27 or 9 values) or preset: "
                                                             "front, left, right, top")
    target.add_argument("--from", dest="from_photo", metavar="PHOTO",
                        help="use the light estimated from this photo's largest face")
    p.add_argument("--residue", choices=("keep", "drop"), default="keep",
                   help="methods 3-7: add the predicted residue to the new shading (keep, default) or not")
    p.add_argument("--steps", type=int, default=None, help="also write a strip of N frames, own light -> target")
    p.add_argument("--method", default=None, help="method id 0-7 or slug except 2 (default: the checkpoint's, else 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="CKPT", default=None,
                     help="checkpoint or registered name (see sfs-weights list; default: the method's default weights)")
    src.add_argument("--onnx", metavar="FILE", default=None,
                     help="an exported .onnx model (runs on --backend onnx, the default, or openvino)")
    add_plan_arguments(p)  # --backend, --device, --precision, --threads (sfs_fast.plan)
    p.add_argument("--masks", metavar="DIR", default=None, help="folder of masks, matched by path or stem")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of IN")
    p.add_argument("--batch-size", type=int, default=16, help="faces per model call (default: 16)")
    p.add_argument("--workers", type=int, default=None, help="decoder and encoder threads, each")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--max-pixels", type=float, default=None, help="refuse larger pictures (default: 100e6)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    add_face_arguments(p, paste=False)
    add_debug_flag(p)
    return p


def model_beta(dec) -> float:
    """How the model takes the residue from the albedo (1 for method 4's updated recon)."""
    model = getattr(dec, "model", None)
    if model is not None and hasattr(model, "beta"):
        return float(model.beta)
    return 1.0 if dec.method == 4 else 0.0


def light_from_photo(path, dec, face_options) -> np.ndarray:
    """The light the model estimates for the largest face of ``path`` (``[27]``)."""
    from sfs_fast import faces, images
    from sfs_fast.pipeline import Crop, infer

    try:
        photo = faces.load_picture(path)
    except images.ImageError as exc:
        raise CommandError(f"--from {path}: {exc}") from None
    plan = faces.plan_faces(photo, face_options.mode, max_faces=1, min_face_size=face_options.min_face_size)
    if plan.as_is:
        image, _, _ = images.load_image(path)
    elif plan.faces:
        image = plan.faces[0].image
    else:
        raise CommandError(f"--from {path}: {plan.reason}")
    return np.asarray(infer([Crop(image, "from")], dec)[0]["light"], np.float64)


def relight(args) -> int:
    from sfs_fast import faces
    from sfs_fast.cli.decompose import face_options_from
    from sfs_fast.face_folder import RelightOptions, face_preparer, relight_finisher
    from sfs_fast.pipeline import FolderOptions, decompose_folder, discover

    if args.steps is not None and args.steps < 2:
        raise CommandError("--steps must be at least 2", EXIT_USAGE)
    face_options = face_options_from(args)
    if face_options is None:  # no OpenCV: pasting back needs it whatever --faces says
        from sfs_fast.faces import FACES_EXTRA_HINT

        raise CommandError(FACES_EXTRA_HINT)
    target = None
    if args.light is not None:
        try:
            target = None if args.light in faces.PRESET_DIRECTIONS and not Path(args.light).is_file() \
                else faces.read_any_light(args.light)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--light {args.light}: neither a preset ({', '.join(faces.PRESET_DIRECTIONS)}) "
                               f"nor a readable light file ({exc})") from None
    options = checked_options(FolderOptions(recursive=args.recursive, masks=Path(args.masks) if args.masks else None,
                                            batch_size=args.batch_size, workers=args.workers,
                                            overwrite=args.overwrite, max_pixels=args.max_pixels))
    if options.masks is not None and not options.masks.is_dir():
        raise CommandError(f"--masks {options.masks}: no such folder")
    src, out_dir = Path(args.input), Path(args.output)
    items = discover(src, out_dir, recursive=options.recursive, masks=options.masks)
    if not items:
        raise CommandError(f"{src}: no pictures found" + ("" if args.recursive else " (use -r for sub-folders)"))
    t0 = time.perf_counter()
    dec = make_decomposer(args, PROG)
    if "light" not in dec.output_names:
        raise CommandError(f"method {dec.method} predicts no SH light, so it cannot be relit")
    if args.from_photo is not None:
        target = light_from_photo(args.from_photo, dec, face_options)
    load_s = time.perf_counter() - t0
    relight_options = RelightOptions(light=args.light or f"from {args.from_photo}", target=target,
                                     residue=args.residue, steps=args.steps, beta=model_beta(dec))
    progress = ProgressBar(len(items), prog=PROG)
    try:
        summary = decompose_folder(items, out_dir, dec, options, prepare=face_preparer(face_options, keep_photo=True),
                                   finish=relight_finisher(out_dir, relight_options), progress=progress)
    finally:
        progress.close()
    print_summary(summary, load_s, args.json, prog=PROG)
    return summary.exit_code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, relight, args)


if __name__ == "__main__":
    sys.exit(main())
