"""Training-step benchmark: one optimizer step (forward, backward, Adam update) per method
with the reference shading (plain PyTorch) against the fused op, to show what the kernel does
for training. The paths are :data:`sfs_fast.plan.TRAIN_PLANS`: the shading backend of the
named plan (``eager``: reference, ``fused``: auto) is the only difference; the training model
gets it from :func:`sfs_fast.optimize.with_shading_backend`. Both start from the same
weights; their outputs and gradients are compared on the same batch before timing."""
from __future__ import annotations

import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfs_fast.optimize import with_shading_backend
from sfs_fast.plan import TRAIN_PLANS, named_plan

from sfs_fast.bench.e2e import INPUT_SIZE, ROTATED_INPUTS, check_paths, compare, load_bench_model, start_measuring
from sfs_fast.bench.floors import compute_floor_ms
from sfs_fast.bench.timing import time_calls

# path -> the shading backend of its named plan
TRAIN_PATHS = {path: named_plan(plan).shading_backend for path, plan in TRAIN_PLANS.items()}


def step_loss(outputs: dict, x: torch.Tensor) -> torch.Tensor:
    """A loss that touches every output (reconstruction L1 plus the mean magnitude of the
    others), so every head and the shading op are in the backward pass."""
    loss = (outputs["recon"] - x).abs().mean()
    for name, value in outputs.items():
        if name != "recon":
            loss = loss + 1e-3 * value.abs().mean()
    return loss


def count_train_flops(model, size: int = INPUT_SIZE, batch: int = 1) -> int:
    """FLOPs per image of forward + backward, counted by ``FlopCounterMode`` (train mode)."""
    x = torch.rand(batch, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        step_loss(model(x), x).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops()) // batch


def _gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def run_train(*, methods, batches, paths=tuple(TRAIN_PATHS), threads=None, warmup=1, runs=20, size=INPUT_SIZE,
              weights=None, gemm_n=2048, log=print) -> dict:
    """Time one training step per (method, batch, path); CPU only. Returns the JSON-ready result.

    The models are fully convolutional, so ``size`` may differ from 128 (small sizes for
    quick checks; the floor is counted at the size used)."""
    if size < 8 or size % 4:
        raise ValueError(f"size: expected a multiple of 4, at least 8, got {size}")
    check_paths(paths, TRAIN_PATHS, "train path")
    threads, gemm = start_measuring(threads, gemm_n, "cpu", log)
    gen = torch.Generator().manual_seed(4321)
    results, models = [], {}
    for method in methods:
        base, source = load_bench_model(method, weights, size=size)
        base.train()
        flops = count_train_flops(copy.deepcopy(base), size)
        models[str(method)] = {"weights": source, "flops_per_image": flops, "counted": "forward + backward"}
        log(f"method {method}: {flops / 1e9:.2f} GFLOP per image (forward + backward), weights: {source}")
        for batch in batches:
            inputs = [torch.rand(batch, 3, size, size, generator=gen) for _ in range(ROTATED_INPUTS)]
            floor_ms = compute_floor_ms(flops, batch, gemm["gflops_median"])
            reference = None
            for path in paths:
                row = {"method": method, "batch": batch, "path": path, "floor_ms": floor_ms,
                       "shading_backend": TRAIN_PATHS[path]}
                results.append(row)
                try:
                    model = with_shading_backend(base, TRAIN_PATHS[path])
                    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

                    def step(x, model=model, opt=opt):
                        opt.zero_grad(set_to_none=True)
                        out = model(x)
                        step_loss(out, x).backward()
                        opt.step()
                        return out

                    # correctness first: the same weights, batch and BN state as the reference
                    probe = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    outs = probe(inputs[0])
                    step_loss(outs, inputs[0]).backward()
                    first_call_s = time.perf_counter() - t0
                    outs = {k: v.detach() for k, v in outs.items()}
                    grads = _gradients(probe)
                    del probe
                    if reference is None:
                        reference = (outs, grads)
                    diff = compare(outs, reference[0])
                    gdiff = float((grads - reference[1]).abs().max())
                    diff.update(grad_max_abs=gdiff, grad_max_rel=gdiff / max(float(reference[1].abs().max()), 1e-30))
                    stats = time_calls(step, inputs, warmup=warmup, runs=runs)
                except Exception as exc:  # one broken path must not sink the others
                    row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    log(f"  m{method} b{batch} {path:10s} FAILED: {row['reason']}")
                    continue
                row.update(status="ok", reason=None, ms=stats, ms_per_image=stats["median"] / batch,
                           first_call_s=first_call_s, diff=diff, ratio_to_floor=stats["median"] / floor_ms)
                log(f"  m{method} b{batch} {path:10s} {stats['median']:9.1f} ms/step  x{stats['median'] / floor_ms:.2f} floor"
                    f"  max|diff| {diff['max_abs']:.2e}, grads {diff['grad_max_rel']:.2e} rel")
    base_ms = {(r["method"], r["batch"]): r["ms"]["median"] for r in results
               if r["path"] == paths[0] and r.get("status") == "ok"}
    for r in results:
        base = base_ms.get((r["method"], r["batch"]))
        r["speedup_vs_eager"] = base / r["ms"]["median"] if r.get("status") == "ok" and base else None
    return {"kind": "train", "baseline": paths[0],
            "floor": {"gemm": gemm, "models": models,
                      "definition": "forward+backward FLOPs per image (FlopCounterMode) x batch / median fp32 GEMM rate"},
            "results": results}
