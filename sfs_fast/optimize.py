"""Inference rewrites of a model, each explicit and switchable: BatchNorm folding, the heads'
1x1 convolution before their upsampling, channels-last memory format, and the shading op's
backend (:func:`with_shading_backend`, :func:`eager_reference`). They return new modules and
never touch the original."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module, *, copy_model: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a
    convolution inside an ``nn.Sequential`` folded into that convolution (``model`` itself
    when ``copy_model=False``).

    The pre-activation BatchNorms of the residual blocks (BN before ReLU before conv) have no
    convolution in front of them and stay as they are.
    """
    model = (copy.deepcopy(model) if copy_model else model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` converted in place to channels-last weights (NHWC convolutions in oneDNN)."""
    return model.to(memory_format=torch.channels_last)


class ConvBeforeUpsample(nn.Module):
    """An ``ImageHead`` or ``GenerationNet`` whose first 1x1 conv + BatchNorm runs at the low
    resolution, before the 2x upsampling, instead of after it (4x fewer FLOPs for that layer).

    Exact in eval mode: a 1x1 convolution and an eval BatchNorm act on each pixel with the
    same affine map, and the upsampling applies the same linear filter to every channel. The
    linear part always commutes; the constant part (bias, BN shift) commutes only when the
    filter weights sum to 1 at every output pixel, which holds for bilinear interpolation
    (both ``align_corners`` settings) but not at the border of Caffe's fixed deconvolution,
    so for that one the constants are added after upsampling. The ReLU stays after.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        from sfs_fast.models import FixedBilinearUpsample, ImageHead

        self.image_head = isinstance(head, ImageHead)
        self.convs = [head.conv1, head.conv2, head.conv3] + ([head.conv4] if self.image_head else [])
        for k, m in enumerate(self.convs, 1):
            self.add_module(f"conv{k}", m)
        self.upsample = None if self.image_head else head.upsample
        # bias and BN shift applied after a zero-padded upsampler (weights not summing to 1)
        self.constants_after = isinstance(self.upsample, FixedBilinearUpsample)

    def _up(self, x):
        if self.image_head:
            return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.upsample(x)

    def forward(self, x):
        conv, bn, relu = self.conv1[0], self.conv1[1], self.conv1[2]
        if not self.constants_after:
            y = self._up(bn(conv(x)))
        else:
            y = self._up(torch.nn.functional.conv2d(x, conv.weight))
            if conv.bias is not None:
                y = y + conv.bias.view(1, -1, 1, 1)
            y = bn(y)
        y = relu(y)
        for m in self.convs[1:]:
            y = m(y)
        return y


def conv_before_upsample(model: nn.Module, *, copy_model: bool = True) -> nn.Module:
    """A copy of ``model`` (eval mode) with every image head and generation net rewritten
    as :class:`ConvBeforeUpsample` (``model`` itself when ``copy_model=False``)."""
    from sfs_fast.models import GenerationNet, ImageHead

    model = (copy.deepcopy(model) if copy_model else model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (ImageHead, GenerationNet):
                setattr(parent, name, ConvBeforeUpsample(child))
    return model


# The rewrites of the "fused" inference path, in the order they are applied; each one can be
# switched off (``optimize_for_inference(model, fold_bn=False)``) to measure what it brings.
FUSED_OPTIONS = {
    "fold_bn": True,  # BatchNorm folded into the convolution before it
    "conv_before_upsample": True,  # 1x1 conv + BN of the heads at 64x64, then upsample
    "channels_last": True,  # NHWC weights and activations (oneDNN's fast layout)
    "shading_backend": "auto",  # the fused shading op ("reference" = the plain PyTorch one)
    "share_equal_trunks": True,  # a second albedo trunk equal to the first: computed once
}


def optimize_for_inference(model: nn.Module, **options) -> nn.Module:
    """A copy of ``model`` (eval) with the rewrites of :data:`FUSED_OPTIONS` applied; keyword
    arguments override the defaults. The original model is not touched."""
    unknown = set(options) - set(FUSED_OPTIONS)
    if unknown:
        raise ValueError(f"options: unknown optimisation(s) {sorted(unknown)}; known: {sorted(FUSED_OPTIONS)}")
    opts = {**FUSED_OPTIONS, **options}
    # one deep copy, then each rewrite in place on it (not one copy per rewrite)
    out = copy.deepcopy(model).eval()
    if opts["share_equal_trunks"]:
        out = share_equal_trunks(out)
    if opts["fold_bn"]:
        out = fold_batchnorm(out, copy_model=False)
    if opts["conv_before_upsample"]:
        out = conv_before_upsample(out, copy_model=False)
    if opts["channels_last"]:
        out = to_channels_last(out)
    return with_shading_backend(out, opts["shading_backend"], copy_model=False)


def equal_trunks(model: nn.Module) -> dict[str, str]:
    """``{"Fa2": "Fa"}`` when ``albedo_residual_model_2`` holds the same class and tensors as
    ``albedo_residual_model`` (a frozen copy: the bundled method-3 weights have one), else
    ``{}``. Both take the same input (``F``), so they give the same features."""
    first = getattr(model, "_modules", {}).get("albedo_residual_model")
    second = getattr(model, "_modules", {}).get("albedo_residual_model_2")
    if first is None or second is None or type(first) is not type(second):
        return {}
    a, b = first.state_dict(), second.state_dict()
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    return {"Fa2": "Fa"} if same else {}


def share_equal_trunks(model: nn.Module) -> nn.Module:
    """``model`` (in place) computing a trunk equal to another once (:func:`equal_trunks`):
    24% of method 3's FLOPs on the bundled weights. ONNX Runtime and OpenVINO merge such
    twins in the exported graph themselves; PyTorch does not."""
    aliases = equal_trunks(model)
    if aliases:
        model.trunk_aliases = aliases
    return model


def with_shading_backend(model: nn.Module, backend: str, *, copy_model: bool = True) -> nn.Module:
    """A copy of ``model`` whose forward shades with ``backend`` (a name of
    ``sfs_fast.kernels.BACKENDS`` or ``auto``); weights, mode and device kept. The one place
    that sets a model's shading backend: the config is replaced, never edited, so a model
    shared with a caller keeps its own. A module without a config is returned as it is
    (copied unless ``copy_model=False``)."""
    out = copy.deepcopy(model) if copy_model else model
    config = getattr(out, "config", None)
    if config is not None:
        out.config = dataclasses.replace(config, shading_backend=backend)  # validated again
    return out


def eager_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the reference shading (plain PyTorch): the eager baseline every
    other path is compared with, and the form that exports to standard ONNX operators."""
    return with_shading_backend(model, "reference")
