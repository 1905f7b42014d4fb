"""``RunPlan``: how to run a model (backend, precision, device, shading, ONNX settings), as
one frozen value made by one resolver.

    plan = resolve_plan(backend="fused", precision="bf16")      # or RunPlan.resolve(...)
    dec = Decomposer(model, plan=plan)                          # dec.plan is what runs
    plan = named_plan("onnx-int8", device="cpu")                # a benchmark path
    add_plan_arguments(parser); plan = plan_from_args(args)     # every command's flags

The resolver fills the defaults and refuses a combination that cannot run with one-line
``ValueError``s that name the setting. Precision ``auto`` is a request, not a plan: the
``Decomposer`` (:func:`sfs_fast.decomposer.auto_plan`) checks the candidates of
:data:`AUTO_ORDER` this machine supports against float32, takes the fastest within the
accuracy budget, keeps the concrete plan it chose and caches the decision
(:mod:`sfs_fast.plan_cache`). ``resolve_plan`` defaults to fp32; the commands' ``--precision``
defaults to auto (:func:`add_plan_arguments`).

This module needs torch and the kernels' backend names only; it builds nothing.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from sfs_fast.kernels import BACKENDS as _KERNEL_BACKENDS
from sfs_fast.optimize import FUSED_OPTIONS

BACKENDS = ("eager", "fused", "compile", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
ONNX_PRECISIONS = ("fp32", "fp16", "int8")  # the precisions an exported .onnx file has
AUTO = "auto"  # the precision that is chosen by measurement (see the module docstring)
SHADING_BACKENDS = ("auto", *_KERNEL_BACKENDS)
INT8_LAYERS = ("budget", "all")  # which convolutions int8 quantizes (sfs_fast.export.quantize)
DEVICES = ("cpu", "cuda")
FUSED_BACKENDS = ("fused", "compile")  # the backends that run sfs_fast.optimize's rewrites
FILE_BACKENDS = ("onnx", "openvino")  # the backends that run an exported .onnx file
OPENVINO_PRECISIONS = ("fp32", "bf16")
TENSORRT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# Images per call of the bf16/fp16 model on the CPU: four images' activations stay in cache
# between the bf16 encoder and the float32 decoders, sixteen do not (bench/README.md).
LOW_PRECISION_CPU_MICRO_BATCH = 4

# The (backend, precision) pairs ``auto`` considers per device type. Each is tried only where
# the hardware has it (sfs_fast.precision.capabilities) and kept only within the accuracy
# budget; among those kept, auto takes the fastest as timed on the machine it runs on, so this
# order (fastest first on the project's Xeons, bench/README.md) only orders the report.
AUTO_ORDER = {
    "cpu": (("openvino", "bf16"), ("fused", "bf16"), ("openvino", "fp32"), ("onnx", "int8"), ("fused", "fp32")),
    "cuda": (("fused", "fp16"), ("fused", "bf16"), ("fused", "fp32")),
}


@dataclass(frozen=True)
class RunPlan:
    """How to run a model; make one with :func:`resolve_plan` (the fields are checked there).

    backend: ``eager`` (the model as built, reference shading), ``fused`` (the rewrites of
        :mod:`sfs_fast.optimize` and the fused shading op), ``compile`` (torch.compile of
        fused), ``onnx`` (ONNX Runtime) or ``openvino`` (OpenVINO's CPU plugin on the
        exported fp32 file; bf16: the modules the PyTorch bf16 path computes in bf16, the
        rest float32).
    precision: ``fp32``, ``bf16``, ``fp16``, ``int8``; ``auto`` only in a request (see the
        module docstring); None only for an ``onnx`` file, meaning the file's own.
    device: ``cpu``, ``cuda`` or ``cuda:N``.
    shading_backend: the shading op's backend (``sfs_fast.kernels.BACKENDS`` or ``auto``);
        ``reference`` for eager, onnx and openvino, whose graphs use the plain PyTorch op.
    int8_layers: int8 only, :data:`INT8_LAYERS`; None otherwise.
    providers: onnx only, ONNX Runtime providers best first; None: those of the device.
    micro_batch: fused/compile only, images per model call (None: the whole batch).
    threads: intra-op threads of torch, ONNX Runtime or OpenVINO; None keeps the default.
    optimizations: fused/compile only, ``(name, value)`` overrides of
        :data:`sfs_fast.optimize.FUSED_OPTIONS` other than the shading backend.
    """

    backend: str | None = "fused"
    precision: str | None = "fp32"
    device: str = "cpu"
    shading_backend: str = "auto"
    int8_layers: str | None = None
    providers: tuple | None = None
    micro_batch: int | None = None
    threads: int | None = None
    optimizations: tuple = field(default=())

    @classmethod
    def resolve(cls, **settings) -> RunPlan:
        """The same as :func:`resolve_plan`."""
        return resolve_plan(**settings)

    @property
    def is_auto(self) -> bool:
        return self.precision == AUTO

    def fused_options(self) -> dict:
        """Keyword arguments of :func:`sfs_fast.optimize.optimize_for_inference`."""
        return {**dict(self.optimizations), "shading_backend": self.shading_backend}

    def settings(self) -> dict:
        """The fields as :func:`resolve_plan` keywords (optimizations as a dict)."""
        return {"backend": self.backend, "precision": self.precision, "device": self.device,
                "shading_backend": self.shading_backend, "int8_layers": self.int8_layers,
                "providers": self.providers, "micro_batch": self.micro_batch, "threads": self.threads,
                "optimizations": dict(self.optimizations)}

    def to_dict(self) -> dict:
        """JSON-ready fields (for manifests and benchmark results)."""
        out = self.settings()
        out["providers"] = None if self.providers is None else list(self.providers)
        return out


def _positive(name, value):
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or number != value:
        raise ValueError(f"{name}: expected a positive whole number, got {value!r}")
    return number


def _check_device(device) -> str:
    try:
        kind = torch.device(str(device)).type
    except RuntimeError:
        kind = None
    if kind not in DEVICES:
        raise ValueError(f"device: unknown device {device!r}; use cpu, cuda or cuda:N")
    return str(device)


def _check_pair(backend, precision, kind):
    """Refuse a (backend, precision) pair that does not exist on this device type."""
    if backend == "openvino" and kind != "cpu":
        raise ValueError("backend: openvino runs on OpenVINO's CPU plugin here; use --device cpu")
    if precision in ("fp32", AUTO, None):
        return
    if backend == "eager":
        raise ValueError(f"precision: the eager backend is the float32 baseline; run {precision} with "
                         "backend fused, compile or onnx")
    if backend == "openvino":
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision: the openvino backend runs fp32 or bf16, not {precision}")
        return
    if precision == "int8" and backend != "onnx":
        raise ValueError("precision: int8 runs through ONNX Runtime (static QDQ); use backend onnx")
    if precision == "int8" and kind == "cuda":
        raise ValueError("precision: int8 is a CPU path (ONNX Runtime CPU provider); use fp16 or bf16 on CUDA")
    if precision == "bf16" and backend == "onnx":
        raise ValueError("precision: bf16 is a PyTorch path; use backend fused or compile (or int8/fp16 with onnx)")
    if precision == "fp16" and backend != "onnx" and kind != "cuda":
        raise ValueError("precision: PyTorch fp16 needs CUDA (the CPU has no fast fp16 convolution); "
                         "use bf16 on the CPU, or backend onnx for an fp16 ONNX file")


def _backend_and_precision(backend, precision, onnx_file):
    """Fill the defaults: precision fp32 (an onnx file's own when ``onnx_file``); backend
    fused, or onnx for int8 and for a file (which backend openvino also runs); ``auto``
    keeps a missing backend missing."""
    if precision is not None and precision not in (*PRECISIONS, AUTO):
        raise ValueError(f"precision: unknown precision {precision!r}; choose from {', '.join((*PRECISIONS, AUTO))}")
    if precision is None and not onnx_file:
        precision = "fp32"
    if backend is None and precision != AUTO:
        backend = "onnx" if onnx_file or precision == "int8" else "fused"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if onnx_file and precision == AUTO:
        raise ValueError("precision: auto needs a model or weights (an .onnx file has its own precision)")
    if onnx_file and backend not in FILE_BACKENDS:
        raise ValueError(f"backend: an .onnx file runs with backend onnx or openvino, not {backend}")
    return backend, precision


def _shading(backend, shading_backend, optimizations):
    """The shading backend field and the other optimizations (a sorted tuple of pairs)."""
    options = dict(optimizations or {})
    unknown = sorted(set(options) - set(FUSED_OPTIONS))
    if unknown:
        raise ValueError(f"optimizations: unknown optimisation(s) {unknown}; known: {sorted(FUSED_OPTIONS)}")
    if "shading_backend" in options:  # the FUSED_OPTIONS spelling of the same setting
        if shading_backend is not None and shading_backend != options["shading_backend"]:
            raise ValueError("shading_backend: given twice with different values")
        shading_backend = options.pop("shading_backend")
    if backend not in FUSED_BACKENDS and backend is not None:
        if options:
            raise ValueError(f"optimizations: only the fused and compile backends take them, not {backend}")
        if shading_backend not in (None, "reference"):
            raise ValueError(f"shading_backend: the {backend} backend runs the reference shading, "
                             f"not {shading_backend!r}")
        return "reference", ()
    shading_backend = "auto" if shading_backend is None else shading_backend
    if shading_backend not in SHADING_BACKENDS:
        raise ValueError(f"shading_backend: unknown backend {shading_backend!r}; "
                         f"choose from {', '.join(SHADING_BACKENDS)}")
    return shading_backend, tuple(sorted(options.items()))


def _onnx_settings(backend, precision, int8_layers, providers):
    if int8_layers is not None and int8_layers not in INT8_LAYERS:
        raise ValueError(f"int8_layers: expected one of {', '.join(INT8_LAYERS)}, got {int8_layers!r}")
    if int8_layers is not None and precision not in ("int8", AUTO):
        raise ValueError(f"int8_layers: applies to int8, not {precision}")
    if precision == "int8" and int8_layers is None:
        int8_layers = "budget"
    if providers is not None:
        if backend != "onnx":
            raise ValueError(f"providers: ONNX Runtime providers apply to backend onnx, not {backend}")
        providers = tuple(providers)
        if not providers or not all(isinstance(p, str) and p for p in providers):
            raise ValueError(f"providers: expected a list of provider names, got {list(providers)!r}")
    return int8_layers, providers


def resolve_plan(*, backend=None, precision=None, device="cpu", shading_backend=None, int8_layers=None,
                 providers=None, micro_batch=None, threads=None, optimizations=None,
                 onnx_file: bool = False) -> RunPlan:
    """The one resolver: a :class:`RunPlan` with the defaults filled in, or a ``ValueError``
    (one line, naming the setting) for a combination that cannot run.

    Defaults: precision fp32; backend fused (onnx for int8 and when ``onnx_file``: the plan
    runs an exported file, whose precision is the file's own when None); micro_batch
    :data:`LOW_PRECISION_CPU_MICRO_BATCH` for bf16/fp16 on the CPU with fused or compile;
    int8_layers ``budget`` for int8. With precision ``auto`` and no backend, auto may
    choose any backend (the request keeps ``backend`` None)."""
    device = _check_device(device)
    kind = torch.device(device).type
    backend, precision = _backend_and_precision(backend, precision, onnx_file)
    _check_pair(backend, precision, kind)
    shading_backend, options = _shading(backend, shading_backend, optimizations)
    int8_layers, providers = _onnx_settings(backend, precision, int8_layers, providers)
    micro_batch = _positive("micro_batch", micro_batch)
    if micro_batch is not None and backend not in (*FUSED_BACKENDS, None):
        raise ValueError(f"micro_batch: a positive number of images for the fused or compile backend, "
                         f"not {micro_batch!r} with {backend}")
    if micro_batch is None and backend in FUSED_BACKENDS and kind == "cpu" and precision in ("bf16", "fp16"):
        micro_batch = LOW_PRECISION_CPU_MICRO_BATCH
    return RunPlan(backend=backend, precision=precision, device=device, shading_backend=shading_backend,
                   int8_layers=int8_layers, providers=providers, micro_batch=micro_batch,
                   threads=_positive("threads", threads), optimizations=options)


# ---------------------------------------------------------------------------------------
# Named plans: the paths of ``sfs-bench`` (each a set of resolve_plan settings; the device,
# threads and optimizations of a run are added by named_plan)

NAMED_PLANS = {
    "eager": {"backend": "eager"},
    "fused": {"backend": "fused"},
    "compile": {"backend": "compile"},
    "onnx": {"backend": "onnx", "precision": "fp32"},
    "onnx-int8": {"backend": "onnx", "precision": "int8"},
    # every convolution but the outputs in int8 (over the accuracy budget), to show its cost
    "onnx-int8-all": {"backend": "onnx", "precision": "int8", "int8_layers": "all"},
    "onnx-fp16": {"backend": "onnx", "precision": "fp16"},
    "bf16": {"backend": "fused", "precision": "bf16"},
    "compile-bf16": {"backend": "compile", "precision": "bf16"},
    "fp16": {"backend": "fused", "precision": "fp16"},
    "tensorrt": {"backend": "onnx", "precision": "fp16", "device": "cuda", "providers": TENSORRT_PROVIDERS},
    "openvino": {"backend": "openvino", "precision": "fp32"},
    "openvino-bf16": {"backend": "openvino", "precision": "bf16"},
}
# ``sfs-bench train``: the training step with the reference shading against the fused op
TRAIN_PLANS = {"reference": "eager", "fused": "fused"}


def named_plan(name: str, **overrides) -> RunPlan:
    """The plan of a :data:`NAMED_PLANS` path with ``overrides`` (device, threads, ...);
    settings a path fixes (tensorrt's device) win over the overrides."""
    if name not in NAMED_PLANS:
        raise ValueError(f"paths: unknown path {name!r}; choose from {', '.join(NAMED_PLANS)}")
    settings = {**overrides, **NAMED_PLANS[name]}
    if settings.get("backend") not in FUSED_BACKENDS:
        settings.pop("optimizations", None)  # the rewrites of fused/compile only
    return resolve_plan(**settings)


def plan_name(backend: str, precision: str, int8_layers: str | None = None) -> str | None:
    """The :data:`NAMED_PLANS` path that runs ``backend`` at ``precision`` (the default int8
    layers unless ``int8_layers`` says otherwise) on the default providers; None when none."""
    layers = None if int8_layers in (None, "budget") else int8_layers
    for name, settings in NAMED_PLANS.items():
        if "providers" not in settings and (settings["backend"], settings.get("precision", "fp32"),
                                            settings.get("int8_layers")) == (backend, precision, layers):
            return name
    return None


# ---------------------------------------------------------------------------------------
# Command-line flags


PLAN_FLAGS = ("backend", "device", "precision", "threads")


def _device_argument(text: str) -> str:
    try:
        return _check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("device: ")) from None


def add_plan_arguments(parser, *, flags=PLAN_FLAGS, onnx_precisions: bool = False) -> None:
    """Add the run-plan flags ``flags`` (of :data:`PLAN_FLAGS`: ``--backend``, ``--device``,
    ``--precision``, ``--threads``) to ``parser`` (a parser or an argument group), with their
    choices from this module. ``onnx_precisions``: ``--precision`` takes only the precisions
    of an ONNX file (sfs-export)."""
    unknown = set(flags) - set(PLAN_FLAGS)
    if unknown:
        raise ValueError(f"flags: unknown plan flag(s) {sorted(unknown)}; known: {', '.join(PLAN_FLAGS)}")
    if "backend" in flags:
        parser.add_argument("--backend", choices=BACKENDS, default=None,
                            help="inference backend (default: the one --precision auto chooses; fused with "
                                 "an explicit precision, onnx with --onnx or int8); openvino needs the "
                                 "openvino extra")
    if "device" in flags:
        parser.add_argument("--device", type=_device_argument, default="cpu", help="cpu or cuda (default: cpu)")
    if "precision" in flags and onnx_precisions:
        parser.add_argument("--precision", choices=ONNX_PRECISIONS, default=None,
                            help="the same as --fp16/--int8 (fp32 default), named as in sfs-decompose and sfs-bench")
    elif "precision" in flags:  # the inference commands: auto by default
        parser.add_argument("--precision", choices=(*PRECISIONS, AUTO), default=AUTO,
                            help="auto (default): the fastest path this machine supports that meets the "
                                 "accuracy budget against fp32 on check images, decided once and cached (see "
                                 "README, Precision); fp32: exact float32; bf16 (CPU with AMX, or CUDA); fp16 "
                                 "(CUDA, or an fp16 ONNX file); int8 (ONNX Runtime static QDQ; implies "
                                 "--backend onnx)")
    if "threads" in flags:
        parser.add_argument("--threads", type=int, default=None,
                            help="intra-op threads of the model (default: torch's)")


def plan_from_args(args) -> RunPlan:
    """The :class:`RunPlan` of the flags of :func:`add_plan_arguments` (and ``--onnx FILE``,
    ``--int8-layers`` where the command has them). With ``--onnx FILE``, precision auto (the
    default) is the file's own: an exported file is the one candidate there is."""
    onnx_file = getattr(args, "onnx", None) is not None
    precision = getattr(args, "precision", None)
    if onnx_file and precision == AUTO:
        precision = None
    return resolve_plan(backend=getattr(args, "backend", None), precision=precision,
                        device=getattr(args, "device", "cpu") or "cpu", threads=getattr(args, "threads", None),
                        int8_layers=getattr(args, "int8_layers", None), onnx_file=onnx_file)


__all__ = ["RunPlan", "resolve_plan", "named_plan", "plan_name", "add_plan_arguments", "plan_from_args", "PLAN_FLAGS",
           "BACKENDS", "FILE_BACKENDS", "OPENVINO_PRECISIONS", "PRECISIONS", "ONNX_PRECISIONS", "AUTO", "SHADING_BACKENDS", "INT8_LAYERS", "AUTO_ORDER", "NAMED_PLANS",
           "TRAIN_PLANS", "LOW_PRECISION_CPU_MICRO_BATCH"]
