"""sfs-interpolate: the original ``interpolate.py`` dump (SPEC B.5) plus real lighting
interpolation (SPEC A.9): picture A's albedo and normals rendered under lights blended from
A's own light to B's (or to a light file) in N steps, saved as a strip."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sfs_fast.cli.common import (EXIT_USAGE, CommandError, add_debug_flag, finish, make_decomposer, prepared_pictures,
                                 run_command)
from sfs_fast.pipeline import Crop

PROG = "sfs-interpolate"

DESCRIPTION = """\
Per-picture decomposition dumps and lighting-interpolation strips.

IN is a folder of pictures (-r for sub-folders), one picture, or a text file listing
pictures; pictures are read as sfs-decompose reads them (EXIF orientation, any mode, center
crop to a square, or --fit pad, then 128x128). Pictures are numbered i = 0, 1, ... in sorted
order (OUT/inputs.txt maps numbers to files).

Dump (as the original interpolate.py, SPEC B.5), for picture i:
  i_face.png  i_normal.png ((n + 1) / 2)  i_albedo.png  i_shading.png  i_recon.png
  i_light.txt (27 SH coefficients, R|G|B blocks of 9; none for method 2)
  method extras: i_corrected_shading.png (1), i_residual.png and i_updated-shading.png
  (3-7; i_shading.png is then the SH-only shading), i_updated-albedo.png (4).

Strip (i_relight.png, unless --no-strips; needs SH light, so not for method 2): picture A's
albedo and unit normals shaded with lights L_t = (1 - t) L_A + t L_B, t = 0 .. 1 in --steps
steps. L_B is the light of --target PICTURE, of --light FILE (SfSNet light-file format), or
by default the light of the next picture (the last one goes to the first). Row 1 is the
shading (one display scale for the whole strip), row 2 the rendered face shading x albedo.
The residue of methods 3-7 is NOT kept in the strip: it was predicted for A's own light,
so the strip shows the pure SH relighting (for method 4 with the plain albedo).
"""

EPILOG = """\
exit codes: 0 success; 1 nothing usable (bad arguments, no pictures, every picture
failed); 2 command-line syntax error; 3 some pictures failed, the others were written.
"""


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.plan import add_plan_arguments

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="folder, picture, or text file listing pictures")
    p.add_argument("output", metavar="OUT", help="output folder")
    p.add_argument("--method", default=None, help="method id 0-7 or slug (default: the checkpoint's, else 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="CKPT", default=None, help="checkpoint or registered name such as sfsnet (see sfs-weights list); "
                                                                            "default: as sfs-decompose")
    src.add_argument("--onnx", metavar="FILE", default=None,
                     help="an exported .onnx model (runs on --backend onnx, the default, or openvino)")
    add_plan_arguments(p)  # --backend, --device, --precision, --threads (sfs_fast.plan)
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of IN")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="non-square pictures: crop or pad")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", metavar="PICTURE", default=None,
                        help="blend every picture's light towards this picture's light")
    target.add_argument("--light", metavar="FILE", default=None,
                        help="blend towards this light file (27 floats, SfSNet format)")
    p.add_argument("--steps", type=int, default=7, help="pictures per strip, ends included (default: 7)")
    p.add_argument("--no-strips", action="store_true", help="only the per-picture dumps")
    p.add_argument("--batch-size", type=int, default=16, help="pictures per model call (default: 16)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_debug_flag(p)
    return p


def relight_strip(normal, albedo, light_a, light_b, steps: int):
    """Render ``steps`` frames of unit ``normal`` and ``albedo`` ``[3,H,W]`` under lights
    blended linearly from ``light_a`` to ``light_b`` ``[27]``.

    Returns ``(shading, recon)``, each float32 ``[steps,3,H,W]``."""
    import torch

    from sfs_fast.kernels import sh_shade

    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float32)[:, None]
    a = torch.as_tensor(light_a, dtype=torch.float32).reshape(1, 27)
    b = torch.as_tensor(light_b, dtype=torch.float32).reshape(1, 27)
    lights = (1.0 - t) * a + t * b
    n = torch.as_tensor(normal, dtype=torch.float32).expand(steps, -1, -1, -1).contiguous()
    alb = torch.as_tensor(albedo, dtype=torch.float32).expand(steps, -1, -1, -1).contiguous()
    shading, recon = sh_shade(n, lights, None, alb)
    return shading, recon


def read_pictures(args) -> tuple[list, int]:
    """The pictures of IN prepared as sfs-decompose prepares them; failures are reported on
    stderr. Returns ``(pictures with one crop each, number failed)``."""
    from sfs_fast import pipeline

    items = pipeline.discover(Path(args.input), Path(args.output), recursive=args.recursive)
    if not items:
        raise CommandError(f"{args.input}: no pictures found")
    options = pipeline.FolderOptions(fit=args.fit)
    for item in items:
        item.mask = None  # the dumps are unmasked, as in the original interpolate.py
    return prepared_pictures(items, lambda item: pipeline.prepare_picture(item, options), PROG)


def dump_images(face, o: dict, residue_method: bool) -> dict:
    """The original interpolate.py's pictures of one decomposition: kind -> uint8 RGB."""
    from sfs_fast import images

    dump = {
        "face": images.unit_to_rgb(face),
        "normal": images.normal_to_rgb(o["normal"]),
        "albedo": images.unit_to_rgb(o["albedo"]),
        "shading": images.shading_to_rgb(o["sh_shading"] if residue_method else o["shading"]),
        "recon": images.unit_to_rgb(o["recon"]),
    }
    if "corrected_shading" in o:
        dump["corrected_shading"] = images.shading_to_rgb(o["corrected_shading"])
    if residue_method:
        dump["residual"] = images.residue_to_rgb(o["residue"])
        dump["updated-shading"] = images.shading_to_rgb(o["shading"])
    if "updated_albedo" in o:
        dump["updated-albedo"] = images.unit_to_rgb(o["updated_albedo"])
    return dump


def strip_image(o: dict, light_b, steps: int):
    """The relighting strip of one decomposition towards ``light_b``: uint8 RGB."""
    from sfs_fast import images

    shading, recon = relight_strip(o["normal"], o["albedo"], o["light"], light_b, steps)
    scale = float(shading.max())
    rows = [[images.shading_to_rgb(s, scale=scale) for s in shading.numpy()],
            [images.unit_to_rgb(r) for r in recon.numpy()]]
    return images.grid(rows, col_labels=images.step_labels(steps), row_labels=["shading", "face"])


def interpolate(args) -> int:
    from sfs_fast import images
    from sfs_fast.pipeline import decompose_crops
    from sfs_fast.sh import format_light, read_light

    if args.steps < 2:
        raise CommandError("--steps must be at least 2", EXIT_USAGE)
    out_dir = Path(args.output)
    pictures, failed = read_pictures(args)
    target_light = read_light(args.light) if args.light else None
    target_image = None
    if args.target:
        try:
            target_image, _, _ = images.load_image(args.target, fit=args.fit)
        except images.ImageError as exc:
            raise CommandError(f"--target {args.target}: {exc}") from None

    dec = make_decomposer(args, PROG)
    has_light = "light" in dec.output_names
    strips = not args.no_strips
    if strips and not has_light:
        print(f"{PROG}: note: method {dec.method} predicts no SH light; writing dumps only", file=sys.stderr)
        strips = False
    out_dir.mkdir(parents=True, exist_ok=True)
    crops = [p.crops[0] for p in pictures]
    outs = decompose_crops(crops, dec, args.batch_size)
    if target_image is not None:
        target_light = decompose_crops([Crop(target_image, "target")], dec)[0]["light"]

    residue_method = "residue" in dec.output_names
    for i, (crop, o) in enumerate(zip(crops, outs)):
        for kind, rgb in dump_images(crop.image, o, residue_method).items():
            images.save_png(out_dir / f"{i}_{kind}.png", rgb)
        if has_light:
            images.save_text(out_dir / f"{i}_light.txt", format_light(o["light"]))
        if strips:
            light_b = target_light if target_light is not None else outs[(i + 1) % len(outs)]["light"]
            images.save_png(out_dir / f"{i}_relight.png", strip_image(o, light_b, args.steps))
    images.save_text(out_dir / "inputs.txt", "".join(f"{i}\t{p.item.path}\n" for i, p in enumerate(pictures)))

    summary = {"ok": len(pictures), "failed": failed, "method": dec.method, "backend": dec.backend,
               "precision": dec.precision, "plan_reason": dec.plan_reason, "strips": strips,
               "steps": args.steps, "output": str(out_dir)}
    return finish(summary, args.json, f"{PROG}: {len(pictures)} pictures dumped{' with strips' if strips else ''}, "
                  f"{failed} failed ({dec.backend} {dec.precision}, {dec.plan_reason}); output in {out_dir}", failed)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, interpolate, args)


if __name__ == "__main__":
    sys.exit(main())
