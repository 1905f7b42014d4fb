"""Checkpoints: bit-exact round trips, metadata, refusals."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sfs_fast import METHODS, build_model
from sfs_fast import weights
from sfs_fast.models import SkipNet


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_roundtrip_bit_exact(tmp_path, method):
    upsample = "caffe" if method % 2 else "bilinear"
    model = build_model(method, upsample=upsample).eval()
    for m in model.modules():  # non-default statistics, so buffers are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    path = weights.save(model, tmp_path / f"m{method}.safetensors", note="test")
    loaded = weights.load(path)
    assert loaded.method == method and loaded.config.upsample == upsample
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out_a, out_b = model(x), loaded(x)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k]), k
    meta = weights.read_metadata(path)
    assert meta["method"] == method and meta["note"] == "test"
    assert meta["convention"]["sh_channel_blocks"].startswith("R|G|B")
    assert not list(tmp_path.glob("*.tmp"))


def test_refuses_other_method(tmp_path):
    path = weights.save(build_model(3), tmp_path / "m3.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"holds method 3 \(shading-residue\), not method 0"):
        weights.load(path, method=0)
    assert weights.load(path, method="shading-residue").method == 3


def test_refuses_architecture_override(tmp_path):
    path = weights.save(build_model(0, upsample="caffe"), tmp_path / "m0.safetensors")
    with pytest.raises(weights.CheckpointError, match="upsample"):
        weights.load(path, upsample="bilinear")
    assert weights.load(path, shading_backend="reference").config.shading_backend == "reference"


def test_refuses_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(weights.CheckpointError, match="not an sfs_fast checkpoint"):
        weights.load(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(weights.CheckpointError, match="not a readable"):
        weights.load(junk)


def test_refuses_tensors_that_do_not_fit(tmp_path):
    path = weights.save(build_model(0), tmp_path / "m0.safetensors")
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in weights.read_metadata(path).items()}
    meta["method"] = "3"
    state = build_model(0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    with pytest.raises(weights.CheckpointError, match="do not fit"):
        weights.load(path)


def test_fp16_storage_halves_size_and_loads_as_float32(tmp_path):
    model = build_model(0)
    full = weights.save(model, tmp_path / "full.safetensors")
    half = weights.save(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = weights.load(half)
    w = loaded.conv_model.conv1[0].weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.conv_model.conv1[0].weight.half().float())


def test_skipnet_roundtrip(tmp_path):
    model = SkipNet()
    path = weights.save(model, tmp_path / "skip.safetensors")
    loaded = weights.load(path)
    assert isinstance(loaded, SkipNet)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(weights.CheckpointError, match="SkipNet"):
        weights.load(path, method=0)


def _trained_on_frozen_trunk(base_model, method):
    """A method-``method`` model whose trunk is the base's and whose head is its own."""
    model = build_model(method)
    model.load_state_dict(base_model.state_dict(), strict=False)
    return model


def test_checkpoint_against_a_base_stores_only_what_differs(tmp_path):
    base_model = build_model(0)
    base = weights.save(base_model, tmp_path / "base.safetensors", dtype=torch.float16)
    model = _trained_on_frozen_trunk(weights.load(base), 3)
    full = weights.save(model, tmp_path / "full.safetensors", dtype=torch.float16)
    delta = weights.save(model, tmp_path / "delta.safetensors", dtype=torch.float16, base=base)
    meta = weights.read_metadata(delta)
    # The trunk modules method 3 shares with method 0 come from the base; its own head and
    # second albedo branch (built fresh here) are stored.
    assert "conv_model" in meta["base"]["modules"] and "shading_residual_model" not in meta["base"]["modules"]
    assert meta["base"]["tensors_sha256"] == weights.read_metadata(base)["tensors_sha256"]
    assert delta.stat().st_size < 0.7 * full.stat().st_size
    a, b = weights.load(full).state_dict(), weights.load(delta).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weights._problem(delta) is None


def test_checkpoint_whose_base_is_gone_or_changed_is_refused(tmp_path):
    base = weights.save(build_model(0), tmp_path / "base.safetensors")
    delta = weights.save(_trained_on_frozen_trunk(weights.load(base), 1), tmp_path / "delta.safetensors", base=base)
    weights.save(build_model(0), base)  # other weights under the base's name
    with pytest.raises(weights.CheckpointError, match="not on this machine"):
        weights.load(delta)
    assert "not on this machine" in weights._problem(delta)
    with pytest.raises(weights.CheckpointError, match="itself stored against a base"):
        weights.save(build_model(1), tmp_path / "d2.safetensors", base=delta)
