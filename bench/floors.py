"""The floors every benchmark table prints (DESIGN section 6).

- Compute floor of a model: FLOPs per image, counted from the model itself with
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, transposed convolutions, linear
  layers: 2 FLOPs per multiply-add), over a GEMM rate measured in the same run.
- Per precision: the matrix rate of each precision a path computes in (fp32, bf16, fp16:
  ``torch.mm``; int8: ONNX Runtime's ``MatMulInteger`` with the int8 path's types), and a
  path's floor is its FLOPs split by the precision each layer runs in (:func:`layer_flops`,
  :func:`path_layer_precisions`), each part over its own rate (:func:`mixed_floor_ms`).
- Memory floor of an op: bytes it must move over a copy bandwidth measured in the same run.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfs_fast.bench.timing import time_calls
from sfs_fast.export.runner import onnx_scope


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
    stats = _torch_matmul(dtype, n, device, warmup, runs)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), **_gflops(stats, n), "ms": stats}


def _gflops(stats: dict, n: int) -> dict:
    """The median and best rates of ``n^3`` products timed as ``stats`` (ms)."""
    flop = 2.0 * n ** 3
    return {"gflops_median": flop / (stats["median"] * 1e-3) / 1e9, "gflops_best": flop / (stats["min"] * 1e-3) / 1e9}


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


# ---------------------------------------------------------------------------------------
# Matrix rates per precision

MATMUL_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_MATMUL_N = 256


def _sized_n(call, n: int, max_call_s: float) -> int:
    """The size to measure at: ``n``, or less where one ``n^3`` product would take over
    ``max_call_s``. Grows from :data:`MIN_MATMUL_N`, doubling while the next size's product
    (8x the work of the last timed one, which small sizes run no faster) fits, because an
    emulated precision (bf16 without AMX/AVX512-BF16: about 1 GFLOP/s) would take minutes at
    2048^3."""
    size = min(n, MIN_MATMUL_N)
    call(size)  # first call: allocation and kernel selection
    while size < n:
        t0 = time.perf_counter()
        call(size)
        if (time.perf_counter() - t0) * 8 > max_call_s:
            break
        size = min(size * 2, n)
    return size


def _torch_matmul(dtype, n, device, warmup, runs):
    """Timings (ms) of ``torch.mm`` on two pairs of random ``[n,n]`` ``dtype`` matrices."""
    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randn(n, n, generator=gen).to(device, dtype), torch.randn(n, n, generator=gen).to(device, dtype))
            for _ in range(2)]
    return time_calls(lambda ab: torch.mm(*ab), mats, warmup=warmup, runs=runs, device=device)


def _int8_matmul_session(n: int, threads: int):
    """An ONNX Runtime session of one ``MatMulInteger`` ``[n,n] x [n,n]`` with int8 inputs and
    int8 constant weights, the types of the int8 path (``sfs_fast.export.quantize``: QInt8
    activations and weights; on CPUs without VNNI ONNX Runtime runs int8 x int8 several times
    slower than uint8 x int8, so the types matter)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).integers(-127, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_matmul",
                              [helper.make_tensor_value_info("A", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
                              initializer=[numpy_helper.from_array(weights, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _int8_matmul(n, warmup, runs):
    import numpy as np

    session = _int8_matmul_session(n, torch.get_num_threads())
    rng = np.random.default_rng(1)
    inputs = [rng.integers(-128, 128, (n, n), dtype=np.int8) for _ in range(2)]
    return time_calls(lambda a: session.run(None, {"A": a}), inputs, warmup=warmup, runs=runs)


def _rate_of(precision, n, device, warmup, runs, max_call_s):
    """``(stats, n used, engine)`` of one precision's matrix product."""
    if precision == "int8":
        if torch.device(device).type != "cpu":
            raise ValueError("int8: the int8 path is ONNX Runtime's CPU provider; no rate on " + str(device))
        n = _sized_n(lambda k: _int8_matmul(k, 0, 1), n, max_call_s)
        return _int8_matmul(n, warmup, runs), n, "onnxruntime MatMulInteger (int8 x int8)"
    if precision != "fp32":  # fp32 is never emulated: measured at n, the floor of every table so far
        n = _sized_n(lambda k: _torch_matmul(_TORCH_DTYPES[precision], k, device, 0, 1), n, max_call_s)
    return _torch_matmul(_TORCH_DTYPES[precision], n, device, warmup, runs), n, "torch.mm"


def measure_matmul_rate(precision: str = "fp32", n: int = 2048, *, device: str = "cpu", warmup: int = 2,
                        runs: int = 7, max_call_s: float = 0.5) -> dict:
    """Rate of an ``n x n x n`` matrix product in ``precision`` (:data:`MATMUL_PRECISIONS`) on
    ``device`` with the current thread setting, at a smaller ``n`` where one product would take
    over ``max_call_s`` (see :func:`_sized_n`). ``hardware``: whether the device runs the
    precision natively (:func:`sfs_fast.precision.capabilities`); False means the rate is that
    of an emulation (or, int8, of kernels without VNNI). Returns the keys of
    :func:`measure_gemm_rate` plus ``precision``, ``engine``, ``hardware``, ``why``;
    ``{"precision", "error"}`` where it cannot be measured here (int8 without onnx/onnxruntime)."""
    from sfs_fast.precision import capabilities

    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
    try:
        stats, n_used, engine = _rate_of(precision, n, device, warmup, runs, max_call_s)
    except (ImportError, ValueError, RuntimeError) as exc:  # a missing package or an unsupported dtype
        return {"precision": precision, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    caps = capabilities(device)
    return {"precision": precision, "n": n_used, "dtype": precision, "engine": engine,
            "hardware": bool(caps.get(precision, precision == "fp32")),
            "why": "" if precision == "fp32" else caps["why"].get(precision, ""),
            **_gflops(stats, n_used), "ms": stats}


def rate_line(rate: dict) -> str:
    """One line: a precision's matrix rate, its size and engine, and whether it is emulated."""
    if "error" in rate:
        return f"{rate['precision']}: not measured ({rate['error']})"
    unit = "GOP/s" if rate["precision"] == "int8" else "GFLOP/s"
    native = "" if rate["hardware"] else f", no hardware support: {'emulated' if rate['precision'] != 'int8' else 'kernels without VNNI'} ({rate['why']})"
    return (f"{rate['precision']} {rate['gflops_median']:.1f} {unit} (median; best {rate['gflops_best']:.1f}; "
            f"{rate['n']}^3, {rate['engine']}{native})")


# ---------------------------------------------------------------------------------------
# FLOPs per layer and per precision

LAYER_TYPES = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def layer_flops(model: torch.nn.Module, size: int = 128) -> dict[str, int]:
    """FLOPs per image of every convolution, transposed convolution and linear layer of
    ``model``, by module name, counted by the same ``FlopCounterMode`` as :func:`count_flops`
    (so the values sum to it); FLOPs outside those layers (none in the SfSNet models) are
    under ``""``."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    per, start = {}, {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: start.__setitem__(n, counter.get_total_flops())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: per.__setitem__(n, per.get(n, 0) + counter.get_total_flops() - start[n])))
    was_training = model.training
    try:
        with torch.no_grad(), counter:
            model.eval()(torch.rand(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    rest = int(counter.get_total_flops()) - sum(per.values())
    return {**{k: int(v) for k, v in per.items()}, **({"": rest} if rest else {})}


def _onnx_stub(model: torch.nn.Module):
    """A stand-in with the ``graph.node`` / ``graph.initializer`` fields that the int8 and fp16
    layer rules of :mod:`sfs_fast.export.quantize` read, one ``Conv`` node per convolution of
    ``model`` named as the exporter names it; and node name -> module name. The rules are then
    applied as they are, with no export."""
    nodes, inits, names = [], [], {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            node = f"{onnx_scope(name)}/Conv"
            nodes.append(SimpleNamespace(name=node, op_type="Conv", input=[f"{node}:x", f"{node}:w"]))
            inits.append(SimpleNamespace(name=f"{node}:w", dims=list(m.weight.shape)))
            names[node] = name
    return SimpleNamespace(graph=SimpleNamespace(node=nodes, initializer=inits)), names


def path_layer_precisions(plan, model: torch.nn.Module) -> dict[str, str]:
    """The precision each layer of ``model`` computes in on a :class:`~sfs_fast.plan.RunPlan`,
    for the layers that do not compute in fp32: bf16/fp16 PyTorch models all but
    :func:`sfs_fast.precision.float_islands`; int8 files the convolutions
    :func:`sfs_fast.export.quantize.quantized_convolutions` picks; fp16 files all convolutions
    but :func:`~sfs_fast.export.quantize.output_convolutions`."""
    from sfs_fast.precision import TORCH_DTYPES, float_islands

    merged = _merged_trunk_layers(plan, model)
    if plan.precision in (None, "fp32"):
        return merged
    if plan.backend != "onnx":
        keep = set(float_islands(model, TORCH_DTYPES[plan.precision]))
        return {**{n: plan.precision for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and n not in keep},
                **merged}
    from sfs_fast.export.quantize import output_convolutions, quantized_convolutions

    stub, names = _onnx_stub(model)
    if plan.precision == "int8":
        return {names[n]: "int8" for n in quantized_convolutions(stub, plan.int8_layers or "budget")}
    keep = set(output_convolutions(stub))
    return {m: plan.precision for n, m in names.items() if n not in keep}


def _merged_trunk_layers(plan, model) -> dict[str, str]:
    """``{layer: "merged"}`` for the layers of a trunk the fused path does not compute
    (:func:`sfs_fast.optimize.share_equal_trunks`)."""
    from sfs_fast.models import ALBEDO_FEATURES
    from sfs_fast.optimize import FUSED_OPTIONS, equal_trunks

    if plan.backend not in ("fused", "compile") or not {**FUSED_OPTIONS, **dict(plan.optimizations)}["share_equal_trunks"]:
        return {}
    skipped = [ALBEDO_FEATURES[key] + "." for key in equal_trunks(model)]
    return {n: "merged" for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and any(n.startswith(prefix) for prefix in skipped)}


def precision_mix(flops_by_layer: dict[str, int], precisions: dict[str, str]) -> dict[str, int]:
    """FLOPs per image by precision: each layer's FLOPs under its precision in
    ``precisions`` (fp32 when it is not there)."""
    mix: dict[str, int] = {}
    for name, flops in flops_by_layer.items():
        prec = precisions.get(name, "fp32")
        mix[prec] = mix.get(prec, 0) + flops
    return mix


def mixed_floor_ms(mix: dict[str, int], batch: int, gflops: dict[str, float]) -> float | None:
    """Milliseconds a batch needs when each precision's FLOPs in ``mix`` run at that
    precision's rate in ``gflops`` (GFLOP/s); None when a rate is missing. ``merged`` FLOPs
    (:func:`sfs_fast.bench.peers.module_precisions`: layers the runtime does not compute)
    take no time."""
    mix = {prec: flops for prec, flops in mix.items() if prec != "merged"}
    if any(flops and not gflops.get(prec) for prec, flops in mix.items()):
        return None
    return sum(compute_floor_ms(flops, batch, gflops[prec]) for prec, flops in mix.items() if flops)
