"""OpenVINO's CPU plugin on an exported file: ``OpenVinoRunner``, the ``Decomposer``'s
``openvino`` backend (and the OpenVINO rows of ``sfs-bench``).

    runner = OpenVinoRunner("method3.onnx", threads=2)                       # fp32
    runner = OpenVinoRunner("method3.onnx", "bf16", bf16_scopes=("/model/normal_residual_model/",))
    out = runner.run(images)          # images float32 [B,3,128,128] RGB in [0,1]
    out["normal"], out["light"], ...  # float32 NumPy arrays, by the names of SPEC A.2
    runner.executed                   # what OpenVINO reports it ran at

Precision ``bf16`` with float32 islands: OpenVINO takes one precision hint per compiled model
(its per-node "keep this in float32" marks are not reachable from Python), so the file is cut
(``onnx.utils.Extractor``) into pieces by whether a node lies under one of ``bf16_scopes``
(ONNX name scopes, ``/model/<module>/``), in a node order that keeps each precision's nodes
together (:func:`cut_by_scope`). Each piece is compiled with its own hint and the pieces run
one after the other, each reading the tensors it needs from the ones before. The
``Decomposer`` passes the scopes of the modules its own bf16 path computes in bf16
(:func:`sfs_fast.precision.low_precision_modules`: the residual trunks and a residue head),
so both bf16 paths keep the same layers in float32. ``bf16_scopes=None``
with bf16 is OpenVINO's own bf16: the whole graph under the hint (over the accuracy budget
on our weights; the ``openvino-bf16-all`` row of ``sfs-bench``).

OpenVINO is asked for a precision and may run another (on a CPU without AVX512-BF16 or AMX
the bf16 hint falls back to f32): ``executed`` holds the hint each piece got back and the
runtime precision of every matrix layer (``get_runtime_model``). Needs the ``openvino``
extra (``pip install 'sfs_fast[openvino]'``) and onnx (to read the file and cut it).
"""
from __future__ import annotations

import collections
import os

import numpy as np

from sfs_fast.export.runner import INPUT_NAME, INPUT_SIZE, read_onnx_metadata

PRECISIONS = ("fp32", "bf16")
_HINTS = {"fp32": "f32", "bf16": "bf16"}
_RUNTIME_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}
_MATRIX_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
EXTRA_HINT = "pip install 'sfs_fast[openvino]'"
COMPILED_BATCHES = 4  # batch sizes kept compiled (a folder run needs two: its batch and the last)


def openvino_module():
    """``openvino``, or an ImportError that says which extra installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"openvino is not installed ({exc}; {EXTRA_HINT})") from exc
    return openvino


def trunk_scopes(model) -> tuple[str, ...]:
    """The ONNX scopes (``/model/<module>/``) of the modules the PyTorch bf16 path computes
    in bf16 (:func:`sfs_fast.precision.low_precision_modules`): the ``bf16_scopes`` that keep
    the same layers in float32 as that path."""
    from sfs_fast.export.runner import onnx_scope
    from sfs_fast.precision import low_precision_modules

    return tuple(onnx_scope(name) + "/" for name in low_precision_modules(model))


def cut_by_scope(model, bf16_scopes) -> list[tuple[str, object, list, list]]:
    """Cut an ONNX ``model`` (a ``ModelProto``) into pieces by precision: a node is bf16
    when its name starts with one of ``bf16_scopes`` (or as :func:`_precision_runs` says),
    fp32 otherwise; the nodes in :func:`_precision_runs`' order. Returns
    ``[(precision, piece ModelProto, input names, output names)]`` in running order; a
    piece's inputs are the graph input or outputs of earlier pieces, its outputs what later
    pieces or the graph's outputs read."""
    import onnx.shape_inference
    import onnx.utils

    model = onnx.shape_inference.infer_shapes(model)  # a cut tensor's piece input needs its type and shape
    nodes = model.graph.node
    finals = {o.name for o in model.graph.output}
    runs = _precision_runs(nodes, tuple(bf16_scopes), {t.name for t in model.graph.initializer}, finals)
    made_in = {out: k for k, (_, run) in enumerate(runs) for node in run for out in node.output}
    read_in = collections.defaultdict(set)
    for k, (_, run) in enumerate(runs):
        for node in run:
            for name in node.input:
                read_in[name].add(k)
    extractor = onnx.utils.Extractor(model)
    # weights and Constant nodes never cross: each piece's extraction takes the ones it reads
    fixed = set(extractor.initializers) | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    pieces = []
    for k, (prec, run) in enumerate(runs):
        inputs = sorted({i for n in run for i in n.input if i and made_in.get(i, -1) < k and i not in fixed})
        outputs = sorted({o for n in run for o in n.output
                          if o not in fixed and (o in finals or any(r > k for r in read_in[o]))})
        if outputs:  # a run nothing later reads is no piece
            pieces.append((prec, extractor.extract_model(inputs, outputs), inputs, outputs))
    return pieces


def _precision_runs(nodes, bf16_scopes: tuple, weights: set, finals: set) -> list[tuple[str, list]]:
    """The non-Constant ``nodes`` in a topological order with few precision changes, as
    ``[(precision, [node, ...])]``. A node is bf16 under ``bf16_scopes``, and so is a node
    without ``weights`` whose every reader is bf16 (the concatenation of the features a bf16
    head reads: its first convolution rounds them to bf16 anyway). The exporter's order
    interleaves modules that do not depend on each other (a residue head's nodes among the
    other heads'), which would cut the graph into many pieces; this order keeps taking
    ready nodes of the current precision, in graph order, and switches only when none is
    left."""
    import heapq

    nodes = [n for n in nodes if n.op_type != "Constant"]  # fixed values: each piece extracts its own
    producer = {out: k for k, n in enumerate(nodes) for out in n.output}
    users = collections.defaultdict(list)
    waiting = []
    for k, node in enumerate(nodes):
        deps = {producer[i] for i in node.input if i in producer}
        waiting.append(len(deps))
        for d in deps:
            users[d].append(k)
    precs = ["bf16" if n.name.startswith(bf16_scopes) else "fp32" for n in nodes]
    for k in reversed(range(len(nodes))):  # readers come later in the exporter's (topological) order
        node = nodes[k]
        if (precs[k] == "fp32" and users[k] and not set(node.input) & weights and not set(node.output) & finals
                and all(precs[u] == "bf16" for u in users[k])):
            precs[k] = "bf16"
    ready = {"fp32": [], "bf16": []}
    for k in range(len(nodes)):
        if not waiting[k]:
            heapq.heappush(ready[precs[k]], k)
    runs: list[tuple[str, list]] = []
    current = precs[0] if nodes else "fp32"
    while ready["fp32"] or ready["bf16"]:
        if not ready[current]:
            current = "bf16" if current == "fp32" else "fp32"
        k = heapq.heappop(ready[current])
        if not runs or runs[-1][0] != current:
            runs.append((current, []))
        runs[-1][1].append(nodes[k])
        for u in users[k]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready[precs[u]], u)
    return runs


def read_file(path) -> tuple[object, dict]:
    """``(ModelProto, metadata)`` of an exported fp32 file; one-line errors (FileNotFoundError,
    ValueError) for a missing file, a file that is not ONNX, not ours, or not fp32."""
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types
        raise ValueError(f"{path}: not an ONNX file ({str(exc).splitlines()[0]})") from None
    metadata = read_onnx_metadata({p.key: p.value for p in model.metadata_props})
    if "method" not in metadata:
        raise ValueError(f"{path}: not an sfs_fast export (no 'method' in its metadata)")
    if metadata.get("precision", "fp32") != "fp32":
        raise ValueError(f"{path}: OpenVINO runs an fp32 export, not a {metadata['precision']} one")
    return model, metadata


class OpenVinoRunner:
    """An exported ``.onnx`` file compiled by OpenVINO for the CPU.

    Args:
        path: the ``.onnx`` file (written by ``sfs-export`` / :func:`export_onnx`, fp32).
        precision: ``fp32`` or ``bf16`` (a hint OpenVINO may not follow: ``executed``).
        threads: inference threads (None: torch's intra-op count, else OpenVINO's default).
        bf16_scopes: with bf16, the ONNX name scopes computed in bf16, the rest in float32
            (module docstring), or a callable of the file's method that returns them (a file
            opened without its model); None: the whole graph in bf16.

    One stream and the latency hint: one request at a time, like the other backends. Each
    new batch size compiles a static-shape model (OpenVINO's recommended form; the first
    call of a size pays for it); the last :data:`COMPILED_BATCHES` sizes are kept.
    Attributes: ``method``, ``output_names``, ``metadata``, ``precision``, ``executed``.
    """

    def __init__(self, path, precision: str = "fp32", threads: int | None = None, bf16_scopes=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: OpenVINO runs fp32 or bf16 here, not {precision!r}")
        ov = openvino_module()
        self.path, self.precision = os.fspath(path), precision
        model, self.metadata = read_file(self.path)
        self.method = int(self.metadata["method"])
        self.output_names = [o.name for o in model.graph.output]
        if precision == "fp32" or bf16_scopes is None:
            self.pieces = [(precision, model, [INPUT_NAME], self.output_names)]
        else:
            self.pieces = cut_by_scope(model, bf16_scopes(self.method) if callable(bf16_scopes) else bf16_scopes)
        self.core = ov.Core()
        self._read = [(prec, self.core.read_model(piece.SerializeToString()), inputs)
                      for prec, piece, inputs, _ in self.pieces]
        self.threads = threads if threads is not None else _torch_threads()
        self.compiled: collections.OrderedDict = collections.OrderedDict()
        self.executed: dict | None = None
        self._compile(1)  # fail here, not in the first call, when the file does not compile

    def _config(self, prec: str) -> dict:
        config = {"INFERENCE_PRECISION_HINT": _HINTS[prec], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def _compile(self, batch: int) -> list:
        chain = []
        for prec, model, inputs in self._read:
            model = model.clone()
            model.reshape({p.get_any_name(): [batch, *(d.get_length() for d in list(p.get_partial_shape())[1:])]
                           for p in model.inputs})
            compiled = self.core.compile_model(model, "CPU", self._config(prec))
            chain.append((compiled, compiled.create_infer_request(), inputs))
        self.executed = _executed([c for c, _, _ in chain], self.precision)
        self.compiled[batch] = chain
        while len(self.compiled) > COMPILED_BATCHES:
            self.compiled.popitem(last=False)
        return chain

    def run(self, images) -> dict:
        """``images`` float32 ``[B,3,128,128]`` -> ``{name: float32 ndarray}`` (copies: the
        requests reuse their buffers)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"images: expected [B,3,{INPUT_SIZE},{INPUT_SIZE}], got {tuple(x.shape)}")
        chain = self.compiled.get(len(x)) or self._compile(len(x))
        self.compiled.move_to_end(len(x))
        tensors = {INPUT_NAME: x}
        for _, request, inputs in chain:
            result = request.infer({name: tensors[name] for name in inputs})
            tensors.update({out.get_any_name(): np.array(value, dtype=np.float32) for out, value in result.items()})
        return {name: tensors[name] for name in self.output_names}


def _torch_threads():
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _executed(compiled_models, asked: str) -> dict:
    """``{"devices", "precision_hint", "asked", "layers": {precision: count},
    "layer_precisions": {node name: precision}, "note"}`` of the compiled pieces: the hints
    read back (``bf16`` when any piece kept a bf16 hint) and the runtime precision of every
    matrix layer of their runtime graphs."""
    per_node, hints, devices = {}, set(), []
    for compiled in compiled_models:
        hints.add(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        devices += [d for d in compiled.get_property("EXECUTION_DEVICES") if d not in devices]
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) in _MATRIX_LAYERS:
                ran = info["runtimePrecision"].astype(str)
                per_node[op.get_friendly_name()] = _RUNTIME_PRECISIONS.get(ran, ran)
    counts = collections.Counter(per_node.values())
    ran = "/".join(f"{n} {p}" for p, n in sorted(counts.items()))
    hint = "bf16" if "bf16" in hints else "f32"
    note = (f"OpenVINO ran {ran} matrix layers (hint {hint}, {len(compiled_models)} compiled pieces)"
            if hint == _HINTS[asked] else f"asked {_HINTS[asked]}, OpenVINO fell back to {hint} on this CPU "
                                          f"({ran} matrix layers)")
    return {"devices": devices, "precision_hint": hint, "asked": _HINTS[asked], "layers": dict(counts),
            "layer_precisions": per_node, "pieces": len(compiled_models), "note": note}
