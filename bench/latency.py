"""``sfs-bench latency``: latency the way users see it.

    sfs-bench latency --method 0 --paths fused,onnx,openvino --runs 5 --plot latency.png
    sfs-bench latency --parts first-output          # only sfs-decompose's time to first output

Parts (``--parts``, all by default):

- ``curve``: per path (the e2e paths, :mod:`sfs_fast.bench.e2e`) and batch (1, 2, 4, 8, 16, 32),
  the median (p50) and 99th percentile (p99) of ``--runs`` timed calls after one untimed first
  call of that batch size (which compiles where a path specialises on it) and ``--warmup``
  more; images per second. Each (path, batch) runs in a fresh process, as a deployment that
  runs one batch size, on the files this process exported (the rss part's children too).
  Each path's outputs at the first batch size are held to the accuracy budget against eager
  fp32 (:func:`sfs_fast.precision.check_budget`). ``--plot`` draws latency and throughput
  against batch.
- ``first-output``: ``sfs-decompose`` on one picture in a fresh process, wall time from
  outside, and where it goes (:mod:`sfs_fast.bench.first_output`).
- ``rss``: peak resident memory of each path in a fresh process that opens the path and
  decomposes ``--rss-batch`` (16) images twice (:func:`sfs_fast.bench.env.peak_rss_mib`: the child's own
  high-water mark); ONNX files are exported by this process first, so a child holds what a
  deployment holds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sfs_fast.bench.env import peak_rss_mib

PROG = "sfs-bench latency"
PARTS = ("curve", "first-output", "rss")
DEFAULT_PATHS = ("eager", "fused", "onnx", "onnx-int8", "bf16", "openvino", "openvino-bf16")
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)


def run_curve(*, method: int, paths, batches, threads, warmup: int, runs: int, weights=None, log=print) -> list[dict]:
    """Rows ``{path, batch, status, reason, ms (timing summary), first_call_ms, images_per_s,
    budget}`` for every (path, batch), each measured in a fresh process
    (:func:`measure_curve_child`): one batch size per process, as a deployment runs, so no
    point depends on the sizes or paths measured before it (in one process they did:
    bench/README.md). The budget, checked in the child of the first batch size, goes on
    every row of the path."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfs_bench_curve_") as folder:
        files = _export_files(paths, method, weights, Path(folder))
        for path in paths:
            budget = None
            for k, b in enumerate(batches):
                spec = {"path": path, "method": method, "batch": b, "threads": threads, "files": files,
                        "weights": weights, "warmup": warmup, "runs": runs, "budget": k == 0}
                row = _run_child("curve", spec, path, b)
                budget = row.pop("budget_report", None) or budget
                rows.append(row)
                if row["status"] != "ok":
                    log(f"  {path:14s} b{b:<3d} {row['status']}: {row['reason']}")
                    continue
                row["budget"] = budget
                log(f"  {path:14s} b{b:<3d} p50 {row['ms']['median']:9.1f} ms  p99 {row['ms']['p99']:9.1f} ms  "
                    f"{row['images_per_s']:6.2f} img/s")
    return rows


def measure_curve_child(path: str, method: int, batch: int, threads, files: dict, weights=None, *,
                        warmup: int, runs: int, budget: bool) -> dict:
    """In this (fresh) process: open ``path`` (:func:`_child_open`), time one untimed first
    call of ``batch`` images (it compiles where a path specialises on the size), ``warmup``
    more and ``runs`` timed ones; with ``budget``, the outputs against eager fp32 on the same
    images (``budget_report``)."""
    import time

    import torch

    from sfs_fast.bench.e2e import bench_images, load_bench_model
    from sfs_fast.bench.timing import time_calls
    from sfs_fast.precision import check_budget, format_metrics, reference_outputs

    if threads is not None:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(4321 + batch)
    inputs = [bench_images(batch, gen) for _ in range(2)]
    dec = _child_open(path, method, threads, files, weights)
    t0 = time.perf_counter()
    first = dec.decompose(inputs[0])
    first_ms = (time.perf_counter() - t0) * 1e3
    stats = time_calls(dec.decompose, inputs, warmup=warmup, runs=runs)
    row = {"path": path, "batch": batch, "status": "ok", "reason": None, "ms": stats, "first_call_ms": first_ms,
           "images_per_s": 1e3 * batch / stats["median"]}
    if budget:
        report = check_budget(first, reference_outputs(load_bench_model(method, weights)[0], inputs[0]))
        row["budget_report"] = {"passed": report["passed"], "line": format_metrics(report)}
    return row


def _run_child(kind: str, spec: dict, path: str, batch: int) -> dict:
    """Run a ``kind`` (``curve`` or ``rss``) measuring child on ``spec``; its row, or a
    ``skipped`` / ``failed`` row with the child's last stderr line."""
    from sfs_fast.bench.e2e import PathUnavailable, path_plan
    from sfs_fast.bench.peers import PEER_PATHS

    try:
        if path not in PEER_PATHS:
            path_plan(path, device="cpu", threads=spec["threads"])  # skip with the reason, not a child's crash
    except PathUnavailable as exc:
        return {"path": path, "batch": batch, "status": "skipped", "reason": str(exc)}
    done = subprocess.run([sys.executable, "-m", "sfs_fast.bench.latency", "--child", json.dumps({kind: spec})],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"path": path, "batch": batch, "status": "skipped" if "not installed" in tail else "failed",
                "reason": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Peak memory per path, each in a fresh process


def _child_open(path: str, method: int, threads, files: dict, weights):
    """The runner of ``path`` in the measuring child: an exported file for the ONNX and
    OpenVINO paths (as a deployment opens it), the model's weights for the PyTorch ones."""
    from sfs_fast.bench.e2e import load_bench_model, make_decomposer, path_plan
    from sfs_fast.bench.peers import PEER_PATHS, Peer
    from sfs_fast.decomposer import Decomposer
    from sfs_fast.export.openvino_runner import OpenVinoRunner
    from sfs_fast.plan import FILE_BACKENDS

    if path in PEER_PATHS:
        return Peer(OpenVinoRunner(files[path], PEER_PATHS[path], threads=threads))
    plan = path_plan(path, device="cpu", threads=threads)
    if plan.backend in FILE_BACKENDS:
        return Decomposer(onnx=files[path], method=method, plan=plan)
    model, _ = load_bench_model(method, weights)
    return make_decomposer(path, model, device="cpu", threads=threads)


def measure_rss_child(path: str, method: int, batch: int, threads, files: dict, weights=None) -> dict:
    """In this (fresh) process: open ``path``, decompose ``batch`` images twice; peak RSS
    (MiB) after opening and after the calls."""
    import numpy as np
    import torch

    from sfs_fast.samples import face_like_images

    if threads is not None:
        torch.set_num_threads(threads)
    dec = _child_open(path, method, threads, files, weights)
    opened = peak_rss_mib()
    x = torch.from_numpy(face_like_images(batch, np.random.default_rng(0)))
    for _ in range(2):
        dec.decompose(x)
    return {"path": path, "batch": batch, "status": "ok", "reason": None,
            "peak_rss_after_open_mib": opened, "peak_rss_mib": peak_rss_mib()}


def _export_files(paths, method: int, weights, folder: Path) -> dict:
    """The file each ONNX or OpenVINO path of ``paths`` opens, exported here once per
    precision; a path that cannot be exported is left out (its child then says why)."""
    from sfs_fast.bench.e2e import PathUnavailable, export_path_file, load_bench_model, path_plan
    from sfs_fast.bench.peers import PEER_PATHS
    from sfs_fast.plan import named_plan

    files, model = {}, None
    for path in paths:
        try:  # a peer and the openvino paths run the onnx path's fp32 file
            plan = named_plan("onnx") if path in PEER_PATHS else path_plan(path, device="cpu", threads=None)
            if plan.backend == "openvino":
                plan = named_plan("onnx")
            if plan.backend != "onnx":
                continue
            target = folder / f"method{method}_{plan.precision}_{plan.int8_layers or 'float'}.onnx"
            if not target.is_file():
                model = model or load_bench_model(method, weights)[0]
                export_path_file(model, plan, target)
            files[path] = str(target)
        except PathUnavailable:
            continue
    return files


def run_rss(*, method: int, paths, batch: int, threads, weights=None, log=print) -> list[dict]:
    """:func:`measure_rss_child` of each path, each in a fresh Python process."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfs_bench_rss_") as folder:
        files = _export_files(paths, method, weights, Path(folder))
        for path in paths:
            spec = {"path": path, "method": method, "batch": batch, "threads": threads, "files": files,
                    "weights": weights}
            rows.append(_run_child("rss", spec, path, batch))
            r = rows[-1]
            log(f"  rss {path:14s} " + (f"peak {r['peak_rss_mib']} MiB (after opening {r['peak_rss_after_open_mib']})"
                                        if r["status"] == "ok" else f"{r['status']}: {r['reason']}"))
    return rows


# ---------------------------------------------------------------------------------------
# Reports


def _budget_cell(budget) -> str:
    if budget is None:
        return "not checked (the first batch's child failed)"
    return "ok" if budget["passed"] else "FAIL: " + budget["line"]


def format_tables(result: dict) -> str:
    """Plain-text tables of the parts that ran."""
    out = []
    if "curve" in result:
        out.append("path            batch  p50 ms     p99 ms     first ms   img/s   budget (first batch vs eager fp32)")
        for r in result["curve"]:
            if r["status"] != "ok":
                out.append(f"{r['path']:15s} {r['batch']:<6d} {r['status']}: {r['reason']}")
                continue
            out.append(f"{r['path']:15s} {r['batch']:<6d} {r['ms']['median']:<10.1f} {r['ms']['p99']:<10.1f} "
                       f"{r['first_call_ms']:<10.1f} {r['images_per_s']:<7.2f} "
                       + _budget_cell(r["budget"]))
    if "first_output" in result:
        from sfs_fast.bench.first_output import format_table

        out += ["", format_table(result["first_output"])]
    if "rss" in result:
        out += ["", f"path            peak RSS at batch {result['settings']['rss_batch']} (MiB)   after opening (MiB)"]
        for r in result["rss"]:
            out.append(f"{r['path']:15s} {r['peak_rss_mib']:<32} {r['peak_rss_after_open_mib']}" if r["status"] == "ok"
                       else f"{r['path']:15s} {r['status']}: {r['reason']}")
    return "\n".join(out).strip("\n")


def plot_curve(rows: list[dict], path, title: str = "") -> None:
    """Two panels against batch: latency per call (p50 solid, p99 dotted) and images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sfs_fast.atomic import atomic_destination

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["path"] for r in ok):
        pts = sorted((r["batch"], r["ms"]["median"], r["ms"]["p99"], r["images_per_s"]) for r in ok if r["path"] == name)
        line, = lat.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} p50")
        lat.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=line.get_color(), label=f"{name} p99")
        thr.plot([p[0] for p in pts], [p[3] for p in pts], marker="o", color=line.get_color(), label=name)
    batches = sorted({r["batch"] for r in rows})
    for ax, ylabel in ((lat, "ms per call"), (thr, "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_destination(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def markdown(result: dict) -> str:
    """The plain-text tables in a fenced block, with the command and environment."""
    from sfs_fast.bench.report import env_line

    return ("```\n" + format_tables(result) + "\n```\n\n" + f"- {env_line(result['env'])}\n"
            + f"- command: `{result['command']}`\n")


# ---------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    from sfs_fast.bench.cli import _int_list as parse

    return parse(text)


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.cli.common import add_debug_flag

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip('`" '),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=lambda t: [v.strip() for v in t.split(",") if v.strip()], default=list(PARTS),
                   help=f"what to measure, comma-separated (default: {','.join(PARTS)})")
    p.add_argument("--method", type=int, default=0, help="method id (default 0)")
    p.add_argument("--paths", type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
                   default=list(DEFAULT_PATHS), help=f"paths (default: {','.join(DEFAULT_PATHS)})")
    p.add_argument("--batch", type=_int_list, default=list(DEFAULT_BATCHES), metavar="B[,B..]",
                   help="batch sizes of the curve (default 1,2,4,8,16,32)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per batch after the first (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per (path, batch) (default 5)")
    p.add_argument("--rss-batch", type=int, default=16, help="batch of the peak-memory children (default 16)")
    p.add_argument("--first-output-runs", type=int, default=3,
                   help="fresh sfs-decompose processes per variant (default 3)")
    p.add_argument("--weights", default=None, help="checkpoint or registered name (default: the bundled demo weights)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--markdown", default=None, metavar="OUT")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="latency and throughput against batch (matplotlib)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a measuring child: {"curve"|"rss": spec}
    add_debug_flag(p)
    return p


def _check(args) -> None:
    from sfs_fast.bench.e2e import PATHS, check_paths
    from sfs_fast.cli.common import CommandError
    from sfs_fast.models import METHODS

    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        raise CommandError(f"--parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}", 2)
    if args.method not in METHODS:
        raise CommandError(f"--method: unknown method {args.method}", 2)
    try:
        check_paths(args.paths, PATHS)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None
    if args.runs < 1 or args.warmup < 0 or args.rss_batch < 1 or args.first_output_runs < 1:
        raise CommandError("--runs, --rss-batch and --first-output-runs must be >= 1, --warmup >= 0", 2)
    if args.threads is not None and args.threads < 1:
        raise CommandError("--threads must be >= 1", 2)


def _run(args) -> int:
    if args.child is not None:
        (kind, spec), = json.loads(args.child).items()
        common = [spec.pop(k) for k in ("path", "method", "batch", "threads", "files", "weights")]
        measure = measure_curve_child if kind == "curve" else measure_rss_child
        print(json.dumps(measure(*common, **spec)))
        return 0
    _check(args)
    import shlex

    import torch

    from sfs_fast.bench import env as env_mod
    from sfs_fast.bench.report import write_json, write_text

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = {"kind": "latency", "env": env_mod.capture(threads=torch.get_num_threads()),
              "command": " ".join(["sfs-bench", "latency"] + [shlex.quote(a) for a in args.argv]),
              "settings": {"method": args.method, "paths": args.paths, "batches": args.batch, "runs": args.runs,
                           "warmup": args.warmup, "threads": torch.get_num_threads(), "rss_batch": args.rss_batch}}
    if "curve" in args.parts:
        result["curve"] = run_curve(method=args.method, paths=args.paths, batches=args.batch, threads=args.threads,
                                    warmup=args.warmup, runs=args.runs, weights=args.weights, log=log)
    if "first-output" in args.parts:
        from sfs_fast.bench.first_output import run_first_output

        result["first_output"] = run_first_output(runs=args.first_output_runs, threads=args.threads, log=log)
    if "rss" in args.parts:
        result["rss"] = run_rss(method=args.method, paths=args.paths, batch=args.rss_batch, threads=args.threads,
                                weights=args.weights, log=log)
    print(format_tables(result))
    if args.json:
        write_json(result, args.json)
    if args.markdown:
        write_text(args.markdown, markdown(result))
    if args.plot:
        if "curve" not in result:
            raise ValueError("--plot draws the curve: add curve to --parts")
        plot_curve(result["curve"], args.plot, title=f"method {args.method}, {torch.get_num_threads()} threads")
    return 0


def main(argv=None) -> int:
    from sfs_fast.cli.common import run_command

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, _run, args)


if __name__ == "__main__":
    sys.exit(main())
