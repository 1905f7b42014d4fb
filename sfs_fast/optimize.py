"""Inference rewrites of a model, each explicit and switchable: BatchNorm folding and
channels-last memory format. They return new modules and never touch the original."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a
    convolution inside an ``nn.Sequential`` folded into that convolution.

    The pre-activation BatchNorms of the residual blocks (BN before ReLU before conv) have no
    convolution in front of them and stay as they are.
    """
    model = copy.deepcopy(model).eval()
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
