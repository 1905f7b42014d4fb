"""``sfs-bench ray``: the Ray engine against the local engine on the same pictures.

    sfs-bench ray [--pictures 64] [--actors 1,2] [--decomposer demo|stand-in] [--json OUT]

Per engine, images/s of a whole ``sfs-decompose`` run into a fresh folder (decode, infer,
encode, write, manifest), the local engine first, then ``--engine ray`` with each actor count
on one local Ray started once (its start-up is reported apart: a cluster pays it once, not per
run). With the model-free stand-in, the difference per picture to the local engine is the
overhead Ray adds (scheduling, transport of pictures and rows), which is what matters on a
cluster where the actors have cores of their own; on a 2-core machine the actors share the
cores the local engine has, so expect no gain.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

PROG = "sfs-bench ray"


def _model(kind: str):
    """What both engines run: the method-0 demo weights (fused fp32) or the stand-in."""
    from sfs_fast.plan import resolve_plan

    if kind == "stand-in":
        from sfs_fast.bench.folder import StandInDecomposer

        return StandInDecomposer, StandInDecomposer(), resolve_plan(backend="eager", precision="fp32")
    from sfs_fast import Decomposer
    from sfs_fast.decomposer import load_model

    model, _ = load_model(method=0)
    plan = resolve_plan(backend="fused", precision="fp32", threads=1)
    return model, Decomposer(model, plan=plan), plan


def _timed_run(fn, pictures: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    summary = fn(pictures, out)
    wall = time.perf_counter() - t0
    if summary.ok != summary.inputs:
        raise CommandError(f"{out.name}: {summary.ok} of {summary.inputs} pictures decomposed")
    return {"wall_s": round(wall, 3), "images_per_s": round(summary.ok / wall, 2)}


def run(pictures: int, actor_counts: list[int], kind: str, batch_size: int) -> dict:
    import ray

    from sfs_fast.bench.folder import make_pictures
    from sfs_fast.pipeline import FolderOptions, decompose_folder
    from sfs_fast.ray_engine import RayOptions, decompose_folder_ray

    source, local_dec, plan = _model(kind)
    options = FolderOptions(batch_size=batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfs-bench-ray-") as tmp:
        src = Path(tmp) / "in"
        make_pictures(src, pictures, size=128)
        rows.append({"engine": "local", **_timed_run(lambda i, o: decompose_folder(i, o, local_dec, options),
                                                      src, Path(tmp) / "local")})
        t0 = time.perf_counter()
        # logical CPUs: one per actor plus the decoding tasks' share (RayOptions.decode_cpus),
        # so every actor count fits; they share the machine's cores like the local engine's threads
        ray.init(num_cpus=max(actor_counts) + 1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 2**20)
        start_s = time.perf_counter() - t0
        try:
            for n in actor_counts:
                ray_opts = RayOptions(actors=n)
                go = lambda i, o: decompose_folder_ray(i, o, source, plan, options, ray_options=ray_opts)  # noqa: E731
                rows.append({"engine": f"ray, {n} actor{'s' if n > 1 else ''}", **_timed_run(go, src, Path(tmp) / f"ray{n}")})
        finally:
            ray.shutdown()
    local_per_image = rows[0]["wall_s"] / pictures
    for row in rows:
        row["x_local"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
        row["overhead_ms_per_image"] = round((row["wall_s"] / pictures - local_per_image) * 1e3, 1)
    return {"kind": "ray", "pictures": pictures, "decomposer": kind, "batch_size": batch_size,
            "ray_start_s": round(start_s, 2), "results": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['pictures']} pictures, {result['decomposer']}, batch {result['batch_size']}; "
             f"local Ray start-up {result['ray_start_s']} s (not in the rows)",
             "| engine | wall (s) | images/s | x local | overhead ms/image |", "|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['wall_s']:.2f} | {r['images_per_s']:.2f} | {r['x_local']:.2f} | "
              f"{r['overhead_ms_per_image']:+.1f} |" for r in result["results"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--pictures", type=int, default=64, help="pictures in the folder (default 64)")
    p.add_argument("--actors", default="1,2", help="actor counts, comma-separated (default 1,2)")
    p.add_argument("--decomposer", choices=("demo", "stand-in"), default="demo",
                   help="demo: method 0's bundled weights, fused fp32; stand-in: no model (Ray's overhead alone)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    add_debug_flag(p)
    return p


def _run(args) -> int:
    try:
        counts = [int(v) for v in args.actors.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--actors: expected comma-separated counts, got {args.actors!r}", 2) from None
    if not counts or min(counts) < 1 or args.pictures < 1:
        raise CommandError("--actors counts and --pictures must be at least 1", 2)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CommandError('Ray is not installed: pip install "sfs_fast[ray]"', 2) from None
    result = run(args.pictures, counts, args.decomposer, args.batch_size)
    print(format_table(result))
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json(result, args.json)
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
