"""The export cache: the onnx and openvino backends of a model export once per weights."""
from types import SimpleNamespace

import pytest
import torch

from sfs_fast import build_model
from sfs_fast.decomposer import Decomposer
from sfs_fast.export import export_cache, onnx_export

pytest.importorskip("onnxruntime")


@pytest.fixture
def exports(tmp_path, monkeypatch):
    """The cache on, in a folder of its own (``.folder``); ``.calls``: the real exports' targets."""
    folder = tmp_path / "exports"
    monkeypatch.setenv(export_cache.CACHE_ENV, str(folder))
    real, calls = onnx_export.export_onnx, []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counting)
    return SimpleNamespace(folder=folder, calls=calls)


def _model(seed):
    torch.manual_seed(seed)
    return build_model(0).eval()


def test_the_second_open_reads_the_file_and_new_weights_export_again(exports):
    images = torch.rand(2, 3, 128, 128)
    model = _model(0)
    first = Decomposer(model, backend="onnx").decompose(images)
    again = Decomposer(model, backend="onnx").decompose(images)
    assert len(exports.calls) == 1 and len(list(exports.folder.glob("*.onnx"))) == 1
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    Decomposer(_model(1), backend="onnx")  # other weights: another file
    assert len(exports.calls) == 2 and len(list(exports.folder.glob("*.onnx"))) == 2
    # the options are in the key too
    assert export_cache.export_key(model, {"precision": "fp32"}) != export_cache.export_key(model, {"precision": "int8"})


def test_a_damaged_file_is_exported_again_and_off_writes_nothing(exports, monkeypatch):
    model = _model(0)
    Decomposer(model, backend="onnx")
    (cached,) = exports.folder.glob("*.onnx")
    cached.write_bytes(cached.read_bytes()[:1000])  # cut short
    dec = Decomposer(model, backend="onnx")
    assert len(exports.calls) == 2 and cached.stat().st_size > 1000
    assert dec.decompose(torch.rand(1, 3, 128, 128))["normal"].shape == (1, 3, 128, 128)

    monkeypatch.setenv(export_cache.CACHE_ENV, "off")
    Decomposer(_model(2), backend="onnx")
    assert len(exports.calls) == 3 and list(exports.folder.glob("*.onnx")) == [cached]
    assert str(exports.folder) not in exports.calls[-1]  # a temporary folder
