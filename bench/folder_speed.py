"""``sfs-bench folder-speed``: is the folder run as fast as the model alone?

    sfs-bench folder-speed [--pictures 64] [--paths eager,fused,bf16,onnx,openvino-bf16] [--method 0]
                           [--batch-size 16] [--rounds 3] [--threads T] [--json OUT]

Per path, one Decomposer (the path's named plan, the method's default weights) runs the same
``--pictures`` pictures (128x128 face-like PNGs) both ways, after one untimed warm-up batch
of each: the model alone on the decoded crops in batches of ``--batch-size``
(:func:`sfs_fast.pipeline.decompose_crops`), and ``sfs-decompose``'s own pipeline
(:func:`sfs_fast.pipeline.decompose_folder`: decoding, batching, encoding and the manifest
in its worker threads) into a fresh folder. The two alternate for ``--rounds`` rounds and
each is summarised by its median round, so a slow spell of a shared machine lands on both
sides instead of on one pass. ``folder / model`` is the ratio of the median images per
second (the issue's target: at least 0.9), printed with its range over the rounds;
``pipeline s`` is the folder run's median wall time beyond its own model calls (what
decoding, encoding and writing add where they do not overlap the model).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

PROG = "sfs-bench folder-speed"
DEFAULT_PATHS = ("eager", "fused", "bf16", "onnx", "openvino-bf16")


def make_faces(folder: Path, n: int) -> None:
    """``n`` distinct 128x128 face-like PNGs (the tests' and benchmarks' procedural faces)."""
    import numpy as np
    from PIL import Image

    from sfs_fast.samples import face_like_images

    folder.mkdir(parents=True, exist_ok=True)
    faces = face_like_images(n, np.random.default_rng(7))
    for k, chw in enumerate(faces):
        rgb = np.uint8(np.rint(np.clip(chw.transpose(1, 2, 0), 0, 1) * 255))
        Image.fromarray(rgb).save(folder / f"face{k:04d}.png", compress_level=1)


def _model_alone(dec, crops, batch_size: int) -> float:
    from sfs_fast.pipeline import decompose_crops

    t0 = time.perf_counter()
    decompose_crops(crops, dec, batch_size)
    return time.perf_counter() - t0


def _folder_run(dec, items, out: Path, options) -> tuple[float, object]:
    from sfs_fast import pipeline

    t0 = time.perf_counter()
    summary = pipeline.decompose_folder(items, out, dec, options)
    return time.perf_counter() - t0, summary


def measure_path(path: str, method: int, src: Path, batch_size: int, threads, rounds: int = 3) -> dict:
    """One path: images/s of the model alone and of the folder run, same Decomposer, the
    two alternating for ``rounds`` rounds (medians; ``ratios`` per round)."""
    from sfs_fast import pipeline
    from sfs_fast.decomposer import Decomposer
    from sfs_fast.plan import named_plan

    dec = Decomposer(method=method, plan=named_plan(path, threads=threads))
    options = pipeline.FolderOptions(batch_size=batch_size).checked()
    items = pipeline.discover(src, src.parent / "unused")
    crops = [c for item in items for c in pipeline.prepare_picture(item, options).crops]
    model_s, folder_s, model_in_folder_s, ok = [], [], [], 0
    with tempfile.TemporaryDirectory() as out:
        _model_alone(dec, crops[:batch_size], batch_size)  # warm-ups
        _folder_run(dec, items[:batch_size], Path(out) / "warm", options)
        for k in range(rounds):
            model_s.append(_model_alone(dec, crops, batch_size))
            wall, summary = _folder_run(dec, src, Path(out) / f"run{k}", options)
            folder_s.append(wall)
            model_in_folder_s.append(summary.timings.get("model_s") or 0.0)
            ok = summary.ok
    n = len(crops)
    model, folder = statistics.median(model_s), statistics.median(folder_s)
    ratios = [m / f for m, f in zip(model_s, folder_s)]
    return {"path": path, "plan": f"{dec.backend} {dec.precision}", "pictures": n, "ok": ok, "rounds": rounds,
            "model_img_s": n / model, "folder_img_s": n / folder, "ratio": model / folder,
            "ratio_min": min(ratios), "ratio_max": max(ratios), "folder_model_s": statistics.median(model_in_folder_s),
            "pipeline_s": statistics.median(f - m for f, m in zip(folder_s, model_in_folder_s))}


def format_table(rows) -> str:
    lines = ["| path | runs as | model alone img/s | folder img/s | folder / model (range) "
             "| model time in folder run (s) | pipeline s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['plan']} | {r['model_img_s']:.2f} | {r['folder_img_s']:.2f} | "
                     f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['folder_model_s']:.2f} | "
                     f"{r['pipeline_s']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("--pictures", type=int, default=64, help="face-like PNGs both passes run (default 64)")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"named plans (default {','.join(DEFAULT_PATHS)})")
    p.add_argument("--method", type=int, default=0, help="method id, with its default weights (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call in both passes (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both passes (medians)")
    p.add_argument("--threads", type=int, default=None, help="the plan's intra-op threads")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON")
    add_debug_flag(p)
    return p


def _run(args) -> int:
    from sfs_fast.plan import NAMED_PLANS

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in NAMED_PLANS]
    if unknown or args.pictures < args.batch_size or args.batch_size < 1 or args.rounds < 1:
        raise CommandError(f"--paths: choose from {', '.join(NAMED_PLANS)}; --pictures >= --batch-size >= 1; "
                           "--rounds >= 1", 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_faces(Path(tmp) / "in", args.pictures)
        for path in paths:
            rows.append(measure_path(path, args.method, Path(tmp) / "in", args.batch_size, args.threads, args.rounds))
            print(f"{PROG}: {path} done", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json({"kind": "folder-speed", "method": args.method, "batch_size": args.batch_size,
                    "rounds": args.rounds, "rows": rows}, args.json)
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, build_parser().parse_args(argv))
