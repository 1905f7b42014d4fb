"""End-to-end inference benchmark: every method, batch and path through the one
``Decomposer``, side by side in one run, each path checked against eager on the same input.

Paths are the named plans of :data:`sfs_fast.plan.NAMED_PLANS`:
- ``eager``: the model as built (reference shading, no rewrites): the baseline.
- ``fused``: ``sfs_fast.optimize.optimize_for_inference`` (BatchNorm folded, heads' 1x1 conv
  before the upsampling, channels-last, fused shading op); ``--fused-off`` switches them.
- ``compile``: ``torch.compile`` of the fused model; the first call (compilation) is timed
  apart from the runs.
- ``onnx``, ``onnx-int8``, ``onnx-fp16``: ONNX Runtime through the Decomposer's ``onnx``
  backend, on a file exported (``sfs_fast.export.export_onnx``) at that precision;
  ``onnx-int8-all``: int8 on every convolution but the outputs (over the accuracy budget).
- ``bf16``, ``compile-bf16``, ``fp16``: the PyTorch low-precision model
  (``sfs_fast.precision.to_low_precision``), eager or compiled.
- ``tensorrt``: the fp16 file on ONNX Runtime's TensorRT provider.

- ``openvino``, ``openvino-bf16``: the Decomposer's ``openvino`` backend, OpenVINO's CPU
  plugin on the exported fp32 file, fp32 or bf16 with the PyTorch bf16 path's float32
  islands, with what OpenVINO reports it ran at.

Peers (:mod:`sfs_fast.bench.peers`, bench-only runners, not Decomposer paths):
``openvino-bf16-all``, the whole graph under OpenVINO's bf16 hint (over the budget).

Floors per precision: each row's floor splits the model's FLOPs by the precision each layer
computes in on that path (:func:`sfs_fast.bench.floors.path_layer_precisions`; a peer: the
runtime precision OpenVINO reports), each part over its precision's matrix rate measured in
the run; ``floor_fp32_ms`` is the all-fp32 floor beside it.

A path that cannot run here (no such hardware, an optional package not installed) is listed
with ``status: "skipped"`` and the reason; one that breaks is listed as ``failed``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sfs_fast.plan import NAMED_PLANS, RunPlan, named_plan
from sfs_fast.precision import output_error
from sfs_fast.samples import face_like_images

from sfs_fast.bench.floors import (MATMUL_PRECISIONS, compute_floor_ms, layer_flops, measure_gemm_rate,
                                   measure_matmul_rate, mixed_floor_ms, path_layer_precisions, precision_mix,
                                   rate_line)
from sfs_fast.bench.peers import PEER_PATHS, PeerUnavailable, make_peer, module_precisions
from sfs_fast.bench.timing import time_calls

PATHS = tuple(NAMED_PLANS) + tuple(PEER_PATHS)
DEFAULT_PATHS = ("eager", "fused", "compile", "onnx", "onnx-int8", "bf16", "openvino", "openvino-bf16",
                 "openvino-bf16-all")
INPUT_SIZE = 128
ROTATED_INPUTS = 3


class PathUnavailable(Exception):
    """A path that cannot run on this machine; the message is the reason shown."""


def bench_images(batch: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch,3,128,128]`` float32 procedural face-like pictures (activation ranges like
    real use, which is what quantized paths are calibrated for), seeded from ``gen``."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
    return torch.from_numpy(face_like_images(batch, np.random.default_rng(seed)))


def load_bench_model(method: int, weights=None, seed: int = 0, size: int = INPUT_SIZE):
    """The model to benchmark and where its weights came from: ``weights`` if given, else the
    bundled demo weights, else random weights with calibrated BatchNorm statistics."""
    from sfs_fast import build_model, weights as weights_mod
    from sfs_fast.models import calibrate_batchnorm

    if weights is not None:
        return weights_mod.load_any(weights, method=method).eval(), str(weights)
    default = weights_mod.default_weights(method)
    if default is not None:
        return weights_mod.load(default).eval(), str(default)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # Face-like pictures at the Decomposer's size, so BatchNorm sees activation ranges like real use.
    batches = (bench_images(2, gen) if size == INPUT_SIZE else torch.rand(2, 3, size, size, generator=gen)
               for _ in range(2))
    return calibrate_batchnorm(build_model(method), batches), "random (BatchNorm calibrated)"


def path_plan(path: str, *, device: str, threads: int | None, fused_options: dict | None = None) -> RunPlan:
    """The :class:`~sfs_fast.plan.RunPlan` of ``path`` on this run's device and threads;
    :class:`PathUnavailable` when the plan cannot exist or its hardware or package is not
    here."""
    from sfs_fast.precision import capabilities, missing_package

    if path not in NAMED_PLANS:
        raise ValueError(f"paths: unknown path {path!r}; choose from {', '.join(PATHS)}")  # peers: make_peer
    try:
        plan = named_plan(path, device=device, threads=threads, optimizations=fused_options)
    except ValueError as exc:  # e.g. PyTorch fp16 on the CPU
        raise PathUnavailable(str(exc).removeprefix("precision: ")) from exc
    package = missing_package(plan.backend)
    if package:
        raise PathUnavailable(f"{package} is not installed (pip install 'sfs_fast[{plan.backend}]')")
    if plan.backend == "onnx":
        import onnxruntime

        missing = [p for p in plan.providers or () if p not in onnxruntime.get_available_providers()]
        if missing:
            raise PathUnavailable(f"onnxruntime has no {missing[0]} here")
    if plan.backend != "onnx" and plan.precision != "fp32":
        caps = capabilities(plan.device)
        if not caps[plan.precision]:
            raise PathUnavailable(f"no {plan.precision} hardware on this {device} ({caps['why'][plan.precision]})")
    return plan


def make_decomposer(path: str, model, *, device: str, threads: int | None, fused_options: dict | None = None):
    """The ``Decomposer`` that runs ``path``; raise :class:`PathUnavailable` with the reason
    when it cannot run here."""
    from sfs_fast.decomposer import Decomposer

    if path in PEER_PATHS:  # a bench-only runner on the exported file, not a Decomposer path
        try:
            return make_peer(path, model, device=device, threads=threads)
        except PeerUnavailable as exc:
            raise PathUnavailable(str(exc)) from exc
    plan = path_plan(path, device=device, threads=threads, fused_options=fused_options)
    if plan.backend == "onnx":
        return _onnx_file_decomposer(model, plan)
    return Decomposer(model, plan=plan)


def export_path_file(model, plan: RunPlan, target) -> str:
    """Export ``model`` at the plan's precision (and int8 layers) to ``target``, as the onnx
    paths run it; returns ``target``. The exporter's own parity gate is opened wide: the
    benchmarks compare every path with eager themselves, in the same run, and report the
    difference beside the time instead of refusing the path."""
    from sfs_fast.export import export_onnx

    try:
        export_onnx(model, target, precision=plan.precision or "fp32", atol=1e6, verify_batches=(1,), sidecar=False,
                    int8_layers=plan.int8_layers or "budget", log=None)
    except ModuleNotFoundError as exc:  # onnx / onnxslim not installed: the one reason to skip
        raise PathUnavailable(f"the ONNX exporter needs a package that is not installed ({exc})") from exc
    return str(target)


def _onnx_file_decomposer(model, plan: RunPlan):
    """Export ``model`` at the plan's precision to a temporary file (:func:`export_path_file`)
    and open it through the Decomposer's ``onnx`` backend."""
    import shutil
    import tempfile

    from sfs_fast.decomposer import Decomposer

    folder = tempfile.mkdtemp(prefix="sfs_bench_onnx_")
    try:
        target = export_path_file(model, plan, f"{folder}/method{model.method}_{plan.precision}.onnx")
        return Decomposer(onnx=target, method=model.method, plan=plan)
    finally:  # the session holds the model in memory
        shutil.rmtree(folder, ignore_errors=True)


def compare(outputs: dict, reference: dict) -> dict:
    """Per output: max absolute difference and that difference over the reference's range
    (max - min), from :func:`sfs_fast.precision.output_error`. ``max_abs`` and
    ``max_rel_range`` are the worst over all outputs."""
    per = {}
    for name, ref in reference.items():
        if name not in outputs:
            per[name] = {"max_abs": float("inf"), "rel_range": float("inf")}
            continue
        err = output_error(outputs[name], ref)
        span = err["ref_span"]
        per[name] = {"max_abs": err["max_abs"], "rel_range": err["max_abs"] / span if span > 0 else err["max_abs"]}
    return {
        "max_abs": max((v["max_abs"] for v in per.values()), default=0.0),
        "max_rel_range": max((v["rel_range"] for v in per.values()), default=0.0),
        "worst_output": max(per, key=lambda k: per[k]["rel_range"]) if per else None,
        "per_output": per,
    }


def check_paths(paths, known, what: str = "path") -> None:
    """ValueError naming the ``paths`` that are not among ``known``."""
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ValueError(f"paths: unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")


def start_measuring(threads, gemm_n: int, device: str = "cpu", log=print) -> tuple[int, dict]:
    """Pin the threads (None keeps torch's) and measure the fp32 GEMM rate the floors use;
    returns ``(threads, gemm)``."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    log(f"measuring the fp32 GEMM rate ({gemm_n}^3, {threads} threads) ...")
    gemm = measure_gemm_rate(gemm_n, device=device)
    log(f"  {gemm['gflops_median']:.1f} GFLOP/s (median), {gemm['gflops_best']:.1f} best")
    return threads, gemm


def path_precisions(path: str) -> set[str]:
    """The precisions whose matrix rates the floor of ``path`` may need (fp32 always: the
    float32 layers of a mixed path, and the fallback of a peer)."""
    asked = PEER_PATHS[path] if path in PEER_PATHS else NAMED_PLANS[path].get("precision", "fp32")
    return {"fp32", asked}


def measure_rates(precisions, gemm_n: int, device: str = "cpu", log=print) -> dict:
    """:func:`~sfs_fast.bench.floors.measure_matmul_rate` of each precision (fp32 first), logged;
    an emulated one is said to be."""
    rates = {}
    for prec in sorted(precisions, key=MATMUL_PRECISIONS.index):
        rate = rates[prec] = measure_matmul_rate(prec, gemm_n, device=device)
        log("  " + rate_line(rate))
    return rates


def run_e2e(*, methods, batches, paths=DEFAULT_PATHS, device="cpu", threads=None, warmup=2, runs=20,
            size=INPUT_SIZE, weights=None, fused_options=None, gemm_n=2048, log=print) -> dict:
    """Benchmark every (method, batch, path); return the JSON-ready result (see README)."""
    if size != INPUT_SIZE:
        raise ValueError(f"size: the models and the Decomposer take {INPUT_SIZE}x{INPUT_SIZE} images, not {size}")
    check_paths(paths, PATHS)
    if threads is not None:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    needed = set().union(*(path_precisions(p) for p in paths))
    log(f"measuring the matrix rates of {', '.join(sorted(needed))} ({gemm_n}^3 or less, {threads} threads) ...")
    rates = measure_rates(needed, gemm_n, device, log)
    gen = torch.Generator().manual_seed(1234)
    results, models, group_rates = [], {}, []
    for method in methods:
        model, source = load_bench_model(method, weights)
        per_layer = layer_flops(model, size)
        flops = sum(per_layer.values())
        models[str(method)] = {"weights": source, "flops_per_image": flops,
                               "parameters": sum(p.numel() for p in model.parameters())}
        log(f"method {method}: {flops / 1e9:.2f} GFLOP per image, weights: {source}")
        run = _Run(model=model, per_layer=per_layer, device=device, threads=threads, fused_options=fused_options,
                   warmup=warmup, runs=runs, log=log,
                   inputs={b: [bench_images(b, gen) for _ in range(ROTATED_INPUTS)] for b in batches})
        for batch in batches:
            # the machines are shared: the rates are measured again right before each group, so
            # the floor of a row reflects the load the row saw
            run.rates = rates if not group_rates else measure_rates(needed, gemm_n, device, log)
            group_rates.append({"method": method, "batch": batch,
                                **{f"{k}_gflops": r.get("gflops_median") for k, r in run.rates.items()},
                                "gflops_median": run.rates["fp32"]["gflops_median"]})
            results += [_bench_row(run, path, batch) for path in paths]
            run.cached = {k: v for k, v in run.cached.items() if k[1] is None}  # per-batch ones (compile) go
    _add_speedups(results)
    return {"kind": "e2e", "floor": {"gemm": rates["fp32"], "rates": rates, "models": models,
                                     "gemm_per_group": group_rates,
                                     "definition": "per path: FLOPs per image (FlopCounterMode on the model) x batch, "
                                                   "split by the precision each layer computes in, each part over its "
                                                   "precision's median matrix rate measured right before each "
                                                   "(method, batch) group"},
            "fused_options": _fused_options(fused_options), "results": results}


@dataclass
class _Run:
    """What the rows of one method share: the model, its FLOPs per layer, the inputs per batch,
    the eager reference per batch, the built decomposers, the group's matrix rates."""

    model: object
    per_layer: dict
    device: str
    threads: int
    fused_options: dict | None
    warmup: int
    runs: int
    log: object
    inputs: dict
    reference: dict = field(default_factory=dict)
    cached: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)

    def gflops(self) -> dict:
        return {p: r["gflops_median"] for p, r in self.rates.items() if "gflops_median" in r}


def _bench_row(run: _Run, path: str, batch: int) -> dict:
    """One (path, batch) row: build (or reuse) the path, check it against eager, time it."""
    m = run.model.method
    row = {"method": m, "batch": batch, "path": path,
           "floor_fp32_ms": compute_floor_ms(sum(run.per_layer.values()), batch, run.rates["fp32"]["gflops_median"]),
           "gemm_gflops": run.rates["fp32"]["gflops_median"]}
    row["floor_ms"] = row["floor_fp32_ms"]
    try:
        dec, setup_s = _decomposer_for(path, run.model, batch, run.cached, run.device, run.threads, run.fused_options)
    except PathUnavailable as exc:
        run.log(f"  m{m} b{batch} {path:10s} skipped: {exc}")
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a path that breaks must not sink the others
        run.log(f"  m{m} b{batch} {path:10s} FAILED to build: {_reason(exc)}")
        return {**row, "status": "failed", "reason": _reason(exc)}
    try:
        x = run.inputs[batch]
        t0 = time.perf_counter()
        outs = dec.decompose(x[0])
        first_call_s = time.perf_counter() - t0
        if path == "eager":
            run.reference[batch] = outs
        if batch not in run.reference:  # eager not among the paths: make the reference now
            run.reference[batch] = make_decomposer("eager", run.model, device=run.device,
                                                   threads=run.threads).decompose(x[0])
        ref = run.reference[batch]
        diff, budget = compare(outs, ref), _budget(outs, ref)
        stats = time_calls(dec.decompose, x, warmup=run.warmup, runs=run.runs, device=run.device)
    except Exception as exc:
        run.log(f"  m{m} b{batch} {path:10s} FAILED: {_reason(exc)}")
        return {**row, "status": "failed", "reason": _reason(exc)}
    row.update(_row_floor(run, path, dec, batch))
    row.update(status="ok", reason=None, ms=stats, ms_per_image=stats["median"] / batch, setup_s=setup_s,
               first_call_s=first_call_s, diff=diff, budget=budget,
               ratio_to_floor=stats["median"] / row["floor_ms"] if row["floor_ms"] else None)
    if _executed(dec):  # OpenVINO: what it ran at, as it reports it
        row["executed"] = {k: v for k, v in _executed(dec).items() if k != "layer_precisions"}
    run.log(f"  m{m} b{batch} {path:10s} {stats['median']:9.1f} ms  ({stats['median'] / batch:7.1f} ms/img)"
            + (f"  x{row['ratio_to_floor']:.2f} floor" if row["ratio_to_floor"] else "")
            + f"  max|diff| {diff['max_abs']:.2e} ({100 * diff['max_rel_range']:.3f}% of range, {diff['worst_output']})"
            + f"  budget: {budget['line']}" + (f"  [{row['executed']['note']}]" if "executed" in row else ""))
    return row


def _row_floor(run: _Run, path: str, dec, batch: int) -> dict:
    """The row's floor at its own precisions: ``floor_ms`` (None when a rate it needs is
    missing) and ``floor_mix`` (FLOPs per image by precision)."""
    if _executed(dec):  # what the compiled model ran, not what was asked
        precisions = module_precisions(_executed(dec), run.per_layer)
    else:
        precisions = path_layer_precisions(dec.plan, run.model)
    mix = precision_mix(run.per_layer, precisions)
    return {"floor_ms": mixed_floor_ms(mix, batch, run.gflops()), "floor_mix": mix}


def _executed(dec) -> dict | None:
    """What an OpenVINO path (a peer or the Decomposer's openvino backend) reports it ran."""
    return getattr(getattr(dec, "runner", None), "executed", None)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _budget(outputs, reference):
    """The accuracy budget of :func:`sfs_fast.precision.check_budget` against eager fp32:
    ``{passed, metrics, failures, line}``."""
    from sfs_fast.precision import check_budget, format_metrics

    report = check_budget(outputs, reference)
    return {"passed": report["passed"], "metrics": report["metrics"], "failures": report["failures"],
            "line": format_metrics(report)}


def _fused_options(overrides):
    from sfs_fast.optimize import FUSED_OPTIONS

    return {**FUSED_OPTIONS, **(overrides or {})}


def _decomposer_for(path, model, batch, cached, device, threads, fused_options):
    """Build (or reuse) the Decomposer of ``path``. torch.compile specialises on the batch
    size, so compiled paths are built per batch with dynamo's caches reset; the others once
    per method. Returns ``(decomposer, setup seconds)``."""
    key = (path, batch if path == "compile" else None)
    if key not in cached:
        if path == "compile":
            torch._dynamo.reset()
        t0 = time.perf_counter()
        cached[key] = (make_decomposer(path, model, device=device, threads=threads, fused_options=fused_options),
                       time.perf_counter() - t0)
    return cached[key]


def _add_speedups(results):
    eager = {(r["method"], r["batch"]): r["ms"]["median"] for r in results
             if r["path"] == "eager" and r.get("status") == "ok"}
    for r in results:
        base = eager.get((r["method"], r["batch"]))
        r["speedup_vs_eager"] = base / r["ms"]["median"] if r.get("status") == "ok" and base else None
