"""sfs-compare: the seed's "results samples comparison across the experiments": per face, one
labelled picture with a row per method and the columns face, normal, albedo, SH shading,
residue, shading and reconstruction."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sfs_fast.cli.common import (EXIT_USAGE, CommandError, add_debug_flag, checked_options, checked_plan, finish,
                                 prepared_pictures, run_command)

PROG = "sfs-compare"

DESCRIPTION = """\
Decompose each face with several methods and write one labelled comparison picture per face.

IN is a folder of pictures (-r for sub-folders), one picture, or a text file listing
pictures; faces are found and cropped as sfs-decompose does (--faces). Each method runs its
default weights (the bundled ones; for method 0 the official SfSNet once downloaded with
sfs-weights download sfsnet) through the same Decomposer and run plan as sfs-decompose.

Writes OUT/STEM_compare.png (STEM_face<k>_compare.png per detected face): one row per method,
columns face | normal | albedo | SH shading | residue | shading | recon. A method without
that output leaves its cell blank (method 2 has no SH light; methods 0-2 no residue). The two
shading columns of a row share one display scale; the residue is signed (mid-grey is zero).
"""

EPILOG = """\
exit codes: 0 success; 1 nothing usable (bad arguments, no pictures, every picture
failed); 2 command-line syntax error; 3 some pictures failed, the others were written.
"""

COLUMNS = ("face", "normal", "albedo", "SH shading", "residue", "shading", "recon")


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.cli.decompose import add_face_arguments
    from sfs_fast.plan import add_plan_arguments

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="folder, picture, or text file listing pictures")
    p.add_argument("output", metavar="OUT", help="output folder")
    p.add_argument("--methods", default="0-7", help="methods to compare: ids or ranges, e.g. 0-7 or 0,3,5 (default 0-7)")
    add_plan_arguments(p)  # --backend, --device, --precision, --threads (sfs_fast.plan)
    add_face_arguments(p, paste=False)
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of IN")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="non-square pictures: crop or pad")
    p.add_argument("--batch-size", type=int, default=16, help="faces per model call (default: 16)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_debug_flag(p)
    return p


def parse_methods(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"``, ``"1-3,6"`` -> sorted unique method ids; one line for anything else."""
    from sfs_fast.models import METHODS

    ids = []
    try:
        for part in filter(None, (x.strip() for x in text.split(","))):
            lo, _, hi = part.partition("-")
            ids += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise CommandError(f"--methods: expected ids or ranges such as 0-7 or 0,3,5, got {text!r}",
                           EXIT_USAGE) from None
    unknown = sorted(set(ids) - set(METHODS))
    if not ids or unknown:
        raise CommandError(f"--methods: choose from {min(METHODS)}-{max(METHODS)} (got {text!r})", EXIT_USAGE)
    return sorted(set(ids))


def read_crops(args) -> tuple[list, int]:
    """The face crops of IN (sfs-decompose's preparer), and how many pictures failed."""
    from sfs_fast import pipeline
    from sfs_fast.cli.decompose import face_options_from

    items = pipeline.discover(Path(args.input), Path(args.output), recursive=args.recursive)
    if not items:
        raise CommandError(f"{args.input}: no pictures found")
    options = checked_options(pipeline.FolderOptions(fit=args.fit))
    face_options = face_options_from(args) if args.faces != "off" else None
    if face_options is not None:
        from sfs_fast.face_folder import face_preparer

        prepare = face_preparer(face_options)
    else:
        prepare = pipeline.prepare_picture
    pictures, failed = prepared_pictures(items, lambda item: prepare(item, options), PROG)
    return [crop for picture in pictures for crop in picture.crops], failed


def method_row(crop, outputs: dict) -> list:
    """One method's tiles of one face in :data:`COLUMNS` order (None where it has no such output)."""
    import numpy as np

    from sfs_fast import images

    mask = crop.mask
    shadings = [outputs[k] for k in ("sh_shading", "shading") if k in outputs]
    weight = 1.0 if mask is None else np.asarray(mask, np.float32)[None]
    scale = max(float(np.max(np.asarray(s) * weight)) for s in shadings)
    tile = {
        "face": images.unit_to_rgb(crop.image),
        "normal": images.normal_to_rgb(outputs["normal"], mask),
        "albedo": images.unit_to_rgb(outputs["albedo"], mask),
        "SH shading": images.shading_to_rgb(outputs["sh_shading"], mask, scale=scale) if "sh_shading" in outputs else None,
        "residue": images.residue_to_rgb(outputs["residue"], mask) if "residue" in outputs else None,
        "shading": images.shading_to_rgb(outputs["shading"], mask, scale=scale),
        "recon": images.unit_to_rgb(outputs["recon"], mask),
    }
    return [tile[c] for c in COLUMNS]


def compare(args) -> int:
    from sfs_fast import images
    from sfs_fast.cli.common import print_notes
    from sfs_fast.decomposer import Decomposer
    from sfs_fast.models import METHODS
    from sfs_fast.pipeline import decompose_crops

    methods = parse_methods(args.methods)
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1", EXIT_USAGE)
    plan = checked_plan(args)  # one plan for every method; auto decides per method's weights
    crops, failed = read_crops(args)
    rows, plans = {c.stem: [] for c in crops}, {}
    for m in methods:
        dec = Decomposer(method=m, plan=plan)
        print_notes([f"method {m}: {n}" for n in dec.notes], PROG)
        plans[m] = f"{dec.backend} {dec.precision}"
        for crop, outputs in zip(crops, decompose_crops(crops, dec, args.batch_size)):
            rows[crop.stem].append(method_row(crop, outputs))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [f"{m} {METHODS[m].slug}" for m in methods]
    for stem, sheet_rows in rows.items():
        sheet = images.grid(sheet_rows, col_labels=COLUMNS, row_labels=labels)
        images.save_png(out_dir / f"{stem}_compare.png", sheet)
    summary = {"faces": len(crops), "failed": failed, "methods": methods, "plans": plans, "output": str(out_dir)}
    return finish(summary, args.json, f"{PROG}: {len(crops)} faces x {len(methods)} methods, "
                  f"{failed} pictures failed; figures in {out_dir}", failed)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, compare, args)
