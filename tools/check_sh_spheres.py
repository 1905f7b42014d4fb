"""Check the SH convention against spheres rendered by an independent renderer (DPR).

    python tools/check_sh_spheres.py DIR

DIR holds ``rotate_light_0K.txt`` (9 grey SH values, DPR/shtools order) and
``sphere_light_0K.png`` (the sphere DPR rendered from each). The rendering recipe: 256x256
grid, x across columns from -1 to 1, z down rows from 1 to -1, y = -sqrt(1 - x^2 - z^2)
inside the disc and a zero normal outside; shading of 0.7 * light over all pixels, clipped
at its 95th percentile, min-max scaled, times 255, cast to uint8, masked. Prints the largest
grey-level difference per sphere; exits 1 if any exceeds 1.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfs_fast.kernels import sh_shade
from sfs_fast.sh import dpr_to_sfsnet, grey_light


def render_sphere(light9_dpr) -> np.ndarray:
    x = np.linspace(-1, 1, 256)
    z = np.linspace(1, -1, 256)
    gx, gz = np.meshgrid(x, z)
    valid = gx**2 + gz**2 <= 1
    gy = np.where(valid, -np.sqrt(np.clip(1 - gx**2 - gz**2, 0, None)), 0.0)
    normal = np.stack([np.where(valid, gx, 0.0), gy, np.where(valid, gz, 0.0)])
    light = grey_light(dpr_to_sfsnet(light9_dpr)) * 0.7
    # normalize=False keeps the zero normals outside the disc as the renderer does;
    # inside, the normals are unit already.
    shading, _ = sh_shade(torch.from_numpy(normal)[None], torch.from_numpy(light)[None],
                          normalize=False, backend="reference")
    s = shading[0, 0].numpy()
    s = np.minimum(s, np.percentile(s, 95))
    s = (s - s.min()) / (s.max() - s.min())
    return (255 * s).astype(np.uint8) * valid


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    worst = 0
    lights = sorted(folder.glob("rotate_light_*.txt"))
    if not lights:
        print(f"{folder}: no rotate_light_*.txt files", file=sys.stderr)
        return 1
    for light_file in lights:
        picture = folder / light_file.name.replace("rotate_light", "sphere_light").replace(".txt", ".png")
        ref = np.asarray(Image.open(picture)).astype(np.int32)
        ref = ref[..., 0] if ref.ndim == 3 else ref
        diff = int(np.abs(render_sphere(np.loadtxt(light_file)).astype(np.int32) - ref).max())
        worst = max(worst, diff)
        print(f"{picture.name}: max difference {diff} grey levels")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
