"""ONNX export: every method and both upsampling modes run in ONNX Runtime with PyTorch's
numbers; the command's checks, metadata and failures; the runner and the Decomposer's onnx
backend. The independent reference is always eager PyTorch (reference shading) compared
with an ONNX Runtime session opened here, not through the code under test."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import calibrate_batchnorm
from sfs_fast import build_model, output_names
from sfs_fast import weights as weights_mod
from sfs_fast.export import OnnxRunner, ParityError, export_onnx
from sfs_fast.export.cli import main as export_main
from sfs_fast.sh import CONVENTION

METHODS = range(8)
UPSAMPLES = ("bilinear", "caffe")


def realistic_model(method, upsample="bilinear", seed=0):
    """A random model with calibrated BatchNorm statistics and a normal head whose raw
    output is about unit length and faces the camera, as a trained one's is. A random head
    makes raw normals of any length, some near zero, where normalizing turns a 1e-6
    difference in the trunk into 1e-4 in the unit normal, which says nothing about the export."""
    torch.manual_seed(seed)
    model = calibrate_batchnorm(build_model(method, upsample=upsample), steps=1, batch=2, seed=seed)
    with torch.no_grad():
        model.normal_gen_model.conv3.weight.mul_(0.25)
        model.normal_gen_model.conv3.bias.mul_(0.25).add_(torch.tensor([0.0, 0.0, 1.0]))
    return model


def eager(model, x):
    ref = build_model(model.method, **{**model.config.to_dict(), "shading_backend": "reference"})
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        return {k: v.numpy() for k, v in ref.eval()(torch.from_numpy(x)).items()}


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``get(method, upsample) -> (model, path, result)``, each exported once per module."""
    folder = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(method, upsample="bilinear"):
        key = (method, upsample)
        if key not in cache:
            model = realistic_model(method, upsample)
            path = folder / f"m{method}_{upsample}.onnx"
            # the export verifies itself at batch 1; the tests check 1 and 5 on their own
            result = export_onnx(model, path, verify_batches=(1,), seed=1, log=None)
            cache[key] = (model, path, result)
        return cache[key]

    return get


# Every method and both upsampling modes run by default, each method in one mode (the pairs
# other tests export anyway among them); the other mode of each method is slow (~10 s each).
DEFAULT_EXPORTS = {(0, "bilinear"), (1, "caffe"), (2, "bilinear"), (3, "bilinear"), (3, "caffe"),
                   (4, "bilinear"), (5, "caffe"), (6, "bilinear"), (7, "caffe")}


@pytest.mark.parametrize("method,upsample", [
    pytest.param(m, u, marks=() if (m, u) in DEFAULT_EXPORTS else pytest.mark.slow)
    for m in METHODS for u in UPSAMPLES])
def test_every_method_matches_pytorch_at_batch_1_and_5(exported, method, upsample):
    model, path, result = exported(method, upsample)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "custom-domain operator in the graph"
    if upsample == "caffe":
        assert "ConvTranspose" in ops
    names = output_names(method)
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == names
    assert [i.name for i in sess.get_inputs()] == ["image"]
    x = np.random.default_rng(100 + method).random((5, 3, 128, 128), dtype=np.float32)
    ref = eager(model, x)
    for batch in (1, 5):  # one file, two batch sizes
        got = dict(zip(names, sess.run(names, {"image": x[:batch]})))
        for name in names:
            assert got[name].shape == ref[name][:batch].shape, name
            err = float(np.abs(got[name] - ref[name][:batch]).max())
            assert err <= 1e-4, f"method {method} {upsample} batch {batch} {name}: max abs {err:.2e}"
    assert result.passed and set(result.parity) == set(names)
    # the light (the 64x64 average and fc) is a real output, not a constant
    if "light" in names:
        assert np.abs(ref["light"][0] - ref["light"][1]).max() > 1e-3


def test_metadata_and_sidecar(exported):
    model, path, result = exported(3)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["method"] == "3" and meta["slug"] == "shading-residue"
    assert json.loads(meta["output_names"]) == output_names(3)
    assert json.loads(meta["sh_convention"]) == json.loads(json.dumps(CONVENTION))
    assert meta["opset"] == "17" and meta["precision"] == "fp32"
    assert json.loads(meta["input"])["shape"] == ["batch", 3, 128, 128]
    assert json.loads(meta["input"])["range"] == [0.0, 1.0]
    parity = json.loads(meta["parity"])
    assert set(parity["outputs"]) == set(output_names(3))
    assert all(v["max_abs"] <= 1e-4 for v in parity["outputs"].values())
    for key in ("torch", "onnx", "onnxruntime"):
        assert json.loads(meta["versions"])[key]
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["method"] == "3" and side["output_names"] == output_names(3)
    assert side["size_bytes"] == path.stat().st_size
    opset = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17


def test_runner_returns_the_model_outputs(exported):
    model, path, _ = exported(3)
    runner = OnnxRunner(path, threads=2)
    assert runner.method == 3 and runner.output_names == output_names(3) and runner.batch is None
    assert runner.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(7).random((3, 3, 128, 128), dtype=np.float32)
    out, ref = runner.run(x), eager(model, x)
    assert list(out) == output_names(3)
    for name in out:
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], ref[name], rtol=0, atol=1e-4)
    assert {k: v.shape for k, v in runner.run(x[:0]).items()} == {k: (0,) + v.shape[1:] for k, v in ref.items()}
    with pytest.raises(ValueError, match="images"):
        runner.run(np.zeros((1, 3, 64, 64), np.float32))


def test_runner_warns_when_cuda_falls_back_to_cpu(exported):
    _, path, _ = exported(3)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        runner = OnnxRunner(path, device="cuda")
    assert runner.providers == ["CPUExecutionProvider"]


def test_decomposer_onnx_backends_agree_with_eager(exported, tmp_path):
    from sfs_fast import Decomposer

    model, path, _ = exported(3)
    x = torch.from_numpy(np.random.default_rng(3).random((2, 3, 128, 128), dtype=np.float32))
    ref = Decomposer(model, backend="eager").decompose(x)
    from_file = Decomposer(onnx=path, backend="onnx", threads=2).decompose(x)
    from_model = Decomposer(model, backend="onnx", threads=2).decompose(x)
    for out in (from_file, from_model):
        assert list(out) == list(ref)
        for name in ref:
            assert isinstance(out[name], torch.Tensor)
            torch.testing.assert_close(out[name], ref[name], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="method"):
        Decomposer(onnx=path, backend="onnx", method=0)


def test_file_runs_with_onnxruntime_alone(exported, tmp_path):
    model, path, _ = exported(4)
    x = np.random.default_rng(11).random((2, 3, 128, 128), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {{"image": np.load({str(tmp_path / 'x.npy')!r})}})
        np.savez({str(tmp_path / 'out.npz')!r}, **dict(zip(names, outs)))
        assert "torch" not in sys.modules, "torch was imported"
        print("ok", ",".join(names))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok " + ",".join(output_names(4))
    got, ref = np.load(tmp_path / "out.npz"), eager(model, x)
    for name in output_names(4):
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-4)


def test_parity_failure_keeps_no_output(exported, tmp_path):
    model, _, _ = exported(0)
    target = tmp_path / "m0.onnx"
    with pytest.raises(ParityError, match="beyond atol"):
        export_onnx(model, target, atol=1e-12, verify_batches=(1,), log=None)
    assert not target.exists() and not target.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.failed.onnx"]  # no temporary left either


def test_command_exports_a_checkpoint_with_fixed_batch(tmp_path, capsys):
    model = realistic_model(2)
    ckpt = weights_mod.save(model, tmp_path / "m2.safetensors")
    out = tmp_path / "m2.onnx"
    code = export_main(["--method", "latent-shading", "--onnx", "-o", str(out), "--weights", str(ckpt),
                        "--batch", "2", "--json", "--seed", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["failed_methods"] == [] and report["results"][0]["batch"] == 2
    assert set(report["results"][0]["parity"]) == set(output_names(2))
    assert "max abs" in captured.err  # the parity table goes to stderr with --json
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["source_sha256"] == weights_mod.file_sha256(ckpt)
    runner = OnnxRunner(out, threads=2)
    assert runner.batch == 2 and runner.method == 2
    x = np.random.default_rng(2).random((2, 3, 128, 128), dtype=np.float32)
    ref = eager(model, x)
    for name, value in runner.run(x).items():
        np.testing.assert_allclose(value, ref[name], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="batch 2"):
        runner.run(x[:1])


@pytest.mark.parametrize("argv, message", [
    (["--method", "9"], "unknown method"),
    (["--method", "0", "-o", "{tmp}/missing/m.onnx"], "does not exist"),
    (["--method", "0", "-o", "{tmp}/m.txt"], "must end in .onnx"),
    (["--method", "0", "--opset", "9"], "--opset 9"),
    (["--method", "0", "--batch", "0"], "--batch"),
    (["--method", "3", "--weights", "{tmp}/m0.safetensors", "-o", "{tmp}/m.onnx"], "holds method 0"),
    (["--method", "0", "--weights", "{tmp}/none.safetensors"], "no such checkpoint"),
    (["--all", "--weights", "{tmp}/m0.safetensors"], "--all"),
    (["--method", "0", "--int8-layers", "all"], "--int8-layers"),
])
def test_command_bad_input_is_one_line(tmp_path, capsys, argv, message):
    weights_mod.save(build_model(0), tmp_path / "m0.safetensors")
    code = export_main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("sfs-export: error:") and message in err[0], err
    assert not list(tmp_path.glob("*.onnx"))


def _quantized_convs(proto) -> set:
    """Conv nodes whose weight comes out of a DequantizeLinear (int8 weights)."""
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    return {n.name for n in proto.graph.node if n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear"}


def test_int8_quantizes_the_budget_layers_and_keeps_outputs_float(exported, tmp_path):
    from sfs_fast.export.quantize import output_convolutions
    from sfs_fast.samples import face_like_images

    model, _, _ = exported(0)
    calib = face_like_images(4, np.random.default_rng(0))
    path = tmp_path / "m0_int8.onnx"
    result = export_onnx(model, path, precision="int8", calibration=calib, verify_batches=(1,), seed=3, log=None)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # exactly the first convolution of the albedo trunk's first residual block holds int8 weights
    expected = {"/model/albedo_residual_model/block1/res/res.2/Conv"}
    assert _quantized_convs(proto) == expected
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)
    assert len(output_convolutions(proto)) == 2  # normal and albedo heads of method 0, float
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["int8_layers"] == "budget"
    assert json.loads(meta["parity"])["criterion"] == "mean"
    assert result.passed
    sess = session(path)
    assert sess.get_inputs()[0].type == "tensor(float)"
    x = face_like_images(2, np.random.default_rng(9))
    names = output_names(0)
    got, ref = dict(zip(names, sess.run(names, {"image": x}))), eager(model, x)
    for name in names:
        scale = max(1.0, float(np.abs(ref[name]).max()))
        assert np.abs(got[name] - ref[name]).mean() <= 1e-1 * scale, name
        assert not np.array_equal(got[name], ref[name])  # it really is another graph


def test_int8_all_layers_quantizes_every_convolution_but_the_outputs(exported, tmp_path):
    from sfs_fast.export.quantize import output_convolutions, quantized_convolutions
    from sfs_fast.samples import face_like_images

    model, _, _ = exported(3)
    path = tmp_path / "m3_int8_all.onnx"
    export_onnx(model, path, precision="int8", calibration=face_like_images(2, np.random.default_rng(0)),
                int8_layers="all", atol=1e6, verify_batches=(1,), log=None)
    proto = onnx.load(str(path))
    convs = {n.name for n in proto.graph.node if n.op_type == "Conv"}
    outputs = set(output_convolutions(proto))
    assert len(outputs) == 3 and _quantized_convs(proto) == convs - outputs
    assert {p.key: p.value for p in proto.metadata_props}["int8_layers"] == "all"
    with pytest.raises(ValueError, match="int8_layers"):
        quantized_convolutions(proto, "some")


@pytest.mark.slow
@pytest.mark.parametrize("method", [0, 3])
def test_fp16_keeps_float32_io_and_parity(exported, tmp_path, method):
    model, _, _ = exported(method)
    path = tmp_path / f"m{method}_fp16.onnx"
    export_onnx(model, path, precision="fp16", seed=4, log=None)
    proto = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    sess = session(path)
    assert sess.get_inputs()[0].type == "tensor(float)"
    assert all(o.type == "tensor(float)" for o in sess.get_outputs())
    x = np.random.default_rng(5).random((2, 3, 128, 128), dtype=np.float32)
    names = output_names(method)
    got, ref = dict(zip(names, sess.run(names, {"image": x}))), eager(model, x)
    for name in names:
        scale = max(1.0, float(np.abs(ref[name]).max()))
        assert np.abs(got[name] - ref[name]).max() <= 5e-2 * scale, name


@pytest.mark.slow
def test_command_all_methods_into_a_folder(tmp_path):
    code = export_main(["--all", "--onnx", "-o", str(tmp_path / "onnx"), "--upsample", "caffe", "--seed", "0"])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 8 and files[0] == "method0-sfsnet.onnx"
    for m in range(8):
        assert OnnxRunner(next((tmp_path / "onnx").glob(f"method{m}-*.onnx"))).method == m


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 20])
def test_other_opsets(exported, tmp_path, opset):
    model, _, _ = exported(3, "caffe")
    result = export_onnx(model, tmp_path / "m.onnx", opset=opset, seed=0, log=None)
    assert result.passed and result.opset == opset
