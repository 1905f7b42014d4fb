"""``sfs-bench folder``: does the folder pipeline's memory stay flat in the number of pictures?

    sfs-bench folder                          # peak RSS at 200 and at 2,000 pictures
    sfs-bench folder --pictures 200 2000 5000 --decomposer demo --json folder.json

Each count runs in a fresh process (peak RSS is a per-process high-water mark) over tiny
generated pictures, through :func:`sfs_fast.pipeline.decompose_folder` with its real
decoding, batching, encoding, manifest and resume bookkeeping. The question is the
pipeline's memory, not the model's, so by default the model is a stand-in
(:class:`StandInDecomposer`: arithmetic on the input, same output names and shapes as method
0); ``--decomposer demo`` runs the bundled method-0 weights instead (slow: about 0.1-0.3 s a
picture on a CPU). Flat means the peak at the largest count stays within a few MiB of the
smallest's; what grows per picture (manifest bookkeeping, item list) is reported as KiB per
picture.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROG = "sfs-bench folder"


class StandInDecomposer:
    """A model-free stand-in with method 0's outputs: ``decompose(images [B,3,128,128])`` ->
    normal ``2x-1``, albedo ``x``, light ``[B,27]``, sh_shading/shading ones, recon ``x``;
    float32 CPU tensors, as :class:`sfs_fast.Decomposer` returns them."""

    method, backend, precision = 0, "stand-in", "fp32"

    def __init__(self, plan=None):
        """``plan`` is ignored: the stand-in is a decomposer factory for the Ray engine too
        (``make(plan) -> decomposer``)."""
        from sfs_fast.models import output_names

        self.output_names = list(output_names(0))

    def decompose(self, images):
        import torch

        x = torch.as_tensor(images).float()
        ones = torch.ones_like(x)
        outs = {"normal": x * 2 - 1, "albedo": x.clone(), "light": x.mean((2, 3)).repeat(1, 9),
                "sh_shading": ones, "shading": ones.clone(), "recon": x.clone()}
        return {k: outs[k].contiguous() for k in self.output_names}


def make_pictures(folder: Path, n: int, size: int = 24) -> None:
    """``n`` small PNG pictures ``p00000.png`` ... of distinct content."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for k in range(n):
        rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.full((size, size), k % 256), np.outer(ramp, ramp) / 255], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"p{k:05d}.png", compress_level=1)


def measure_one(n: int, decomposer: str = "stand-in", batch_size: int = 16, workers: int = 2) -> dict:
    """Decompose ``n`` generated pictures in this process; peak RSS is this process's."""
    from sfs_fast.bench.env import peak_rss_mib
    from sfs_fast.pipeline import FolderOptions, decompose_folder

    if decomposer == "demo":
        from sfs_fast import Decomposer

        dec = Decomposer(method=0, backend="fused")
    else:
        dec = StandInDecomposer()
    with tempfile.TemporaryDirectory(prefix="sfs-bench-folder-") as tmp:
        make_pictures(Path(tmp) / "in", n)
        rss_before = peak_rss_mib()
        t0 = time.perf_counter()
        summary = decompose_folder(Path(tmp) / "in", Path(tmp) / "out", dec,
                                   FolderOptions(batch_size=batch_size, workers=workers))
        wall = time.perf_counter() - t0
    peak = peak_rss_mib()
    return {"pictures": n, "ok": summary.ok, "failed": summary.failed, "wall_s": round(wall, 2),
            "peak_rss_mib": peak, "peak_rss_before_run_mib": rss_before,
            "decomposer": decomposer, "batch_size": batch_size, "workers": workers}


def run_folder(counts, decomposer: str = "stand-in", batch_size: int = 16, workers: int = 2, log=None) -> dict:
    """:func:`measure_one` for each count, each in a fresh Python process."""
    rows = []
    for n in counts:
        cmd = [sys.executable, "-m", "sfs_fast.bench.folder", "--one", str(n), "--decomposer", decomposer,
               "--batch-size", str(batch_size), "--workers", str(workers)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{n} pictures: the measuring process failed: {tail}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if log:
            log(f"{PROG}: {n} pictures: peak RSS {rows[-1]['peak_rss_mib']} MiB in {rows[-1]['wall_s']} s")
    first, last = rows[0], rows[-1]
    extra = last["pictures"] - first["pictures"]
    growth = last["peak_rss_mib"] - first["peak_rss_mib"]
    return {"kind": "folder", "results": rows, "growth_mib": round(growth, 1),
            "growth_kib_per_picture": round(growth * 1024 / extra, 2) if extra > 0 else None}


def format_table(result: dict) -> str:
    lines = ["pictures  ok      failed  wall_s   peak RSS (MiB)"]
    for r in result["results"]:
        lines.append(f"{r['pictures']:<9} {r['ok']:<7} {r['failed']:<7} {r['wall_s']:<8} {r['peak_rss_mib']}")
    lines.append(f"growth: {result['growth_mib']} MiB ({result['growth_kib_per_picture']} KiB per extra picture), "
                 f"decomposer {result['results'][0]['decomposer']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--pictures", type=int, nargs="+", default=[200, 2000], metavar="N",
                   help="picture counts, each measured in a fresh process (default: 200 2000)")
    p.add_argument("--decomposer", choices=("stand-in", "demo"), default="stand-in",
                   help="stand-in: model-free arithmetic (default; the pipeline's memory alone); "
                        "demo: the bundled method-0 weights")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the measuring child
    return p


def main(argv=None) -> int:
    from sfs_fast.cli.common import run_command

    args = build_parser().parse_args(argv)
    return run_command(PROG, _run, args)


def _run(args) -> int:
    if min(args.pictures) < 1 or args.batch_size < 1 or args.workers < 1:
        raise ValueError("--pictures, --batch-size and --workers must be positive")
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.decomposer, args.batch_size, args.workers)))
        return 0
    result = run_folder(sorted(args.pictures), args.decomposer, args.batch_size, args.workers,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
