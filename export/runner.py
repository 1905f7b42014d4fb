"""ONNX Runtime sessions for exported files: ``OnnxRunner``.

This module needs only ``onnxruntime`` and ``numpy``, so a deployment can run an exported
file without torch; exporting a model and opening it in one step is
:func:`sfs_fast.export.onnx_export.export_session`.

    runner = OnnxRunner("method3.onnx", threads=2)
    out = runner.run(images)          # images float32 [B,3,128,128] RGB in [0,1]
    out["normal"], out["light"], ...  # float32 NumPy arrays, by the names of SPEC A.2
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

INPUT_NAME = "image"
INPUT_SIZE = 128

# Execution providers asked for, per device, best first; each list is filtered by what the
# installed onnxruntime offers (get_available_providers) and checked after the session opens.
DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # the [onnx] extra is optional
        raise ImportError("onnxruntime is not installed: pip install 'sfs_fast[onnx]'") from exc
    return onnxruntime


def select_providers(device="cpu", providers=None):
    """The provider list for ``device`` (``cpu``, ``cuda[:N]``, ``tensorrt[:N]``) or the
    explicit ``providers``, keeping those the installed onnxruntime offers.

    Returns ``(providers, wanted)`` where ``wanted`` is the first provider asked for (what
    the caller hopes the session runs on)."""
    ort = _ort()
    available = set(ort.get_available_providers())
    device = str(device)
    kind, _, index = device.partition(":")
    if providers is None:
        if kind not in DEVICE_PROVIDERS:
            raise ValueError(f"device: unknown device {device!r}; use cpu, cuda or tensorrt")
        providers = DEVICE_PROVIDERS[kind]
    providers = list(providers)
    if not providers:
        raise ValueError("providers: the list is empty")
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    chosen = []
    for p in providers:
        name = p if isinstance(p, str) else p[0]
        if name not in available:
            continue
        if isinstance(p, str) and index and name != "CPUExecutionProvider":
            p = (name, {"device_id": int(index)})
        chosen.append(p)
    if not any((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in chosen):
        chosen.append("CPUExecutionProvider")
    return chosen, wanted


def onnx_scope(module_name: str) -> str:
    """The scope the TorchScript ONNX exporter gives a module's nodes (under the export
    wrapper's ``model``): ``albedo_residual_model.block1.res.2`` ->
    ``/model/albedo_residual_model/block1/res/res.2`` (a numbered child is named after its
    container). Node names are that scope plus ``/Conv``, ``/Gemm``, ..."""
    parts = module_name.split(".")
    return "/model/" + "/".join(f"{parts[i - 1]}.{p}" if p.isdigit() and i else p for i, p in enumerate(parts))


def read_onnx_metadata(custom_map: dict) -> dict:
    """Decode the ``metadata_props`` written by :func:`sfs_fast.export.export_onnx`
    (JSON values decoded, plain strings kept)."""
    meta = {}
    for key, value in custom_map.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return meta


class OnnxRunner:
    """An ``InferenceSession`` on an exported file, returning the models' output dict.

    Args:
        path: the ``.onnx`` file (written by ``sfs-export`` / :func:`export_onnx`).
        device: ``cpu``, ``cuda[:N]`` or ``tensorrt[:N]`` (providers best first, falling back
            to CPU; a warning says when the session did not get the accelerator asked for).
        threads: ``intra_op_num_threads`` (None: onnxruntime's default, one per core).
        providers: an explicit provider list, overriding ``device``.

    Attributes: ``method`` (int), ``output_names`` (list), ``metadata`` (dict),
    ``providers`` (what the session runs on), ``batch`` (None for a dynamic batch).
    """

    def __init__(self, path, device="cpu", threads=None, providers=None):
        ort = _ort()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        chosen, wanted = select_providers(device, providers)
        try:
            self.session = ort.InferenceSession(self.path, sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.providers = self.session.get_providers()
        if wanted not in self.providers:
            # Asking for CUDA without its libraries only logs an error and runs on the CPU.
            warnings.warn(f"{wanted} was asked for but the session runs on {self.providers[0]} "
                          f"(available: {', '.join(ort.get_available_providers())})", stacklevel=2)
        self.metadata = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
        if "method" not in self.metadata:
            raise ValueError(f"{self.path}: not an sfs_fast export (no 'method' in its metadata)")
        self.method = int(self.metadata["method"])
        graph_outputs = [o.name for o in self.session.get_outputs()]
        names = self.metadata.get("output_names") or graph_outputs
        if sorted(names) != sorted(graph_outputs):
            raise ValueError(f"{self.path}: metadata outputs {names} do not match the graph's {graph_outputs}")
        self.output_names = list(names)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ValueError(f"{self.path}: expected one input named {INPUT_NAME!r}")
        dim0 = inputs[0].shape[0]
        self.batch = dim0 if isinstance(dim0, int) else None

    def run(self, images) -> dict:
        """Run a batch: ``images`` float ``[B,3,128,128]`` RGB in [0,1] (NumPy or anything
        ``np.asarray`` takes). Returns ``{name: float32 ndarray}`` in ``output_names`` order."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"images: expected [B,3,{INPUT_SIZE},{INPUT_SIZE}], got {list(x.shape)}")
        if self.batch is not None and x.shape[0] != self.batch:
            raise ValueError(f"images: {self.path} was exported for batch {self.batch}, got {x.shape[0]}")
        if x.shape[0] == 0:  # an empty batch: shapes from a one-image run
            return {k: v[:0] for k, v in self.run(np.zeros((1,) + x.shape[1:], np.float32)).items()}
        values = self.session.run(self.output_names, {INPUT_NAME: x})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, values)}

    __call__ = run

    def __repr__(self):
        return f"OnnxRunner({self.path!r}, method={self.method}, providers={self.providers})"
