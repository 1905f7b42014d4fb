"""The ``openvino`` backend: the graph cut into bf16 / float32 pieces, OpenVINO fp32 against
eager, bf16 within the accuracy budget on the bundled weights with the PyTorch bf16 path's
float32 islands, exported files, the plan's refusals, and a command run."""
import json

import numpy as np
import pytest
import torch

from sfs_fast import precision as P
from sfs_fast.decomposer import Decomposer
from sfs_fast.plan import resolve_plan
from sfs_fast.samples import check_images

pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")
ort = pytest.importorskip("onnxruntime")


def _demo(method):
    from sfs_fast import weights

    return weights.load(weights.default_weights(method)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """method -> an fp32 export of its bundled weights (made once)."""
    from sfs_fast.export import export_onnx

    files = {}

    def get(method):
        if method not in files:
            files[method] = str(tmp_path_factory.mktemp("ov") / f"method{method}.onnx")
            export_onnx(_demo(method), files[method], log=None, sidecar=False)
        return files[method]

    return get


@pytest.fixture(scope="module")
def images():
    return check_images(8)


def _trunk_scopes(method):
    from sfs_fast.export.runner import onnx_scope

    return tuple(onnx_scope(n) + "/" for n in P.low_precision_modules(_demo(method)))


def test_low_precision_modules_are_the_trunks_and_a_residue_head():
    model = _demo(3)
    assert P.low_precision_modules(model) == [*model.ENCODER[1:], "shading_residual_model"]
    assert P.low_precision_modules(_demo(0)) == ["normal_residual_model", "albedo_residual_model"]


@pytest.mark.parametrize("method", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_the_cut_pieces_chained_compute_the_whole_graph(method, exported, images):
    """Independent of OpenVINO: the pieces run one after the other in ONNX Runtime give the
    whole file's outputs, and every node of the file is in exactly one piece's run."""
    import onnx

    from sfs_fast.export.openvino_runner import cut_by_scope

    model = onnx.load(exported(method))
    pieces = cut_by_scope(model, _trunk_scopes(method))
    assert [p[0] for p in pieces] == ["fp32", "bf16", "fp32"]
    whole = ort.InferenceSession(exported(method), providers=["CPUExecutionProvider"])
    names = [o.name for o in whole.get_outputs()]
    want = dict(zip(names, whole.run(names, {"image": images.numpy()})))
    tensors = {"image": images.numpy()}
    for _, piece, inputs, outputs in pieces:
        session = ort.InferenceSession(piece.SerializeToString(), providers=["CPUExecutionProvider"])
        tensors.update(zip(outputs, session.run(outputs, {n: tensors[n] for n in inputs})))
    for name in names:
        np.testing.assert_allclose(tensors[name], want[name], atol=2e-5, rtol=1e-5, err_msg=name)  # fusions differ per piece
    computed = [n.name for _, piece, _, _ in pieces for n in piece.graph.node if n.op_type != "Constant"]
    assert sorted(computed) == sorted(n.name for n in model.graph.node if n.op_type != "Constant")


@pytest.mark.parametrize("method", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_openvino_fp32_equals_eager(method, exported, images):
    dec = Decomposer(onnx=exported(method), backend="openvino")
    assert (dec.backend, dec.precision, dec.method) == ("openvino", "fp32", method)
    ref = P.reference_outputs(_demo(method), images)
    out = dec.decompose(images)
    assert list(out) == list(ref)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=2e-4, rtol=1e-4, msg=name)
    assert set(dec.runner.executed["layers"]) == {"fp32"}


@pytest.mark.parametrize("method", [3, *(pytest.param(m, marks=pytest.mark.slow) for m in (0, 5, 6))])
def test_openvino_bf16_meets_the_budget_with_float_islands(method, exported, images):
    """bf16 in the trunks and the residue head only, as the PyTorch bf16 path: within budget
    on the bundled weights (OpenVINO's own bf16, the whole graph, is not: bench/README.md)."""
    dec = Decomposer(onnx=exported(method), backend="openvino", precision="bf16")
    report = P.check_budget(dec.decompose(images), P.reference_outputs(_demo(method), images))
    assert report["passed"], P.format_metrics(report)
    executed = dec.runner.executed
    if executed["precision_hint"] == "bf16":  # a CPU with bf16: the trunks ran in it, the rest did not
        assert set(executed["layers"]) == {"bf16", "fp32"}
        for node, prec in executed["layer_precisions"].items():
            assert (prec == "bf16") == node.startswith(_trunk_scopes(method)), node


def test_a_model_on_the_openvino_backend_is_its_export(exported, images):
    """Decomposer(model, backend=openvino) exports the model and runs what a file runs."""
    dec = Decomposer(_demo(0), backend="openvino", precision="bf16", threads=2)
    from_file = Decomposer(onnx=exported(0), backend="openvino", precision="bf16", threads=2)
    out, want = dec.decompose(images[:3]), from_file.decompose(images[:3])
    for name in want:
        torch.testing.assert_close(out[name], want[name], atol=0, rtol=0, msg=name)
    assert dec.decompose(images[:1])["normal"].shape == (1, 3, 128, 128)  # another batch size compiles anew


def test_the_plan_refuses_what_openvino_does_not_run():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        resolve_plan(backend="openvino", precision="int8")
    with pytest.raises(ValueError, match="CPU plugin"):
        resolve_plan(backend="openvino", device="cuda")
    with pytest.raises(ValueError, match="onnx or openvino"):
        resolve_plan(backend="fused", onnx_file=True)
    assert resolve_plan(backend="openvino", onnx_file=True).precision is None  # the file's own


def test_openvino_refuses_a_low_precision_file(tmp_path):
    from sfs_fast.export import export_onnx
    from sfs_fast.export.openvino_runner import OpenVinoRunner

    path = tmp_path / "m0_fp16.onnx"
    export_onnx(_demo(0), path, precision="fp16", log=None, sidecar=False, verify_batches=(1,))
    with pytest.raises(ValueError, match="fp32 export, not a fp16"):
        OpenVinoRunner(path)


def test_without_openvino_the_backend_says_which_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ImportError, match=r"sfs_fast\[openvino\]"):
        Decomposer(_demo(0), backend="openvino")


def test_sfs_decompose_runs_the_openvino_backend(tmp_path, capsys):
    from sfs_fast.cli.decompose import main

    rc = main(["examples/faces", str(tmp_path / "out"), "--backend", "openvino", "--precision", "bf16",
               "--threads", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert rows and all((r["plan"]["backend"], r["plan"]["precision"]) == ("openvino", "bf16") for r in rows)
    assert "(openvino bf16, as requested)" in capsys.readouterr().err


def test_sfs_decompose_runs_an_onnx_file_on_openvino(tmp_path, capsys, exported):
    from sfs_fast.cli.common import EXIT_USAGE
    from sfs_fast.cli.decompose import main

    rc = main(["examples/faces", str(tmp_path / "out"), "--onnx", exported(0), "--backend", "openvino",
               "--precision", "bf16", "--threads", "2", "--faces", "off"])
    assert rc == 0 and "(openvino bf16, as requested)" in capsys.readouterr().err
    assert main(["examples/faces", str(tmp_path / "out2"), "--onnx", exported(0), "--backend", "eager"]) == EXIT_USAGE
    assert "--onnx needs --backend onnx or openvino" in capsys.readouterr().err
