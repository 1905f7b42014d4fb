"""The eight models: one SfSNet trunk (SPEC B.1), method heads (B.3), SkipNet and the two
discriminators. ``build_model(method, **config)`` is the one entry point.

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

from sfs_fast.kernels import sh_shade
from sfs_fast.sh import normalize_normal

UPSAMPLE_MODES = ("bilinear", "caffe")
SHADING_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda", "compile")


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
# Methods (SPEC A.1, B.3): names are data


@dataclass(frozen=True)
class MethodSpec:
    """How one method wires the trunk and its head.

    head: None, ``"residue"`` (shading = SH shading + residue), ``"correct"`` (a 6->3 head
    corrects the SH shading with a latent light map) or ``"generate"`` (a 6->3 head makes the
    shading from normal and latent light; no SH).
    head_features: ``"ALL"`` = cat(F, Fn, Fa) or ``"NEW"`` = cat(F, Fn, Fa2).
    albedo_features: ``"Fa"`` (albedo branch 1) or ``"Fa2"`` (a second albedo branch).
    """

    method: int
    slug: str
    head: str | None
    head_module: str | None
    head_features: str | None
    albedo_features: str
    light: bool = True
    beta: float = 0.0

    @property
    def second_albedo(self) -> bool:
        return self.albedo_features == "Fa2" or self.head_features == "NEW"

    @property
    def first_albedo(self) -> bool:
        return self.albedo_features == "Fa" or self.light or self.head_features == "ALL"


METHODS = {
    0: MethodSpec(0, "sfsnet", None, None, None, "Fa"),
    1: MethodSpec(1, "shading-correcting", "correct", "shading_correctness_model", "NEW", "Fa"),
    2: MethodSpec(2, "latent-shading", "generate", "shading_model", "NEW", "Fa2", light=False),
    3: MethodSpec(3, "shading-residue", "residue", "shading_residual_model", "NEW", "Fa2"),
    4: MethodSpec(4, "shading-albedo-residue", "residue", "residual_model", "ALL", "Fa", beta=1.0),
    5: MethodSpec(5, "residue-albedo-gan", "residue", "shading_residual_model", "ALL", "Fa"),
    6: MethodSpec(6, "gan-separate", "residue", "shading_residual_model", "NEW", "Fa2"),
    7: MethodSpec(7, "gan-train2", "residue", "shading_residual_model", "NEW", "Fa2"),
}
SLUGS = {spec.slug: m for m, spec in METHODS.items()}


def method_id(method) -> int:
    """Accept an id (3, "3") or a slug ("shading-residue"); raise ValueError otherwise."""
    if isinstance(method, str):
        if method in SLUGS:
            return SLUGS[method]
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
    method4_recon: ``"updated"`` (recon with albedo - residue) or ``"original"`` (B.7.5).
    shading_backend: backend of the fused op used in forward (``"auto"`` picks the fastest).
    """

    upsample: str = "bilinear"
    normalize: bool = True
    method4_recon: str = "updated"
    shading_backend: str = "auto"

    def __post_init__(self):
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample: expected one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.method4_recon not in ("updated", "original"):
            raise ValueError(f"method4_recon: expected 'updated' or 'original', got {self.method4_recon!r}")
        if self.shading_backend not in SHADING_BACKENDS:
            raise ValueError(f"shading_backend: expected one of {SHADING_BACKENDS}, got {self.shading_backend!r}")
        self.normalize = bool(self.normalize)

    def to_dict(self) -> dict:
        return asdict(self)


class SfSNetModel(nn.Module):
    """SfSNet trunk plus the head of one method; see the module docstring for the outputs."""

    # The modules of ``features`` (shared convolutions and residual trunks); everything else
    # decodes their output. Low-precision inference computes these in bf16/fp16.
    ENCODER = ("conv_model", "normal_residual_model", "albedo_residual_model", "albedo_residual_model_2")

    def __init__(self, method: int = 0, **config):
        super().__init__()
        self.spec = METHODS[method_id(method)]
        self.config = ModelConfig(**config)
        spec, cfg = self.spec, self.config
        self.conv_model = BaseFeatures()
        self.normal_residual_model = ResidualTrunk()
        self.normal_gen_model = GenerationNet(cfg.upsample)
        if spec.first_albedo:
            self.albedo_residual_model = ResidualTrunk()
        if spec.second_albedo:
            self.albedo_residual_model_2 = ResidualTrunk()
        self.albedo_gen_model = GenerationNet(cfg.upsample)
        if spec.light:
            self.light_estimator_model = LightEstimator()
        if spec.head == "residue":
            setattr(self, spec.head_module, ImageHead())
        elif spec.head in ("correct", "generate"):
            self.neural_light_model = ImageHead()
            setattr(self, spec.head_module, ShadingHead())

    @property
    def method(self) -> int:
        return self.spec.method

    @property
    def beta(self) -> float:
        if self.spec.method == 4 and self.config.method4_recon == "original":
            return 0.0
        return self.spec.beta

    def features(self, x: torch.Tensor) -> dict:
        """Trunk features, each ``[B,128,64,64]``: ``F``, ``Fn``, ``Fa`` and/or ``Fa2``."""
        feats = {"F": self.conv_model(x)}
        feats["Fn"] = self.normal_residual_model(feats["F"])
        if self.spec.first_albedo:
            feats["Fa"] = self.albedo_residual_model(feats["F"])
        if self.spec.second_albedo:
            feats["Fa2"] = self.albedo_residual_model_2(feats["F"])
        return feats

    def head_input(self, feats: dict, which: str) -> torch.Tensor:
        albedo = feats["Fa"] if which == "ALL" else feats["Fa2"]
        return torch.cat([feats["F"], feats["Fn"], albedo], dim=1)

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.features(x)
        return self.decompose_features(feats)

    def decompose_features(self, feats: dict, albedo: torch.Tensor | None = None) -> dict:
        """Heads and shading from trunk features. ``albedo`` overrides the albedo generator
        (the GAN trainers pass their generator's output)."""
        spec, cfg = self.spec, self.config
        raw_normal = self.normal_gen_model(feats["Fn"])
        if albedo is None:
            albedo = self.albedo_gen_model(feats[spec.albedo_features])
        normal = normalize_normal(raw_normal) if cfg.normalize else raw_normal
        out = {"normal": normal, "albedo": albedo}
        shade = dict(normalize=cfg.normalize, backend=cfg.shading_backend)

        if spec.light:
            out["light"] = self.light_estimator_model(self.head_input(feats, "ALL"))

        if spec.head is None:
            shading, recon = sh_shade(raw_normal, out["light"], None, albedo, **shade)
            out.update(sh_shading=shading, shading=shading, recon=recon)
        elif spec.head == "residue":
            residue = getattr(self, spec.head_module)(self.head_input(feats, spec.head_features))
            shading, recon = sh_shade(raw_normal, out["light"], residue, albedo, beta=self.beta, **shade)
            out.update(sh_shading=shading - residue, residue=residue, shading=shading, recon=recon)
            if spec.method == 4:
                out["updated_albedo"] = albedo - residue
        else:
            latent = self.neural_light_model(self.head_input(feats, spec.head_features))
            head = getattr(self, spec.head_module)
            if spec.head == "correct":
                sh_shading, _ = sh_shade(raw_normal, out["light"], **shade)
                shading = head(torch.cat([sh_shading, latent], dim=1))
                out.update(sh_shading=sh_shading, latent_light=latent, corrected_shading=shading)
            else:
                shading = head(torch.cat([normal, latent], dim=1))
                out.update(latent_light=latent)
            out.update(shading=shading, recon=shading * albedo)
        return out

    def extra_repr(self) -> str:
        return f"method={self.spec.method} ({self.spec.slug}), config={self.config.to_dict()}"


def build_model(method=0, **config) -> SfSNetModel:
    """Build the model of ``method`` (0-7 or a slug) with ``config`` (see :class:`ModelConfig`).

    >>> m = build_model(3).eval()
    >>> sorted(m(torch.rand(1, 3, 128, 128)))
    ['albedo', 'light', 'normal', 'recon', 'residue', 'sh_shading', 'shading']
    """
    return SfSNetModel(method, **config)


def output_names(method) -> list[str]:
    """The output keys of ``method``'s forward, in a stable order."""
    spec = METHODS[method_id(method)]
    names = ["normal", "albedo"]
    if spec.light:
        names.append("light")
    if spec.head != "generate":
        names.append("sh_shading")
    if spec.head == "residue":
        names.append("residue")
    if spec.head in ("correct", "generate"):
        names.append("latent_light")
    if spec.head == "correct":
        names.append("corrected_shading")
    names += ["shading", "recon"]
    if spec.method == 4:
        names.append("updated_albedo")
    return names


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


def build_discriminator(method) -> nn.Module:
    """The discriminator a GAN method trains with (5: PatchGAN critic; 6, 7: DCGAN)."""
    m = method_id(method)
    if m == 5:
        return PatchDiscriminator()
    if m in (6, 7):
        return DCGANDiscriminator()
    raise ValueError(f"method {m} has no discriminator (only 5, 6 and 7 do)")
