"""Low-precision inference: the accuracy budget, what the hardware supports, and the
PyTorch low-precision models the ``Decomposer`` runs.

    report = check_budget(outputs, reference)     # both {name: tensor}; reference is fp32
    report["passed"], report["metrics"]["normal_p99_deg"], report["failures"]
    capabilities("cpu")                           # {"bf16": True, "int8": True, ...} + why
    with forced_capabilities(bf16=False):         # pretend a CPU without AMX (tests)
        ...

Precisions (:data:`sfs_fast.plan.PRECISIONS`, which backend runs which is
:func:`sfs_fast.plan.resolve_plan`'s business): ``fp32``; ``bf16`` (PyTorch: CPU with AMX /
AVX512-BF16, or CUDA); ``fp16`` (PyTorch on CUDA; ONNX Runtime); ``int8`` (ONNX Runtime
static QDQ, the quantization of :mod:`sfs_fast.export.quantize`); ``auto`` (the fastest path
the device supports that meets the budget on check images: :func:`sfs_fast.decomposer.auto_plan`).

The accuracy budget (:data:`BUDGET`), against the float32 outputs of the same weights on
the same images:

- ``normal``: angle between the unit normals per pixel, median <= 1 degree, 99th
  percentile <= 3 degrees;
- ``albedo``, ``shading``, ``recon``: max |x - x_fp32| <= 1% of the fp32 range (max - min
  over the batch);
- ``light``: ``|L - L_fp32| / |L_fp32|`` per image (27 coefficients), max over the batch
  <= 1%.

Outputs a method does not have are skipped; the other outputs (``residue``,
``sh_shading``, ...) are measured the same way as the images and reported, not gated.

This module imports torch only (the ONNX parts live in :mod:`sfs_fast.export.quantize`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os

import numpy as np
import torch
import torch.nn as nn

from sfs_fast.plan import AUTO_ORDER, FUSED_BACKENDS  # (backend, precision) pairs; kernels has the shading-backend order

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BUDGET = {
    "normal_median_deg": 1.0,
    "normal_p99_deg": 3.0,
    "range_fraction": 0.01,  # albedo, shading, recon: max abs error / fp32 range
    "light_rel": 0.01,
}
RANGE_GATED = ("albedo", "shading", "recon")


# ---------------------------------------------------------------------------------------
# The accuracy budget


def unit_normals(n: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` normals scaled to unit length in float64. For measuring: unlike the
    model's ``sfs_fast.sh.normalize_normal`` (``n / (|n| + 1e-8)``) a unit normal stays
    exactly unit here, so identical maps are 0 degrees apart, not 0.01."""
    n = n.double()
    return n / (n * n).sum(1, keepdim=True).sqrt().clamp_min(1e-12)


def normal_angles_deg(normal: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-pixel angle in degrees (float64, flattened) between two ``[B,3,H,W]`` normal
    maps (each normalized here, so raw maps work too)."""
    cos = (unit_normals(normal) * unit_normals(reference)).sum(1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos)).flatten()


def output_error(got, ref) -> dict:
    """How far ``got`` is from ``ref`` (tensors or arrays of one output), in float64: the one
    element-wise comparison that :func:`check_budget`, the ONNX exporter's parity check and
    ``sfs-bench`` all build on.

    Returns ``{"shape": None or a mismatch message, "finite": bool, "max_abs", "mean_abs",
    "ref_max_abs" (max |ref|), "ref_span" (max - min of ref)}``; ``max_abs`` is inf when
    ``got`` has a non-finite value."""
    got = torch.as_tensor(got).detach().cpu().double()
    ref = torch.as_tensor(ref).detach().cpu().double()
    if got.shape != ref.shape:
        return {"shape": f"shape {tuple(got.shape)} vs {tuple(ref.shape)}", "finite": False,
                "max_abs": math.inf, "mean_abs": math.inf, "ref_max_abs": 0.0, "ref_span": 0.0}
    finite = bool(torch.isfinite(got).all())
    if not ref.numel():
        return {"shape": None, "finite": finite, "max_abs": 0.0, "mean_abs": 0.0, "ref_max_abs": 0.0,
                "ref_span": 0.0}
    diff = (got - ref).abs()
    return {"shape": None, "finite": finite, "max_abs": float(diff.max()) if finite else math.inf,
            "mean_abs": float(diff.mean()), "ref_max_abs": float(ref.abs().max()),
            "ref_span": float(ref.max() - ref.min())}


def check_budget(outputs: dict, reference: dict, budget: dict | None = None) -> dict:
    """Compare ``outputs`` (any precision) with the float32 ``reference`` of the same
    model and images: ``{"passed": bool, "metrics": {...}, "failures": [str, ...]}``.

    Metrics: ``normal_median_deg``, ``normal_p99_deg``, ``light_rel`` (max over images of
    ``|L - L_ref| / |L_ref|``), and ``<name>_range`` = ``max|x - x_ref| / (max - min of
    x_ref)`` for every other output the two dicts share. A non-finite output fails.
    """
    limits = {**BUDGET, **(budget or {})}
    metrics, failures = {}, []

    def gate(key, value, limit):
        metrics[key] = value
        if not value <= limit:  # NaN fails too
            failures.append(f"{key} {value:.4g} > {limit:g}")

    for name, ref in reference.items():
        if name not in outputs:
            continue
        err = output_error(outputs[name], ref)
        if err["shape"]:
            failures.append(f"{name}: {err['shape']}")
        elif not err["finite"]:
            failures.append(f"{name}: non-finite values")
            metrics[f"{name}_nonfinite"] = True
        elif name == "normal":
            median, p99 = np.percentile(normal_angles_deg(outputs[name], ref).numpy(), [50, 99])
            gate("normal_median_deg", float(median), limits["normal_median_deg"])
            gate("normal_p99_deg", float(p99), limits["normal_p99_deg"])
        elif name == "light":
            got, want = (torch.as_tensor(t).detach().cpu().double().flatten(1) for t in (outputs[name], ref))
            rel = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)
            gate("light_rel", float(rel.max()), limits["light_rel"])
        elif torch.as_tensor(ref).numel():
            span, value = err["ref_span"], err["max_abs"]
            value = value / span if span > 0 else (0.0 if value == 0 else math.inf)
            if name in RANGE_GATED:
                gate(f"{name}_range", value, limits["range_fraction"])
            else:
                metrics[f"{name}_range"] = value
    return {"passed": not failures, "metrics": metrics, "failures": failures, "budget": limits}


def format_metrics(report: dict) -> str:
    """One line: the gated metrics of a :func:`check_budget` report."""
    m = report["metrics"]
    parts = []
    if "normal_median_deg" in m:
        parts.append(f"normal {m['normal_median_deg']:.3f}/{m['normal_p99_deg']:.3f} deg (median/p99)")
    for name in RANGE_GATED:
        if f"{name}_range" in m:
            parts.append(f"{name} {100 * m[f'{name}_range']:.3f}%")
    if "light_rel" in m:
        parts.append(f"light {100 * m['light_rel']:.3f}%")
    parts.append("ok" if report["passed"] else "FAIL: " + "; ".join(report["failures"]))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# What the hardware supports

_FORCED: dict = {}


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what :mod:`platform` says)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


@contextlib.contextmanager
def forced_capabilities(**caps):
    """Override :func:`capabilities` inside the block, e.g. ``forced_capabilities(bf16=False)``
    to act as a CPU without AMX. The environment variable ``SFS_FAST_FORCE_CAPS`` (e.g.
    ``bf16=0,int8=0``) does the same for a whole process."""
    saved = dict(_FORCED)
    _FORCED.update({k: bool(v) for k, v in caps.items()})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _env_forced() -> dict:
    text = os.environ.get("SFS_FAST_FORCE_CAPS", "")
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip().lower() not in ("0", "false", "no", "off")
    return out


def capabilities(device="cpu") -> dict:
    """Which precisions run *fast* on ``device`` (they all run correctly anywhere PyTorch
    runs them, but bf16 without hardware support is emulated and slower than fp32).

    Returns ``{"fp32": True, "bf16": bool, "fp16": bool, "int8": bool, "why": {..}}``:
    - CPU: bf16 with ``amx_bf16`` or ``avx512_bf16`` (``/proc/cpuinfo``, else torch's
      oneDNN check); int8 (ONNX Runtime) with ``amx_int8``, ``avx512_vnni`` or
      ``avx_vnni`` (without VNNI its u8s8 kernels can saturate); fp16 off (no fast CPU path).
    - CUDA: fp16 always; bf16 where ``torch.cuda.is_bf16_supported()``; int8 off.
    :func:`forced_capabilities` and ``SFS_FAST_FORCE_CAPS`` override the result.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        caps = {"fp32": True, "bf16": bf16, "fp16": torch.cuda.is_available(), "int8": False,
                "why": {"bf16": "torch.cuda.is_bf16_supported()", "fp16": "CUDA", "int8": "no CUDA int8 path"}}
    else:
        flags = cpu_flags()
        bf16_flags = sorted(flags & {"amx_bf16", "avx512_bf16"})
        if not flags:  # no /proc/cpuinfo: ask oneDNN
            try:
                bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            except (AttributeError, RuntimeError):
                bf16 = False
            bf16_why = f"torch oneDNN bf16 check ({torch.backends.cpu.get_cpu_capability()})"
        else:
            bf16 = bool(bf16_flags)
            bf16_why = ", ".join(bf16_flags) if bf16_flags else "no amx_bf16/avx512_bf16 in /proc/cpuinfo"
        int8_flags = sorted(flags & {"amx_int8", "avx512_vnni", "avx_vnni"})
        caps = {"fp32": True, "bf16": bf16, "fp16": False, "int8": bool(int8_flags),
                "why": {"bf16": bf16_why,
                        "int8": ", ".join(int8_flags) if int8_flags else "no VNNI/AMX-int8 in /proc/cpuinfo",
                        "fp16": "no fast fp16 convolution on the CPU"}}
    for key, value in {**_env_forced(), **_FORCED}.items():
        if key in caps:
            caps[key] = value
            caps["why"][key] = "forced"
    return caps


# ---------------------------------------------------------------------------------------
# PyTorch low-precision models


def _cast_inputs_to_weight(module, args):
    """Forward pre-hook: floating inputs take the dtype of the module's weight, so float32
    islands and low-precision layers can follow each other."""
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
                 else a for a in args)


def float_islands(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Names of the convolution and linear layers :func:`to_low_precision` keeps in float32
    when the rest computes in ``dtype``.

    float16 (10 mantissa bits): the convolutions with 3 input or output channels (the one
    reading the image, and the last layer of every head: its output *is* the normal, albedo,
    residue or shading) and the linear layers: within budget on the demo weights.

    bfloat16 (7 mantissa bits), the default: for a model with an ``ENCODER`` (the SfSNet
    models: the shared convolutions and the residual trunks, all at 64x64 but the first two
    layers, about 80% of the FLOPs), every layer outside it: the generation nets, the light
    estimator and the shading heads, whose outputs are the results themselves, so a rounding
    step there is an error in an output. Inside the encoder, its first part (``ENCODER[0]``,
    the shared convolutions before the trunks, 8% of the FLOPs): on the bundled weights bf16
    there alone put the shading at 1.6% of its range. The one head outside the encoder that
    computes in bf16 is a residue head (:func:`bf16_heads`): the residue is a correction
    added to the SH shading, so bf16's relative rounding of it is small in the shading. Any
    other model gets the float16 rule. The float16 rule alone puts bf16 over the budget on
    the demo weights; each float32 island of the bf16 rule was kept for the error it removes
    (figures in bench/README.md, "Lab notes").
    """
    encoder = getattr(model, "ENCODER", None) if dtype == torch.bfloat16 else None
    low = (*encoder[1:], *bf16_heads(model)) if encoder is not None else ()
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if encoder is not None:
            if name.split(".", 1)[0] not in low:
                names.append(name)
        elif isinstance(m, nn.Linear) or m.out_channels == 3 or m.in_channels == 3:
            names.append(name)
    return names


def bf16_heads(model: nn.Module) -> tuple[str, ...]:
    """The heads outside the encoder that compute in bf16 under :func:`to_low_precision`:
    a residue head (``spec.head == "residue"``), whose output is added to the SH shading.
    On the bundled weights of methods 3-7 it moves no budget metric by more than 0.01% of a
    range, and it is 3.1 of the 13.4 GFLOP per image method 3 computed in float32 before
    (bench/README.md, "Lab notes"). A correcting or generating head's output *is* the
    shading: it stays float32."""
    spec = getattr(model, "spec", None)
    return (spec.head_module,) if spec is not None and spec.head == "residue" else ()


def low_precision_modules(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The top-level modules of ``model`` whose every convolution and linear layer computes
    in ``dtype`` under :func:`to_low_precision` (none of them a :func:`float_islands`), in
    the model's order: for the SfSNet models under bf16, the residual trunks and a residue
    head (:func:`bf16_heads`). The OpenVINO bf16 path (``sfs_fast.export.openvino_runner``)
    compiles these in bf16 and the rest in float32, so the two bf16 paths keep the same
    layers in float32."""
    keep = set(float_islands(model, dtype))
    state: dict[str, bool] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            top = name.split(".", 1)[0]
            state[top] = state.get(top, True) and name not in keep
    return [top for top, low in state.items() if low]


def to_low_precision(model: nn.Module, dtype: torch.dtype, *, keep_float: bool = True) -> nn.Module:
    """A copy of ``model`` whose convolutions and linear layers compute in ``dtype`` (bf16
    or fp16), except the :func:`float_islands` when ``keep_float``.

    Every convolution and linear layer casts its input to its weight's dtype, and each
    part of the encoder returns float32 (:func:`_float_output`), so the residual trunks sum
    in float32, the decoders read float32 features, and the normal's normalization, the SH
    shading op and the reconstruction run in float32. BatchNorm
    layers keep float32 parameters (running statistics, scale, shift) and take the dtype of
    their input: rounding those to bf16 shifts whole channels the same way in every image,
    an error the light's global average does not wash out (bench/README.md, "Lab notes").
    Memory format and rewrites
    of ``model`` are kept; the image may be passed in float32 or ``dtype``.
    """
    out = copy.deepcopy(model).eval()
    keep = set(float_islands(out, dtype)) if keep_float else set()
    for name, m in out.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            if name not in keep:
                m.to(dtype)
            m.register_forward_pre_hook(_cast_inputs_to_weight)
    if keep_float:
        for name in (*getattr(out, "ENCODER", ()), *(bf16_heads(out) if dtype == torch.bfloat16 else ())):
            if hasattr(out, name):
                out.get_submodule(name).register_forward_hook(_float_output)
    return out


def _float_output(module, args, output):
    """Forward hook: the module hands float32 on. On the encoder's parts this keeps the
    residual trunks' running sums in float32 (a bf16 block output plus a float32 input is
    float32): a bf16 sum over five blocks drops the small updates (bench/README.md, "Lab
    notes"); a bf16 residue head hands the shading op float32 like its other inputs."""
    return output.float()


# ---------------------------------------------------------------------------------------
# Which backend runs which precision, and the ``auto`` choice

def auto_choices(backend: str | None, device="cpu") -> tuple[list[tuple[str, str]], list[dict]]:
    """What ``auto`` may choose from on ``device``: ``(candidates, ruled_out)``.

    ``candidates``: the ``(backend, precision)`` pairs of :data:`sfs_fast.plan.AUTO_ORDER`
    that the hardware supports (:func:`capabilities`), restricted to ``backend`` when one is
    given (``compile`` takes the ``fused`` entries), fp32 last. ``ruled_out``: the pairs of
    that order (for that backend) the machine cannot run fast (``by: "hardware"``) or lacks
    the runtime for (``by: "package"``), as ``{"backend", "precision", "why", "by"}``, so a
    report can say why a faster path was not tried."""
    kind = torch.device(device).type
    caps = capabilities(device)
    candidates, ruled_out = [], []
    for cand_backend, prec in AUTO_ORDER.get(kind, AUTO_ORDER["cpu"]):
        if backend is not None:
            if backend == "eager":
                break  # the eager baseline is float32 only
            if backend in FUSED_BACKENDS and cand_backend in FUSED_BACKENDS:
                cand_backend = backend
            elif cand_backend != backend:
                continue
        if prec != "fp32" and not caps.get(prec, False):
            ruled_out.append({"backend": cand_backend, "precision": prec, "why": caps["why"].get(prec, "unsupported"),
                              "by": "hardware"})
            continue
        missing = missing_package(cand_backend)
        if missing:
            ruled_out.append({"backend": cand_backend, "precision": prec, "why": f"{missing} is not installed",
                              "by": "package"})
            continue
        candidates.append((cand_backend, prec))
    fallback = (backend or "fused", "fp32")
    if fallback not in candidates:
        candidates.append(fallback)
    return candidates, ruled_out


# what a candidate needs beyond torch: ONNX Runtime for int8; OpenVINO, and onnx to export
_RUNTIME_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}


def missing_package(backend: str) -> str | None:
    """The first package ``backend`` needs beyond torch that is not installed (found, not
    imported): ``auto``'s and ``sfs-bench``'s check."""
    import importlib.util

    for name in _RUNTIME_PACKAGES.get(backend, ()):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def auto_candidates(backend: str | None, device="cpu") -> list[tuple[str, str]]:
    """The ``(backend, precision)`` pairs ``auto`` tries on ``device`` (the first part of
    :func:`auto_choices`)."""
    return auto_choices(backend, device)[0]


AUTO_CHECK_IMAGES = 8  # images ``auto`` checks each candidate on (sfs_fast.samples.check_images)
# Timed calls of each candidate within the budget, on the check batch, after the check's own
# call (the warm-up): few, because the machines are shared and the first run pays for them.
AUTO_TIMED_CALLS = 2


def reference_outputs(model: nn.Module, images: torch.Tensor) -> dict:
    """The float32 outputs of ``model`` (as built, CPU, reference shading) on ``images``:
    what every low-precision path is held against."""
    from sfs_fast.optimize import eager_reference

    ref = eager_reference(model).float().cpu().eval()
    with torch.inference_mode():
        return {k: v.float() for k, v in ref(images.float()).items()}
