"""``Decomposer``: the one inference path that every command, benchmark and example uses.

    dec = Decomposer(method=3, backend="fused")          # or weights="ckpt.safetensors"
    out = dec.decompose(images)                           # images [B,3,128,128] RGB in [0,1]
    out["normal"], out["albedo"], out["light"], ...       # float32 CPU tensors

Backends:
- ``eager``: the model as built (reference shading, no rewrites): the baseline.
- ``fused``: BatchNorm folded into convolutions, the heads' first 1x1 conv before their
  upsampling, channels-last, the fused shading op (``sfs_fast.optimize``; each switchable).
- ``compile``: ``torch.compile`` of the fused model (the first call compiles).
- ``onnx``: an ONNX Runtime session (``sfs_fast.export.OnnxRunner``) on an exported file.

Precisions (``precision=``, see :mod:`sfs_fast.precision`): ``fp32``; ``bf16`` (fused or
compile: the encoder's convolutions in bf16, everything that decodes its features, the
BatchNorm parameters and the shading in float32: :func:`sfs_fast.precision.to_low_precision`);
``fp16`` (the same on CUDA; an fp16 ONNX file with backend onnx); ``int8`` (backend onnx:
static QDQ int8, :func:`sfs_fast.export.precision.quantize_int8`); ``auto``: the fastest
pair of :func:`sfs_fast.precision.auto_candidates` that meets the accuracy budget against
float32 on :func:`sfs_fast.precision.check_images` (``dec.auto_report`` says what was tried).
"""
from __future__ import annotations

import warnings

import torch

from sfs_fast.models import build_model, method_id, output_names
from sfs_fast.optimize import FUSED_OPTIONS, optimize_for_inference

BACKENDS = ("eager", "fused", "compile", "onnx")
INPUT_SIZE = 128
# Images per call of the bf16/fp16 model on the CPU. Measured (demo weights, 2 threads, batch
# 16 in slices of 1 / 4 / 16, calls interleaved, median ms per image of 6): method 0
# 102 / 94 / 115, method 3 138 / 131 / 151. Four images' activations stay in cache between
# the bf16 encoder and the float32 decoders; sixteen do not.
LOW_PRECISION_CPU_MICRO_BATCH = 4


class Decomposer:
    """Holds a model, a backend and a device; ``decompose(batch) -> dict of outputs``.

    Args:
        model: a built model (``build_model`` or ``weights.load``); or give ``weights`` or
            ``method`` and the model is loaded or built here.
        method: method id or slug, used when no model or weights are given, and checked
            against the weights when both are.
        weights: a checkpoint path (any format :func:`sfs_fast.weights.load_any` reads).
        onnx: an exported ``.onnx`` file for the ``onnx`` backend (exported on the fly from
            the model when omitted).
        backend: one of ``eager``, ``fused``, ``compile``, ``onnx``.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` (default), ``bf16``, ``fp16``, ``int8`` or ``auto`` (module
            docstring); for an ``onnx`` file the file's own precision when None.
        threads: intra-op threads (torch and ONNX Runtime); None keeps the default.
        optimizations: overrides of :data:`sfs_fast.optimize.FUSED_OPTIONS` for the ``fused``
            and ``compile`` backends (e.g. ``{"channels_last": False}``), to measure each one.
        micro_batch: ``fused``/``compile`` only: images per model call, a batch being run in
            slices of that size. None chooses: :data:`LOW_PRECISION_CPU_MICRO_BATCH` for bf16
            and fp16 on the CPU, the whole batch otherwise.
    ``notes``: one-line notes for the user about this run (random weights, emulated
    precision), also issued as warnings; commands print them.
    """

    def __init__(self, model=None, *, method=None, weights=None, onnx=None, backend=None,
                 device="cpu", threads=None, optimizations=None, precision=None, micro_batch=None):
        from sfs_fast import precision as precision_mod

        self.notes: list[str] = []
        file_only = onnx is not None and model is None and weights is None
        if backend is None and file_only:
            backend = "onnx"
        if not (file_only and precision is None):
            backend, precision = precision_mod.resolve(precision, backend, device)
        if backend not in BACKENDS and not (backend is None and precision == "auto"):
            raise ValueError(f"backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        # checked before auto, which would take a refused candidate as a path that cannot run
        if micro_batch is not None and (int(micro_batch) < 1 or backend not in ("fused", "compile", None)):
            raise ValueError(f"micro_batch: a positive number of images for the fused or compile backend, "
                             f"not {micro_batch!r} with {backend}")
        self.backend = backend
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.threads = threads
        self.optimizations = dict(optimizations or {})
        self.runner = None
        self.micro_batch = None
        self.precision = precision
        self.auto_report = None
        if precision == "auto":
            if file_only:
                raise ValueError("precision: auto needs a model or weights (an .onnx file has its own precision)")
            self._choose_auto(self._resolve_model(model, method, weights), backend, onnx, micro_batch)
            return
        if backend == "onnx" and file_only:
            from sfs_fast.export import OnnxRunner

            self.runner = OnnxRunner(onnx, device=self.device.type, threads=threads)
            self.method = self.runner.method
            if method is not None and method_id(method) != self.method:
                raise ValueError(f"onnx: {onnx} holds method {self.method}, not method {method_id(method)}")
            self.model = None
            self.output_names = list(self.runner.output_names)
            file_precision = self.runner.metadata.get("precision", "fp32")
            if self.precision is not None and self.precision != file_precision:
                raise ValueError(f"precision: {onnx} is a {file_precision} export, not {self.precision}")
            self.precision = file_precision
            return
        self.model = self._resolve_model(model, method, weights)
        self.method = self.model.method
        self.output_names = output_names(self.method)
        if micro_batch is not None and backend not in ("fused", "compile"):
            raise ValueError(f"micro_batch: a positive number of images for the fused or compile backend, "
                             f"not {micro_batch!r} with {backend}")
        if micro_batch is None and backend in ("fused", "compile") and self.device.type == "cpu" \
                and precision in ("bf16", "fp16"):
            micro_batch = LOW_PRECISION_CPU_MICRO_BATCH
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self._run = self._prepare(onnx)

    def _resolve_model(self, model, method, weights):
        from sfs_fast import weights as weights_mod

        if model is None and weights is not None:
            model = weights_mod.load_any(weights, method=method)
        elif model is None:
            m = method_id(method if method is not None else 0)
            default = weights_mod.default_weights(m)
            if default is not None:
                model = weights_mod.load(default)
                note = weights_mod.default_weights_note(m)  # the demo weights say what they are
                self.notes += [note] if note else []
            else:
                self.notes.append("no trained weights given: the model has random weights, so the outputs "
                                  "are not meaningful")
                warnings.warn(self.notes[-1], stacklevel=3)
                model = build_model(method if method is not None else 0)
        elif method is not None and method_id(method) != model.method:
            raise ValueError(f"model is method {model.method}, not method {method_id(method)}")
        return model.eval()

    def _prepare(self, onnx):
        model = self.model.to(self.device)
        if self.backend == "eager":
            eager = build_model(model.method, **{**model.config.to_dict(), "shading_backend": "reference"})
            eager.load_state_dict(model.state_dict())
            eager = eager.to(self.device).eval()
            return lambda x: eager(x)
        if self.backend == "onnx":
            from sfs_fast.export import OnnxRunner

            self.runner = OnnxRunner.from_model(model, path=onnx, device=self.device.type, threads=self.threads,
                                                precision=self.precision)
            return None
        fused = optimize_for_inference(model, **self.optimizations)
        if self.precision in ("bf16", "fp16"):
            from sfs_fast.precision import TORCH_DTYPES, capabilities, to_low_precision

            if not capabilities(self.device)[self.precision]:
                self.notes.append(f"{self.precision} has no hardware support on this {self.device.type} "
                                  "(emulated: slower than fp32)")
                warnings.warn(self.notes[-1], stacklevel=4)
            fused = to_low_precision(fused, TORCH_DTYPES[self.precision])
        if self.backend == "compile":
            fused = torch.compile(fused)
        if not {**FUSED_OPTIONS, **self.optimizations}["channels_last"]:
            return lambda x: fused(x)
        return lambda x: fused(x.contiguous(memory_format=torch.channels_last))

    def _choose_auto(self, model, backend, onnx, micro_batch=None):
        """Take the first :func:`~sfs_fast.precision.auto_candidates` pair whose outputs on
        the check images meet the accuracy budget against float32 (fp32 always does)."""
        from sfs_fast import precision as precision_mod
        from sfs_fast.precision import auto_candidates, check_budget, check_images, reference_outputs

        images = check_images(precision_mod.AUTO_CHECK_IMAGES)
        reference = reference_outputs(model, images)
        tried, chosen = [], None
        for cand_backend, cand_precision in auto_candidates(backend, self.device):
            try:
                cand = Decomposer(model, backend=cand_backend, precision=cand_precision, device=self.device,
                                  threads=self.threads, optimizations=self.optimizations,
                                  onnx=onnx if cand_backend == "onnx" else None,
                                  micro_batch=micro_batch if cand_backend in ("fused", "compile") else None)
                report = check_budget(cand.decompose(images), reference)
            except Exception as exc:  # a path that cannot be built here is not chosen
                report = {"passed": False, "metrics": {}, "failures": [f"{type(exc).__name__}: {str(exc)[:200]}"]}
                cand = None
            tried.append({"backend": cand_backend, "precision": cand_precision, **report})
            # fp32 is the reference precision: accepted even where reordered sums differ
            if cand is not None and (report["passed"] or cand_precision == "fp32"):
                chosen = cand
                break
        if chosen is None:
            raise ValueError("precision auto: no path could be built here: "
                             + "; ".join(f"{t['backend']}-{t['precision']}: {t['failures']}" for t in tried))
        self.__dict__.update({k: v for k, v in chosen.__dict__.items() if k not in ("auto_report", "notes")})
        self.notes += [n for n in chosen.notes if n not in self.notes]
        self.auto_report = {"chosen": {"backend": cand_backend, "precision": cand_precision}, "tried": tried,
                            "images": len(images)}

    def decompose(self, images) -> dict:
        """Decompose a batch: ``images`` ``[B,3,128,128]`` float RGB in [0,1] (tensor or
        NumPy). Returns a dict of contiguous float32 CPU tensors by output name."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"images: expected [B,3,{INPUT_SIZE},{INPUT_SIZE}], got {tuple(x.shape)}")
        x = x.float()
        if self.runner is not None:
            outs = self.runner.run(x.numpy())
            return {k: torch.from_numpy(v) for k, v in outs.items()}
        x = x.to(self.device)
        step = self.micro_batch
        with torch.inference_mode():
            if step is None or len(x) <= step:
                outs = self._run(x)
            else:
                parts = [self._run(x[i:i + step]) for i in range(0, len(x), step)]
                outs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v.float().cpu().contiguous() for k, v in outs.items()}

    __call__ = decompose
