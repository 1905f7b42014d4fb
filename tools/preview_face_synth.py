"""Contact sheet of the mesh face generator, for a person to look at.

    python tools/preview_face_synth.py OUT.png [--n 16] [--seed 0] [--plain]

One row per sample, columns: face (what the network sees), albedo, normal, SH shading (the
target, one scale for the sheet), residue (face / albedo - SH shading inside the mask,
mid-grey = 0) and mask; column labels on top. ``--plain`` switches specular highlights,
occlusion, shadows and camera effects off (the residue column is then flat grey).
"""
import argparse
import sys

import numpy as np
from PIL import Image, ImageDraw

from sfs_fast.images import grid, residue_to_rgb, save_png, shading_to_rgb
from sfs_fast.training.face_synth import FaceSynthOptions, render_sample

COLUMNS = ("face", "albedo", "normal", "SH shading", "residue", "mask")


def sample_tiles(sample: dict) -> list:
    """uint8 ``[S,S,3]`` tiles of one sample in COLUMNS order."""
    mask = sample["mask"][0] > 0
    face = sample["face"][0].astype(np.float64) / 255.0
    albedo = sample["albedo"][0].astype(np.float64) / 255.0
    sh = sample["sh_shading"][0]
    residue = np.where(mask[..., None], face / np.maximum(albedo, 1e-3) - sh, 0.0).clip(-1.0, 1.0)
    chw = lambda a: np.moveaxis(a, -1, 0)  # noqa: E731 - the image helpers take [3,H,W]
    return [sample["face"][0], sample["albedo"][0], sample["normal"][0],
            shading_to_rgb(chw(sh), scale=1.5), residue_to_rgb(chw(residue), mask),
            np.repeat(sample["mask"][0][..., None], 3, -1)]


def labelled(sheet: np.ndarray, tile: int, pad: int = 2, band: int = 14) -> Image.Image:
    """The sheet with a band of column labels on top."""
    out = Image.new("RGB", (sheet.shape[1], sheet.shape[0] + band), "white")
    out.paste(Image.fromarray(sheet), (0, band))
    draw = ImageDraw.Draw(out)
    for c, name in enumerate(COLUMNS):
        draw.text((pad + c * (tile + pad) + 4, 1), name, fill="black")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="PNG to write")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="no specular, occlusion, shadows, camera")
    args = p.parse_args(argv)
    opts = FaceSynthOptions(specular=False, occlusion=False, shadows=False, camera=False) if args.plain else FaceSynthOptions()
    rows = [sample_tiles(render_sample(np.random.default_rng([args.seed, i]), opts)) for i in range(args.n)]
    # Two blocks of rows side by side keep the sheet about as wide as it is tall.
    half = (len(rows) + 1) // 2
    rows = [rows[i] + [None] + (rows[i + half] if i + half < len(rows) else []) for i in range(half)]
    sheet = grid(rows)
    img = labelled(sheet, opts.size)
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(COLUMNS):
        draw.text((2 + (len(COLUMNS) + 1 + c) * (opts.size + 2) + 4, 1), name, fill="black")
    save_png(args.out, np.asarray(img))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
