"""Peers in the e2e table: OpenVINO's own bf16 on the same exported ONNX file as the ``onnx``
path, so every table says where the toolkit stands against another runtime's fastest
setting.

    peer = make_peer("openvino-bf16-all", model, threads=2)   # exports the fp32 file, compiles it
    out = peer.decompose(images)        # as Decomposer.decompose: {name: float32 CPU tensor}
    peer.executed                       # what OpenVINO reports it ran at (device, precision)

``openvino-bf16-all`` is the whole graph under OpenVINO's bf16 hint: over the accuracy budget
on our weights, so it is a bench-only row, not a ``Decomposer`` backend. OpenVINO within the
budget is the Decomposer's ``openvino`` backend (paths ``openvino`` and ``openvino-bf16``:
:mod:`sfs_fast.export.openvino_runner`). A row reports what the compiled model ran at and its
floor uses that, not what was asked. Needs the ``openvino`` extra.
"""
from __future__ import annotations

import torch

from sfs_fast.export.openvino_runner import EXTRA_HINT, OpenVinoRunner

PEER_PATHS = {"openvino-bf16-all": "bf16"}  # path -> precision asked of OpenVINO for the whole graph
MERGED = "merged"  # the precision of a module the compiled model computes with no layer of its own


class PeerUnavailable(Exception):
    """The peer cannot run here (OpenVINO not installed, not a CPU run); the message says why."""


class Peer:
    """A :class:`~sfs_fast.export.openvino_runner.OpenVinoRunner` with the Decomposer's
    ``decompose`` (torch tensors in and out)."""

    def __init__(self, runner: OpenVinoRunner):
        self.runner = runner

    @property
    def executed(self) -> dict | None:
        return self.runner.executed

    def decompose(self, images) -> dict:
        outs = self.runner.run(torch.as_tensor(images).float().numpy())
        return {name: torch.from_numpy(v) for name, v in outs.items()}

    __call__ = decompose


def module_precisions(executed: dict, module_names) -> dict[str, str]:
    """The runtime precision of each module of ``module_names`` whose node the compiled model
    reports (:func:`sfs_fast.export.runner.onnx_scope` + ``/``, longest match), for the ones
    that did not run in fp32: the per-layer split that the row's floor uses.

    A module with no reported node is ``merged``: computed by no layer of its own, because
    onnxslim or OpenVINO merged it with an identical layer on the same input (on the bundled
    method-3 weights ``albedo_residual_model_2`` equals ``albedo_residual_model``, 24% of the
    FLOPs) or fused it into another layer (the light estimator's fully connected layer, whose
    node takes the output's name ``light``: a few kFLOPs); the floor leaves it out."""
    from sfs_fast.export.runner import onnx_scope

    scopes = sorted(((onnx_scope(m) + "/", m) for m in module_names), key=lambda s: -len(s[0]))
    reported = (executed or {}).get("layer_precisions", {})
    if not reported:
        return {}
    out = {m: MERGED for m in module_names}
    for node, prec in reported.items():
        module = next((m for scope, m in scopes if node.startswith(scope)), None)
        if module is not None:
            out[module] = prec
    return {m: p for m, p in out.items() if p != "fp32"}


def make_peer(path: str, model, *, device: str = "cpu", threads: int | None = None) -> Peer:
    """The runner of peer ``path`` (:data:`PEER_PATHS`) on ``model`` exported to fp32 ONNX the
    way the ``onnx`` path exports it; :class:`PeerUnavailable` with the reason where it cannot
    run here."""
    import shutil
    import tempfile

    from sfs_fast.precision import missing_package

    if path not in PEER_PATHS:
        raise ValueError(f"paths: unknown peer {path!r}; choose from {', '.join(PEER_PATHS)}")
    if torch.device(device).type != "cpu":
        raise PeerUnavailable("the OpenVINO rows run on the CPU plugin (--device cpu)")
    package = missing_package("openvino")
    if package:  # the reason to skip, before seconds of export
        raise PeerUnavailable(f"{package} is not installed ({EXTRA_HINT})")
    from sfs_fast.bench.e2e import PathUnavailable, export_path_file
    from sfs_fast.plan import named_plan

    folder = tempfile.mkdtemp(prefix="sfs_bench_openvino_")
    try:
        try:  # the file of the onnx path: the same graph ONNX Runtime runs
            target = export_path_file(model, named_plan("onnx"), f"{folder}/method{model.method}_fp32.onnx")
        except PathUnavailable as exc:
            raise PeerUnavailable(str(exc)) from exc
        return Peer(OpenVinoRunner(target, PEER_PATHS[path], threads=threads))
    finally:  # OpenVINO holds the model in memory once read
        shutil.rmtree(folder, ignore_errors=True)
