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
"""
from __future__ import annotations

import warnings

import torch

from sfs_fast.models import build_model, method_id, output_names
from sfs_fast.optimize import FUSED_OPTIONS, optimize_for_inference

BACKENDS = ("eager", "fused", "compile", "onnx")
INPUT_SIZE = 128


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
        threads: intra-op threads (torch and ONNX Runtime); None keeps the default.
        optimizations: overrides of :data:`sfs_fast.optimize.FUSED_OPTIONS` for the ``fused``
            and ``compile`` backends (e.g. ``{"channels_last": False}``), to measure each one.
    """

    def __init__(self, model=None, *, method=None, weights=None, onnx=None, backend="fused",
                 device="cpu", threads=None, optimizations=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.threads = threads
        self.optimizations = dict(optimizations or {})
        self.runner = None
        if backend == "onnx" and onnx is not None and model is None and weights is None:
            from sfs_fast.export import OnnxRunner

            self.runner = OnnxRunner(onnx, device=self.device.type, threads=threads)
            self.method = self.runner.method
            if method is not None and method_id(method) != self.method:
                raise ValueError(f"onnx: {onnx} holds method {self.method}, not method {method_id(method)}")
            self.model = None
            self.output_names = list(self.runner.output_names)
            return
        self.model = self._resolve_model(model, method, weights)
        self.method = self.model.method
        self.output_names = output_names(self.method)
        self._run = self._prepare(onnx)

    @staticmethod
    def _resolve_model(model, method, weights):
        from sfs_fast import weights as weights_mod

        if model is None and weights is not None:
            model = weights_mod.load_any(weights, method=method)
        elif model is None:
            default = weights_mod.default_weights(method_id(method if method is not None else 0))
            if default is not None:
                model = weights_mod.load(default)
            else:
                warnings.warn("no trained weights given: the model has random weights", stacklevel=3)
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

            self.runner = OnnxRunner.from_model(model, path=onnx, device=self.device.type, threads=self.threads)
            return None
        fused = optimize_for_inference(model, **self.optimizations)
        if self.backend == "compile":
            fused = torch.compile(fused)
        if not {**FUSED_OPTIONS, **self.optimizations}["channels_last"]:
            return lambda x: fused(x)
        return lambda x: fused(x.contiguous(memory_format=torch.channels_last))

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
        with torch.inference_mode():
            outs = self._run(x.to(self.device))
        return {k: v.float().cpu().contiguous() for k, v in outs.items()}

    __call__ = decompose
