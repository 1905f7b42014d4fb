"""sfs-decompose: decompose a folder (or a list, or one picture) of faces into normals,
albedo, SH light, shading, residue and reconstruction, robustly and fast.

The command is argument parsing, one call of :func:`sfs_fast.pipeline.decompose_folder` (the
folder pipeline: decoding ahead, batching, inference, atomic writes, manifest, resume) and the
summary line. ``--engine ray`` runs the same stages on Ray (:mod:`sfs_fast.ray_engine`,
imported only then: the local engine never loads Ray).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sfs_fast.cli.common import EXIT_USAGE, CommandError, add_debug_flag, checked_options, make_decomposer, run_command
from sfs_fast.pipeline import FORMATS, FolderOptions, Summary, decompose_folder, discover
from sfs_fast.plan import add_plan_arguments

PROG = "sfs-decompose"

DESCRIPTION = """\
Decompose face pictures into normals, albedo, SH lighting, shading, residue and
reconstruction with one of the eight methods (0 = SfSNet, 1-7 = residue methods).

IN is a folder (pictures directly inside it; -r for sub-folders), one picture, or a text
file listing pictures (one path a line, relative to the list file; '#' starts a comment).
In a folder, files with a picture extension (.png .jpg .jpeg .bmp .tif .webp ...) are
inputs; the format itself is recognised by content, not by the extension. Files named
NAME_mask.* are masks, never inputs.

Pre-processing: EXIF orientation is applied; grey, palette, RGBA (alpha dropped), CMYK and
16-bit pictures become 8-bit RGB. Pictures that are not square are CENTER-CROPPED to the
square of side min(W,H) by default (--fit pad pads them with black to side max(W,H)
instead); the square is resized to 128x128. The square's box (left, top, right, bottom) in
the upright picture's pixels is kept in the manifest as "crop".

Faces (--faces, default auto): "detect" finds every face (YuNet, OpenCV), aligns each to
the SfSNet crop framing with a similarity transform from its 5 landmarks and decomposes it
as STEM_face<k> (k = 0 for the largest face), masked by the user's mask warped with the face
or else by a template face mask; "off" uses the whole picture as described above; "auto"
uses the whole picture when it already is a tight face crop and detects otherwise. A
picture is taken as a crop when its long side is at most 256 px, it is square within 10%,
and YuNet finds either no face or one face whose alignment is close to identity on the
picture resized to 128 (scale 0.7-1.4, rotation within 15 degrees, landmarks' centre within
20 px of the template's); so the bundled examples/faces give exactly what --faces off
gives. A picture in which no face is found fails with the reason "no face found".
--paste writes the reconstruction and the shading blended back into the full-resolution
photo through each face's feathered mask (pixels outside the masks are the photo's).

Engines: "local" (default) decodes and encodes on threads of this process; "ray" runs the
same stages on a Ray cluster (pip install "sfs_fast[ray]"): decoding in Ray tasks, a pool of
--actors actors each holding the model (--actor-cpus CPUs and --actor-gpus GPUs each), the
same output files and one manifest, written by this process as results come back. --address
empty starts a local Ray; "auto" joins the cluster of this machine (ray start --head);
HOST:PORT or ray://HOST:PORT a remote head. IN and OUT must be at the same path on every node.

Masks: --masks DIR matches masks by relative path or stem (STEM.* or STEM_mask.*); without
it, NAME_mask.* beside the picture is used (and, for SfSNet's NAME_face.png, NAME_mask.*).
A mask gets the same crop and resize as its picture and multiplies the picture outputs
(black background); the .npy outputs stay unmasked and the resized mask is saved as
STEM_mask.npy.
"""

EPILOG = """\
outputs (the input tree is mirrored under OUT):
  STEM_normal.png    unit normals mapped to RGB as (n + 1) / 2
  STEM_albedo.png    albedo, clipped to [0, 1]
  STEM_shading.png   shading divided by its maximum over the picture (display only)
  STEM_residue.png   signed shading residue, 0.5 + r / (2 max|r|) (methods 3-7)
  STEM_recon.png     reconstruction shading x albedo, clipped to [0, 1]
  STEM_light.txt     27 SH coefficients, R|G|B blocks of 9, one tab-separated line
                     (the SfSNet light-file format; none for method 2)
  STEM_NAME.npy      with --formats png,npy: every float output of the model, unmasked
  STEM_face<k>_*     the same files per detected face k (--faces detect, or auto on a photo)
  STEM_paste_recon.png, STEM_paste_shading.png
                     with --paste: the reconstruction / shading pasted into the photo
  manifest.jsonl     one JSON line per input: status ok/skipped/failed, reason, crop,
                     timings, outputs; with faces: size, faces (mode, count), and per face
                     under "crops": box, landmarks, score, transform, inverse, scale,
                     rotation_deg
  grids/             with --grid: a contact sheet per batch (face, normal, albedo,
                     shading, [residue], recon per row)

Inputs whose outputs would share a name (a.jpg and a.png in one folder) are all processed,
each with its extension in the output stem: a_jpg_normal.png, a_png_normal.png (an input
named alone keeps the plain stem).

A rerun skips inputs whose outputs all exist (--overwrite redoes them) and retries failed
ones. Ctrl-C (SIGINT) or SIGTERM stops after the batch in flight: its outputs are finished,
the manifest written and the summary printed, exit code 130 (SIGINT) or 143 (SIGTERM); the
rerun picks up the rest. A second Ctrl-C stops at once (still no half-written files). Unreadable, empty, truncated, corrupt, non-picture and oversized (--max-pixels)
inputs are reported (manifest and one stderr line) and skipped; the rest is processed.

exit codes:
  0  every input succeeded (or was already done)
  1  nothing usable: bad arguments, no inputs, a model that cannot be loaded, or every
     input failed; with --engine ray also: no Ray, an unreachable cluster, or a run lost
     after its retries (the rows written so far stay; a rerun does the rest)
  2  command-line syntax error (argparse)
  3  partial failure: some inputs failed, the others were processed
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="folder, picture, or text file listing pictures")
    p.add_argument("output", metavar="OUT", help="output folder (created; mirrors IN's tree)")
    p.add_argument("--method", default=None,
                   help="method id 0-7 or slug (default: the checkpoint's, else 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="CKPT", default=None,
                     help="checkpoint (.safetensors, or .pth/.pkl/.caffemodel.h5 imported on the fly) or a "
                          "registered name (sfsnet, demo-0 ... demo-7: see sfs-weights list); default: the "
                          "cached official SfSNet for method 0, else the bundled demo weights of the method")
    src.add_argument("--onnx", metavar="FILE", default=None,
                     help="an exported .onnx model (runs on --backend onnx, the default, or openvino)")
    add_plan_arguments(p)  # --backend, --device, --precision, --threads (sfs_fast.plan)
    p.add_argument("--masks", metavar="DIR", default=None, help="folder of masks, matched by path or stem")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of IN")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop",
                   help="non-square pictures: center crop (default) or pad with black to a square")
    p.add_argument("--batch-size", type=int, default=16, help="pictures per model call (default: 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoder threads and encoder threads, each (default: min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--formats", default="png",
                   help="comma-separated output formats: png (pictures + light file), npy (float arrays); "
                        "default: png")
    p.add_argument("--grid", action="store_true", help="also write a contact sheet per batch under OUT/grids/")
    p.add_argument("--max-pixels", type=float, default=None,
                   help="refuse pictures with more pixels than this (default: 100e6)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    add_engine_arguments(p)
    add_face_arguments(p)
    add_debug_flag(p)
    return p


RAY_FLAGS = {"address": "--address", "actors": "--actors", "actor_cpus": "--actor-cpus", "actor_gpus": "--actor-gpus"}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray engine's flags (``sfs_fast.ray_engine``)."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): this process; ray: a Ray cluster (needs sfs_fast[ray])")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); empty (default): start a local Ray")
    g.add_argument("--actors", type=int, default=None, metavar="N",
                   help="ray: model actors (default: as many as the cluster's GPUs or CPUs hold)")
    g.add_argument("--actor-cpus", type=float, default=None, metavar="C",
                   help="ray: CPUs per actor, also its thread count (default 1)")
    g.add_argument("--actor-gpus", type=float, default=None, metavar="G",
                   help="ray: GPUs per actor, fractions share a GPU (default: 1 with --device cuda, else 0)")


def ray_options_from(args):
    """The :class:`~sfs_fast.ray_engine.RayOptions` of ``args`` (Ray not imported yet);
    one-line errors for flags that do not fit the engine."""
    given = [flag for name, flag in RAY_FLAGS.items() if getattr(args, name) is not None]
    if args.engine != "ray":
        if given:
            raise CommandError(f"{', '.join(given)}: options of --engine ray")
        return None
    if args.actors is not None and args.actors < 1:
        raise CommandError(f"--actors must be at least 1 (got {args.actors})")
    if args.actor_cpus is not None and not args.actor_cpus > 0:
        raise CommandError(f"--actor-cpus must be more than 0 (got {args.actor_cpus:g})")
    if args.actor_gpus is not None and args.actor_gpus < 0:
        raise CommandError(f"--actor-gpus must be >= 0 (got {args.actor_gpus:g})")
    for flag, value in (("--grid", args.grid), ("--workers", args.workers is not None)):
        if value:
            raise CommandError(f"{flag} is an option of the local engine (Ray schedules the workers)")
    from sfs_fast.ray_engine import RayOptions

    return RayOptions(address=args.address or "", actors=args.actors, actor_cpus=args.actor_cpus or 1.0,
                      actor_gpus=args.actor_gpus, debug=args.debug)


def add_face_arguments(p: argparse.ArgumentParser, paste: bool = True) -> None:
    """``--faces --max-faces --min-face-size`` (and ``--paste``), shared with sfs-relight."""
    g = p.add_argument_group("faces")
    g.add_argument("--faces", choices=("auto", "detect", "off"), default="auto",
                   help="auto (default): detect faces unless the picture already is a tight face crop; "
                        "detect: always; off: the whole picture as one crop")
    g.add_argument("--max-faces", type=int, default=None, help="at most this many faces per picture, largest first")
    g.add_argument("--min-face-size", type=float, default=0.0,
                   help="ignore faces whose box is smaller than this many pixels (longer side; default 0)")
    if paste:
        g.add_argument("--paste", action="store_true",
                       help="also write STEM_paste_recon.png and STEM_paste_shading.png: the results "
                            "blended back into the full-resolution photo")


def _check_face_values(args) -> None:
    if args.max_faces is not None and args.max_faces < 1:
        raise CommandError("--max-faces must be at least 1")
    if args.min_face_size < 0:
        raise CommandError("--min-face-size must be >= 0")


def face_options_from(args):
    """The :class:`~sfs_fast.face_folder.FaceOptions` of ``args``; a one-line error for bad values."""
    _check_face_values(args)
    try:
        from sfs_fast.face_folder import FaceOptions
        import cv2  # noqa: F401 - only to fail here, before the model loads
    except ImportError:
        if args.faces == "off" and not getattr(args, "paste", False):
            return None
        from sfs_fast.faces import FACES_EXTRA_HINT

        raise CommandError(f"--faces {args.faces}: {FACES_EXTRA_HINT} (or use --faces off)") from None
    return FaceOptions(args.faces, args.max_faces, args.min_face_size, getattr(args, "paste", False))


def face_hooks(args, out_dir: Path) -> dict:
    """``prepare``/``finish`` for decompose_folder: none with --faces off and no --paste (the
    default preparer, whose resume also knows outputs without a manifest line)."""
    if args.faces == "off" and not args.paste:  # no detector: OpenCV and sfs_fast.faces stay unimported
        _check_face_values(args)
        return {}
    face_options = face_options_from(args)  # a detector or a paste: OpenCV is there, or this raised
    from sfs_fast.face_folder import face_preparer, paste_finisher

    hooks = {"prepare": face_preparer(face_options, keep_photo=face_options.paste)}
    if face_options.paste:
        hooks["finish"] = paste_finisher(out_dir)
    return hooks


def parse_formats(text: str) -> tuple:
    """``png,npy`` -> ``("png", "npy")``; a one-line error for anything else."""
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not formats or not set(formats) <= set(FORMATS):
        raise CommandError(f"--formats: choose from {', '.join(FORMATS)} (got {text!r})", EXIT_USAGE)
    return formats


class ProgressBar:
    """The run's progress hook: a tqdm bar on a terminal, one stderr line per failed input."""

    def __init__(self, total: int, prog: str = PROG):
        from tqdm import tqdm

        self.prog = prog
        self.on_terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="img", disable=not self.on_terminal, file=sys.stderr, dynamic_ncols=True)

    def say(self, line: str) -> None:
        if self.on_terminal:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def __call__(self, row: dict) -> None:
        self.bar.update(1)
        if row["status"] == "failed":
            self.say(f"{self.prog}: failed {row['path']}: {row['reason']}")

    def close(self) -> None:
        self.bar.close()


def print_summary(summary: Summary, load_s: float, as_json: bool, prog: str = PROG) -> None:
    """The last line of a run: JSON on stdout, or one sentence on stderr."""
    data = {**summary.to_dict(), "load_s": round(load_s, 3)}
    stopped = (f"interrupted by {summary.interrupted} ({summary.remaining} inputs left for a rerun); "
               if summary.interrupted else "")
    if as_json:
        print(json.dumps(data))
        if stopped:  # a stopped run says so where people look, whatever the format
            print(f"{prog}: {stopped.rstrip('; ')}", file=sys.stderr)
        return
    wall, ok = data["wall_s"], summary.ok
    rate = f", {data['images_per_s']:.1f} images/s" if ok and data["images_per_s"] else ""
    why = f", {data['plan_reason']}" if data.get("plan_reason") else ""
    print(f"{prog}: {stopped}{ok} ok, {summary.skipped} skipped, {summary.failed} failed in {wall:.1f} s{rate} "
          f"({data['backend']} {data['precision'] or 'fp32'}{why}); manifest {summary.manifest}", file=sys.stderr)


def decompose(args) -> int:
    ray_options = ray_options_from(args)
    options = checked_options(FolderOptions(
        recursive=args.recursive, masks=Path(args.masks) if args.masks else None, fit=args.fit,
        batch_size=args.batch_size, workers=args.workers, overwrite=args.overwrite,
        formats=parse_formats(args.formats), grid=args.grid, max_pixels=args.max_pixels))
    if options.masks is not None and not options.masks.is_dir():
        raise CommandError(f"--masks {options.masks}: no such folder")
    src, out_dir = Path(args.input), Path(args.output)
    hooks = face_hooks(args, out_dir)
    # inputs first: a wrong IN is reported before the model loads
    items = discover(src, out_dir, recursive=options.recursive, masks=options.masks)
    if not items:
        raise CommandError(f"{src}: no pictures found" + ("" if args.recursive else " (use -r for sub-folders)"))
    if ray_options is not None:
        return decompose_on_ray(args, items, out_dir, options, hooks, ray_options)
    t0 = time.perf_counter()
    dec = make_decomposer(args, PROG)
    load_s = time.perf_counter() - t0
    progress = ProgressBar(len(items))
    try:
        summary = decompose_folder(items, out_dir, dec, options, progress=progress, **hooks)
    finally:
        progress.close()
    print_summary(summary, load_s, args.json)
    return summary.exit_code


def decompose_on_ray(args, items, out_dir: Path, options: FolderOptions, hooks: dict, ray_options) -> int:
    """The run on Ray: the model is loaded here once and shipped to the actors, which build
    their Decomposers from it and the plan of the flags."""
    from sfs_fast.cli.common import checked_plan, make_model_source
    from sfs_fast.ray_engine import check_reachable, decompose_folder_ray, import_ray

    import_ray()  # a missing Ray, bad flags or an unreachable cluster: one line, before the model loads
    plan = checked_plan(args)
    ray_options = ray_options.checked(plan)
    if ray_options.address not in ("", "auto"):
        check_reachable(ray_options.address)
    t0 = time.perf_counter()
    model = make_model_source(args, PROG)
    load_s = time.perf_counter() - t0
    progress = ProgressBar(len(items))
    try:
        summary = decompose_folder_ray(items, out_dir, model, plan, options, ray_options=ray_options,
                                       progress=progress, **hooks)
    finally:
        progress.close()
    print_summary(summary, load_s, args.json)
    return summary.exit_code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, decompose, args)


if __name__ == "__main__":
    sys.exit(main())
