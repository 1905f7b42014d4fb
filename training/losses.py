"""Per-method loss tables (SPEC B.3), as data.

A table is a tuple of :class:`Term` s; each compares one model output with one target:

- outputs: the model's output names (``normal``, ``albedo``, ``light``, ``shading``, ``recon``;
  SPEC A.2). ``normal`` is the unit normal the model returns (SPEC A.3), compared with the
  stored ``(png-128)/128``, which is unit within quantization.
- targets: ``normal``, ``albedo``, ``light``, ``face`` (the input image) and ``gt_shading``
  (the shading of the ground-truth normal under the ground-truth light, through ``sh_shade``).

Image terms are masked (``--mask-losses``, on by default, as Caffe did; SPEC A.8): the mean
of the per-pixel loss over the pixels inside the mask, which equals the plain mean when the
mask is all ones (CelebA pseudo labels), so the original weights keep their meaning.

GAN methods add an adversarial term weighted by ``GanSpec.weight`` (see the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfs_fast.kernels import sh_shade

KINDS = ("l1", "smooth_l1", "mse")


@dataclass(frozen=True)
class Term:
    output: str
    target: str
    kind: str
    weight: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"loss kind {self.kind!r}: expected one of {KINDS}")


def T(output, target, kind, weight):
    return Term(output, target, kind, weight)


# The tables. Keys are (method, stage); stage "main" for single-stage methods, "gan" and
# "recon" for the two stages of methods 6 and 7. Sources in SPEC B.3 / B.1.4 / B.4.4.
LOSS_TABLES: dict[tuple[int, str], tuple[Term, ...]] = {
    # SfSNet (Caffe weights, also SfSNet-PyTorch's synthetic/CelebA loss): L1 normal, albedo and
    # recon 0.5 each, SH 0.1 (MSE).
    (0, "main"): (T("normal", "normal", "l1", 0.5), T("albedo", "albedo", "l1", 0.5),
                  T("light", "light", "mse", 0.1), T("recon", "face", "l1", 0.5)),
    # Method 1 V2 train(): SmoothL1 normal/albedo 0.5, SH MSE 0.1, recon MSE 1.
    (1, "main"): (T("normal", "normal", "smooth_l1", 0.5), T("albedo", "albedo", "smooth_l1", 0.5),
                  T("light", "light", "mse", 0.1), T("recon", "face", "mse", 1.0)),
    # Method 2: L1 normal 1, albedo 1, recon 0.2, shading vs GT shading 0.8.
    (2, "main"): (T("normal", "normal", "l1", 1.0), T("albedo", "albedo", "l1", 1.0),
                  T("recon", "face", "l1", 0.2), T("shading", "gt_shading", "l1", 0.8)),
    # Method 3 train_with_shading_loss (the newest main): SmoothL1 albedo 0.5, recon 0.3,
    # updated shading vs GT shading 0.7.
    (3, "main"): (T("albedo", "albedo", "smooth_l1", 0.5), T("recon", "face", "smooth_l1", 0.3),
                  T("shading", "gt_shading", "smooth_l1", 0.7)),
    # Method 4 train(): SmoothL1 recon 1 (only the residual head trains).
    (4, "main"): (T("recon", "face", "smooth_l1", 1.0),),
    # Method 5 (final): MSE recon 1 + 0.4 GAN; no albedo supervision.
    (5, "main"): (T("recon", "face", "mse", 1.0),),
    # Methods 6/7 stage 1 (generator): 10 SmoothL1 albedo + 1 GAN.
    (6, "gan"): (T("albedo", "albedo", "smooth_l1", 10.0),),
    (7, "gan"): (T("albedo", "albedo", "smooth_l1", 10.0),),
    # Methods 6/7 stage 2 (frozen generator): SmoothL1 albedo 1 + SmoothL1 recon 1.
    (6, "recon"): (T("albedo", "albedo", "smooth_l1", 1.0), T("recon", "face", "smooth_l1", 1.0)),
    (7, "recon"): (T("albedo", "albedo", "smooth_l1", 1.0), T("recon", "face", "smooth_l1", 1.0)),
}

# Variants the original code also ran (experiment knobs), selectable with --loss-variant.
LOSS_VARIANTS: dict[str, dict[tuple[int, str], tuple[Term, ...]]] = {
    "shading": {  # the "train_with_shading_loss" functions
        (1, "main"): (T("normal", "normal", "smooth_l1", 0.5), T("albedo", "albedo", "smooth_l1", 0.5),
                      T("light", "light", "mse", 0.1), T("recon", "face", "smooth_l1", 0.3),
                      T("shading", "gt_shading", "smooth_l1", 0.7)),
        (3, "main"): LOSS_TABLES[(3, "main")],
        (4, "main"): (T("recon", "face", "smooth_l1", 1.0), T("shading", "gt_shading", "smooth_l1", 1.0)),
    },
    "recon-mse": {  # method 3's train(): SmoothL1 albedo 0.5 + MSE recon 1
        (3, "main"): (T("albedo", "albedo", "smooth_l1", 0.5), T("recon", "face", "mse", 1.0)),
    },
}


@dataclass(frozen=True)
class GanSpec:
    """How a GAN method uses its discriminator (SPEC B.3.5-B.3.7).

    weight: weight of the generator's adversarial term. real: where the discriminator's real
    albedos come from: ``"synthetic"`` (a separate synthetic-only loader, 5 and 6) or
    ``"batch"`` (the batch's own albedos with per-sample labels, 7).
    order: ``"d_first"`` (5) or ``"g_first"`` (6, 7).
    """

    weight: float
    real: str
    order: str


GAN_SPECS = {
    5: GanSpec(0.4, "synthetic", "d_first"),
    6: GanSpec(1.0, "synthetic", "g_first"),
    7: GanSpec(1.0, "batch", "g_first"),
}

# Stages of each method: (stage name, what trains). Two-stage methods run --epochs of each.
STAGES = {m: ("main",) for m in range(6)}
STAGES.update({6: ("gan", "recon"), 7: ("gan", "recon")})


def loss_table(method: int, stage: str = "main", variant: str | None = None) -> tuple[Term, ...]:
    if variant:
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"--loss-variant: unknown {variant!r}; choose from {', '.join(LOSS_VARIANTS)}")
        table = LOSS_VARIANTS[variant].get((method, stage))
        if table is None:
            raise ValueError(f"--loss-variant {variant}: not defined for method {method}")
        return table
    return LOSS_TABLES[(method, stage)]


def _pointwise(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return (pred - target).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none")
    return (pred - target) ** 2


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
        elif term.target == "face":
            target = batch["face"]
        else:
            target = batch[term.target]
        values = _pointwise(term.kind, pred, target)
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
