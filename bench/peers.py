"""Peers in the e2e table: OpenVINO's CPU plugin on the same exported ONNX file as the ``onnx``
path, fp32 and bf16, so every table says where the toolkit stands against another runtime.

    peer = make_peer("openvino-bf16", model, threads=2)   # exports the fp32 file, compiles it
    out = peer.decompose(images)        # as Decomposer.decompose: {name: float32 CPU tensor}
    peer.executed                       # what OpenVINO reports it ran at (device, precision)

These rows are a bench-only runner, not a ``Decomposer`` backend. OpenVINO is asked for a
precision through ``INFERENCE_PRECISION_HINT`` and may run another: on a CPU without
AVX512-BF16 or AMX the bf16 hint falls back to f32. So the row reports the hint the compiled
model holds and the runtime precision of each of its convolutions (``get_runtime_model``),
and its floor uses what ran, not what was asked. Needs the ``openvino`` extra.
"""
from __future__ import annotations

import collections

import numpy as np
import torch

PEER_PATHS = {"openvino": "fp32", "openvino-bf16": "bf16"}  # path -> precision asked of OpenVINO
_HINTS = {"fp32": "f32", "bf16": "bf16"}
_RUNTIME_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}
_MATRIX_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
EXTRA_HINT = "pip install 'sfs_fast[openvino]'"


class PeerUnavailable(Exception):
    """The peer cannot run here (OpenVINO not installed, not a CPU run); the message says why."""


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise PeerUnavailable(f"openvino is not installed ({exc}; {EXTRA_HINT})") from exc
    return openvino


class OpenVinoRunner:
    """An exported ``.onnx`` file compiled by OpenVINO for the CPU at ``precision`` (``fp32`` or
    ``bf16``, a hint OpenVINO may not follow) with ``threads`` inference threads, one stream and
    the latency hint (one request at a time, like every other path of the table).

    ``decompose(images [B,3,128,128])`` compiles a static-shape model for each new batch size
    (OpenVINO's recommended form; the first call of a size includes it) and returns the
    outputs by name as float32 CPU tensors. ``executed``: what the last compiled model runs
    at (see :meth:`_executed`)."""

    def __init__(self, path, precision: str = "fp32", threads: int | None = None):
        if precision not in _HINTS:
            raise ValueError(f"precision: OpenVINO rows are fp32 or bf16, not {precision!r}")
        self.ov = _openvino()
        self.core = self.ov.Core()
        self.path, self.precision = str(path), precision
        self.config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                       "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.model = self.core.read_model(self.path)
        self.input_name = self.model.inputs[0].get_any_name()
        self.output_names = [o.get_any_name() for o in self.model.outputs]
        self.requests: dict[int, object] = {}
        self.executed: dict | None = None
        self._compile(1)  # fail here, not in the first timed call, when the file does not compile

    def _compile(self, batch: int):
        model = self.model.clone()
        model.reshape({self.input_name: [batch, 3, 128, 128]})
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.executed = self._executed(compiled)
        self.requests[batch] = compiled.create_infer_request()
        return self.requests[batch]

    def _executed(self, compiled) -> dict:
        """``{"devices", "precision_hint", "asked", "layers": {precision: count},
        "layer_precisions": {node name: precision}, "note"}`` of a compiled model: its
        ``EXECUTION_DEVICES`` and ``INFERENCE_PRECISION_HINT`` read back, and the runtime
        precision of every matrix layer (convolution, fully connected) of its runtime graph."""
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        per_node = {}
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) in _MATRIX_LAYERS:
                per_node[op.get_friendly_name()] = _RUNTIME_PRECISIONS.get(info["runtimePrecision"].astype(str),
                                                                         info["runtimePrecision"].astype(str))
        counts = collections.Counter(per_node.values())
        ran = "/".join(f"{n} {p}" for p, n in sorted(counts.items()))
        asked = _HINTS[self.precision]
        note = (f"OpenVINO ran {ran} matrix layers (hint {hint})" if hint == asked
                else f"asked {asked}, OpenVINO fell back to {hint} on this CPU ({ran} matrix layers)")
        return {"devices": list(compiled.get_property("EXECUTION_DEVICES")), "precision_hint": hint, "asked": asked,
                "layers": dict(counts), "layer_precisions": per_node, "note": note}

    def decompose(self, images) -> dict:
        """``images`` ``[B,3,128,128]`` float RGB in [0,1] -> ``{name: float32 CPU tensor}``."""
        x = np.ascontiguousarray(torch.as_tensor(images).float().numpy())
        request = self.requests.get(len(x)) or self._compile(len(x))
        result = request.infer({self.input_name: x})
        # the request's output tensors are reused by its next call: copy them out
        outs = {o.get_any_name(): np.array(v, dtype=np.float32) for o, v in result.items()}
        return {name: torch.from_numpy(outs[name]) for name in self.output_names}

    __call__ = decompose


def module_precisions(executed: dict, module_names) -> dict[str, str]:
    """The runtime precision of each module of ``module_names`` whose node the compiled model
    reports (:func:`sfs_fast.bench.floors.onnx_scope` + ``/``, longest match), for the ones
    that did not run in fp32: the per-layer split that the row's floor uses."""
    from sfs_fast.bench.floors import onnx_scope

    scopes = sorted(((onnx_scope(m) + "/", m) for m in module_names), key=lambda s: -len(s[0]))
    out = {}
    for node, prec in (executed or {}).get("layer_precisions", {}).items():
        module = next((m for scope, m in scopes if node.startswith(scope)), None)
        if module is not None and prec != "fp32":
            out[module] = prec
    return out


def make_peer(path: str, model, *, device: str = "cpu", threads: int | None = None) -> OpenVinoRunner:
    """The runner of peer ``path`` (:data:`PEER_PATHS`) on ``model`` exported to fp32 ONNX the
    way the ``onnx`` path exports it; :class:`PeerUnavailable` with the reason where it cannot
    run here."""
    import shutil
    import tempfile

    if path not in PEER_PATHS:
        raise ValueError(f"paths: unknown peer {path!r}; choose from {', '.join(PEER_PATHS)}")
    if torch.device(device).type != "cpu":
        raise PeerUnavailable("the OpenVINO rows run on the CPU plugin (--device cpu)")
    _openvino()  # the reason to skip, before seconds of export
    from sfs_fast.bench.e2e import PathUnavailable, export_path_file
    from sfs_fast.plan import named_plan

    folder = tempfile.mkdtemp(prefix="sfs_bench_openvino_")
    try:
        try:  # the file of the onnx path: the same graph ONNX Runtime runs
            target = export_path_file(model, named_plan("onnx"), f"{folder}/method{model.method}_fp32.onnx")
        except PathUnavailable as exc:
            raise PeerUnavailable(str(exc)) from exc
        return OpenVinoRunner(target, PEER_PATHS[path], threads=threads)
    finally:  # OpenVINO holds the model in memory once read
        shutil.rmtree(folder, ignore_errors=True)
