"""sfs-convert: Caffe .h5 and .pth -> safetensors that load to the same model; bad input
gives one stderr line, a non-zero exit and no output file."""
import subprocess
import sys

import pytest
import torch

import caffe_reference as cr
from sfs_fast import build_model, weights
from sfs_fast.cli.convert import main
from sfs_fast.importers import import_caffe_h5


@pytest.fixture(scope="module")
def caffe_h5(tmp_path_factory):
    layers = cr.deploy_layers()
    blobs = cr.random_blobs(layers, seed=21)  # random statistics: only equality is checked here
    return cr.write_caffe_h5(tmp_path_factory.mktemp("cli") / "SfSNet.caffemodel.h5", blobs, layers)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(code, err):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfs-convert: error:"), err
    assert "Traceback" not in err


def test_h5_to_safetensors_loads_the_same_model(tmp_path, capsys, caffe_h5):
    dst = tmp_path / "sfsnet.safetensors"
    code, out, err = _run(capsys, caffe_h5, "-o", dst)
    assert code == 0, err
    assert "wrote" in out and dst.is_file()
    direct = import_caffe_h5(caffe_h5)
    loaded = weights.load(dst)
    assert loaded.method == 0 and loaded.config.upsample == "caffe"
    sd_direct, sd_loaded = direct.state_dict(), loaded.state_dict()
    assert sd_direct.keys() == sd_loaded.keys()
    assert all(torch.equal(sd_direct[k], sd_loaded[k]) for k in sd_direct)
    x = torch.rand(1, 3, 32, 32)  # fully convolutional up to a global mean; small is enough here
    with torch.no_grad():
        a, b = direct(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = weights.read_metadata(dst)
    assert meta["source_format"] == "caffe-h5" and meta["source"] == caffe_h5.name
    assert meta["source_sha256"] == weights.file_sha256(caffe_h5)
    assert "conv_model" in meta["loaded_modules"]


def test_h5_to_other_method_and_fp16(tmp_path, capsys, caffe_h5):
    dst = tmp_path / "m3.safetensors"
    code, _, err = _run(capsys, caffe_h5, "-o", dst, "--method", "shading-residue", "--fp16")
    assert code == 0, err
    model = weights.load(dst)
    meta = weights.read_metadata(dst)
    assert model.method == 3 and meta["stored_dtype"] == "float16"
    assert "shading_residual_model" not in meta["loaded_modules"]
    assert "albedo_residual_model_2" in meta["loaded_modules"]
    assert model.loaded_modules == meta["loaded_modules"]  # what the trainer freezes


def test_pth_pipeline_round_trip_and_wrong_method(tmp_path, capsys):
    torch.manual_seed(3)
    model = build_model(4).eval()
    src = tmp_path / "method4.pth"
    torch.save(model.state_dict(), src)
    dst = tmp_path / "m4.safetensors"
    code, _, err = _run(capsys, src, "-o", dst)
    assert code == 0, err
    loaded = weights.load(dst)
    assert loaded.method == 4
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.state_dict().items())
    # A method-4 checkpoint is not a method-1 one: as .pth and as safetensors.
    for source in (src, dst):
        out = tmp_path / f"wrong_{source.suffix[1:]}.safetensors"
        code, _, err = _run(capsys, source, "-o", out, "--method", "1")
        _assert_one_error_line(code, err)
        assert "method" in err and not out.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_inputs_give_one_line(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, _, err = _run(capsys, tmp_path / "missing.h5", "-o", out)
    _assert_one_error_line(code, err)
    assert "no such file" in err
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    code, _, err = _run(capsys, text, "-o", out)
    _assert_one_error_line(code, err)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x04garbage")
    code, _, err = _run(capsys, garbage, "-o", out)
    _assert_one_error_line(code, err)
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, unknown)
    code, _, err = _run(capsys, unknown, "-o", out)
    _assert_one_error_line(code, err)
    assert "layout" in err
    code, _, err = _run(capsys, unknown, "-o", out, "--method", "9")
    _assert_one_error_line(code, err)
    assert not out.exists()


def test_console_process_reports_one_line(tmp_path):
    """The installed command path: a separate process, exit code and stderr as a user sees them."""
    proc = subprocess.run([sys.executable, "-m", "sfs_fast.cli.convert", str(tmp_path / "nope.pth"),
                           "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"sfs-convert: error: {tmp_path / 'nope.pth'}: no such file"]
