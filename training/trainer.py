"""Trainers for the eight methods (SPEC B.3, A.8; DESIGN section 8).

One :class:`Trainer` runs every method; what differs between methods is data on its
:class:`sfs_fast.models.MethodSpec`: the training stages with their loss tables, which
modules freeze when they were loaded from pretrained weights (``frozen_if_loaded``) and, for
5-7, the GAN set-up. An adversarial stage that runs the whole model trains jointly
(method 5: discriminator step, then generator + pipeline step); methods 6 and 7 run two
stages of ``--epochs`` each: the adversarial generator stage (``albedo_only``), then the
reconstruction stage with the generator frozen (its ``Stage.frozen``).

FIX-freeze-loaded: a module is only frozen when it was actually loaded from
--load_pretrained_model (the original also froze freshly initialised branches, B.7.4).

The albedo generator of the GAN methods is the model's own ``albedo_gen_model`` (the original
kept it as a separate ``AlbedoGenerationNet``; the layers are the same), trained by its own
optimizer, so a checkpoint of a GAN method is one ordinary model file.

Shading in every loss goes through :func:`sfs_fast.kernels.sh_shade` (in the model's forward
and for the ground-truth shading), with the model's ``shading_backend``.

Fixes of the original (SPEC A.8 / B.7), each named where the code departs from it:
FIX-zero-grad, FIX-gan-target-shape, FIX-per-sample-labels, FIX-no-reinit, FIX-freeze-loaded,
FIX-mask-losses, FIX-read-first-seed (data.py), FIX-details-optional.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfs_fast import images
from sfs_fast import weights as weights_mod
from sfs_fast.atomic import TEMP_PREFIX, atomic_destination, atomic_write
from sfs_fast.kernels import resolve_backend
from sfs_fast.models import METHODS, Stage, build_discriminator, build_model, init_weights, method_id
from sfs_fast.precision import normal_angles_deg
from sfs_fast.training import losses as L
from sfs_fast.training.data import build_splits

DISC_SIZE = 128


class TrainingDiverged(RuntimeError):
    """A loss or weight became NaN/Inf; the message names the last good checkpoint."""


@dataclass
class TrainOptions:
    method: int = 0
    syn_data: str | None = None
    celeba_data: str | None = None
    log_dir: str = "./results/"
    batch_size: int = 8
    epochs: int = 10
    lr: float = 1e-3
    wt_decay: float = 5e-4
    seed: int = 1
    read_first: int | None = None
    details: str | None = None
    load_pretrained_model: str | None = None
    load_model: str | None = None
    device: str = "cpu"
    workers: int = 0
    mask_losses: bool = True
    loss_variant: str | None = None
    crop: int | None = None
    val_split: float = 2.0
    shading_backend: str = "auto"
    log_every: int = 50
    samples: int = 4
    freeze: tuple = ()  # modules kept fixed besides the method's frozen_if_loaded (--freeze)
    command: str = ""


@dataclass
class EpochStats:
    sums: dict = field(default_factory=dict)
    count: int = 0

    def add(self, parts: dict):
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _set_seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def find_checkpoint(path) -> Path:
    """The epoch folder to resume from: ``path`` may be a log dir, its ``checkpoints/`` or an
    epoch folder itself."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        latest = candidate / "LATEST"
        if latest.is_file():
            return candidate / latest.read_text().strip()
    if (path / "model.safetensors").is_file() and (path / "state.pt").is_file():
        return path
    raise ValueError(f"--load_model {path}: no checkpoint there (expected <log_dir>/checkpoints/LATEST)")


def transfer_pretrained(model, source) -> set:
    """Copy the modules ``source`` holds into ``model`` by attribute name; returns the names
    of ``model``'s modules that were filled.

    ``source.loaded_modules`` (set by the importers) names what the file really held; without
    it (our own checkpoints) every module of ``source`` counts. As the original mapping
    (SPEC B.6.2), ``albedo_residual_model_2`` is filled from ``albedo_residual_model`` when
    the source has only the first.
    """
    src_children = dict(source.named_children())
    loaded = getattr(source, "loaded_modules", None)
    loaded = set(src_children) if loaded is None else set(loaded)
    filled = set()
    for name, module in model.named_children():
        src_name = name
        if name not in loaded and name == "albedo_residual_model_2" and "albedo_residual_model" in loaded:
            src_name = "albedo_residual_model"
        if src_name not in loaded or src_name not in src_children:
            continue
        src_state = src_children[src_name].state_dict()
        dst_state = module.state_dict()
        if set(src_state) != set(dst_state) or any(src_state[k].shape != dst_state[k].shape for k in dst_state):
            continue
        module.load_state_dict(src_state)
        filled.add(name)
    return filled


def zero_new_residue(model, loaded: set) -> bool:
    """Zero the last convolution of a residue head that starts fresh on a pretrained trunk,
    so that training starts from the trunk's own decomposition (residue 0: method 0's
    shading and reconstruction) and learns only what SH misses. From a random last layer, a
    short training on renders leaves residues that spoil real photos (measured on the
    bundled weights' method 4: example recon error 0.27 against method 0's 0.16)."""
    spec = model.spec
    if spec.head != "residue" or spec.head_module in loaded:
        return False
    last = [m for m in getattr(model, spec.head_module).modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return True


def load_source_model(path, method: int):
    """Any importer's output (Caffe .h5, .pth/.pkl, ours) or registered weights (``sfsnet``)
    as a model to copy from; an unknown path or name raises CheckpointError (one line)."""
    try:
        return weights_mod.load_any(path, method=method)
    except weights_mod.WeightsDownloadError:
        raise  # not a method mismatch: do not fetch twice
    except (ValueError, KeyError):
        # A file of another method (e.g. a method-0 checkpoint for method 3): load as stored.
        return weights_mod.load_any(path)


class Trainer:
    """Everything of one run: model, discriminator, optimizers, data, logs, checkpoints."""

    def __init__(self, opts: TrainOptions, splits=None):
        self.opts = opts
        self.method = method_id(opts.method)
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device (use --no_cuda or --device cpu)")
        if opts.batch_size < 1 or opts.epochs < 1:
            raise ValueError("--batch_size and --epochs must be at least 1")
        if opts.crop is not None and (opts.crop < 16 or opts.crop % 4):
            raise ValueError(f"--crop: expected a multiple of 4, at least 16, got {opts.crop}")
        self.log_dir = Path(opts.log_dir)
        self.spec = METHODS[self.method]
        self.stages = self.spec.stages
        self.gan = self.spec.gan
        _set_seed(opts.seed)

        resume_dir = find_checkpoint(opts.load_model) if opts.load_model else None
        self.frozen: set[str] = set()
        self.loaded: set[str] = set()
        if resume_dir is not None:
            stored = weights_mod.load(resume_dir / "model.safetensors", method=self.method,
                                      shading_backend=opts.shading_backend)
            self.model = stored
        else:
            config = {"shading_backend": opts.shading_backend}
            source = None
            if opts.load_pretrained_model:
                source = load_source_model(opts.load_pretrained_model, self.method)
                config.update(upsample=source.config.upsample, normalize=source.config.normalize)
            self.model = build_model(self.method, **config)
            self.model.apply(init_weights)
            if source is not None:
                # FIX-no-reinit: the pretrained weights are copied after the initialisation
                # and never re-initialised later (B.7.6a).
                self.loaded = transfer_pretrained(self.model, source)
                if not self.loaded:
                    raise ValueError(f"--load_pretrained_model {opts.load_pretrained_model}: no module fits method {self.method}")
                self.frozen = set(self.spec.frozen_if_loaded) & self.loaded  # FIX-freeze-loaded
                zero_new_residue(self.model, self.loaded)
            self.frozen |= self._checked_freeze(opts.freeze)
        self.model.to(self.device)

        self.disc = build_discriminator(self.method).to(self.device) if self.gan else None
        if self.disc is not None:
            self.disc.apply(init_weights)
        self._build_optimizers()
        self.epoch = 0  # epochs completed
        self.step = 0
        self.last_good: Path | None = None
        if resume_dir is not None:
            self._restore(resume_dir)
        self._apply_freeze()

        self.splits = splits if splits is not None else build_splits(
            opts.syn_data, opts.celeba_data, read_first=opts.read_first, seed=opts.seed,
            validation_split=opts.val_split)
        if self.gan and self.gan.real == "synthetic" and self.splits.real_albedo is None:
            raise ValueError(f"method {self.method} needs synthetic data (--syn_data) for the discriminator's real albedos")
        self._real_iter = None
        self._real_epoch = 0

    # ---------------------------------------------------------------- set-up

    def _build_optimizers(self):
        o = self.opts
        gen_params = list(self.model.albedo_gen_model.parameters()) if self.gan else []
        gen_ids = {id(p) for p in gen_params}
        pipe_params = [p for p in self.model.parameters() if id(p) not in gen_ids]
        # The GAN mains commented weight decay out (SPEC B.3.5); we keep that.
        decay = 0.0 if self.gan else o.wt_decay
        self.opt = torch.optim.Adam(pipe_params, lr=o.lr, weight_decay=decay)
        self.g_opt = torch.optim.Adam(gen_params, lr=o.lr) if self.gan else None
        self.d_opt = torch.optim.Adam(self.disc.parameters(), lr=o.lr) if self.gan else None

    @property
    def stage_spec(self) -> Stage:
        """The stage the next epoch trains: ``--epochs`` epochs of each of ``spec.stages``."""
        return self.stages[min(self.epoch // self.opts.epochs, len(self.stages) - 1)]

    @property
    def stage(self) -> str:
        """The name of :attr:`stage_spec` (what logs and checkpoints record)."""
        return self.stage_spec.name

    @property
    def total_epochs(self) -> int:
        return self.opts.epochs * len(self.stages)

    def _apply_freeze(self):
        frozen = set(self.frozen) | set(self.stage_spec.frozen)
        for name, module in self.model.named_children():
            module.requires_grad_(name not in frozen)
        self._active_frozen = frozen

    def set_train_mode(self):
        """Train mode, except frozen modules: they stay in eval mode so that their BatchNorm
        statistics (loaded with their weights) stay as loaded. (The original left them in
        train mode, which let the running statistics of "frozen" modules drift.)"""
        self.model.train()
        for name, module in self.model.named_children():
            if name in self._active_frozen:
                module.eval()
        if self.disc is not None:
            self.disc.train()

    def table(self, stage=None):
        return L.loss_table(self.method, stage or self.stage, self.opts.loss_variant)

    # ---------------------------------------------------------------- steps

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _supervised(self, outputs, batch, stage=None):
        return L.compute_losses(self.table(stage), outputs, batch, mask_losses=self.opts.mask_losses,
                                normalize=self.model.config.normalize, backend=self.model.config.shading_backend)

    def batch_loss(self, batch: dict) -> float:
        """The supervised loss of the current stage on ``batch`` (no update; eval mode)."""
        self.model.eval()
        return self.stage_loss(batch)

    @torch.no_grad()
    def stage_loss(self, batch: dict) -> float:
        """The supervised loss of the current stage on ``batch``, no update, with the modules
        in the modes they are in (after :meth:`set_train_mode`: with batch statistics)."""
        batch = self.to_device(batch)
        if self.stage_spec.albedo_only:
            outputs = {"albedo": self.generated_albedo(self.model.features(batch["face"]))}
        else:
            outputs = self.model(batch["face"])
        total, _ = self._supervised(outputs, batch)
        return float(total)

    def generated_albedo(self, feats: dict) -> torch.Tensor:
        """The albedo generator's output on trunk features (what the discriminator judges)."""
        return self.model.albedo_gen_model(feats[self.spec.albedo_features])

    def _next_real_albedo(self, n: int) -> torch.Tensor:
        """Real albedos from the synthetic-only pool, reshuffled when exhausted (B.4.4)."""
        ds = self.splits.real_albedo
        while True:
            if self._real_iter is None:
                # Seeded by (seed, epoch, pass) so that a resumed run draws the same albedos.
                g = torch.Generator().manual_seed(self.opts.seed * 7919 + self.epoch * 1009 + self._real_epoch)
                self._real_epoch += 1
                self._real_iter = iter(torch.utils.data.DataLoader(ds, batch_size=n, shuffle=True, generator=g,
                                                                   num_workers=0))
            try:
                return next(self._real_iter)["albedo"].to(self.device)
            except StopIteration:
                self._real_iter = None

    def _real_albedos(self, batch: dict):
        """The discriminator's real side as ``(albedos, target)``, by ``gan.real``: the batch's
        own albedos with per-sample labels (FIX-per-sample-labels, B.7.6b/f), or as many
        synthetic ones, all labelled 1."""
        if self.gan.real == "batch":
            return batch["albedo"], batch["label"]
        return self._next_real_albedo(batch["face"].shape[0]), 1.0

    def _disc(self, albedo: torch.Tensor) -> torch.Tensor:
        """The discriminator on ``[B,3,h,w]`` albedos. Both critics need 128x128 inputs (their
        last convolution spans the whole 8x8 / 4x4 map), so crops are resized to 128 first."""
        if tuple(albedo.shape[-2:]) != (DISC_SIZE, DISC_SIZE):
            albedo = torch.nn.functional.interpolate(albedo, size=(DISC_SIZE, DISC_SIZE), mode="bilinear",
                                                     align_corners=False)
        return self.disc(albedo)

    def _check(self, name, value, parts=None):
        if not torch.isfinite(value).all():
            where = self.last_good or "none was written yet"
            detail = f" ({', '.join(f'{k}={float(v):.4g}' for k, v in (parts or {}).items())})" if parts else ""
            raise TrainingDiverged(
                f"{name} became {float(value.detach().reshape(-1)[0])} at epoch {self.epoch + 1}, step {self.step + 1}{detail}; "
                f"training stopped, the last good checkpoint is {where}")

    def train_step(self, batch: dict) -> dict:
        """One optimisation step of the current stage on ``batch``; returns the loss parts."""
        batch = self.to_device(batch)
        stage = self.stage_spec
        if stage.albedo_only:
            parts = self._step_generator_stage(batch)
        elif stage.adversarial:
            parts = self._step_joint_gan(batch)
        else:
            outputs = self.model(batch["face"])
            total, parts = self._supervised(outputs, batch)
            self._check("loss", total, parts)
            self.opt.zero_grad(set_to_none=True)  # FIX-zero-grad (B.7.6c: stage 2 of 6/7 never zeroed)
            total.backward()
            self.opt.step()
            parts = {"total": total.detach(), **parts}
        self.step += 1
        return {k: float(v) for k, v in parts.items()}

    def _step_joint_gan(self, batch):
        """An adversarial stage of the whole model (method 5, final version): D step on real
        albedos vs G(F*), then the generator + pipeline step on supervised + weight * GAN."""
        feats = self.model.features(batch["face"])
        fake = self.generated_albedo(feats)
        loss_d = self._discriminator_step(batch, fake)
        parts = self._generator_step(self.model.decompose_features(feats, albedo=fake), fake, batch)
        return {**parts, "gan_d": loss_d}

    def _step_generator_stage(self, batch):
        """An ``albedo_only`` stage (methods 6/7, stage 1): generator step (supervised + GAN),
        then D step. With ``gan.real == "synthetic"`` (6) D sees synthetic GT albedos as real;
        with ``"batch"`` (7) the batch's own albedos with their labels (1 synthetic, 0 CelebA
        pseudo label)."""
        fake = self.generated_albedo(self.model.features(batch["face"]))
        # The pipeline optimiser steps too, so albedo_residual_model_2 learns in this stage as
        # in the earlier version (fcef6d58); the later one computed its gradients and dropped
        # them, then froze it.
        parts = self._generator_step({"albedo": fake}, fake, batch)
        return {**parts, "gan_d": self._discriminator_step(batch, fake)}

    def _generator_step(self, outputs: dict, fake: torch.Tensor, batch: dict) -> dict:
        """One step of the generator's and the pipeline's optimizers on the supervised loss of
        ``outputs`` plus ``gan.weight`` times the GAN loss of ``fake``; D is frozen meanwhile."""
        self.disc.requires_grad_(False)
        try:
            supervised, parts = self._supervised(outputs, batch)
            loss_gan = L.gan_mse(self._disc(fake), 1.0)
            total = supervised + self.gan.weight * loss_gan
            self._check("loss", total, parts)
            self.opt.zero_grad(set_to_none=True)
            self.g_opt.zero_grad(set_to_none=True)
            total.backward()
            self.g_opt.step()
            self.opt.step()
        finally:
            self.disc.requires_grad_(True)
        return {"total": total.detach(), **parts, "gan_g": loss_gan.detach()}

    def _discriminator_step(self, batch: dict, fake: torch.Tensor) -> torch.Tensor:
        """One D step: real albedos (:meth:`_real_albedos`) against the detached ``fake``."""
        real, real_target = self._real_albedos(batch)
        # FIX-gan-target-shape: targets shaped like D's output.
        loss_d = 0.5 * (L.gan_mse(self._disc(real), real_target) + L.gan_mse(self._disc(fake.detach()), 0.0))
        self._check("discriminator loss", loss_d)
        self.d_opt.zero_grad(set_to_none=True)
        loss_d.backward()
        self.d_opt.step()
        return loss_d.detach()

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, dataset, max_batches=None) -> dict:
        """Mean supervised loss and error metrics over ``dataset`` (eval mode): normal angle
        (degrees), albedo / recon L1, light MSE, all over mask pixels."""
        if dataset is None or len(dataset) == 0:
            return {}
        self.model.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.opts.batch_size, shuffle=False,
                                             num_workers=self.opts.workers)
        stats = EpochStats()
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = self.to_device(batch)
            out = self.model(batch["face"])
            metrics = decomposition_errors(out, batch)
            if not self.stage_spec.albedo_only:
                metrics["loss"], _ = self._supervised(out, batch)
            stats.add(metrics)  # one add per batch: the means divide by the batch count
        return stats.means()

    # ---------------------------------------------------------------- the loop

    def _crop(self, batch, gen):
        c = self.opts.crop
        if c is None:
            return batch
        h, w = batch["face"].shape[-2:]
        if c >= min(h, w):
            return batch
        y = int(torch.randint(0, h - c + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - c + 1, (1,), generator=gen))
        return {k: (v[..., y:y + c, x:x + c] if v.dim() == 4 else v) for k, v in batch.items()}

    def _loader(self, epoch):
        g = torch.Generator().manual_seed(self.opts.seed * 100003 + epoch)
        return torch.utils.data.DataLoader(self.splits.train, batch_size=self.opts.batch_size, shuffle=True,
                                           generator=g, num_workers=self.opts.workers, drop_last=False), g

    def fit(self, log=print):
        o = self.opts
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if o.details is not None:  # FIX-details-optional (B.7.12)
            (self.log_dir / "details.txt").write_text(o.details + "\n")
        self._truncate_metrics()
        if self.opts.load_model:
            log(f"resuming after epoch {self.epoch} (step {self.step}) from {self.last_good}")
        log(f"method {self.method} ({self.model.spec.slug}): {len(self.splits.train)} training samples, "
            f"{len(self.splits.val) if self.splits.val else 0} validation, "
            f"{len(self.splits.test) if self.splits.test else 0} test; frozen: {sorted(self.frozen) or 'none'}; "
            f"shading backend {self.model.config.shading_backend} "
            f"({resolve_backend(self.model.config.shading_backend, self.device)})")
        while self.epoch < self.total_epochs:
            self._apply_freeze()
            self._real_iter, self._real_epoch = None, 0
            started = time.perf_counter()
            loader, gen = self._loader(self.epoch)
            stats = EpochStats()
            self.set_train_mode()
            for i, batch in enumerate(loader):
                parts = self.train_step(self._crop(batch, gen))
                stats.add(parts)
                if o.log_every and (i + 1) % o.log_every == 0:
                    log(f"  epoch {self.epoch + 1} step {i + 1}/{len(loader)} loss {parts['total']:.4f}")
            train_seconds = time.perf_counter() - started
            self._check_weights()
            record = {"epoch": self.epoch + 1, "stage": self.stage, "step": self.step,
                      "train": stats.means(), "train_seconds": round(train_seconds, 3),
                      "seconds_per_step": round(train_seconds / max(stats.count, 1), 4)}
            record["val"] = self.evaluate(self.splits.val)
            last = self.epoch + 1 == self.total_epochs
            if self.splits.test is not None and ((self.epoch + 1) % 5 == 0 or last):
                record["test"] = self.evaluate(self.splits.test)
            if o.samples > 0:
                self.save_samples(o.samples)
            self.epoch += 1
            with open(self.log_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.save_checkpoint(record)
            val = record["val"]
            log(f"epoch {self.epoch}/{self.total_epochs} [{record['stage']}] train loss {record['train'].get('total', float('nan')):.4f}"
                + (f", val normal {val['normal_deg']:.2f} deg, albedo L1 {val['albedo_l1']:.4f}" if val else "")
                + f" ({train_seconds:.1f} s)")
        return self

    def _check_weights(self):
        for module in ([self.model] + ([self.disc] if self.disc is not None else [])):
            for name, p in module.state_dict().items():
                if p.is_floating_point() and not torch.isfinite(p).all():
                    self._check(f"weight {name}", torch.tensor(float("nan")))

    def _truncate_metrics(self):
        """A resumed run drops the metrics of epochs after its checkpoint."""
        path = self.log_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("epoch", 0) <= self.epoch]
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))

    def _checked_freeze(self, names) -> set:
        """``--freeze``: modules of the model that stay fixed (eval mode, no gradients)."""
        modules = {name for name, _ in self.model.named_children()}
        unknown = sorted(set(names) - modules)
        if unknown:
            raise ValueError(f"--freeze: method {self.method} has no module {', '.join(unknown)} "
                             f"(it has {', '.join(sorted(modules))})")
        return set(names)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, record=None):
        """``<log_dir>/checkpoints/epoch-NNNN/{model.safetensors,state.pt}``, then ``LATEST``
        (the switch is one atomic rename), then ``<log_dir>/model.safetensors``."""
        ckdir = self.log_dir / "checkpoints"
        name = f"epoch-{self.epoch:04d}"
        final = ckdir / name
        with atomic_destination(final) as tmp:  # the epoch folder appears whole or not at all
            tmp.mkdir()
            weights_mod.save(self.model, tmp / "model.safetensors", **self._metadata(record))
            torch.save(self._training_state(), tmp / "state.pt")
            if final.exists():
                shutil.rmtree(final)
        atomic_write(ckdir / "LATEST", lambda f: f.write(f"{name}\n".encode()))
        for old in ckdir.iterdir():
            # Older epochs, and the temporary folder of a run killed while it saved.
            if (old.name.startswith("epoch-") and old.name != name) or old.name.startswith(TEMP_PREFIX):
                shutil.rmtree(old, ignore_errors=True)
        with atomic_destination(self.log_dir / "model.safetensors") as tmp:
            shutil.copyfile(final / "model.safetensors", tmp)
        self.last_good = final
        return final

    def _training_state(self) -> dict:
        """What ``state.pt`` holds besides the model: counters, optimizers, D, the RNG."""
        return {
            "epoch": self.epoch, "step": self.step, "method": self.method,
            "frozen": sorted(self.frozen), "loaded": sorted(self.loaded),
            "optimizer": self.opt.state_dict(),
            "g_optimizer": self.g_opt.state_dict() if self.g_opt else None,
            "d_optimizer": self.d_opt.state_dict() if self.d_opt else None,
            "discriminator": self.disc.state_dict() if self.disc is not None else None,
            "torch_rng": torch.get_rng_state(),
        }

    def _metadata(self, record):
        o = self.opts
        meta = {"trained_by": "sfs-train", "command": o.command, "epoch": self.epoch, "step": self.step,
                "stage": self.stage, "frozen_modules": sorted(self.frozen),
                # Not "loaded_modules": weights.load reads that key as "the file holds only
                # these"; a trained checkpoint holds every module.
                "pretrained_modules": sorted(self.loaded),
                "options": {k: v for k, v in asdict(o).items() if k != "command"}}
        if record is not None:
            meta["metrics"] = {"train": record.get("train"), "val": record.get("val"), "test": record.get("test")}
        return meta

    def _restore(self, folder: Path):
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=True)
        if state["method"] != self.method:
            raise ValueError(f"--load_model {folder}: a method-{state['method']} run, not method {self.method}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.frozen, self.loaded = set(state["frozen"]), set(state["loaded"])
        self.opt.load_state_dict(state["optimizer"])
        if self.g_opt is not None:
            self.g_opt.load_state_dict(state["g_optimizer"])
            self.d_opt.load_state_dict(state["d_optimizer"])
            self.disc.load_state_dict(state["discriminator"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.last_good = folder

    # ---------------------------------------------------------------- pictures

    @torch.no_grad()
    def save_samples(self, n=4):
        """A labelled PNG grid of a few decompositions: columns :data:`SAMPLE_COLUMNS`, one
        row per validation sample."""
        ds = self.splits.val if self.splits.val is not None and len(self.splits.val) else self.splits.train
        batch = torch.utils.data.default_collate([ds[i] for i in range(min(n, len(ds)))])
        batch = self.to_device(batch)
        self.model.eval()
        out = self.model(batch["face"])
        cols = [batch["face"], out["recon"], out["albedo"], batch["albedo"], out["shading"],
                (out["normal"] + 1) / 2, (batch["normal"] + 1) / 2]
        rows = [[images.unit_to_rgb(c[i].float().cpu().numpy()) for c in cols] for i in range(len(batch["face"]))]
        sheet = images.grid(rows, col_labels=SAMPLE_COLUMNS, row_labels=[f"val {i}" for i in range(len(rows))])
        images.save_png(self.log_dir / "samples" / f"epoch_{self.epoch + 1:03d}.png", sheet)


SAMPLE_COLUMNS = ("face", "recon", "albedo", "GT albedo", "shading", "normal", "GT normal")


def decomposition_errors(out: dict, batch: dict) -> dict:
    """Masked error metrics of one batch: normal angle (deg), albedo/recon L1, light MSE."""
    mask = batch["mask"]
    denom = mask.sum().clamp(min=1.0)
    angles = normal_angles_deg(out["normal"], batch["normal"])  # [B*H*W], the mask's order
    metrics = {
        "normal_deg": float((angles * mask.flatten().double()).sum() / denom),
        "albedo_l1": float(((out["albedo"] - batch["albedo"]).abs() * mask).sum() / (3 * denom)),
        "recon_l1": float(((out["recon"] - batch["face"]).abs() * mask).sum() / (3 * denom)),
    }
    if "light" in out:
        metrics["light_mse"] = float(((out["light"] - batch["light"]) ** 2).mean())
    return metrics
