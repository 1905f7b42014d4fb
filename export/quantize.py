"""Lower-precision ONNX graphs: float16 and static int8 (ONNX Runtime quantization).

- ``to_float16``: weights and activations in half, inputs and outputs kept float32
  (``keep_io_types``), with onnxruntime's own converter
  (``onnxruntime.transformers.float16``; the ``onnxconverter-common`` package is not needed).
- ``quantize_int8``: static QDQ quantization, per-channel int8 weights, int8 activations
  calibrated (MinMax) on a small image set, of the convolutions :data:`INT8_LAYERS` names:
  ``budget`` (the default) quantizes only the layers whose int8 error stays within the
  accuracy budget of :mod:`sfs_fast.precision`; ``all`` every convolution but the heads'
  3-channel output layers (faster, far over budget). The light's average and
  fully-connected layer, the upsampling and the SH shading always stay float32. Dynamic
  int8 is not offered: it runs slower than fp32 on these models.

Calibration images: the example faces shipped with the package, mirrored, plus synthetic
face-like pictures (:mod:`sfs_fast.samples`).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from sfs_fast.plan import INT8_LAYERS
from sfs_fast.samples import example_faces, face_like_images

from sfs_fast.export.runner import INPUT_NAME, INPUT_SIZE


def shading_nodes(proto) -> list[str]:
    """Names of the nodes of the models' own ``forward`` (not of a submodule): the normal's
    normalization, the SH shading, residue and reconstruction. The TorchScript exporter
    names them ``/model/<Op>[_k]``; the Concats of trunk features are left out."""
    return [n.name for n in proto.graph.node
            if n.name.startswith("/model/") and n.name.count("/") == 2 and n.op_type != "Concat"]


def to_float16(proto):
    """A float16 copy of ``proto`` with float32 inputs and outputs. The output convolutions
    and the shading (:func:`shading_nodes`) stay float32: normalizing a short normal vector
    in half precision turns a 1e-3 error into a 1e-1 one."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = output_convolutions(proto) + shading_nodes(proto)
    wrapped = OnnxModel(proto)
    wrapped.convert_float_to_float16(keep_io_types=True, node_block_list=keep)
    # keep_io_types appends the input Casts after the nodes that read them: sort again.
    wrapped.topological_sort()
    return wrapped.model


def calibration_images(count: int = 16, seed: int = 1234) -> np.ndarray:
    """The default int8 calibration set: the example faces, their mirror images, and
    synthetic face-like pictures up to ``count`` images."""
    faces = example_faces()
    faces = np.concatenate([faces, faces[..., ::-1]])[:count]
    rest = count - len(faces)
    synth = face_like_images(rest, np.random.default_rng(seed)) if rest > 0 else faces[:0]
    return np.ascontiguousarray(np.concatenate([faces, synth]).astype(np.float32))


class _Batches:
    """``CalibrationDataReader`` over an array, ``batch`` images a step."""

    def __init__(self, images, batch):
        self.images, self.batch, self.pos = images, batch, 0

    def get_next(self):
        if self.pos + self.batch > len(self.images):
            return None
        x = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {INPUT_NAME: np.ascontiguousarray(x)}

    def rewind(self):
        self.pos = 0


def output_convolutions(proto) -> list[str]:
    """Names of the Conv nodes whose output is one of the model's 3-channel maps (the last
    1x1/3x3 convolution of every head): the weight initializer has 3 output channels."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and shapes.get(n.input[1], [0])[0] == 3]


# Which convolutions ``quantize_int8`` quantizes (sfs_fast.plan.INT8_LAYERS): measured one
# layer at a time on the bundled weights, only the first convolution of the first residual
# block of each albedo trunk stays within the accuracy budget; every later layer costs more
# than the whole budget (the light estimator reads the trunks' last features, and int8 rounds
# each convolution's *output* to 256 levels). Figures in bench/README.md.


def quantized_convolutions(proto, layers: str = "budget") -> list[str]:
    """Names of the Conv nodes :func:`quantize_int8` quantizes for ``layers`` (see
    :data:`INT8_LAYERS`): ``budget``, the first convolution of the first residual block of
    each albedo trunk; ``all``, every convolution but :func:`output_convolutions`."""
    if layers not in INT8_LAYERS:
        raise ValueError(f"int8_layers: expected one of {', '.join(INT8_LAYERS)}, got {layers!r}")
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    if layers == "all":
        outputs = set(output_convolutions(proto))
        return [n for n in convs if n not in outputs]
    return [n for n in convs if n.startswith("/model/albedo_residual_model") and "/block1/res/res.2/" in n]


def quantize_int8(proto, calibration: np.ndarray, *, batch: int | None = None, layers: str = "budget"):
    """Static int8 QDQ quantization of ``proto``'s convolutions named by ``layers``
    (:func:`quantized_convolutions`), calibrated on ``calibration`` ``[N,3,128,128]``
    float32. Returns the quantized ``ModelProto``."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or calibration.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE) or len(calibration) == 0:
        raise ValueError(f"calibration: expected [N,3,{INPUT_SIZE},{INPUT_SIZE}] images, got {list(calibration.shape)}")
    step = batch or 1
    if len(calibration) < step:
        raise ValueError(f"calibration: {len(calibration)} images are fewer than the batch {step}")
    with tempfile.TemporaryDirectory(prefix="sfs_fast_int8_") as folder:
        src, pre, dst = (os.path.join(folder, f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        chosen = quantized_convolutions(onnx.load(pre), layers)
        if not chosen:
            raise ValueError(f"int8_layers: {layers!r} names no convolution of this graph")
        quantize_static(pre, dst, _Batches(calibration, step), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=chosen,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        return onnx.load(dst)
