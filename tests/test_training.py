"""Trainers: every method's loss falls on a fixed batch, checkpoints reload bit-exactly,
resuming gives the same weights as an uninterrupted run, a SIGKILLed run resumes from its
last checkpoint, pretrained loading freezes only what was loaded, NaN stops cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sfs_fast import build_model
from sfs_fast import weights as W
from sfs_fast.training import losses as L
from sfs_fast.training import synth
from sfs_fast.training.data import build_splits
from sfs_fast.atomic import TEMP_PREFIX
from sfs_fast.models import METHODS, LossTerm
from sfs_fast.training.trainer import TrainOptions, Trainer, TrainingDiverged

CROP = 32  # the models are fully convolutional: small crops keep the tests fast


# Tiny tensors: on a busy 2-core machine one thread measured much faster than two.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_data")
    synth.write_dataset(out, 8, seed=3, test_fraction=0.25)
    return out


def _opts(data, tmp_path, method, **kw):
    base = dict(method=method, syn_data=str(data), log_dir=str(tmp_path / f"m{method}"), batch_size=2, epochs=1,
                lr=1e-3, seed=5, crop=CROP, val_split=20.0, log_every=0, samples=1)
    base.update(kw)
    return TrainOptions(**base)


def _fixed_batch(trainer, n=2):
    ds = trainer.splits.train
    batch = torch.utils.data.default_collate([ds[i] for i in range(n)])
    c0 = (128 - CROP) // 2 - 8  # off-centre: face and some background
    return {k: (v[..., c0:c0 + CROP, c0:c0 + CROP] if v.dim() == 4 else v) for k, v in batch.items()}


def _train_mode_loss(trainer, batch):
    """The stage's supervised loss with batch statistics (the model is in training)."""
    trainer.set_train_mode()
    return trainer.stage_loss(batch)


@pytest.mark.parametrize("method", range(8))
def test_loss_falls(data, tmp_path, method):
    trainer = Trainer(_opts(data, tmp_path, method, lr=2e-3, wt_decay=0.0))
    batch = _fixed_batch(trainer)
    before = _train_mode_loss(trainer, batch)
    trainer.set_train_mode()
    for _ in range(6):
        parts = trainer.train_step(batch)
        assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    after = _train_mode_loss(trainer, batch)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("method", [6, 7])
def test_two_stage_recon_stage(data, tmp_path, method):
    trainer = Trainer(_opts(data, tmp_path, method, lr=2e-3))
    trainer.epoch = trainer.opts.epochs  # stage 2
    assert trainer.stage == "recon"
    trainer._apply_freeze()
    frozen_before = {k: v.clone() for k, v in trainer.model.state_dict().items()
                     if k.startswith(("albedo_gen_model.", "albedo_residual_model_2."))}
    batch = _fixed_batch(trainer)
    before = _train_mode_loss(trainer, batch)
    trainer.set_train_mode()
    for _ in range(6):
        trainer.train_step(batch)
    assert _train_mode_loss(trainer, batch) < 0.9 * before
    state = trainer.model.state_dict()
    for k, v in frozen_before.items():  # generator and second albedo branch frozen, BN stats too
        assert torch.equal(state[k], v), k


def test_gan_targets_have_discriminator_shape():
    pred = torch.tensor([0.2, 0.9, 0.4]).reshape(3, 1, 1, 1)
    labels = torch.tensor([[1.0], [0.0], [1.0]])
    expected = ((pred.flatten() - labels.flatten()) ** 2).mean()
    assert torch.allclose(L.gan_mse(pred, labels), expected)
    assert torch.allclose(L.gan_mse(pred, 1.0), ((pred - 1) ** 2).mean())


def test_masked_loss_ignores_outside_pixels():
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    batch = {"albedo": target, "mask": mask}
    table = (LossTerm("albedo", "albedo", "l1", 1.0),)
    a, _ = L.compute_losses(table, {"albedo": pred}, batch)
    changed = pred.clone()
    changed[:, :, 0] = 100.0  # outside the mask
    b, _ = L.compute_losses(table, {"albedo": changed}, batch)
    assert torch.allclose(a, b)
    assert torch.allclose(a, (pred - target).abs()[:, :, 2:6, 2:6].mean())
    ones, _ = L.compute_losses(table, {"albedo": pred}, {**batch, "mask": torch.ones_like(mask)})
    assert torch.allclose(ones, (pred - target).abs().mean())
    unmasked, _ = L.compute_losses(table, {"albedo": pred}, batch, mask_losses=False)
    assert torch.allclose(unmasked, ones)


def test_every_method_has_a_table():
    for m, spec in METHODS.items():
        names = set(build_model(m).eval()(torch.rand(1, 3, 32, 32)))
        for stage in spec.stages:
            table = L.loss_table(m, stage.name)
            assert table is stage.losses and all(t.weight > 0 for t in table)
            assert {t.output for t in table} <= names


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_reloads_bit_exactly_and_resume_matches(data, tmp_path):
    # Method 5: model, generator, discriminator and three optimisers in the state.
    small = dict(read_first=4, val_split=0.0)
    full = Trainer(_opts(data, tmp_path, 5, epochs=2, log_dir=str(tmp_path / "full"), **small)).fit(log=lambda m: None)
    reloaded = W.load(tmp_path / "full" / "model.safetensors")
    _state_equal(reloaded.state_dict(), full.model.state_dict())
    meta = W.read_metadata(tmp_path / "full" / "model.safetensors")
    assert meta["epoch"] == 2 and meta["trained_by"] == "sfs-train"

    part = Trainer(_opts(data, tmp_path, 5, epochs=1, log_dir=str(tmp_path / "part"), **small)).fit(log=lambda m: None)
    resumed = Trainer(_opts(data, tmp_path, 5, epochs=2, log_dir=str(tmp_path / "part"),
                            load_model=str(tmp_path / "part"), **small))
    assert resumed.epoch == 1
    resumed.fit(log=lambda m: None)
    _state_equal(resumed.model.state_dict(), full.model.state_dict())
    _state_equal(resumed.disc.state_dict(), full.disc.state_dict())
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["train"]["total"] == pytest.approx(
        [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()][1]["train"]["total"])
    assert (tmp_path / "part" / "samples" / "epoch_002.png").is_file()
    assert part.last_good is not None


def test_pretrained_freezes_only_loaded_modules(data, tmp_path):
    source = build_model(0)
    W.save(source, tmp_path / "m0.safetensors")
    trainer = Trainer(_opts(data, tmp_path, 3, load_pretrained_model=str(tmp_path / "m0.safetensors")))
    m = trainer.model
    assert trainer.frozen == set(METHODS[3].frozen_if_loaded)
    # The second albedo branch starts from the first one's weights (SPEC B.6.2).
    _state_equal(m.albedo_residual_model_2.state_dict(), source.albedo_residual_model.state_dict())
    _state_equal(m.conv_model.state_dict(), source.conv_model.state_dict())
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k.split(".")[0] in trainer.frozen}
    batch = _fixed_batch(trainer)
    trainer.set_train_mode()
    for _ in range(2):
        trainer.train_step(batch)
    state = m.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert not torch.equal(state["shading_residual_model.conv4.weight"],
                           build_model(3).state_dict()["shading_residual_model.conv4.weight"])

    # A source that holds only some modules (as an importer reports with loaded_modules).
    partial = build_model(0)
    partial.loaded_modules = {"conv_model", "normal_residual_model"}
    from sfs_fast.training.trainer import transfer_pretrained

    target = build_model(3)
    filled = transfer_pretrained(target, partial)
    assert filled == {"conv_model", "normal_residual_model"}
    assert set(METHODS[3].frozen_if_loaded) & filled == filled


def test_nan_stops_and_keeps_last_checkpoint(data, tmp_path):
    trainer = Trainer(_opts(data, tmp_path, 0, epochs=1, val_split=0.0)).fit(log=lambda m: None)
    good = trainer.last_good
    before = (good / "model.safetensors").read_bytes()
    batch = _fixed_batch(trainer)
    batch["face"][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*epoch-0001"):
        trainer.train_step(batch)
    assert (good / "model.safetensors").read_bytes() == before


def _cli(args, **kw):
    code = "import sys; from sfs_fast.training.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_sigkill_mid_epoch_then_resume(data, tmp_path):
    log_dir = tmp_path / "killed"
    args = ["--method", "0", "--syn_data", str(data), "--log_dir", str(log_dir), "--epochs", "2",
            "--batch_size", "1", "--crop", str(CROP), "--seed", "2", "--threads", "1", "--log-every", "1",
            "--val-split", "0", "--details", "resume test", "--samples", "1"]
    proc = _cli(args)
    latest = log_dir / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.1)
    assert latest.is_file(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    # Now in epoch 2 (6 steps of one sample each): kill it there, without warning.
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    name = latest.read_text().strip()
    assert name == "epoch-0001"
    ckpt = W.load(log_dir / "checkpoints" / name / "model.safetensors")
    assert ckpt.checkpoint_metadata["epoch"] == int(name[-4:])

    resumed = _cli(args + ["--load_model", str(log_dir)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert latest.read_text().strip() == "epoch-0002"
    # The resumed run's save removed what the killed one may have left half-written.
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == ["LATEST", "epoch-0002"]
    assert "resuming" in out
    epochs = [json.loads(x)["epoch"] for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert (log_dir / "details.txt").read_text().strip() == "resume test"
    final = W.load(log_dir / "model.safetensors")
    assert final.checkpoint_metadata["epoch"] == 2
    assert "sfs-train --method 0" in final.checkpoint_metadata["command"]


def test_cli_bad_input_one_line(tmp_path, capsys):
    from sfs_fast.training.cli import train_main

    for args in (["--method", "3", "--syn_data", str(tmp_path / "missing"), "--log_dir", str(tmp_path / "x")],
                 ["--method", "9", "--syn_data", str(tmp_path)],
                 ["--method", "0"]):
        assert train_main(args) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sfs-train: error:"), err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_metrics_are_exact(data, tmp_path):
    from sfs_fast.training.trainer import decomposition_errors

    b, h = 2, 8
    gt = torch.zeros(b, 3, h, h)
    gt[:, 2] = 1.0
    pred = torch.zeros(b, 3, h, h)
    pred[:, 0], pred[:, 2] = 0.5, 3 ** 0.5 / 2  # 30 degrees away
    mask = torch.ones(b, 1, h, h)
    mask[:, :, :, :4] = 0
    albedo = torch.rand(b, 3, h, h)
    off = albedo.clone()
    off[..., 4:] += 0.1
    off[..., :4] += 5.0  # outside the mask: ignored
    m = decomposition_errors({"normal": pred, "albedo": off, "recon": albedo},
                             {"normal": gt, "albedo": albedo, "face": albedo, "mask": mask})
    assert m["normal_deg"] == pytest.approx(30.0, abs=1e-3)
    assert m["albedo_l1"] == pytest.approx(0.1, abs=1e-5) and m["recon_l1"] == 0.0

    # Trainer.evaluate is the mean over the dataset, not diluted by the loss bookkeeping.
    trainer = Trainer(_opts(data, tmp_path, 0, batch_size=2, read_first=2, val_split=0.0))
    ds = trainer.splits.train
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    trainer.model.eval()
    with torch.no_grad():
        direct = decomposition_errors(trainer.model(batch["face"]), batch)
    evaluated = trainer.evaluate(ds)
    for key, value in direct.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-5)


def test_a_registered_method_trains(data, tmp_path):
    """One spec entry is all a new method needs: here a GAN method (joint adversarial stage,
    real albedos from the batch, as no built-in method combines them) trains one step."""
    from sfs_fast.models import GanSpec, MethodSpec, Stage, loss_terms, register_method

    register_method(MethodSpec(
        method=8, slug="test-joint-batch-gan", head="residue", head_module="test_residue_model",
        head_features="ALL", albedo_features="Fa", gan=GanSpec("patch", weight=0.3, real="batch"),
        stages=(Stage("main", loss_terms(("recon", "face", "smooth_l1", 1.0)), adversarial=True),)))
    try:
        trainer = Trainer(_opts(data, tmp_path, "test-joint-batch-gan"))
        head_before = trainer.model.test_residue_model.conv4.weight.clone()
        trainer.set_train_mode()
        parts = trainer.train_step(_fixed_batch(trainer))
        assert {"total", "recon_smooth_l1", "gan_g", "gan_d"} <= set(parts)
        assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
        assert not torch.equal(trainer.model.test_residue_model.conv4.weight, head_before)
        assert trainer.stage == "main" and trainer.total_epochs == 1
    finally:
        METHODS.pop(8)


def test_sample_grid_is_labelled(data, tmp_path):
    from PIL import Image

    from sfs_fast.training.trainer import SAMPLE_COLUMNS

    trainer = Trainer(_opts(data, tmp_path, 3))
    trainer.save_samples(2)
    sheet = np.asarray(Image.open(tmp_path / "m3" / "samples" / "epoch_001.png"))
    size = trainer.splits.val[0]["face"].shape[-1] + 2  # a tile and its gap
    rows = min(2, len(trainer.splits.val))
    top, left = sheet.shape[0] - (rows * size + 2), sheet.shape[1] - (len(SAMPLE_COLUMNS) * size + 2)
    assert top > 0 and left > 0 and sheet[:top].min() < 128 and sheet[top:, :left].min() < 128


def test_freeze_keeps_the_named_modules_fixed(data, tmp_path):
    trainer = Trainer(_opts(data, tmp_path, 0, freeze=("conv_model", "normal_residual_model")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.set_train_mode()
    trainer.train_step(_fixed_batch(trainer))
    after = trainer.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert "light_estimator_model" in changed and not changed & {"conv_model", "normal_residual_model"}
    with pytest.raises(ValueError, match="--freeze: method 0 has no module nope"):
        Trainer(_opts(data, tmp_path, 0, freeze=("nope",)))


def test_a_fresh_residue_head_starts_at_zero_residue(data, tmp_path):
    base = tmp_path / "m0.safetensors"
    W.save(build_model(0), base)
    trainer = Trainer(_opts(data, tmp_path, 4, load_pretrained_model=str(base)))
    with torch.no_grad():
        out = trainer.model.eval()(torch.rand(1, 3, 32, 32))
    assert float(out["residue"].abs().max()) == 0.0
    trainer.set_train_mode()
    trainer.train_step(_fixed_batch(trainer))  # and it learns from there
    with torch.no_grad():
        assert float(trainer.model.eval()(torch.rand(1, 3, 32, 32))["residue"].abs().max()) > 0.0
