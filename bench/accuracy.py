"""``sfs-bench accuracy``: every precision path against float32, on the bundled example faces
and on procedural synthetic faces, with the accuracy budget of :mod:`sfs_fast.precision`
printed beside the time.

Per (method, path, image set): normal angular error median / p99 (degrees), albedo /
shading / recon max abs error as % of the fp32 range, light relative error (%), pass/fail,
and the median time per image over ``runs`` calls on that set (after ``warmup``), with its
ratio to eager fp32 timed in the same run. The last lines say which path ``auto`` takes
for each method (the first of :func:`sfs_fast.precision.auto_candidates` that passes on
every set; fp32 when none does).
"""
from __future__ import annotations

import numpy as np
import torch

from sfs_fast.bench.e2e import PathUnavailable, load_bench_model, make_decomposer
from sfs_fast.bench.timing import time_calls

DEFAULT_PATHS = ("eager", "fused", "bf16", "onnx", "onnx-int8", "onnx-int8-all")


def image_sets(synthetic: int = 8, seed: int = 0) -> dict:
    """``{"examples": [N,3,128,128], "synthetic": [S,3,128,128]}`` float32 tensors: the
    example faces shipped with the package and procedural faces."""
    from sfs_fast.samples import example_faces, face_like_images

    return {"examples": torch.from_numpy(np.ascontiguousarray(example_faces())),
            "synthetic": torch.from_numpy(face_like_images(synthetic, np.random.default_rng(20_000 + seed)))}


def run_accuracy(*, methods, paths=DEFAULT_PATHS, device="cpu", threads=None, warmup=1, runs=5, weights=None,
                 synthetic=8, log=print) -> dict:
    """Measure every (method, path, set); JSON-ready ``{"kind": "accuracy", "results": [...],
    "auto": {method: path}}``."""
    from sfs_fast.plan import plan_name
    from sfs_fast.precision import BUDGET, auto_candidates, check_budget, format_metrics, reference_outputs

    if threads is not None:
        torch.set_num_threads(int(threads))
    sets = image_sets(synthetic)
    results, auto = [], {}
    for method in methods:
        model, source = load_bench_model(method, weights)
        log(f"method {method}: weights {source}; sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
        refs = {name: reference_outputs(model, x) for name, x in sets.items()}
        eager_ms = {}
        for path in paths:
            try:
                dec = make_decomposer(path, model, device=device, threads=threads)
            except PathUnavailable as exc:
                results.append({"method": method, "path": path, "status": "skipped", "reason": str(exc)})
                log(f"  m{method} {path:12s} skipped: {exc}")
                continue
            except Exception as exc:
                results.append({"method": method, "path": path, "status": "failed",
                                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                log(f"  m{method} {path:12s} FAILED to build: {results[-1]['reason']}")
                continue
            for name, x in sets.items():
                report = check_budget(dec.decompose(x), refs[name])
                stats = time_calls(dec.decompose, [x], warmup=warmup, runs=runs, device=device)
                ms_img = stats["median"] / len(x)
                if path == "eager":
                    eager_ms[name] = ms_img
                row = {"method": method, "path": path, "set": name, "images": len(x), "status": "ok",
                       "passed": report["passed"], "metrics": report["metrics"], "failures": report["failures"],
                       "ms_per_image": ms_img, "ms": stats,
                       "speedup_vs_eager": eager_ms[name] / ms_img if name in eager_ms else None}
                results.append(row)
                log(f"  m{method} {path:12s} {name:9s} {ms_img:8.1f} ms/img"
                    + (f" (x{row['speedup_vs_eager']:.2f} eager)" if row["speedup_vs_eager"] else "")
                    + f"  {format_metrics(report)}")
        ok = {r["path"]: r for r in results if r["method"] == method and r.get("status") == "ok"}
        passing = {p for p in ok if all(r["passed"] for r in results
                                        if r["method"] == method and r["path"] == p and r.get("status") == "ok")}
        auto[str(method)] = next((plan_name(*c) for c in auto_candidates(None, device) if plan_name(*c) in passing),
                                 "fused (fp32)")
        log(f"  m{method} auto takes: {auto[str(method)]}")
    return {"kind": "accuracy", "budget": dict(BUDGET), "sets": {k: len(v) for k, v in sets.items()},
            "results": results, "auto": auto}


COLUMNS = ("method", "path", "set", "ms/img", "x eager", "normal med/p99 deg", "albedo %", "shading %",
           "recon %", "light %", "budget")


def rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["results"]:
        if r.get("status") != "ok":
            out.append([str(r["method"]), r["path"], "-", "-", "-", "-", "-", "-", "-", "-",
                        f"{r['status']}: {r['reason']}"])
            continue
        m = r["metrics"]

        def pct(key):
            return f"{100 * m[key]:.3f}" if key in m else "-"

        out.append([str(r["method"]), r["path"], r["set"], f"{r['ms_per_image']:.1f}",
                    f"{r['speedup_vs_eager']:.2f}" if r.get("speedup_vs_eager") else "-",
                    f"{m['normal_median_deg']:.3f}/{m['normal_p99_deg']:.3f}" if "normal_median_deg" in m else "-",
                    pct("albedo_range"), pct("shading_range"), pct("recon_range"), pct("light_rel"),
                    "ok" if r["passed"] else "FAIL"])
    return out


def format_table(result: dict) -> str:
    """Plain-text table plus the budget and auto lines."""
    table = [list(COLUMNS)] + rows(result)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    b = result["budget"]
    lines.append(f"budget vs fp32: normal median <= {b['normal_median_deg']} deg, p99 <= {b['normal_p99_deg']} deg; "
                 f"albedo/shading/recon max abs <= {100 * b['range_fraction']:g}% of range; "
                 f"light relative <= {100 * b['light_rel']:g}%")
    lines.append("auto takes: " + ", ".join(f"method {k}: {v}" for k, v in result["auto"].items()))
    return "\n".join(lines)


def markdown(result: dict, command: str | None = None) -> str:
    table = [list(COLUMNS)] + rows(result)
    out = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(r) + " |" for r in table[1:]]
    out.append("")
    out += [f"- {line}" for line in format_table(result).splitlines()[-2:]]
    if command:
        out.append(f"- command: `{command}`")
    return "\n".join(out) + "\n"
