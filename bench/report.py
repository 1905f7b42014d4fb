"""Reports of a benchmark result (the dict ``run_e2e`` / ``run_train`` / the op benchmark
return): JSON, a plain-text table for the terminal, a Markdown table, a matplotlib plot."""
from __future__ import annotations

import json
import math

from sfs_fast.atomic import atomic_destination, atomic_write

COLUMNS = ("method", "batch", "path", "median ms", "ms/img", "p10", "p90", "min",
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
        if r.get("budget") and r["path"] != "eager":  # sfs_fast.precision's accuracy budget vs eager fp32
            note.append(f"budget {r['budget']['line']}")
        out.append([
            str(r["method"]), str(r["batch"]), label,
            _fmt(ms["median"]), _fmt(ms["median"] / r["batch"]), _fmt(ms["p10"]), _fmt(ms["p90"]), _fmt(ms["min"]),
            _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("ratio_to_floor"), ".2f"),
            f"{diff['max_abs']:.1e}", f"{100 * diff['max_rel_range']:.3f} ({diff['worst_output']})",
            f"{100 * diff['per_output']['recon']['rel_range']:.3f}" if "recon" in diff.get("per_output", {}) else "-",
            "; ".join(note),
        ])
    return out


def floor_lines(result: dict) -> list[str]:
    """The floor of the table, one line each: rate measured and floor per image per method."""
    floor = result.get("floor", {})
    lines = []
    gemm = floor.get("gemm")
    if gemm:
        lines.append(f"GEMM rate (fp32 {gemm['n']}^3, median of {gemm['ms']['runs']}): "
                     f"{gemm['gflops_median']:.1f} GFLOP/s (best {gemm['gflops_best']:.1f})")
        groups = floor.get("gemm_per_group") or []
        if len(groups) > 1:
            rates = [g["gflops_median"] for g in groups]
            lines.append(f"GEMM rate re-measured before each method/batch group: {min(rates):.1f}-{max(rates):.1f} GFLOP/s "
                         "(each row's floor uses its group's rate; the ms/image below use the first)")
        for m, info in floor.get("models", {}).items():
            per_img = info["flops_per_image"] / (gemm["gflops_median"] * 1e9) * 1e3
            lines.append(f"method {m}: {info['flops_per_image'] / 1e9:.2f} GFLOP/image (counted) -> floor "
                         f"{per_img:.1f} ms/image; weights: {info['weights']}")
    return lines


def env_line(env: dict) -> str:
    load = env.get("load_average")
    load_s = "/".join(f"{x:.2f}" for x in load) if load else "?"
    return (f"{env.get('date_utc')} UTC; {env.get('cpu')} ({env.get('cores')} cores, {env.get('threads')} threads); "
            f"GPU {env['gpu']['name'] if env.get('gpu') else 'none'}; torch {env['versions']['torch']}, "
            f"onnxruntime {env['versions']['onnxruntime']}; load average before {load_s}")


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
    out.append("- x eager: eager median / path median (higher is faster); x floor: path median / floor "
               "(1.00 = at the compute floor); max|diff|: max |path - eager| over all outputs; worst % range: "
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
        floors = sorted({(r["batch"], r["floor_ms"] / r["batch"]) for r in result["results"]
                         if r["method"] == method and r.get("floor_ms")})
        if floors:
            ax.plot([p[0] for p in floors], [p[1] for p in floors], "k--", label="compute floor")
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
