"""Time to first output of ``sfs-decompose``: one picture, a fresh process, the real command.

Each variant (the default command, ``--faces off``) runs ``--runs`` times as the console
script runs it (``python -c`` of its entry point), timed from outside, plus once under
``python -X importtime`` for the breakdown:

- ``python start``: ``python -c pass`` (interpreter and site), measured apart;
- ``import``: ``import sfs_fast.cli.decompose`` (the command's module tree, torch included);
- ``load``: weights and run plan (the ``load_s`` of the command's ``--json`` summary);
- ``run``: the folder run (discovery, decoding, faces, the model call, encoding, writing:
  its ``wall_s``), of which ``model``: the first forward (``model_s``);
- ``rest``: what is left of the wall time (argument parsing, interpreter exit: with torch
  loaded, tearing the interpreter down takes a good part of a second);
- ``first file``: when the first output file was written (its modification time), the
  moment a user could open a result;
- ``lazy imports``: modules first imported while the command ran (inside load or run),
  largest first, and which heavy optional modules (onnx, onnxruntime, triton, cv2,
  matplotlib, torch._dynamo, ...) the start-up import and the run pulled in.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the body of the sfs-decompose console script (setup.py entry point)
ENTRY = "import sys; from sfs_fast.cli.decompose import main; sys.exit(main())"
ENTRY_MODULE = "sfs_fast.cli.decompose"
VARIANTS = {"default": [], "faces-off": ["--faces", "off"]}
HEAVY = ("onnx", "onnxruntime", "onnxslim", "triton", "cv2", "matplotlib", "openvino", "scipy",
         "torch._dynamo", "torch._inductor")


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """``python -X importtime`` lines -> ``[(module, self_us, cumulative_us, depth)]`` in the
    order printed (a module after the modules it imported; depth 0 for top-level imports)."""
    out = []
    for line in stderr.splitlines():
        fields = line.split("|")
        if not line.startswith("import time:") or len(fields) != 3 or "self [us]" in line:
            continue
        try:
            self_us, cum_us = int(fields[0].split(":", 1)[1]), int(fields[1])
        except ValueError:
            continue
        name = fields[2][1:]  # "| " then two spaces per level of nesting
        out.append((name.strip(), self_us, cum_us, (len(name) - len(name.lstrip(" "))) // 2))
    return out


def split_imports(entries, entry_module: str = ENTRY_MODULE) -> dict:
    """Top-level imports around ``entry_module``'s: ``startup_s`` (its cumulative time),
    ``lazy`` (``[(module, seconds)]`` imported later, largest first), ``heavy_at_startup`` and
    ``heavy_lazy`` (:data:`HEAVY` modules in each)."""
    names = [e[0] for e in entries]
    at = names.index(entry_module) if entry_module in names else -1
    startup = entries[:at + 1] if at >= 0 else []
    later = entries[at + 1:] if at >= 0 else entries
    roots = [(n, cum / 1e6) for n, _, cum, depth in later if depth == 0]

    def heavy(part):
        return sorted({h for n, *_ in part for h in HEAVY if n == h})

    return {"startup_s": entries[at][2] / 1e6 if at >= 0 else None,
            "lazy": sorted(roots, key=lambda r: -r[1]), "lazy_s": sum(s for _, s in roots),
            "heavy_at_startup": heavy(startup), "heavy_lazy": heavy(later)}


def _run_command(picture: Path, flags: list, importtime: bool, threads) -> dict:
    """One fresh ``sfs-decompose PICTURE OUT --json`` process: wall seconds, its summary, and
    the import entries under ``-X importtime``."""
    out = Path(tempfile.mkdtemp(prefix="sfs_bench_first_"))
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-c", ENTRY, str(picture),
                                                                              str(out / "out"), "--json", *flags]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        t0, epoch = time.perf_counter(), time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        # the first output file's modification time: when the user could first open a result
        written = [p.stat().st_mtime for p in (out / "out").rglob("*") if p.is_file() and p.suffix != ".jsonl"]
        first_file = min(written) - epoch if written else None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"sfs-decompose {' '.join(flags)} exited {done.returncode}: {tail}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "first_file_s": first_file, "summary": summary,
            "imports": parse_importtime(done.stderr) if importtime else None}


def python_start_s(runs: int = 3) -> float:
    """Median wall seconds of ``python -c pass`` in this environment."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(run: dict, start_s: float) -> dict:
    """Where one ``-X importtime`` run's wall time went (module docstring)."""
    s = run["summary"]
    imports = split_imports(run["imports"])
    parts = {"python_start_s": start_s, "import_s": imports["startup_s"] or 0.0, "load_s": s.get("load_s", 0.0),
             "run_s": s.get("wall_s", 0.0), "model_s": s.get("model_s", 0.0)}
    parts["rest_s"] = run["wall_s"] - sum(v for k, v in parts.items() if k != "model_s")
    return {"wall_s": run["wall_s"], "first_file_s": run["first_file_s"], **parts, "lazy_s": imports["lazy_s"], "lazy_top": imports["lazy"][:5],
            "heavy_at_startup": imports["heavy_at_startup"], "heavy_lazy": imports["heavy_lazy"]}


def run_first_output(*, runs: int = 3, threads=None, variants=None, log=print) -> dict:
    """Time to first output per variant: plain runs (median, min, max wall) and the
    breakdown of one ``-X importtime`` run. The picture is a bundled example face."""
    from sfs_fast.samples import EXAMPLES

    variants = variants or VARIANTS
    folder = Path(tempfile.mkdtemp(prefix="sfs_bench_picture_"))
    try:
        picture = folder / "face.png"
        shutil.copyfile(EXAMPLES / "1_face.png", picture)  # alone: no mask beside it
        start_s = python_start_s()
        rows = []
        for name, flags in variants.items():
            plain = [_run_command(picture, flags, False, threads) for _ in range(runs)]
            walls = [r["wall_s"] for r in plain]
            firsts = [r["first_file_s"] for r in plain if r["first_file_s"] is not None]
            detail = breakdown(_run_command(picture, flags, True, threads), start_s)
            rows.append({"variant": name, "flags": flags, "runs": runs, "wall_median_s": statistics.median(walls),
                         "wall_min_s": min(walls), "wall_max_s": max(walls),
                         "first_file_median_s": statistics.median(firsts) if firsts else None, "breakdown": detail})
            log(f"  first output ({name}): first file {rows[-1]['first_file_median_s'] or float('nan'):.2f} s, "
                f"returned {rows[-1]['wall_median_s']:.2f} s (median of {runs}); import {detail['import_s']:.2f} s, "
                f"load {detail['load_s']:.2f} s, model {detail['model_s']:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"python_start_s": start_s, "rows": rows, "entry": ENTRY, "cpus": os.cpu_count()}


def format_table(result: dict) -> str:
    """The first-output table: first file and return time per variant (median of the plain
    runs), then where the ``-X importtime`` run's time went."""
    head = (f"{'sfs-decompose, 1 picture, fresh process':<40} {'first file s':<13} {'returned s (min-max)':<21} "
            f"{'python':<7} {'import':<7} {'load':<6} {'run (model)':<12} {'rest':<6} lazy imports")
    lines = [head]
    for r in result["rows"]:
        b = r["breakdown"]
        first = "-" if r["first_file_median_s"] is None else f"{r['first_file_median_s']:.2f}"
        lazy = ", ".join(f"{n} {s:.2f}" for n, s in b["lazy_top"][:3])
        lines.append(f"{r['variant']:<40} {first:<13} {r['wall_median_s']:.2f} ({r['wall_min_s']:.2f}-{r['wall_max_s']:.2f})"
                     f"{'':<6} {b['python_start_s']:<7.2f} {b['import_s']:<7.2f} {b['load_s']:<6.2f} "
                     f"{b['run_s']:.2f} ({b['model_s']:.2f}){'':<2} {b['rest_s']:<6.2f} {b['lazy_s']:.2f} s: {lazy}")
    for r in result["rows"]:
        b = r["breakdown"]
        lines.append(f"{r['variant']}: heavy optional modules imported at start-up: "
                     f"{', '.join(b['heavy_at_startup']) or 'none'}; during the run: {', '.join(b['heavy_lazy']) or 'none'}")
    lines.append("python: python -c pass; import: import sfs_fast.cli.decompose; load: weights and run plan; run: the "
                 "folder run (discovery, decoding, faces, model, encoding, writing), model: its model call; rest: "
                 "argument parsing and interpreter exit (with torch loaded, most of it); breakdown of one "
                 "python -X importtime run")
    return "\n".join(lines)
