"""The floors every benchmark table prints (DESIGN section 6).

- Compute floor of a model: FLOPs per image, counted from the model itself with
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, transposed convolutions, linear
  layers: 2 FLOPs per multiply-add), over a GEMM rate measured in the same run.
- Memory floor of an op: bytes it must move over a copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfs_fast.bench.timing import time_calls


def count_flops(model: torch.nn.Module, size: int = 128, batch: int = 1) -> int:
    """FLOPs of one forward of ``model`` on a ``[batch,3,size,size]`` input, divided by
    ``batch`` (FLOPs per image). The model runs once, on CPU copies of nothing: in place."""
    device = next(model.parameters()).device
    x = torch.rand(batch, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def flops_by_module(model: torch.nn.Module, size: int = 128) -> dict[str, int]:
    """FLOPs per image of each top-level child of ``model`` (for profiles and reports)."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.rand(1, 3, size, size, device=device))
    flops = counter.get_flop_counts()
    out = {}
    for name in dict(model.named_children()):
        key = next((k for k in flops if k.split(".")[-1] == name or k.endswith("." + name)), None)
        if key is not None:
            out[name] = int(sum(flops[key].values()))
    return out


def measure_gemm_rate(n: int = 2048, *, device: str = "cpu", dtype=torch.float32,
                      warmup: int = 2, runs: int = 7) -> dict:
    """Rate of an ``n x n x n`` matrix product (``torch.mm``) on ``device`` with the current
    thread setting. Returns ``{"n", "dtype", "gflops_median", "gflops_best", "ms"}``; the
    median rate is the one floors use (every path is summarised by its median too)."""
    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randn(n, n, generator=gen).to(device, dtype), torch.randn(n, n, generator=gen).to(device, dtype))
            for _ in range(2)]
    stats = time_calls(lambda ab: torch.mm(*ab), mats, warmup=warmup, runs=runs, device=device)
    flop = 2.0 * n ** 3
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "gflops_median": flop / (stats["median"] * 1e-3) / 1e9,
        "gflops_best": flop / (stats["min"] * 1e-3) / 1e9,
        "ms": stats,
    }


def measure_copy_bandwidth(nbytes: int = 64 << 20, *, device: str = "cpu", warmup: int = 2, runs: int = 9) -> dict:
    """Bandwidth of ``dst.copy_(src)`` for ``nbytes`` (read ``nbytes`` + write ``nbytes``).
    Returns ``{"bytes", "gbps_median", "gbps_best", "ms"}`` in GB/s of bytes moved."""
    numel = max(1, nbytes // 4)
    pairs = [(torch.rand(numel, device=device), torch.empty(numel, device=device)) for _ in range(2)]
    stats = time_calls(lambda p: p[1].copy_(p[0]), pairs, warmup=warmup, runs=runs, device=device)
    moved = 2.0 * numel * 4
    return {
        "bytes": numel * 4,
        "gbps_median": moved / (stats["median"] * 1e-3) / 1e9,
        "gbps_best": moved / (stats["min"] * 1e-3) / 1e9,
        "ms": stats,
    }


def compute_floor_ms(flops_per_image: float, batch: int, gflops: float) -> float:
    """Milliseconds a batch needs at ``gflops`` (GFLOP/s): the e2e floor."""
    return flops_per_image * batch / (gflops * 1e9) * 1e3


def memory_floor_ms(nbytes: float, gbps: float) -> float:
    """Milliseconds to move ``nbytes`` at ``gbps`` (GB/s): the op floor."""
    return nbytes / (gbps * 1e9) * 1e3
