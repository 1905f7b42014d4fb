"""``sfs-bench ray``: images/s of ``sfs-decompose --engine ray`` on 1 and 2 local actors
against the local engine, and the per-image cost that Ray adds.

    sfs-bench ray                                   # 64 pictures, actors 1,2, demo + stand-in
    sfs-bench ray --pictures 8 --actors 1 --decomposer stand-in     # a quick check that it runs

Every configuration runs the whole folder pipeline (:func:`sfs_fast.pipeline.decompose_folder`
or :func:`sfs_fast.ray_engine.decompose_folder_ray`) over N generated 128x128 pictures into a
fresh output folder, ``--repeats`` times (medians kept). ``ms/image`` is the steady state, timed
from the manifest rows as the driver receives them: first row to last, over the rows after the
first batch. The fixed cost before the first row (Ray starting the actors, each importing
torch and building its Decomposer; the local engine's first batch) is reported apart, as
``first row after``. Two models: ``demo`` (the bundled method-0 weights, fused fp32) is what a
run costs; the ``stand-in`` (arithmetic on the input, method 0's outputs, no model) leaves only
the pipeline, so ``ray ms/image - local ms/image`` on the stand-in is the per-image overhead
Ray adds (pickling pictures and rows, the object store, scheduling), the figure that matters
on a cluster, where the actors are on other machines. On a 2-core machine, 2 actors cannot beat
the local engine (which already uses both cores); expect no gain there.

Threads: the local engine runs the model on every CPU; ``ray xK`` gives each of its K actors
``CPUs // K`` threads and ``(CPUs - 0.5) / K`` Ray CPUs, leaving half a CPU to the decoding
tasks. One local Ray (no dashboard, usage stats off) serves every configuration.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROG = "sfs-bench ray"
DECODE_CPUS = 0.5
OBJECT_STORE_MIB = 500  # pictures of 128x128 in flight need little; the machine may be shared


def _decomposer_source(kind: str, threads: int):
    """``(what the engines run, plan)``: the demo model or the stand-in factory."""
    from sfs_fast.plan import resolve_plan

    plan = resolve_plan(backend="fused", precision="fp32", threads=threads)
    if kind == "demo":
        from sfs_fast.decomposer import load_model

        return load_model(method=0)[0], plan
    from sfs_fast.bench.folder import StandInDecomposer

    return StandInDecomposer, plan


def _one_run(engine: str, actors: int, kind: str, src: Path, out: Path, batch_size: int) -> dict:
    """One whole run of ``engine`` over ``src``: wall seconds, seconds to the first row, and
    the steady ms/image (first row to last, over the rows that came after the first)."""
    from sfs_fast.pipeline import FolderOptions, decompose_folder

    cpus = os.cpu_count() or 1
    options = FolderOptions(batch_size=batch_size)
    arrivals = []

    def progress(_row):
        arrivals.append(time.perf_counter())

    # the model is loaded outside the timing (the command does it once, before either engine);
    # the local Decomposer is built outside it too, the actors' inside: a cost Ray adds
    if engine == "local":
        from sfs_fast.decomposer import Decomposer

        source, plan = _decomposer_source(kind, cpus)
        dec = Decomposer(source, plan=plan) if kind == "demo" else source(plan)
        t0 = time.perf_counter()
        summary = decompose_folder(src, out, dec, options, progress=progress)
    else:
        from sfs_fast.ray_engine import RayOptions, decompose_folder_ray

        source, plan = _decomposer_source(kind, max(1, cpus // actors))
        ray_options = RayOptions(actors=actors, actor_cpus=max(0.1, (cpus - DECODE_CPUS) / actors),
                                 decode_cpus=DECODE_CPUS)
        t0 = time.perf_counter()
        summary = decompose_folder_ray(src, out, source, plan, options, ray_options=ray_options, progress=progress)
    wall = time.perf_counter() - t0
    if summary.failed or summary.ok != summary.inputs:
        raise RuntimeError(f"{engine} x{actors} {kind}: {summary.failed} of {summary.inputs} pictures failed")
    later = [t for t in arrivals if t > arrivals[0] + 1e-4]  # rows after the first batch's
    steady = (arrivals[-1] - arrivals[0]) * 1e3 / len(later) if later else None
    return {"wall_s": wall, "startup_s": arrivals[0] - t0, "ms_per_image": steady}


def measure(engine: str, actors: int, kind: str, folder: Path, batch_size: int, repeats: int) -> dict:
    """One configuration: the medians over ``repeats`` runs."""
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="sfs-bench-ray-out-") as out:
            runs.append(_one_run(engine, actors, kind, folder, Path(out) / "out", batch_size))

    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    ms = median("ms_per_image")
    return {"engine": engine if engine == "local" else f"ray x{actors}", "actors": actors if engine == "ray" else 0,
            "decomposer": kind, "pictures": len(list(folder.iterdir())), "runs": repeats,
            "wall_s": round(median("wall_s"), 3), "startup_s": round(median("startup_s"), 3),
            "ms_per_image": round(ms, 2) if ms is not None else None,
            "images_per_s": round(1e3 / ms, 2) if ms else None}


def run_ray_bench(n: int = 64, actors=(1, 2), kinds=("demo", "stand-in"), batch_size: int = 8,
                  repeats: int = 1, log=None) -> dict:
    """Every (model, engine) configuration; the Ray overhead per image from the stand-in."""
    from sfs_fast.ray_engine import RayOptions, connect, import_ray

    from sfs_fast.bench.folder import make_pictures

    started = connect(RayOptions(address="", object_store_mib=OBJECT_STORE_MIB))  # one Ray for all (or the caller's)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="sfs-bench-ray-in-") as tmp:
            folder = Path(tmp) / "in"
            make_pictures(folder, n, size=128)
            # untimed: Ray's worker processes for the decoding tasks start (and import) once
            _one_run("ray", 1, "stand-in", folder, Path(tmp) / "warm-up", batch_size)
            for kind in kinds:
                for engine, k in [("local", 1)] + [("ray", a) for a in actors]:
                    rows.append(measure(engine, k, kind, folder, batch_size, repeats))
                    if log:
                        r = rows[-1]
                        log(f"{PROG}: {r['engine']} {kind}: {r['ms_per_image']} ms/image, "
                            f"first row after {r['startup_s']} s")
    finally:
        if started:
            import_ray().shutdown()
    by = {(r["engine"], r["decomposer"]): r for r in rows}
    local = by.get(("local", "stand-in"), {}).get("ms_per_image")
    overhead = {r["engine"]: round(r["ms_per_image"] - local, 2) for r in rows
                if r["decomposer"] == "stand-in" and r["engine"] != "local" and None not in (local, r["ms_per_image"])}
    return {"kind": "ray", "results": rows, "ray_overhead_ms_per_image": overhead,
            "settings": {"pictures": n, "actors": list(actors), "batch_size": batch_size, "repeats": repeats,
                         "cpus": os.cpu_count()}}


def format_table(result: dict) -> str:
    lines = ["| model | engine | ms/image (steady) | images/s | first row after (s) | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['decomposer']} | {r['engine']} | {r['ms_per_image']} | {r['images_per_s']} | "
                     f"{r['startup_s']} | {r['wall_s']} |")
    for engine, ms in result["ray_overhead_ms_per_image"].items():
        lines.append(f"Ray overhead per image ({engine} - local, stand-in): {ms} ms")
    return "\n".join(lines)


def _positive_list(text: str) -> list:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--pictures", type=int, default=64, metavar="N", help="pictures per run (default 64)")
    p.add_argument("--actors", type=_positive_list, default=[1, 2], metavar="K[,K..]", help="actor counts (default 1,2)")
    p.add_argument("--decomposer", choices=("demo", "stand-in", "both"), default="both",
                   help="demo: the bundled method-0 weights; stand-in: no model (Ray's overhead); both (default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per size, the median is kept (default 1)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    return p


def main(argv=None) -> int:
    from sfs_fast.cli.common import run_command

    args = build_parser().parse_args(argv)
    return run_command(PROG, _run, args)


def _run(args) -> int:
    if args.pictures < 1 or args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--pictures, --batch-size and --repeats must be positive")
    from sfs_fast.bench import env as env_mod

    kinds = ("demo", "stand-in") if args.decomposer == "both" else (args.decomposer,)
    result = run_ray_bench(args.pictures, tuple(args.actors), kinds, args.batch_size, args.repeats,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    result["env"] = env_mod.capture(threads=os.cpu_count())
    print(format_table(result))
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
