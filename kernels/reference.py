"""The readable definition of the fused shading op, in plain PyTorch.

It is the ``reference`` backend, the form that ONNX export traces, and the definition every
fast backend is tested against. Autograd is PyTorch's.
"""
from __future__ import annotations

import torch

from sfs_fast.sh import normalize_normal, shade


def sh_shade_reference(normal, light, residue=None, albedo=None, normalize=True, beta=0.0):
    """``shading = Y(n/|n|) . L + residue``; ``recon = shading * (albedo - beta * residue)``.

    Computes in float32 (float64 stays float64) and returns the input dtype.
    """
    out_dtype = normal.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    n = normal.to(work)
    if normalize:
        n = normalize_normal(n)
    shading = shade(n, light.to(work))
    if residue is not None:
        shading = shading + residue.to(work)
    recon = None
    if albedo is not None:
        reflect = albedo.to(work)
        if residue is not None and beta != 0.0:
            reflect = reflect - beta * residue.to(work)
        recon = (shading * reflect).to(out_dtype)
    return shading.to(out_dtype), recon
