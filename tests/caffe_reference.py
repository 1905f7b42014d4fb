"""Test helpers for the Caffe importer, independent of sfs_fast.

* ``parse_prototxt(text)``: a small protobuf-text parser (messages -> dicts of lists).
* ``deploy_layers(path)``: the TEST-phase layer list of a deploy prototxt.
* ``CaffeNet``: a forward of that layer list in float64 (torch.nn.functional for the
  convolutions, everything else written out), with Caffe's semantics: BatchNorm with global
  statistics divided by the stored scale factor, in-place tops, Eltwise SUM, grouped
  Deconvolution, Concat, AVE Pooling, InnerProduct. Input is BGR, as Caffe reads images.
* ``make_caffe_h5(path, ...)``: a random ``.caffemodel.h5`` with the blob shapes of the
  prototxt, laid out as Caffe writes it (``<top>/<layer>/0,1,2``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PROTOTXT = Path(__file__).parent / "data" / "SfSNet_deploy.prototxt"

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}:]|[^\s{}:"#]+')


def _tokens(text: str):
    for match in _TOKEN.finditer(text):
        tok = match.group(0)
        if tok.isspace() or tok.startswith("#"):
            continue
        yield tok


def _scalar(tok: str):
    if tok.startswith('"'):
        return tok[1:-1]
    for cast in (int, float):
        try:
            return cast(tok)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(tok, tok)  # enums (SUM, AVE, TEST) stay strings


def parse_prototxt(text: str) -> dict:
    """Protobuf text format -> ``{field: [values]}``; nested messages are dicts again."""
    toks = list(_tokens(text))
    pos = 0

    def message(closing: bool) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(toks):
            tok = toks[pos]
            if tok == "}":
                if not closing:
                    raise ValueError("unbalanced '}'")
                pos += 1
                return out
            key = tok
            pos += 1
            if toks[pos] == ":":
                pos += 1
            if toks[pos] == "{":
                pos += 1
                value = message(True)
            else:
                value = _scalar(toks[pos])
                pos += 1
            out.setdefault(key, []).append(value)
        if closing:
            raise ValueError("missing '}'")
        return out

    return message(False)


def _one(msg: dict, key: str, default=None):
    values = msg.get(key)
    return values[0] if values else default


def deploy_layers(path=PROTOTXT) -> list[dict]:
    """Layers that run in the TEST phase, in file order."""
    net = parse_prototxt(Path(path).read_text())
    layers = []
    for layer in net["layer"]:
        phases = [_one(inc, "phase") for inc in layer.get("include", [])]
        if phases and "TEST" not in phases:
            continue
        layers.append(layer)
    return layers


def blob_shapes(layers, input_shape=(1, 3, 128, 128)) -> dict:
    """``{layer name: [blob shapes]}`` for every layer with parameters, by propagating shapes."""
    shapes = {}
    tops: dict[str, tuple] = {}
    for layer in layers:
        kind, name = _one(layer, "type"), _one(layer, "name")
        bottoms = [tops[b] for b in layer.get("bottom", [])]
        if kind == "Input":
            out = tuple(input_shape)
        elif kind in ("Convolution", "Deconvolution"):
            p = _one(layer, "convolution_param")
            n, c, h, w = bottoms[0]
            k, s, pad = _one(p, "kernel_size"), _one(p, "stride", 1), _one(p, "pad", 0)
            group, cout = _one(p, "group", 1), _one(p, "num_output")
            if kind == "Convolution":
                shapes[name] = [(cout, c // group, k, k)]
                out = (n, cout, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
            else:
                shapes[name] = [(c, cout // group, k, k)]
                out = (n, cout, (h - 1) * s - 2 * pad + k, (w - 1) * s - 2 * pad + k)
            if _one(p, "bias_term", True):
                shapes[name].append((cout,))
        elif kind == "BatchNorm":
            c = bottoms[0][1]
            shapes[name] = [(c,), (c,), (1,)]
            out = bottoms[0]
        elif kind == "InnerProduct":
            p = _one(layer, "inner_product_param")
            cout = _one(p, "num_output")
            shapes[name] = [(cout, int(np.prod(bottoms[0][1:]))), (cout,)]
            out = (bottoms[0][0], cout)
        elif kind == "Concat":
            out = (bottoms[0][0], sum(b[1] for b in bottoms)) + tuple(bottoms[0][2:])
        elif kind == "Pooling":
            p = _one(layer, "pooling_param")
            k, s = _one(p, "kernel_size"), _one(p, "stride", 1)
            n, c, h, w = bottoms[0]
            out = (n, c, -(-(h - k) // s) + 1, -(-(w - k) // s) + 1)
        else:  # ReLU, Eltwise: shape of the first bottom
            out = bottoms[0]
        for top in layer.get("top", []):
            tops[top] = out
    return shapes


class CaffeNet:
    """Forward of a Caffe layer list with numpy blobs ``{layer: [arrays]}`` (float64 by default)."""

    def __init__(self, layers, blobs: dict, dtype=torch.float64):
        self.layers = layers
        self.dtype = dtype
        self.blobs = {k: [torch.as_tensor(np.asarray(b, dtype=np.float64)).to(dtype) for b in v]
                      for k, v in blobs.items()}
        self.batch_stats: dict[str, tuple] = {}

    def forward(self, bgr: torch.Tensor, calibrate: bool = False) -> dict:
        """All blobs after the forward; ``bgr`` is ``[B,3,H,W]`` BGR. With ``calibrate``,
        BatchNorm uses the batch's own statistics and records them in ``batch_stats`` (any
        image size works then: pooling shrinks to the feature map)."""
        data: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            kind, name = _one(layer, "type"), _one(layer, "name")
            xs = [data[b] for b in layer.get("bottom", [])]
            if kind == "Input":
                y = bgr.to(self.dtype)
            elif kind == "Convolution":
                p = _one(layer, "convolution_param")
                w = self.blobs[name]
                y = F.conv2d(xs[0], w[0], w[1] if len(w) > 1 else None, stride=_one(p, "stride", 1),
                             padding=_one(p, "pad", 0), groups=_one(p, "group", 1))
            elif kind == "Deconvolution":
                p = _one(layer, "convolution_param")
                w = self.blobs[name]
                y = F.conv_transpose2d(xs[0], w[0], w[1] if len(w) > 1 else None, stride=_one(p, "stride", 1),
                                       padding=_one(p, "pad", 0), groups=_one(p, "group", 1))
            elif kind == "BatchNorm":
                p = _one(layer, "batch_norm_param", {})
                eps = _one(p, "eps", 1e-5)
                x = xs[0]
                if calibrate:
                    mean = x.mean(dim=(0, 2, 3))
                    var = x.var(dim=(0, 2, 3), unbiased=False)
                    self.batch_stats[name] = (mean, var)
                else:
                    assert _one(p, "use_global_stats") is True
                    m, v, s = self.blobs[name]
                    factor = 0.0 if float(s[0]) == 0 else 1.0 / float(s[0])
                    mean, var = m * factor, v * factor
                y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
            elif kind == "ReLU":
                y = torch.where(xs[0] > 0, xs[0], torch.zeros_like(xs[0]))
            elif kind == "Eltwise":
                p = _one(layer, "eltwise_param", {})
                assert _one(p, "operation", "SUM") == "SUM"
                y = xs[0].clone()
                for x in xs[1:]:
                    y = y + x
            elif kind == "Concat":
                p = _one(layer, "concat_param", {})
                y = torch.cat(xs, dim=_one(p, "axis", 1))
            elif kind == "Pooling":
                p = _one(layer, "pooling_param")
                assert _one(p, "pool") == "AVE" and _one(p, "pad", 0) == 0
                k, s = _one(p, "kernel_size"), _one(p, "stride", 1)
                x = xs[0]
                if calibrate:  # calibration may run on small images: statistics only
                    k = min(k, x.shape[2], x.shape[3])
                out_h, out_w = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
                y = torch.stack([torch.stack([x[:, :, i * s:i * s + k, j * s:j * s + k].mean(dim=(2, 3))
                                              for j in range(out_w)], -1) for i in range(out_h)], -2)
            elif kind == "InnerProduct":
                w, b = self.blobs[name]
                y = xs[0].reshape(xs[0].shape[0], -1) @ w.T + b
            else:
                raise NotImplementedError(f"layer type {kind}")
            for top in layer.get("top", []):
                data[top] = y  # in place: the top replaces the blob of the same name
        return data


def postprocess(blobs: dict) -> dict:
    """What test_SfSNet / the Mannix port do with the raw outputs, written out in float64:
    normal = BGR->RGB of (2 Nconv0 - 1) / (|.| + 1e-8); albedo = BGR->RGB of Aconv0; light as is."""
    n = 2.0 * blobs["Nconv0"] - 1.0
    n = n / (torch.sqrt((n * n).sum(1, keepdim=True)) + 1e-8)
    return {"normal": n[:, [2, 1, 0]], "albedo": blobs["Aconv0"][:, [2, 1, 0]], "light": blobs["fc_light"]}


def random_blobs(layers, seed: int = 0, calibrate_input: torch.Tensor | None = None,
                 scale_factors: bool = True) -> dict:
    """Random blobs with the shapes of ``layers``: xavier-scale weights, non-zero biases, a
    perturbed bilinear deconvolution kernel, and BatchNorm statistics that keep activations
    well scaled (from a calibration forward when ``calibrate_input`` is given), stored Caffe's
    way: ``(mean*s, var*s, s)`` with random ``s`` != 1."""
    rng = np.random.default_rng(seed)
    shapes = blob_shapes(layers)
    kinds = {_one(layer, "name"): _one(layer, "type") for layer in layers}
    blobs = {}
    for name, shp in shapes.items():
        kind = kinds[name]
        if kind == "BatchNorm":
            c = shp[0][0]
            blobs[name] = [rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c), np.ones(1)]
        elif kind == "Deconvolution":
            k = shp[0][-1]
            f = (k + 1) // 2
            center = f - 1 if k % 2 == 1 else f - 0.5
            og = 1 - np.abs(np.arange(k) - center) / f
            kernel = np.outer(og, og)
            blobs[name] = [kernel[None, None] + rng.normal(0, 0.05, shp[0])]
        else:
            fan_in = int(np.prod(shp[0][1:]))
            bound = np.sqrt(3.0 / fan_in)
            blobs[name] = [rng.uniform(-bound, bound, shp[0]), rng.normal(0, 0.1, shp[1])]
    if calibrate_input is not None:
        net = CaffeNet(layers, blobs, dtype=calibrate_input.dtype)
        net.forward(calibrate_input, calibrate=True)
        for name, (mean, var) in net.batch_stats.items():
            c = mean.shape[0]
            mean, var = mean.double().numpy(), var.double().numpy()
            blobs[name][0] = mean + rng.normal(0, 0.05, c) * np.sqrt(var)
            blobs[name][1] = var * rng.uniform(0.8, 1.25, c) + 1e-3
    # Realistic output layers: Caffe's raw normal is a normal image in [0, 1] of a surface
    # facing the camera (B = z near 1, G and R near 0.5), the albedo is near 0.5. This keeps
    # 2 Nconv0 - 1 away from zero length, where normalizing would amplify rounding.
    for name, offset in (("Nconv0", [0.95, 0.5, 0.5]), ("Aconv0", [0.5, 0.5, 0.5])):
        if name in blobs:
            blobs[name][0] = 0.05 * np.asarray(blobs[name][0])
            blobs[name][1] = np.asarray(offset) + 0.05 * np.asarray(blobs[name][1])
    for name, kind in kinds.items():
        if kind == "BatchNorm" and scale_factors:
            s = rng.uniform(2.0, 999.0)
            blobs[name][0] = blobs[name][0] * s
            blobs[name][1] = blobs[name][1] * s
            blobs[name][2] = np.array([s])
    return {k: [np.asarray(b, dtype=np.float32).reshape(shp) for b, shp in zip(v, shapes[k])]
            for k, v in blobs.items()}


def write_caffe_h5(path, blobs: dict, layers, top: str = "data") -> Path:
    """Write ``blobs`` as Caffe does: ``<top>/<layer>/<i>``, an empty group for each layer
    without parameters."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as f:
        root = f.create_group(top)
        for layer in layers:
            name = _one(layer, "name")
            if name in root:
                continue
            group = root.create_group(name)
            for i, blob in enumerate(blobs.get(name, [])):
                group.create_dataset(str(i), data=blob)
    return path
