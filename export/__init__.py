"""ONNX export of every method, parity verification, and ONNX Runtime sessions.

    from sfs_fast.export import export_onnx, OnnxRunner
    result = export_onnx(model, "method3.onnx")        # verified against PyTorch
    out = OnnxRunner("method3.onnx").run(images)       # {name: float32 ndarray}

``sfs-export`` (:mod:`sfs_fast.export.cli`) is the command line. The runner needs only
onnxruntime and numpy; the exporter (torch, onnx, onnxslim) is imported on first use.
"""
from sfs_fast.export.runner import OnnxRunner, read_onnx_metadata, select_providers

_EXPORTER_NAMES = ("export_onnx", "export_session", "export_openvino_session", "verify", "ExportResult", "ParityError", "DEFAULT_OPSET",
                   "DEFAULT_ATOL", "MIN_OPSET", "MAX_OPSET", "ONNX_PRECISIONS")

__all__ = ["OnnxRunner", "read_onnx_metadata", "select_providers", *_EXPORTER_NAMES]


def __getattr__(name):
    if name in _EXPORTER_NAMES:
        from sfs_fast.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(name)
