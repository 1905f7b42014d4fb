"""Losses of the per-method tables (SPEC B.3).

The tables are data on each method's spec (``sfs_fast.models.METHODS[m].stages``, one per
training stage, plus the ``--loss-variant`` alternatives); :func:`loss_table` looks one up.
A table is a tuple of :class:`sfs_fast.models.LossTerm` s; each compares one model output
with one target:

- outputs: the model's output names (``normal``, ``albedo``, ``light``, ``shading``, ``recon``;
  SPEC A.2). ``normal`` is the unit normal the model returns (SPEC A.3), compared with the
  stored ``(png-128)/128``, which is unit within quantization.
- targets: ``normal``, ``albedo``, ``light``, ``face`` (the input image) and ``gt_shading``
  (the shading of the ground-truth normal under the ground-truth light, through ``sh_shade``).

Image terms are masked (``--mask-losses``, on by default, as Caffe did; SPEC A.8): the mean
of the per-pixel loss over the pixels inside the mask, which equals the plain mean when the
mask is all ones (CelebA pseudo labels), so the original weights keep their meaning.

GAN methods add an adversarial term weighted by their spec's ``gan.weight`` (see the trainer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sfs_fast.kernels import sh_shade
from sfs_fast.models import METHODS, LossTerm, method_id


def loss_table(method, stage: str = "main", variant: str | None = None) -> tuple[LossTerm, ...]:
    """The loss table of ``method``'s ``stage`` (its spec's), or of the ``--loss-variant``."""
    spec = METHODS[method_id(method)]
    table = spec.stage(stage).table(variant)
    if table is None:
        known = sorted({name for s in METHODS.values() for st in s.stages for name, _ in st.variants})
        if variant not in known:
            raise ValueError(f"--loss-variant: unknown {variant!r}; choose from {', '.join(known)}")
        raise ValueError(f"--loss-variant {variant}: not defined for method {spec.method}")
    return table


# LossTerm.kind -> the per-element loss (one entry per sfs_fast.models.LOSS_KINDS).
POINTWISE = {
    "l1": lambda pred, target: (pred - target).abs(),
    "smooth_l1": lambda pred, target: F.smooth_l1_loss(pred, target, reduction="none"),
    "mse": lambda pred, target: (pred - target) ** 2,
}


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``[B,C,H,W]`` over the pixels where ``mask`` ``[B,1,H,W]`` is 1."""
    if mask is None:
        return values.mean()
    weight = mask.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def gt_shading(batch: dict, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """Shading of the ground-truth normal under the ground-truth light ``[B,3,H,W]``."""
    shading, _ = sh_shade(batch["normal"], batch["light"], normalize=normalize, backend=backend)
    return shading


def compute_losses(table, outputs: dict, batch: dict, *, mask_losses: bool = True,
                   normalize: bool = True, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """Weighted sum of the table's terms -> ``(total, {"<output>_<kind>": value})``.

    ``outputs``: the model's dict; ``batch``: the targets (``face``, ``normal``, ``albedo``,
    ``light``, ``mask`` ``[B,1,H,W]``). ``normalize``/``backend``: how ``gt_shading`` shades.
    """
    mask = batch["mask"] if mask_losses else None
    total = None
    parts = {}
    target_cache = {}
    for term in table:
        pred = outputs[term.output]
        if term.target == "gt_shading":
            if "gt_shading" not in target_cache:
                with torch.no_grad():
                    target_cache["gt_shading"] = gt_shading(batch, normalize, backend)
            target = target_cache["gt_shading"]
        else:
            target = batch[term.target]
        values = POINTWISE[term.kind](pred, target)
        value = values.mean() if pred.dim() == 2 else masked_mean(values, mask)
        parts[f"{term.output}_{term.kind}"] = value.detach()
        total = term.weight * value if total is None else total + term.weight * value
    return total, parts


def gan_mse(prediction: torch.Tensor, target) -> torch.Tensor:
    """LSGAN loss with the target shaped like the discriminator's output (SPEC A.8 fix of
    B.7.6b: the original compared ``[B,1,1,1]`` with ``[B,1]`` and broadcast to ``[B,1,B,1]``).
    ``target``: a number or per-sample values ``[B]``/``[B,1]``."""
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1, *([1] * (prediction.dim() - 1))).expand_as(prediction).to(prediction.dtype)
    else:
        target = torch.full_like(prediction, float(target))
    return F.mse_loss(prediction, target)
