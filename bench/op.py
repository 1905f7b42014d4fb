"""Micro benchmark of the fused shading op ``sh_shade``: every backend side by side, with the
memory floor measured in the same run.

    sfs-bench op [--batch B,..] [--size S] [--paths reference,compile,cpu] [--device cpu|cuda]
                 [--runs R] [--warmup W] [--threads T] [--json OUT]

For each shape (default B=16x3x128x128 and B=4x3x512x512) and mode (forward; forward+backward)
it times every backend (median, p10, p90 of >= 20 runs after warm-up, inputs rotated over
several sets so caches do not flatter, threads pinned), checks each backend's outputs against
the reference in the same run, and prints the floor: the bytes the fused op must move (forward
60 B/pixel: normal, residue, albedo in, shading, recon out; backward 96 B/pixel more) timed as a
``copy_`` of the same number of bytes. Columns are milliseconds; ratios are to the eager
reference and to the floor.
"""
from __future__ import annotations

import torch

from sfs_fast.kernels import available_backends, sh_shade

from sfs_fast.bench.floors import measure_copy_bandwidth
from sfs_fast.bench.timing import time_calls

DEFAULT_SHAPES = ((16, 3, 128, 128), (4, 3, 512, 512))
MODES = ("forward", "forward+backward")
BETA = 1.0  # the full op: residue and albedo present, recon = shading * (albedo - residue)


def op_bytes(shape, mode, dtype=torch.float32) -> int:
    """Bytes the fused op must read and write once (the floor's numerator)."""
    b, _, h, w = shape
    per_value = torch.empty((), dtype=dtype).element_size()
    values = 15 if mode == "forward" else 15 + 24  # fwd: 3 in x3, 2 out x3; bwd: 5 in x3, 3 out x3
    return b * h * w * values * per_value + b * 27 * per_value


def _inputs(shape, sets, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        n = torch.randn(shape, generator=g)
        out.append({
            "normal": n.to(device, dtype),
            "light": torch.randn(shape[0], 27, generator=g).to(device, dtype),
            "residue": (0.1 * torch.randn(shape, generator=g)).to(device, dtype),
            "albedo": torch.rand(shape, generator=g).to(device, dtype),
            "grad_shading": torch.randn(shape, generator=g).to(device, dtype),
            "grad_recon": torch.randn(shape, generator=g).to(device, dtype),
        })
    return out


def _forward_fn(backend):
    def fn(x):
        with torch.no_grad():
            return sh_shade(x["normal"], x["light"], x["residue"], x["albedo"], beta=BETA, backend=backend)
    return fn


def _forward_backward_fn(backend):
    def fn(x):
        leaves = [x[k].detach().requires_grad_() for k in ("normal", "light", "residue", "albedo")]
        shading, recon = sh_shade(*leaves, beta=BETA, backend=backend)
        return torch.autograd.grad([shading, recon], leaves, [x["grad_shading"], x["grad_recon"]])
    return fn


def _max_rel_err(got, want):
    err = 0.0
    for g, w in zip(got, want):
        scale = w.abs().max().clamp_min(1e-12)
        err = max(err, float(((g.float() - w.float()).abs().max() / scale).item()))
    return err


def run(shapes=DEFAULT_SHAPES, backends=None, runs=20, warmup=3, threads=2, device="cpu",
        modes=MODES, dtype=torch.float32, sets=None, log=None) -> dict:
    """Time every backend on every shape and mode; returns a JSON-serialisable dict.

    ``backends`` defaults to all that run on ``device`` (``reference`` first, it is the baseline).
    ``threads`` pins ``torch.set_num_threads`` (the cpu kernels follow it).
    """
    log = log or (lambda msg: None)
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    names = list(backends) if backends else available_backends(device)
    if "reference" not in names:
        names.insert(0, "reference")
    unknown = [n for n in names if n not in available_backends(device)]
    if unknown:
        raise ValueError(f"backends: not available on {device}: {', '.join(unknown)}")
    rows = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        nbytes_set = 6 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        # Enough sets that one full rotation exceeds ~256 MiB of inputs (larger than any LLC).
        n_sets = sets or max(2, min(8, (256 << 20) // max(nbytes_set, 1)))
        inputs = _inputs(shape, n_sets, device, dtype)
        for mode in modes:
            make = _forward_fn if mode == "forward" else _forward_backward_fn
            want = make("reference")(inputs[0])
            nbytes = op_bytes(shape, mode, dtype)
            copy = measure_copy_bandwidth(nbytes // 2, device=str(device), warmup=warmup, runs=runs)
            row = {"shape": list(shape), "mode": mode, "bytes": nbytes, "floor_ms": copy["ms"]["median"],
                   "copy_gbps": copy["gbps_median"], "backends": {}}
            for name in names:
                fn = make(name)
                log(f"op: {mode} {'x'.join(map(str, shape))} {name}")
                try:
                    got = fn(inputs[0])  # also the first (compiling) call for "compile"
                    err = _max_rel_err([t for t in got if t is not None], [t for t in want if t is not None])
                    stats = time_calls(fn, inputs, warmup=warmup, runs=runs, device=str(device))
                except Exception as exc:  # noqa: BLE001 - report the backend as failed, keep the others
                    row["backends"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                    continue
                row["backends"][name] = {"status": "ok", "ms": stats, "max_rel_err": err}
            ref = row["backends"].get("reference", {}).get("ms", {}).get("median")
            for name, r in row["backends"].items():
                if r["status"] == "ok":
                    r["speedup_vs_reference"] = ref / r["ms"]["median"] if ref else None
                    r["times_floor"] = r["ms"]["median"] / row["floor_ms"]
            rows.append(row)
    extension = None
    if device.type == "cpu":
        from sfs_fast.kernels import cpu
        extension = {"built": cpu._cpu is not None, "isa": cpu._cpu.isa() if cpu._cpu else None}
    return {"kind": "op", "device": str(device), "threads": torch.get_num_threads(), "dtype": str(dtype),
            "runs": runs, "warmup": warmup, "backends": names, "cpu_extension": extension, "rows": rows}


def format_table(result: dict) -> str:
    """A text table: one line per shape and mode; median [p10-p90] ms per backend, then the
    floor, the fused-cpu speed-up over the eager reference and its distance to the floor."""
    names = result["backends"]
    head = ["shape", "mode"] + names + ["floor"] + [f"ref/{n}" for n in names if n != "reference"] + \
        [f"{n}/floor" for n in names if n != "reference"]
    lines = [head]
    for row in result["rows"]:
        cells = ["x".join(map(str, row["shape"])), row["mode"]]
        for n in names:
            r = row["backends"].get(n, {})
            cells.append(f"{r['ms']['median']:.3f} [{r['ms']['p10']:.3f}-{r['ms']['p90']:.3f}]"
                         if r.get("status") == "ok" else "failed")
        cells.append(f"{row['floor_ms']:.3f}")
        for n in names:
            if n != "reference":
                r = row["backends"].get(n, {})
                cells.append(f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else "-")
        for n in names:
            if n != "reference":
                r = row["backends"].get(n, {})
                cells.append(f"{r['times_floor']:.2f}" if r.get("status") == "ok" else "-")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    errs = [f"{n}: {max(row['backends'][n].get('max_rel_err', 0.0) for row in result['rows'] if n in row['backends']):.1e}"
            for n in names]
    text.append(f"ms: median [p10-p90] of {result['runs']} runs after {result['warmup']} warm-up, "
                f"{result['threads']} threads, {result['device']}, {result['dtype']}; floor = copy_ of the op's bytes "
                f"in this run; max rel err vs reference: {', '.join(errs)}")
    failed = [f"{n} ({row['mode']} {'x'.join(map(str, row['shape']))}): {r['reason']}"
              for row in result["rows"] for n, r in row["backends"].items() if r["status"] == "failed"]
    text += [f"failed: {f}" for f in failed]
    return "\n".join(text)
