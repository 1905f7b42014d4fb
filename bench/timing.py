"""Timing of one callable the way DESIGN section 6 asks: warm-up, then timed runs with the
inputs rotated, summarised by median, p10, p90 and min. On CUDA the runs are timed with
events after a synchronize."""
from __future__ import annotations

import statistics
import time

import torch


def summarize(times_s: list[float]) -> dict:
    """Seconds per run -> ``{"median","p10","p90","p99","min","max","mean","runs"}`` in
    milliseconds (p99: the tail a user's slowest calls see; with fewer than 100 runs it is
    interpolated between the slowest two)."""
    ms = sorted(t * 1e3 for t in times_s)
    return {
        "median": statistics.median(ms),
        "p10": _quantile(ms, 0.10),
        "p90": _quantile(ms, 0.90),
        "p99": _quantile(ms, 0.99),
        "min": ms[0],
        "max": ms[-1],
        "mean": statistics.fmean(ms),
        "runs": len(ms),
    }


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_calls(fn, inputs: list, *, warmup: int, runs: int, device: str = "cpu") -> dict:
    """Call ``fn(inputs[i % len(inputs)])`` ``warmup`` times untimed, then ``runs`` times
    timed; return :func:`summarize` of the timed runs (milliseconds per call)."""
    if runs < 1:
        raise ValueError("runs: need at least one timed run")
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(runs):
        x = inputs[(warmup + i) % len(inputs)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return summarize(times)
