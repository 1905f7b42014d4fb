"""``sfs-bench faces``: what faces in the wild cost per picture, beside the model.

    sfs-bench faces [--faces 1,6] [--method 0] [--backend fused] [--runs 20] [--json OUT]

On a 1024x768 photo holding 1 and 6 faces (copies of matplotlib's public-domain
``grace_hopper.jpg`` at known scales and rotations on a noisy gradient), per picture:
``detect`` (YuNet on the photo shrunk to 640 px plus the per-face landmark refinement),
``align`` (warp and mask every face), ``paste`` (feather and blend one 128x128 result per
face back into the photo) and ``model`` (one Decomposer call on all of the picture's crops).
Median of ``--runs`` timed runs after ``--warmup``; every run is checked (the faces are found,
the paste leaves the photo outside the masks as it was).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

PROG = "sfs-bench faces"
SIZE = (1024, 768)
# (scale, rotation in degrees, centre) of up to six copies, one per cell of a 3x2 grid
PLACEMENTS = [(0.45, 0, (170, 192)), (0.5, 20, (512, 192)), (0.4, -20, (853, 192)),
              (0.55, 10, (170, 576)), (0.35, -10, (512, 576)), (0.5, 0, (853, 576))]


def group_photo(n: int, seed: int = 0) -> np.ndarray:
    """A ``uint8 [768,1024,3]`` photo with ``n`` (1..6) faces; the one-face photo holds a
    copy at 1.2x, the size of a portrait's face in a 1024 px picture."""
    import cv2
    from matplotlib import cbook
    from PIL import Image

    if not 1 <= n <= len(PLACEMENTS):
        raise CommandError(f"--faces: expected 1..{len(PLACEMENTS)}, got {n}", 2)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        face = np.asarray(im.convert("RGB"))
    w, h = SIZE
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:h, 0:w][1]
    photo = np.clip((60 + 80 * xx / w)[..., None] * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 4, (h, w, 3)),
                    0, 255).astype(np.uint8)
    placements = [(1.2, 0, (w / 2, h / 2))] if n == 1 else PLACEMENTS[:n]
    fh, fw = face.shape[:2]
    for scale, degrees, centre in placements:
        p = cv2.getRotationMatrix2D(((fw - 1) / 2, (fh - 1) / 2), degrees, scale)
        p[:, 2] += np.asarray(centre) - ((fw - 1) / 2, (fh - 1) / 2)
        warped = cv2.warpAffine(face, p, (w, h))
        cover = cv2.warpAffine(np.ones((fh, fw), np.float32), p, (w, h)) > 0.999
        photo[cover] = warped[cover]
    return photo


def _timed(fn, warmup: int, runs: int) -> tuple:
    """``fn()`` warmup times, then runs times: (summary in ms, the last result)."""
    import time

    from sfs_fast.bench.timing import summarize

    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return summarize(times), out


def measure(n: int, decomposer, warmup: int, runs: int) -> dict:
    """The four stages on the ``n``-face photo -> ``{stage: timing summary}``, checked."""
    import torch

    from sfs_fast import faces

    photo = group_photo(n)
    detect, found = _timed(lambda: faces.detect_faces(photo), warmup, runs)
    if len(found) != n:
        raise CommandError(f"the {n}-face photo gave {len(found)} faces")
    align, aligned = _timed(lambda: faces.align_faces(photo, found), warmup, runs)
    batch = torch.from_numpy(np.stack([a.image for a in aligned]))
    model, out = _timed(lambda: decomposer.decompose(batch), warmup, runs)
    recon = out["recon"].float().clamp(0, 1).numpy()

    def paste():
        pieces = [(a.matrix, recon[i], faces.feather(a.mask)) for i, a in enumerate(aligned)]
        return faces.paste(photo, pieces)

    paste_t, (composite, weight) = _timed(paste, warmup, runs)
    if not np.array_equal(composite[weight == 0], photo[weight == 0]):
        raise CommandError("paste changed pixels outside the masks")
    return {"detect": detect, "align": align, "paste": paste_t, "model": model}


def format_table(rows: list) -> str:
    """Plain-text table: ms per picture, median (p10-p90), and the face work's share."""
    lines = [f"{'faces':>5}  {'detect':>16}  {'align':>16}  {'paste':>16}  {'model':>16}  face work / model"]
    for row in rows:
        t = row["timings"]
        cells = [f"{t[k]['median']:7.1f} ({t[k]['p10']:.0f}-{t[k]['p90']:.0f})" for k in
                 ("detect", "align", "paste", "model")]
        work = sum(t[k]["median"] for k in ("detect", "align", "paste"))
        lines.append(f"{row['faces']:>5}  " + "  ".join(f"{c:>16}" for c in cells)
                     + f"  {work:.1f} / {t['model']['median']:.1f} ms = {work / t['model']['median']:.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--faces", default="1,6", help="face counts of the photos, comma-separated (1..6; default 1,6)")
    p.add_argument("--method", default="0", help="method of the model beside it (default 0, bundled demo weights)")
    p.add_argument("--backend", default="fused", choices=("eager", "fused", "compile", "onnx"))
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (torch and OpenCV)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    add_debug_flag(p)
    return p


def _run(args) -> int:
    import cv2
    import torch

    from sfs_fast import Decomposer, weights
    from sfs_fast.models import build_model, method_id

    from sfs_fast.bench import env as env_mod

    try:
        counts = [int(v) for v in args.faces.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--faces: expected comma-separated counts, got {args.faces!r}", 2) from None
    if not counts or any(not 1 <= n <= len(PLACEMENTS) for n in counts):
        raise CommandError(f"--faces: expected counts 1..{len(PLACEMENTS)}, got {args.faces!r}", 2)
    if args.runs < 1 or args.warmup < 0:
        raise CommandError("--runs must be >= 1 and --warmup >= 0", 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    method = method_id(args.method)
    path = weights.default_weights(method)
    model = weights.load(path) if path is not None else build_model(method)
    dec = Decomposer(model.eval(), backend=args.backend)
    rows = [{"faces": n, "timings": measure(n, dec, args.warmup, args.runs)} for n in counts]
    print(format_table(rows))
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json({"kind": "faces", "photo": list(SIZE), "method": method, "backend": args.backend,
                    "env": env_mod.capture(device="cpu", threads=torch.get_num_threads()), "results": rows}, args.json)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, _run, args)


if __name__ == "__main__":
    sys.exit(main())
