"""Reports of a benchmark result (the dict ``run_e2e`` / ``run_train`` / the op benchmark
return): JSON, a plain-text table for the terminal, a Markdown table, a matplotlib plot."""
from __future__ import annotations

import json
import math

from sfs_fast.atomic import atomic_destination, atomic_write
from sfs_fast.bench.floors import rate_line

COLUMNS = ("method", "batch", "path", "median ms", "ms/img", "p10", "p90", "p99", "min",
           "x eager", "x floor", "max|diff|", "worst % range", "recon % range", "note")


def write_json(result: dict, path) -> None:
    """Write ``result`` to ``path`` atomically (temporary file, then rename)."""
    write_text(path, json.dumps(result, indent=1, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (sfs_fast.atomic)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def rows(result: dict) -> list[list[str]]:
    """Table rows (strings) of the e2e or train results, in COLUMNS order."""
    out = []
    for r in result["results"]:
        label = r.get("label", r["path"])
        if r.get("status") != "ok":
            out.append([str(r["method"]), str(r["batch"]), label] + ["-"] * (len(COLUMNS) - 4)
                       + [f"{r.get('status')}: {r.get('reason')}"])
            continue
        ms, diff = r["ms"], r["diff"]
        note = []
        if r["path"] == "compile" and r.get("first_call_s") is not None:
            note.append(f"compile {r['first_call_s']:.1f} s")
        if r.get("executed"):  # a peer: what it says it ran at
            note.append(r["executed"]["note"])
        if r.get("budget") and r["path"] != "eager":  # sfs_fast.precision's accuracy budget vs eager fp32
            note.append(f"budget {r['budget']['line']}")
        out.append([
            str(r["method"]), str(r["batch"]), label,
            _fmt(ms["median"]), _fmt(ms["median"] / r["batch"]), _fmt(ms["p10"]), _fmt(ms["p90"]),
            _fmt(ms.get("p99")), _fmt(ms["min"]),
            _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("ratio_to_floor"), ".2f"),
            f"{diff['max_abs']:.1e}", f"{100 * diff['max_rel_range']:.3f} ({diff['worst_output']})",
            f"{100 * diff['per_output']['recon']['rel_range']:.3f}" if "recon" in diff.get("per_output", {}) else "-",
            "; ".join(note),
        ])
    return out


def floor_lines(result: dict) -> list[str]:
    """The floor of the table, one line each: the rates measured, the floor per image per
    method, and the precision split of each path whose floor is not all fp32."""
    floor = result.get("floor", {})
    lines = []
    gemm = floor.get("gemm")
    if gemm:
        lines.append(f"GEMM rate (fp32 {gemm['n']}^3, median of {gemm['ms']['runs']}): "
                     f"{gemm['gflops_median']:.1f} GFLOP/s (best {gemm['gflops_best']:.1f})")
        others = [r for p, r in (floor.get("rates") or {}).items() if p != "fp32"]
        if others:
            lines.append("other matrix rates: " + "; ".join(rate_line(r) for r in others))
        groups = floor.get("gemm_per_group") or []
        if len(groups) > 1:
            rates = [g["gflops_median"] for g in groups]
            lines.append(f"GEMM rate re-measured before each method/batch group: {min(rates):.1f}-{max(rates):.1f} GFLOP/s "
                         "(each row's floor uses its group's rates; the ms/image below use the first)")
        for m, info in floor.get("models", {}).items():
            per_img = info["flops_per_image"] / (gemm["gflops_median"] * 1e9) * 1e3
            lines.append(f"method {m}: {info['flops_per_image'] / 1e9:.2f} GFLOP/image (counted) -> fp32 floor "
                         f"{per_img:.1f} ms/image; weights: {info['weights']}")
    lines += mix_lines(result)
    return lines


def mix_lines(result: dict) -> list[str]:
    """``x floor`` of a path is against the floor of its own precisions: one line per (method,
    path) whose FLOPs are not all fp32, with the split."""
    seen, lines = set(), []
    for r in result.get("results", []):
        mix = r.get("floor_mix") or {}
        key = (r["method"], r["path"])
        if key in seen or set(mix) <= {"fp32"}:
            continue
        seen.add(key)
        total = sum(mix.values()) or 1
        parts = ", ".join(f"{100 * f / total:.0f}% {p}" for p, f in sorted(mix.items(), key=lambda kv: -kv[1]))
        lines.append(f"method {r['method']} {r['path']}: floor from {parts} of the FLOPs, each at its precision's rate")
    return lines


def env_line(env: dict) -> str:
    load = env.get("load_average")
    load_s = "/".join(f"{x:.2f}" for x in load) if load else "?"
    return (f"{env.get('date_utc')} UTC; {env.get('cpu')} ({env.get('cores')} cores, {env.get('threads')} threads); "
            f"GPU {env['gpu']['name'] if env.get('gpu') else 'none'}; torch {env['versions']['torch']}, "
            f"onnxruntime {env['versions']['onnxruntime']}"
            + (f", openvino {env['versions']['openvino']}" if env["versions"].get("openvino") else "")
            + f"; load average before {load_s}")


def text_table(result: dict) -> str:
    """A fixed-width table for the terminal, floors and environment underneath."""
    body = [list(COLUMNS)] + rows(result)
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c.rjust(w) if i not in (2,) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]
             for r in body]
    extra = floor_lines(result)
    if "env" in result:
        extra.append(env_line(result["env"]))
    return "\n".join(lines + [""] + extra)


def markdown_table(result: dict, command: str | None = None) -> str:
    """A Markdown table with the floor, the environment and (if given) the command line."""
    body = rows(result)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    out.append("")
    out += [f"- {line}" for line in floor_lines(result)]
    if "env" in result:
        out.append(f"- {env_line(result['env'])}")
    if command:
        out.append(f"- command: `{command}`")
    out.append("- x eager: eager median / path median (higher is faster); x floor: path median / the floor of "
               "the path's own precisions (1.00 = at the compute floor); p99: the 99th percentile of the timed "
               "calls; max|diff|: max |path - eager| over all outputs; worst % range: "
               "the largest of max|diff| / (max - min of eager's output) over the outputs (and which); "
               "recon % range: the same for the reconstruction.")
    return "\n".join(out) + "\n"


def write_markdown(result: dict, path, command: str | None = None) -> None:
    write_text(path, markdown_table(result, command))


def plot(result: dict, path) -> None:
    """Latency per image for each path against batch, one panel per method, the compute
    floor as a dashed line. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"--plot needs matplotlib ({exc}); pip install matplotlib") from exc
    ok = [r for r in result["results"] if r.get("status") == "ok"]
    methods = sorted({r["method"] for r in result["results"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in ok if r["method"] == method]
        for label in dict.fromkeys(r.get("label", r["path"]) for r in mine):
            pts = sorted((r["batch"], r["ms"]["median"] / r["batch"]) for r in mine if r.get("label", r["path"]) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        floors = sorted({(r["batch"], r.get("floor_fp32_ms", r.get("floor_ms")) / r["batch"]) for r in result["results"]
                         if r["method"] == method and r.get("floor_fp32_ms", r.get("floor_ms"))})
        if floors:
            ax.plot([p[0] for p in floors], [p[1] for p in floors], "k--", label="fp32 compute floor")
        batches = sorted({r["batch"] for r in result["results"] if r["method"] == method})
        if len(batches) > 1 and min(batches) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per image (median)")
        ax.set_title(f"method {method} ({result.get('kind', '')})")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_destination(path) as tmp:  # the temporary name keeps the suffix: savefig's format
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
