"""The eight models: one SfSNet trunk (SPEC B.1), method heads (B.3), SkipNet and the two
discriminators. ``build_model(method, **config)`` is the one entry point.

A method is one :class:`MethodSpec` in :data:`METHODS` (registered at the end of this file):
its modules, outputs, recon, loss tables, training stages, GAN set-up and what freezes when
pretrained weights are loaded. The model, :func:`output_names`, the trainer and the exporters
read those facts from it; adding a method is one :func:`register_method` call.

Module attribute names follow the original ``SfsNetPipeline`` (``conv_model``,
``normal_residual_model``, ...), so that checkpoints of the original code map by name.

Every model takes ``x`` ``[B,3,128,128]`` RGB in [0,1] and returns a dict with the output
names of SPEC A.2: ``normal`` (unit), ``albedo``, ``light`` ``[B,27]``, ``sh_shading``,
``residue``, ``shading``, ``recon`` and the method extras. A method without an output omits it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfs_fast.kernels import BACKENDS, sh_shade
from sfs_fast.sh import normalize_normal

UPSAMPLE_MODES = ("bilinear", "caffe")


# --------------------------------------------------------------------------------------
# Building blocks (SPEC B.1.1)


def conv_bn_relu(cin: int, cout: int, kernel_size: int, padding: int = 0, stride: int = 1) -> nn.Sequential:
    """Conv (with bias) -> BatchNorm -> ReLU; indices 0 and 1 are what checkpoints name."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=True),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResNetBlock(nn.Module):
    """Pre-activation residual block: BN, ReLU, conv3x3, BN, ReLU, conv3x3, plus the input."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.res = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=False),
            nn.Conv2d(channels, channels, 3, 1, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )

    def forward(self, x):
        return self.res(x) + x


class BaseFeatures(nn.Module):
    """conv1 (7x7, 64) -> conv2 (3x3, 128) -> conv3 (3x3 stride 2, no BN/ReLU): ``[B,128,64,64]``."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 64, 7, padding=3)
        self.conv2 = conv_bn_relu(64, 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 2, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class ResidualTrunk(nn.Module):
    """5 residual blocks -> BN -> ReLU (the normal or albedo branch): ``[B,128,64,64]``."""

    def __init__(self, channels: int = 128, blocks: int = 5):
        super().__init__()
        for k in range(1, blocks + 1):
            self.add_module(f"block{k}", ResNetBlock(channels))
        self.blocks = blocks
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x):
        for k in range(1, self.blocks + 1):
            x = getattr(self, f"block{k}")(x)
        return F.relu(self.bn1(x))


def bilinear_kernel(size: int = 4) -> torch.Tensor:
    """Caffe's ``bilinear`` weight filler for a 2x upsampling deconvolution, ``[size,size]``."""
    factor = (size + 1) // 2
    center = factor - 1.0 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1.0 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


class FixedBilinearUpsample(nn.Module):
    """Caffe's fixed ``Deconvolution`` (k4 s2 p1, one group per channel, no bias).

    The kernel is a buffer (Caffe trains it with lr_mult 0) so that imported weights load
    into it; near the border it acts like zero padding, unlike ``F.interpolate``.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.register_buffer("weight", bilinear_kernel(4).expand(channels, 1, 4, 4).clone())

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=2, padding=1, groups=self.channels)


class Upsample2x(nn.Module):
    """Parameter-free bilinear 2x upsampling (align_corners=False), as ``nn.Upsample``."""

    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class GenerationNet(nn.Module):
    """Upsample x2 -> CBR(128,128,1x1) -> CBR(128,64,3x3) -> conv(64,3,1x1): ``[B,3,128,128]``."""

    def __init__(self, upsample: str = "bilinear"):
        super().__init__()
        self.upsample = FixedBilinearUpsample(128) if upsample == "caffe" else Upsample2x()
        self.conv1 = conv_bn_relu(128, 128, 1)
        self.conv2 = conv_bn_relu(128, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 3, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(self.upsample(x))))


class LightEstimator(nn.Module):
    """CBR(384,128,1x1) -> global average (the 64x64 AvgPool of the original) -> fc(128,27)."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(384, 128, 1)
        self.fc = nn.Linear(128, 27)

    def forward(self, x):
        return self.fc(self.conv1(x).mean(dim=(2, 3)))


class ImageHead(nn.Module):
    """The common 384->3 head (SPEC B.3): bilinear x2 (align_corners=True) -> CBR(384,128,1)
    -> CBR(128,64,1) -> CBR(64,64,3) -> conv(64,3,1). Latent light map or shading residue."""

    def __init__(self, cin: int = 384):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, 128, 1)
        self.conv2 = conv_bn_relu(128, 64, 1)
        self.conv3 = conv_bn_relu(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 3, 1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ShadingHead(nn.Module):
    """The common 6->3 head (SPEC B.3): CBR(6,64,1) -> conv(64,3,3 p1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(6, 64, 1)
        self.conv2 = nn.Conv2d(64, 3, 3, 1, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x))


# --------------------------------------------------------------------------------------
# Methods (SPEC A.1, B.3): every fact of a method is data on its MethodSpec; the eight
# entries are registered at the end of this file.

LOSS_KINDS = ("l1", "smooth_l1", "mse")
# What a loss term compares with: the batch's fields, plus "gt_shading" (the shading of the
# ground-truth normal under the ground-truth light, computed by the trainer).
LOSS_TARGETS = ("normal", "albedo", "light", "face", "gt_shading")
FEATURES = ("ALL", "NEW")  # head inputs: cat(F, Fn, Fa) or cat(F, Fn, Fa2)
ALBEDO_FEATURES = {"Fa": "albedo_residual_model", "Fa2": "albedo_residual_model_2"}
GAN_REAL = ("synthetic", "batch")

# The outputs each kind of head adds after normal, albedo (and light), in forward order.
HEAD_OUTPUTS = {
    None: ("sh_shading", "shading", "recon"),
    "residue": ("sh_shading", "residue", "shading", "recon"),
    "correct": ("sh_shading", "latent_light", "corrected_shading", "shading", "recon"),
    "generate": ("latent_light", "shading", "recon"),
}

# The SfSNet modules a residue method takes from pretrained SfSNet weights (the original
# fix_weights() froze them; not albedo_gen_model, which the residue methods retrain).
SFSNET_TRUNK = ("conv_model", "normal_residual_model", "normal_gen_model", "albedo_residual_model",
                "light_estimator_model")


def _one_of(argument: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argument}: expected one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a loss table: ``weight * kind(outputs[output], targets[target])``.

    output: a model output name (SPEC A.2). target: one of :data:`LOSS_TARGETS`.
    kind: ``"l1"``, ``"smooth_l1"`` or ``"mse"`` (per pixel; image terms are masked means).
    """

    output: str
    target: str
    kind: str
    weight: float

    def __post_init__(self):
        _one_of("LossTerm.kind", self.kind, LOSS_KINDS)
        _one_of("LossTerm.target", self.target, LOSS_TARGETS)
        if not self.weight > 0:
            raise ValueError(f"LossTerm.weight: expected a positive weight, got {self.weight!r}")


def loss_terms(*rows) -> tuple[LossTerm, ...]:
    """``loss_terms(("albedo", "albedo", "l1", 0.5), ...)``: a table from plain rows."""
    return tuple(LossTerm(*row) for row in rows)


@dataclass(frozen=True)
class Stage:
    """One training stage of a method; a run trains ``--epochs`` epochs of each stage in turn.

    name: what logs and checkpoints call it (``"main"``, ``"gan"``, ``"recon"``).
    losses: the supervised loss table.
    adversarial: the generator's loss adds ``GanSpec.weight`` times its GAN term and the
        discriminator trains in the same step.
    albedo_only: only the albedo generator runs and is supervised (stage 1 of methods 6, 7).
    frozen: modules frozen during this stage whether or not they were loaded.
    variants: ``(name, table)`` pairs that ``--loss-variant name`` selects instead of ``losses``.
    """

    name: str
    losses: tuple[LossTerm, ...]
    adversarial: bool = False
    albedo_only: bool = False
    frozen: tuple[str, ...] = ()
    variants: tuple[tuple[str, tuple[LossTerm, ...]], ...] = ()

    def __post_init__(self):
        if not self.losses:
            raise ValueError(f"Stage.losses: stage {self.name!r} has an empty loss table")
        if self.albedo_only and not self.adversarial:
            raise ValueError(f"Stage.albedo_only: stage {self.name!r} trains the generator alone, "
                             "which only an adversarial stage does")

    def table(self, variant: str | None = None) -> tuple[LossTerm, ...]:
        """The loss table, or that of ``variant``; None when the stage has no such variant."""
        return self.losses if variant is None else dict(self.variants).get(variant)


@dataclass(frozen=True)
class GanSpec:
    """How a GAN method uses its discriminator (SPEC B.3.5-B.3.7).

    discriminator: a key of :data:`DISCRIMINATORS` (``"patch"``: PatchGAN critic, LSGAN;
    ``"dcgan"``: the DCGAN one). weight: weight of the generator's adversarial term.
    real: where the discriminator's real albedos come from: ``"synthetic"`` (a separate
    synthetic-only loader) or ``"batch"`` (the batch's own albedos with per-sample labels).
    """

    discriminator: str
    weight: float
    real: str

    def __post_init__(self):
        _one_of("GanSpec.discriminator", self.discriminator, DISCRIMINATORS)
        _one_of("GanSpec.real", self.real, GAN_REAL)


@dataclass(frozen=True)
class MethodSpec:
    """Everything that makes one method: the model, its outputs and how it trains.

    method, slug: the id (0-7 for the paper's methods) and the name commands accept.
    head: None (SH shading only), ``"residue"`` (shading = SH shading + residue),
        ``"correct"`` (a 6->3 head corrects the SH shading with a latent light map) or
        ``"generate"`` (a 6->3 head makes the shading from normal and latent light; no SH).
    head_module: attribute (checkpoint) name of the head's last module.
    head_features: ``"ALL"`` = cat(F, Fn, Fa) or ``"NEW"`` = cat(F, Fn, Fa2).
    albedo_features: ``"Fa"`` (albedo branch 1) or ``"Fa2"`` (a second albedo branch).
    light: it estimates an SH light.
    beta: recon = shading * (albedo - beta * residue); 1 for method 4, whose forward also
        returns ``updated_albedo`` = albedo - residue.
    stages: its training stages, in order. gan: its discriminator set-up, None without.
    frozen_if_loaded: the original fix_weights() (SPEC B.3): modules frozen when they were
        loaded from pretrained weights (only then: FIX-freeze-loaded, see the trainer).
    """

    method: int
    slug: str
    head: str | None
    head_module: str | None
    head_features: str | None
    albedo_features: str
    light: bool = True
    beta: float = 0.0
    stages: tuple[Stage, ...] = ()
    gan: GanSpec | None = None
    frozen_if_loaded: tuple[str, ...] = ()

    def __post_init__(self):
        where = f"method {self.method!r}"
        if not isinstance(self.method, int) or isinstance(self.method, bool) or self.method < 0:
            raise ValueError(f"MethodSpec.method: expected a non-negative int, got {self.method!r}")
        if not self.slug or self.slug.strip().isdigit():
            raise ValueError(f"MethodSpec.slug: {where} needs a name that is not a number, got {self.slug!r}")
        _one_of("MethodSpec.head", self.head, HEAD_OUTPUTS)
        _one_of("MethodSpec.albedo_features", self.albedo_features, ALBEDO_FEATURES)
        if self.head is None:
            if self.head_module is not None or self.head_features is not None:
                raise ValueError(f"MethodSpec.head_module: {where} has no head, so neither head_module nor head_features")
        else:
            _one_of("MethodSpec.head_features", self.head_features, FEATURES)
            taken = {"neural_light_model", *(name for name, _ in self._trunk_modules())}
            if not self.head_module or self.head_module in taken:
                raise ValueError(f"MethodSpec.head_module: {where} needs a name of its own, got {self.head_module!r}")
        if not self.light and self.head != "generate":
            raise ValueError(f"MethodSpec.light: {where} shades with SH, so it needs a light")
        self._check_training(where)

    def _check_training(self, where: str) -> None:
        if not self.stages:
            raise ValueError(f"MethodSpec.stages: {where} has no training stage")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"MethodSpec.stages: {where} repeats a stage name: {names}")
        if any(stage.adversarial for stage in self.stages) != (self.gan is not None):
            raise ValueError(f"MethodSpec.gan: {where} needs a GanSpec exactly when a stage is adversarial")
        outputs, modules = set(self.outputs), set(self.module_names)
        for stage in self.stages:
            for table in (stage.losses, *(t for _, t in stage.variants)):
                unknown = sorted({term.output for term in table} - outputs)
                if unknown:
                    raise ValueError(f"MethodSpec.stages: {where} stage {stage.name!r} has losses on "
                                     f"outputs it does not make: {unknown}")
        for argument, frozen in [("frozen_if_loaded", self.frozen_if_loaded),
                                 *[("stages", s.frozen) for s in self.stages]]:
            unknown = sorted(set(frozen) - modules)
            if unknown:
                raise ValueError(f"MethodSpec.{argument}: {where} has no module {unknown}")

    @property
    def second_albedo(self) -> bool:
        return self.albedo_features == "Fa2" or self.head_features == "NEW"

    @property
    def first_albedo(self) -> bool:
        return self.albedo_features == "Fa" or self.light or self.head_features == "ALL"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys of the forward's dict, in order (the forward returns exactly these)."""
        light = ("light",) if self.light else ()
        updated = ("updated_albedo",) if self.beta else ()
        return ("normal", "albedo", *light, *HEAD_OUTPUTS[self.head], *updated)

    def _trunk_modules(self) -> tuple[tuple[str, str], ...]:
        modules = [("conv_model", "features"), ("normal_residual_model", "trunk"),
                   ("normal_gen_model", "generation")]
        if self.first_albedo:
            modules.append(("albedo_residual_model", "trunk"))
        if self.second_albedo:
            modules.append(("albedo_residual_model_2", "trunk"))
        modules.append(("albedo_gen_model", "generation"))
        if self.light:
            modules.append(("light_estimator_model", "light"))
        return tuple(modules)

    @property
    def modules(self) -> tuple[tuple[str, str], ...]:
        """``(attribute name, block)`` of every module the model has, in registration order
        (the order of its parameters, hence of optimizer states). Blocks name entries of
        :data:`BLOCKS`; the attribute names are the checkpoints' (``conv_model``, ...)."""
        if self.head is None:
            head = ()
        elif self.head == "residue":
            head = ((self.head_module, "image_head"),)
        else:  # correct / generate: a latent light map, then a 6->3 shading head
            head = (("neural_light_model", "image_head"), (self.head_module, "shading_head"))
        return self._trunk_modules() + head

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.modules)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"stage: method {self.method} has stages {[s.name for s in self.stages]}, not {name!r}")


METHODS: dict[int, MethodSpec] = {}  # id -> spec; filled by register_method below


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS`; :func:`build_model`, :func:`output_names`, the
    trainer and the exporters then know it by id and slug. Returns ``spec``."""
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"spec: expected a MethodSpec, got {type(spec).__name__}")
    for other in METHODS.values():
        if spec.method == other.method or spec.slug == other.slug:
            raise ValueError(f"spec: method {spec.method} ({spec.slug}) clashes with the registered "
                             f"method {other.method} ({other.slug})")
    METHODS[spec.method] = spec
    return spec


def method_id(method) -> int:
    """Accept an id (3, "3") or a slug ("shading-residue"); raise ValueError otherwise."""
    if isinstance(method, str):
        slugs = {spec.slug: m for m, spec in METHODS.items()}
        if method in slugs:
            return slugs[method]
        if method.strip().isdigit():
            method = int(method)
    if isinstance(method, int) and not isinstance(method, bool) and method in METHODS:
        return method
    names = ", ".join(f"{m} ({s.slug})" for m, s in METHODS.items())
    raise ValueError(f"unknown method {method!r}; choose one of {names}")


@dataclass
class ModelConfig:
    """Config fields of a model; stored in checkpoints so ``load`` rebuilds the same model.

    upsample: ``"bilinear"`` (PyTorch port) or ``"caffe"`` (fixed deconvolution).
    normalize: normalize the normal before shading (SPEC A.3); False reproduces the port.
    method4_recon: for a method whose recon takes the residue from the albedo (``beta``,
        method 4): ``"updated"`` (recon with albedo - residue) or ``"original"`` (B.7.5).
    shading_backend: backend of the fused op used in forward (``"auto"`` picks the fastest;
        the others are the keys of :data:`sfs_fast.kernels.BACKENDS`).
    """

    upsample: str = "bilinear"
    normalize: bool = True
    method4_recon: str = "updated"
    shading_backend: str = "auto"

    def __post_init__(self):
        _one_of("upsample", self.upsample, UPSAMPLE_MODES)
        _one_of("method4_recon", self.method4_recon, ("updated", "original"))
        _one_of("shading_backend", self.shading_backend, ("auto", *BACKENDS))
        self.normalize = bool(self.normalize)

    def to_dict(self) -> dict:
        return asdict(self)


# The blocks a MethodSpec's modules name: block -> factory(config).
BLOCKS = {
    "features": lambda config: BaseFeatures(),
    "trunk": lambda config: ResidualTrunk(),
    "generation": lambda config: GenerationNet(config.upsample),
    "light": lambda config: LightEstimator(),
    "image_head": lambda config: ImageHead(),
    "shading_head": lambda config: ShadingHead(),
}


class SfSNetModel(nn.Module):
    """SfSNet trunk plus the head of one method; see the module docstring for the outputs.

    The modules are those of ``spec.modules``, under their checkpoint names; ``head`` is the
    method's head module (``spec.head_module``), None for SfSNet.
    """

    # The modules of ``features`` (shared convolutions and residual trunks); everything else
    # decodes their output. Low-precision inference computes these in bf16/fp16.
    ENCODER = ("conv_model", "normal_residual_model", "albedo_residual_model", "albedo_residual_model_2")

    def __init__(self, method: int = 0, **config):
        super().__init__()
        self.spec = METHODS[method_id(method)]
        self.config = ModelConfig(**config)
        for name, block in self.spec.modules:
            self.add_module(name, BLOCKS[block](self.config))

    @property
    def method(self) -> int:
        return self.spec.method

    @property
    def head(self) -> nn.Module | None:
        return None if self.spec.head_module is None else self.get_submodule(self.spec.head_module)

    @property
    def beta(self) -> float:
        """The recon's ``beta`` (albedo - beta * residue): the spec's, 0 under ``method4_recon="original"``."""
        return 0.0 if self.config.method4_recon == "original" else self.spec.beta

    def features(self, x: torch.Tensor) -> dict:
        """Trunk features, each ``[B,128,64,64]``: ``F``, ``Fn``, ``Fa`` and/or ``Fa2``."""
        feats = {"F": self.conv_model(x)}
        feats["Fn"] = self.normal_residual_model(feats["F"])
        # set by sfs_fast.optimize.share_equal_trunks: a trunk equal to another on the same input
        aliases = getattr(self, "trunk_aliases", None) or {}
        for key, name in ALBEDO_FEATURES.items():
            if key in aliases:
                feats[key] = feats[aliases[key]]
            elif name in self._modules:
                feats[key] = self._modules[name](feats["F"])
        return feats

    def head_input(self, feats: dict, which: str) -> torch.Tensor:
        """``[B,384,64,64]``: cat(F, Fn, Fa) for ``"ALL"``, cat(F, Fn, Fa2) for ``"NEW"``."""
        albedo = feats["Fa"] if which == "ALL" else feats["Fa2"]
        return torch.cat([feats["F"], feats["Fn"], albedo], dim=1)

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.features(x)
        return self.decompose_features(feats)

    def decompose_features(self, feats: dict, albedo: torch.Tensor | None = None) -> dict:
        """Heads and shading from trunk features, as a dict keyed by ``spec.outputs`` in that
        order. ``albedo`` overrides the albedo generator (the GAN trainers pass their
        generator's output)."""
        spec, cfg = self.spec, self.config
        raw_normal = self.normal_gen_model(feats["Fn"])
        if albedo is None:
            albedo = self.albedo_gen_model(feats[spec.albedo_features])
        normal = normalize_normal(raw_normal) if cfg.normalize else raw_normal
        out = {"normal": normal, "albedo": albedo}
        if spec.light:
            out["light"] = self.light_estimator_model(self.head_input(feats, "ALL"))
        out.update(self._HEAD_DECODERS[spec.head](self, feats, raw_normal, out))
        return {name: out[name] for name in spec.outputs}

    def _shade(self, raw_normal, light, residue=None, albedo=None, beta=0.0):
        return sh_shade(raw_normal, light, residue, albedo, normalize=self.config.normalize, beta=beta,
                        backend=self.config.shading_backend)

    def _decode_sh(self, feats, raw_normal, out) -> dict:
        shading, recon = self._shade(raw_normal, out["light"], None, out["albedo"])
        return {"sh_shading": shading, "shading": shading, "recon": recon}

    def _decode_residue(self, feats, raw_normal, out) -> dict:
        residue = self.head(self.head_input(feats, self.spec.head_features))
        shading, recon = self._shade(raw_normal, out["light"], residue, out["albedo"], beta=self.beta)
        parts = {"sh_shading": shading - residue, "residue": residue, "shading": shading, "recon": recon}
        if self.spec.beta:
            parts["updated_albedo"] = out["albedo"] - residue
        return parts

    def _decode_correct(self, feats, raw_normal, out) -> dict:
        latent = self.neural_light_model(self.head_input(feats, self.spec.head_features))
        sh_shading, _ = self._shade(raw_normal, out["light"])
        shading = self.head(torch.cat([sh_shading, latent], dim=1))
        return {"sh_shading": sh_shading, "latent_light": latent, "corrected_shading": shading,
                "shading": shading, "recon": shading * out["albedo"]}

    def _decode_generate(self, feats, raw_normal, out) -> dict:
        latent = self.neural_light_model(self.head_input(feats, self.spec.head_features))
        shading = self.head(torch.cat([out["normal"], latent], dim=1))
        return {"latent_light": latent, "shading": shading, "recon": shading * out["albedo"]}

    # spec.head -> decoder; each returns the outputs HEAD_OUTPUTS lists for its head.
    _HEAD_DECODERS = {None: _decode_sh, "residue": _decode_residue, "correct": _decode_correct,
                      "generate": _decode_generate}

    def extra_repr(self) -> str:
        return f"method={self.spec.method} ({self.spec.slug}), config={self.config.to_dict()}"


def build_model(method=0, **config) -> SfSNetModel:
    """Build the model of ``method`` (an id or slug of :data:`METHODS`) with ``config`` (see
    :class:`ModelConfig`): the one entry point, as timm's ``create_model``.

    >>> m = build_model(3).eval()
    >>> sorted(m(torch.rand(1, 3, 128, 128)))
    ['albedo', 'light', 'normal', 'recon', 'residue', 'sh_shading', 'shading']
    """
    return SfSNetModel(method, **config)


def output_names(method) -> list[str]:
    """The output keys of ``method``'s forward, in order (its spec's ``outputs``)."""
    return list(METHODS[method_id(method)].outputs)


def init_weights(module: nn.Module) -> None:
    """The original ``weights_init``: xavier-uniform convolutions with zero bias, linear
    layers N(0, 1) with zero bias; BatchNorm and transposed convolutions keep defaults.
    Use with ``model.apply(init_weights)``."""
    if isinstance(module, (nn.Conv2d, nn.Conv1d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 1.0)
        nn.init.zeros_(module.bias)


def calibrate_batchnorm(model: nn.Module, batches, modules=None) -> nn.Module:
    """Set every BatchNorm's running statistics to the average over ``batches`` (an iterable
    of ``[B,3,H,W]`` images) and return the model in eval mode. ``modules``: names of the
    top-level submodules whose BatchNorms are calibrated (the others keep their statistics
    and run in eval mode meanwhile), or None for all of them.

    A freshly built model has mean 0 / var 1 statistics, under which activations grow through
    the trunk and relative errors mean little; benchmarks and tests of untrained models use this.
    """
    norms = [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and (modules is None or name.split(".", 1)[0] in modules)]
    for m in norms:
        m.momentum = None  # cumulative average over the calibration batches
        m.reset_running_stats()
    if modules is None:
        model.train()
    else:
        model.eval()
        for m in norms:
            m.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


# --------------------------------------------------------------------------------------
# SkipNet (SPEC B.1.3) and the discriminators (B.3.5, B.3.6)


def _skip_conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def _skip_deconv(cin, cout):
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class SkipNetEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 4, 2, 1)
        self.conv2 = _skip_conv(64, 128)
        self.conv3 = _skip_conv(128, 256)
        self.conv4 = _skip_conv(256, 256)
        self.conv5 = _skip_conv(256, 256)
        self.fc256 = nn.Linear(4096, 256)

    def forward(self, x):
        out1 = self.conv1(x)
        out2 = self.conv2(out1)
        out3 = self.conv3(out2)
        out4 = self.conv4(out3)
        z = self.fc256(self.conv5(out4).flatten(1))
        return z, out1, out2, out3, out4


class SkipNetDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dconv1 = _skip_deconv(256, 256)
        self.dconv2 = _skip_deconv(256, 256)
        self.dconv3 = _skip_deconv(256, 128)
        self.dconv4 = _skip_deconv(128, 64)
        self.dconv5 = _skip_deconv(64, 64)
        self.conv6 = nn.Conv2d(64, 3, 1)

    def forward(self, z, out1, out2, out3, out4):
        # The original upsamples a 1x1 map by 4 (bilinear), which is a constant 4x4 map.
        x = z.reshape(z.shape[0], 256, 1, 1).expand(-1, -1, 4, 4)
        x = self.dconv1(x) + out4
        x = self.dconv2(x) + out3
        x = self.dconv3(x) + out2
        x = self.dconv4(x) + out1
        return self.conv6(self.dconv5(x))


class SkipNet(nn.Module):
    """The encoder-decoder used to make CelebA pseudo labels; outputs as the models."""

    def __init__(self, normalize: bool = True, shading_backend: str = "auto"):
        super().__init__()
        self.config = ModelConfig(normalize=normalize, shading_backend=shading_backend)
        self.encoder = SkipNetEncoder()
        self.normal_decoder = SkipNetDecoder()
        self.albedo_decoder = SkipNetDecoder()
        self.light_decoder = nn.Linear(256, 27)

    def forward(self, x):
        z, *skips = self.encoder(x)
        raw_normal = self.normal_decoder(z, *skips)
        albedo = self.albedo_decoder(z, *skips)
        light = self.light_decoder(z)
        shading, recon = sh_shade(raw_normal, light, None, albedo,
                                  normalize=self.config.normalize, backend=self.config.shading_backend)
        normal = normalize_normal(raw_normal) if self.config.normalize else raw_normal
        return {"normal": normal, "albedo": albedo, "light": light, "sh_shading": shading,
                "shading": shading, "recon": recon}


class PatchDiscriminator(nn.Module):
    """Method 5's critic: 4 strided convs (instance norm after the first), zero pad and an
    11x11 conv: ``[B,1,1,1]`` for a 128x128 albedo, no sigmoid (LSGAN)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for i, cout in enumerate((64, 128, 256, 512)):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1))
            if i > 0:
                layers.append(nn.InstanceNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        layers += [nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(512, 1, 11, padding=1, bias=False)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class DCGANDiscriminator(nn.Module):
    """Methods 6/7's critic (``PT_Tutorial_Discriminator``): bias-free strided convs with
    BatchNorm, LeakyReLU(0.2), a 4x4 conv to ``[B,1,1,1]`` and a sigmoid."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for i, cout in enumerate((64, 128, 256, 512, 1024)):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        layers += [nn.Conv2d(1024, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


# The critics a GanSpec names.
DISCRIMINATORS = {"patch": PatchDiscriminator, "dcgan": DCGANDiscriminator}


def build_discriminator(method) -> nn.Module:
    """The discriminator a GAN method trains with (its ``spec.gan.discriminator``)."""
    spec = METHODS[method_id(method)]
    if spec.gan is None:
        gans = ", ".join(str(m) for m, s in METHODS.items() if s.gan is not None)
        raise ValueError(f"method {spec.method} has no discriminator (only {gans} do)")
    return DISCRIMINATORS[spec.gan.discriminator]()


# --------------------------------------------------------------------------------------
# The eight methods. Loss sources: SPEC B.3 / B.1.4 / B.4.4.

# Methods 6/7: stage 1 trains the albedo generator adversarially (10 SmoothL1 albedo + 1 GAN),
# stage 2 the rest with the generator and the second albedo branch frozen (fix_new_weights),
# SmoothL1 albedo 1 + SmoothL1 recon 1.
_GAN_THEN_RECON = (
    Stage("gan", loss_terms(("albedo", "albedo", "smooth_l1", 10.0)), adversarial=True, albedo_only=True),
    Stage("recon", loss_terms(("albedo", "albedo", "smooth_l1", 1.0), ("recon", "face", "smooth_l1", 1.0)),
          frozen=("albedo_residual_model_2", "albedo_gen_model")),
)

register_method(MethodSpec(
    0, "sfsnet", head=None, head_module=None, head_features=None, albedo_features="Fa",
    # Caffe weights, also SfSNet-PyTorch's synthetic/CelebA loss: L1 normal, albedo and recon
    # 0.5 each, SH 0.1 (MSE).
    # The "light" variant weighs the SH term 10x: at 0.1 the light is the weakest gradient of the
    # table and a short CPU training (the bundled weights) leaves it near its initial guess.
    stages=(Stage("main", loss_terms(("normal", "normal", "l1", 0.5), ("albedo", "albedo", "l1", 0.5),
                                     ("light", "light", "mse", 0.1), ("recon", "face", "l1", 0.5)),
                  variants=(("light", loss_terms(
                      ("normal", "normal", "l1", 0.5), ("albedo", "albedo", "l1", 0.5),
                      ("light", "light", "mse", 1.0), ("recon", "face", "l1", 0.5))),)),)))

register_method(MethodSpec(
    1, "shading-correcting", head="correct", head_module="shading_correctness_model", head_features="NEW",
    albedo_features="Fa", frozen_if_loaded=SFSNET_TRUNK,
    # V2 train(): SmoothL1 normal/albedo 0.5, SH MSE 0.1, recon MSE 1; the variant is
    # train_with_shading_loss.
    stages=(Stage("main", loss_terms(("normal", "normal", "smooth_l1", 0.5), ("albedo", "albedo", "smooth_l1", 0.5),
                                     ("light", "light", "mse", 0.1), ("recon", "face", "mse", 1.0)),
                  variants=(("shading", loss_terms(
                      ("normal", "normal", "smooth_l1", 0.5), ("albedo", "albedo", "smooth_l1", 0.5),
                      ("light", "light", "mse", 0.1), ("recon", "face", "smooth_l1", 0.3),
                      ("shading", "gt_shading", "smooth_l1", 0.7))),)),)))

register_method(MethodSpec(
    2, "latent-shading", head="generate", head_module="shading_model", head_features="NEW",
    albedo_features="Fa2", light=False,
    # fix_weights named a module method 2 does not have; we keep the rest of its trunk.
    frozen_if_loaded=("conv_model", "normal_residual_model", "normal_gen_model"),
    # L1 normal 1, albedo 1, recon 0.2, shading vs GT shading 0.8.
    stages=(Stage("main", loss_terms(("normal", "normal", "l1", 1.0), ("albedo", "albedo", "l1", 1.0),
                                     ("recon", "face", "l1", 0.2), ("shading", "gt_shading", "l1", 0.8))),)))

# Method 3's train_with_shading_loss (the newest main): SmoothL1 albedo 0.5, recon 0.3, updated
# shading vs GT shading 0.7; "recon-mse" is its train(): SmoothL1 albedo 0.5 + MSE recon 1.
_METHOD3_LOSSES = loss_terms(("albedo", "albedo", "smooth_l1", 0.5), ("recon", "face", "smooth_l1", 0.3),
                             ("shading", "gt_shading", "smooth_l1", 0.7))
register_method(MethodSpec(
    3, "shading-residue", head="residue", head_module="shading_residual_model", head_features="NEW",
    albedo_features="Fa2", frozen_if_loaded=SFSNET_TRUNK,
    stages=(Stage("main", _METHOD3_LOSSES, variants=(
        ("shading", _METHOD3_LOSSES),
        ("recon-mse", loss_terms(("albedo", "albedo", "smooth_l1", 0.5), ("recon", "face", "mse", 1.0))))),)))

register_method(MethodSpec(
    4, "shading-albedo-residue", head="residue", head_module="residual_model", head_features="ALL",
    albedo_features="Fa", beta=1.0, frozen_if_loaded=SFSNET_TRUNK + ("albedo_gen_model",),
    # train(): SmoothL1 recon 1 (only the residual head trains).
    stages=(Stage("main", loss_terms(("recon", "face", "smooth_l1", 1.0)), variants=(
        ("shading", loss_terms(("recon", "face", "smooth_l1", 1.0), ("shading", "gt_shading", "smooth_l1", 1.0))),)),)))

register_method(MethodSpec(
    5, "residue-albedo-gan", head="residue", head_module="shading_residual_model", head_features="ALL",
    albedo_features="Fa", frozen_if_loaded=SFSNET_TRUNK, gan=GanSpec("patch", weight=0.4, real="synthetic"),
    # The final version trains jointly: MSE recon 1 + 0.4 GAN; no albedo supervision.
    stages=(Stage("main", loss_terms(("recon", "face", "mse", 1.0)), adversarial=True),)))

register_method(MethodSpec(
    6, "gan-separate", head="residue", head_module="shading_residual_model", head_features="NEW",
    albedo_features="Fa2", frozen_if_loaded=SFSNET_TRUNK, gan=GanSpec("dcgan", weight=1.0, real="synthetic"),
    stages=_GAN_THEN_RECON))

register_method(MethodSpec(
    7, "gan-train2", head="residue", head_module="shading_residual_model", head_features="NEW",
    albedo_features="Fa2", frozen_if_loaded=SFSNET_TRUNK, gan=GanSpec("dcgan", weight=1.0, real="batch"),
    stages=_GAN_THEN_RECON))
