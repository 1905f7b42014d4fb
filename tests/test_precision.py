"""Low-precision paths (sfs_fast.precision + Decomposer(precision=...)): the accuracy budget
against an independent float64 NumPy computation, capability forcing, the backend/precision
pairs, every method through bf16 and int8 at batch 2 within the budget, and ``auto`` never
taking a path that misses the budget."""
import math

import numpy as np
import pytest
import torch

from sfs_fast import precision as P
from sfs_fast.decomposer import Decomposer
from sfs_fast.models import METHODS, build_model, output_names
from sfs_fast.plan import resolve_plan
from sfs_fast.samples import check_images, example_faces

from conftest import calibrate_batchnorm


# ---------------------------------------------------------------------------------------
# The budget, against NumPy written here


def _numpy_metrics(out, ref):
    """The budget metrics in float64 NumPy, independently of sfs_fast.precision."""
    m = {}
    a, b = out["normal"].numpy().astype(np.float64), ref["normal"].numpy().astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    ang = np.degrees(np.arccos(np.clip((a * b).sum(1), -1, 1))).ravel()
    m["normal_median_deg"] = np.median(ang)
    m["normal_p99_deg"] = np.percentile(ang, 99)
    for name in ("albedo", "shading", "recon"):
        x, y = out[name].numpy().astype(np.float64), ref[name].numpy().astype(np.float64)
        m[f"{name}_range"] = np.abs(x - y).max() / (y.max() - y.min())
    la, lb = out["light"].numpy().astype(np.float64), ref["light"].numpy().astype(np.float64)
    m["light_rel"] = (np.linalg.norm(la - lb, axis=1) / np.linalg.norm(lb, axis=1)).max()
    return m


def _outputs(gen, b=2, s=16):
    n = torch.randn(b, 3, s, s, generator=gen)
    n[:, 2] = n[:, 2].abs() + 1.0
    return {"normal": n / n.norm(dim=1, keepdim=True), "albedo": torch.rand(b, 3, s, s, generator=gen),
            "shading": torch.rand(b, 3, s, s, generator=gen) * 2, "recon": torch.rand(b, 3, s, s, generator=gen),
            "light": torch.randn(b, 27, generator=gen), "residue": torch.randn(b, 3, s, s, generator=gen)}


def _rotate(normal, degrees):
    """Rotate every normal by ``degrees`` about an axis perpendicular to it."""
    n = normal.double()
    helper = torch.zeros_like(n)
    helper[:, 0] = 1.0
    axis = torch.cross(n, helper, dim=1)
    axis = axis / axis.norm(dim=1, keepdim=True)
    t = math.radians(degrees)
    return (n * math.cos(t) + torch.cross(axis, n, dim=1) * math.sin(t)).float()


def test_budget_metrics_match_numpy():
    gen = torch.Generator().manual_seed(1)
    ref = _outputs(gen)
    out = {k: v + 0.003 * torch.randn(v.shape, generator=gen) for k, v in ref.items()}
    report = P.check_budget(out, ref)
    expected = _numpy_metrics(out, ref)
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert "residue_range" in report["metrics"]  # measured, not gated


@pytest.mark.parametrize("change, passes", [
    (lambda o: o, True),
    (lambda o: {**o, "albedo": o["albedo"] + 0.009 * (o["albedo"].max() - o["albedo"].min())}, True),
    (lambda o: {**o, "albedo": o["albedo"] + 0.011 * (o["albedo"].max() - o["albedo"].min())}, False),
    (lambda o: {**o, "recon": o["recon"].clone().index_put_((torch.tensor([0]),) * 4, torch.tensor(9.0))}, False),
    (lambda o: {**o, "light": o["light"] * 1.009}, True),
    (lambda o: {**o, "light": o["light"] * 1.011}, False),
    (lambda o: {**o, "normal": _rotate(o["normal"], 0.9)}, True),
    (lambda o: {**o, "normal": _rotate(o["normal"], 1.2)}, False),  # median and p99 over
    (lambda o: {**o, "shading": o["shading"] * float("nan")}, False),
    (lambda o: {**o, "residue": o["residue"] * 5}, True),  # not gated
])
def test_budget_gates(change, passes):
    ref = _outputs(torch.Generator().manual_seed(2))
    report = P.check_budget(change(dict(ref)), ref)
    assert report["passed"] is passes, report["failures"]


def test_budget_p99_alone():
    """2% of the pixels off by 5 degrees: the median passes, the 99th percentile fails."""
    ref = _outputs(torch.Generator().manual_seed(3), b=1, s=50)
    n = ref["normal"].clone()
    flat = n.view(1, 3, -1)
    flat[..., :50] = _rotate(n, 5.0).view(1, 3, -1)[..., :50]
    report = P.check_budget({**ref, "normal": n}, ref)
    assert report["metrics"]["normal_median_deg"] < 1e-3
    assert not report["passed"] and any("p99" in f for f in report["failures"])


# ---------------------------------------------------------------------------------------
# Capabilities and the (backend, precision) pairs


def test_capabilities_forced_and_env(monkeypatch):
    caps = P.capabilities("cpu")
    assert caps["fp32"] is True and set(caps) >= {"bf16", "fp16", "int8", "why"}
    flags = P.cpu_flags()
    if flags:
        assert caps["bf16"] == bool(flags & {"amx_bf16", "avx512_bf16"})
    with P.forced_capabilities(bf16=False, int8=False):
        forced = P.capabilities("cpu")
        assert forced["bf16"] is False and forced["int8"] is False and forced["why"]["bf16"] == "forced"
    assert P.capabilities("cpu")["bf16"] == caps["bf16"]  # restored
    monkeypatch.setenv("SFS_FAST_FORCE_CAPS", "bf16=1,int8=0")
    assert P.capabilities("cpu")["bf16"] is True and P.capabilities("cpu")["int8"] is False


@pytest.mark.parametrize("precision, backend, device, expected", [
    (None, None, "cpu", ("fused", "fp32")),
    ("int8", None, "cpu", ("onnx", "int8")),
    ("bf16", None, "cpu", ("fused", "bf16")),
    ("bf16", "compile", "cpu", ("compile", "bf16")),
    ("fp16", "onnx", "cpu", ("onnx", "fp16")),
    ("auto", None, "cpu", (None, "auto")),  # auto with no backend chooses among all of them
    ("auto", "compile", "cpu", ("compile", "auto")),
])
def test_resolve(precision, backend, device, expected):
    plan = resolve_plan(precision=precision, backend=backend, device=device)
    assert (plan.backend, plan.precision) == expected


@pytest.mark.parametrize("precision, backend, words", [
    ("int8", "fused", "ONNX Runtime"), ("bf16", "eager", "baseline"), ("bf16", "onnx", "PyTorch path"),
    ("fp16", "fused", "CUDA"), ("fp64", None, "unknown precision"),
])
def test_resolve_rejects(precision, backend, words):
    with pytest.raises(ValueError, match=words):
        resolve_plan(precision=precision, backend=backend, device="cpu")
    with pytest.raises(ValueError, match=words):
        Decomposer(torch.nn.Identity(), precision=precision, backend=backend)


def test_auto_candidates_follow_capabilities(without_openvino):
    with P.forced_capabilities(bf16=False, int8=False):  # a CPU without AMX or VNNI
        assert P.auto_candidates(None, "cpu") == [("fused", "fp32")]
        assert P.auto_candidates("onnx", "cpu") == [("onnx", "fp32")]
    with P.forced_capabilities(bf16=True, int8=True):
        assert P.auto_candidates(None, "cpu") == [("fused", "bf16"), ("onnx", "int8"), ("fused", "fp32")]
        assert P.auto_candidates("compile", "cpu") == [("compile", "bf16"), ("compile", "fp32")]
        assert P.auto_candidates("eager", "cpu") == [("eager", "fp32")]
        assert [r["why"] for r in P.auto_choices(None, "cpu")[1]] == ["openvino is not installed"] * 2


def test_auto_candidates_take_openvino_where_it_is_installed():
    pytest.importorskip("openvino")
    with P.forced_capabilities(bf16=True, int8=True):
        assert P.auto_candidates(None, "cpu") == [("openvino", "bf16"), ("fused", "bf16"), ("openvino", "fp32"),
                                                 ("onnx", "int8"), ("fused", "fp32")]
        assert P.auto_candidates("openvino", "cpu") == [("openvino", "bf16"), ("openvino", "fp32")]
        assert P.auto_candidates("fused", "cpu") == [("fused", "bf16"), ("fused", "fp32")]
    with P.forced_capabilities(bf16=False, int8=False):
        assert P.auto_candidates(None, "cpu") == [("openvino", "fp32"), ("fused", "fp32")]


# ---------------------------------------------------------------------------------------
# The paths, every method at batch 2


class _Models(dict):
    """Calibrated random models, built on first use."""

    def __missing__(self, method):
        from sfs_fast import build_model

        torch.manual_seed(method)
        self[method] = calibrate_batchnorm(build_model(method), steps=2, batch=2)
        return self[method]


@pytest.fixture(scope="module")
def models():
    return _Models()


def _check_shapes(out, ref, method):
    assert sorted(out) == sorted(output_names(method))
    for k, v in out.items():
        assert v.dtype == torch.float32 and v.shape == ref[k].shape, k
        assert torch.isfinite(v).all(), k


class _DemoBased(dict):
    """Every method as a checkpoint with trained encoder features, built on first use: the
    bundled demo weights where they exist (methods 0 and 3); for the other methods, method
    3's weights (encoder, generation nets, light, and its residue head for the other residue
    methods), method 0's first-albedo trunk, and seeded random heads for methods 1 and 2
    with BatchNorm statistics measured on the example faces. Realistic encoder features are
    what the low-precision paths are judged on: the decoders stay float32."""

    def __missing__(self, method):
        from sfs_fast import build_model, weights
        from sfs_fast.models import calibrate_batchnorm as calibrate

        path = weights.default_weights(method)
        if path is not None:
            self[method] = weights.load(path).eval()
            return self[method]
        demo0, demo3 = self[0].state_dict(), self[3].state_dict()
        torch.manual_seed(method)
        model = build_model(method)
        own, spec = model.state_dict(), METHODS[method]
        state = {k: v for k, v in demo3.items() if k in own}
        state.update({k: v for k, v in demo0.items() if k.startswith("albedo_residual_model.") and k in own})
        if spec.head == "residue":
            state.update({spec.head_module + k[len("shading_residual_model"):]: v
                          for k, v in demo3.items() if k.startswith("shading_residual_model.")})
        model.load_state_dict(state, strict=False)
        untrained = {k.split(".")[0] for k in own if k not in state}
        self[method] = calibrate(model, [torch.from_numpy(example_faces())], modules=untrained)
        return self[method]


@pytest.fixture(scope="module")
def demo_based():
    return _DemoBased()


@pytest.fixture(scope="module")
def example_pair():
    """Two of the bundled example faces: the batch-2 inputs the budget is checked on."""
    return torch.from_numpy(example_faces()[:2].copy())


def test_bf16_layers_follow_the_encoder_rule(models):
    """bf16 computes the trunks' convolutions (the encoder but its first part) and a residue
    head's; decoders, light and other heads keep float32 weights; BatchNorm keeps float32
    parameters everywhere."""
    low = P.to_low_precision(models[3], torch.bfloat16)
    islands = set(P.float_islands(low))
    assert {"conv_model.conv1.0", "conv_model.conv2.0", "conv_model.conv3", "normal_gen_model.conv3",
            "albedo_gen_model.conv2.0", "light_estimator_model.conv1.0", "light_estimator_model.fc"} <= islands
    assert not any(n.startswith(("normal_residual_model", "albedo_residual_model", "albedo_residual_model_2",
                                 "shading_residual_model")) for n in islands)
    assert P.bf16_heads(models[3]) == ("shading_residual_model",)
    for method, head in ((1, "shading_correctness_model"), (2, "shading_model")):  # their head is the shading
        model = build_model(method)
        assert P.bf16_heads(model) == () and any(n.startswith(head) for n in P.float_islands(model)), method
    for name, p in low.named_parameters():
        layer = name.rsplit(".", 1)[0]
        is_bn = isinstance(low.get_submodule(layer), torch.nn.BatchNorm2d)
        assert p.dtype == (torch.float32 if layer in islands or is_bn else torch.bfloat16), name
    for name, b in low.named_buffers():
        assert b.dtype != torch.bfloat16 or name.endswith("num_batches_tracked"), name


def test_bf16_encoder_hands_on_float32(models):
    """Each part of the bf16 encoder returns float32, so the residual trunks sum in float32."""
    low = P.to_low_precision(models[3], torch.bfloat16)
    with torch.inference_mode():
        feats = low.features(torch.rand(1, 3, 128, 128))
    assert set(feats) == {"F", "Fn", "Fa", "Fa2"} and all(f.dtype == torch.float32 for f in feats.values())
    inner = []
    hook = low.normal_residual_model.block2.res[2].register_forward_hook(lambda m, a, o: inner.append(o.dtype))
    with torch.inference_mode():
        low.features(torch.rand(1, 3, 128, 128))
    hook.remove()
    assert inner == [torch.bfloat16]  # while the convolutions inside compute in bf16


def test_micro_batch_slices_a_batch(demo_based):
    """bf16 on the CPU runs batches in slices of LOW_PRECISION_CPU_MICRO_BATCH images; any
    slice size gives the same outputs (to bf16 rounding of another kernel choice); fp32 and
    other backends run whole batches; a bad value is refused."""
    from sfs_fast.decomposer import LOW_PRECISION_CPU_MICRO_BATCH

    model = demo_based[0]
    x = check_images(5)
    sliced = Decomposer(model, precision="bf16")
    assert sliced.micro_batch == LOW_PRECISION_CPU_MICRO_BATCH
    assert Decomposer(model).micro_batch is None and Decomposer(model, backend="eager").micro_batch is None
    calls = []
    sliced._run = (lambda run: lambda t: calls.append(len(t)) or run(t))(sliced._run)
    a = sliced.decompose(x)
    step = LOW_PRECISION_CPU_MICRO_BATCH
    assert calls == [min(step, 5 - i) for i in range(0, 5, step)]
    b = Decomposer(model, precision="bf16", micro_batch=5).decompose(x)
    for k in a:
        assert a[k].shape == b[k].shape
        assert (a[k] - b[k]).abs().max() <= 0.02 * (b[k].max() - b[k].min()) + 1e-6, k
    for bad, backend in ((0, "fused"), (2, "eager"), (2, "onnx")):
        with pytest.raises(ValueError, match="micro_batch"):
            Decomposer(model, backend=backend, micro_batch=bad)
    with pytest.raises(ValueError, match="micro_batch"):  # not taken by auto as a path that cannot run
        Decomposer(model, precision="auto", micro_batch=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_path_every_method(demo_based, example_pair, method):
    """bf16 runs every method at batch 2 on two example faces and meets the budget there."""
    model = demo_based[method]
    ref = P.reference_outputs(model, example_pair)
    dec = Decomposer(model, precision="bf16")
    assert dec.backend == "fused" and dec.precision == "bf16"
    out = dec.decompose(example_pair)
    _check_shapes(out, ref, method)
    report = P.check_budget(out, ref)
    assert report["passed"], (method, P.format_metrics(report))
    assert not torch.equal(out["albedo"], ref["albedo"])  # it really ran in lower precision


@pytest.fixture
def few_calibration_images(monkeypatch):
    """int8 calibration on 4 images (2 example faces + 2 synthetic) to keep the test short."""
    from sfs_fast.export import quantize

    real = quantize.calibration_images
    monkeypatch.setattr(quantize, "calibration_images", lambda count=4, seed=1234: real(4, seed))


@pytest.mark.parametrize("method", [0, 3] + [pytest.param(m, marks=pytest.mark.slow) for m in (1, 2, 4, 5, 6, 7)])
def test_int8_path(demo_based, example_pair, method, few_calibration_images):
    """int8 (ONNX Runtime, the budget layers quantized) runs at batch 2 on two example faces
    and meets the budget there."""
    model = demo_based[method]
    dec = Decomposer(model, precision="int8", threads=2)
    assert dec.backend == "onnx" and dec.precision == "int8" and dec.runner is not None
    out = dec.decompose(example_pair)
    ref = P.reference_outputs(model, example_pair)
    _check_shapes(out, ref, method)
    report = P.check_budget(out, ref)
    assert report["passed"], (method, P.format_metrics(report))
    assert not torch.equal(out["albedo"], ref["albedo"])  # it really ran quantized


# ---------------------------------------------------------------------------------------
# auto


@pytest.fixture(autouse=True)
def _few_auto_images(monkeypatch):
    monkeypatch.setattr(P, "AUTO_CHECK_IMAGES", 2)


def test_auto_without_amx_takes_fp32(models, without_openvino):
    with P.forced_capabilities(bf16=False, int8=False):
        dec = Decomposer(models[0], precision="auto")
    assert (dec.backend, dec.precision) == ("fused", "fp32")
    # the only candidate: taken without a check (tests/test_plan_cache.py runs none)
    assert dec.auto_report["decided"] == "only candidate" and dec.auto_report["tried"] == []
    assert [r["precision"] for r in dec.auto_report["ruled_out"]] == ["bf16", "bf16", "fp32", "int8"]
    out = dec.decompose(check_images(2))
    assert out["normal"].dtype == torch.float32


def test_auto_never_takes_a_path_over_budget(models, monkeypatch, without_openvino):
    """With a budget nothing below fp32 can meet, auto tries bf16, rejects it, takes fp32;
    with a loose one it takes bf16."""
    with P.forced_capabilities(bf16=True, int8=False):
        monkeypatch.setitem(P.BUDGET, "range_fraction", 1e-9)
        dec = Decomposer(models[3], precision="auto")
        tried = dec.auto_report["tried"]
        assert [t["precision"] for t in tried] == ["bf16", "fp32"] and not tried[0]["passed"]
        assert dec.precision == "fp32"
        for key, value in {"normal_median_deg": 90, "normal_p99_deg": 180, "range_fraction": 10,
                           "light_rel": 10}.items():
            monkeypatch.setitem(P.BUDGET, key, value)
        dec = Decomposer(models[3], precision="auto")
        assert dec.precision == "bf16" and dec.auto_report["tried"][0]["passed"]


# ---------------------------------------------------------------------------------------
# The budget on trained weights (the bundled demo weights)


def _demo(method):
    from sfs_fast import weights

    path = weights.default_weights(method)
    if path is None:
        pytest.skip(f"no bundled demo weights for method {method}")
    return weights.load(path).eval()


# method 3's candidates are each checked on its demo weights (bf16 and int8 here, openvino bf16
# in test_openvino.py); its whole decision (five candidates, about 70 s) runs with -m slow
@pytest.mark.parametrize("method", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_auto_on_demo_weights_meets_budget(method, monkeypatch, few_calibration_images):
    """Whatever auto picks on the demo weights meets the budget on its check images (the
    Decomposer really runs the path it checked)."""
    monkeypatch.setattr(P, "AUTO_CHECK_IMAGES", 8)
    model = _demo(method)
    dec = Decomposer(model, precision="auto")
    images = check_images(8)
    report = P.check_budget(dec.decompose(images), P.reference_outputs(model, images))
    assert report["passed"], (dec.precision, report["failures"])


@pytest.mark.parametrize("backend", ["fused", pytest.param("compile", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", [0, 3])
def test_bf16_on_demo_weights_meets_budget(method, backend):
    """The issue's goal on the demo weights: bf16 within budget on the 8 check images
    (example faces and synthetic faces), eager and compiled."""
    model = _demo(method)
    dec = Decomposer(model, backend=backend, precision="bf16")
    images = check_images(8)
    report = P.check_budget(dec.decompose(images), P.reference_outputs(model, images))
    assert report["passed"], P.format_metrics(report)


@pytest.mark.slow  # fp16 convolutions on the CPU take minutes per batch here (CUDA's path, run slowly)
@pytest.mark.parametrize("method", [0, 3])
def test_fp16_model_on_demo_weights_meets_budget(method):
    """The CUDA fp16 model (its numerics run on the CPU too, slowly): within budget."""
    from sfs_fast.optimize import optimize_for_inference

    model = _demo(method)
    low = P.to_low_precision(optimize_for_inference(model, channels_last=False), torch.float16)
    assert low.albedo_gen_model.conv2[0].weight.dtype == torch.float16  # the narrower fp16 rule
    images = check_images(8)
    with torch.inference_mode():
        out = {k: v.float() for k, v in low(images).items()}
    report = P.check_budget(out, P.reference_outputs(model, images))
    assert report["passed"], P.format_metrics(report)


@pytest.mark.slow
@pytest.mark.parametrize("method", [0, 3])
def test_int8_on_demo_weights_meets_budget(method):
    """int8 with its default calibration set, on the 8 check images."""
    model = _demo(method)
    dec = Decomposer(model, precision="int8")
    images = check_images(8)
    report = P.check_budget(dec.decompose(images), P.reference_outputs(model, images))
    assert report["passed"], P.format_metrics(report)


# ---------------------------------------------------------------------------------------
# Commands


def test_bench_accuracy_reports_budget_beside_time(monkeypatch):
    from sfs_fast.bench import accuracy

    monkeypatch.setattr("sfs_fast.bench.e2e.load_bench_model",
                        lambda method, weights=None: (_Models()[method], "random (BatchNorm calibrated)"))
    monkeypatch.setattr(accuracy, "load_bench_model",
                        lambda method, weights=None: (_Models()[method], "random (BatchNorm calibrated)"))
    with P.forced_capabilities(bf16=True):
        result = accuracy.run_accuracy(methods=[0], paths=("eager", "bf16", "fp16"), runs=1, warmup=0,
                                       synthetic=2, log=lambda *a: None)
    rows = {(r["path"], r.get("set")): r for r in result["results"]}
    assert rows[("fp16", None)]["status"] == "skipped" and "CUDA" in rows[("fp16", None)]["reason"]
    for s in result["sets"]:
        eager, bf16 = rows[("eager", s)], rows[("bf16", s)]
        assert eager["passed"] and eager["metrics"]["albedo_range"] == 0.0
        # the ratio is the two times of this run, not a number of its own
        assert bf16["speedup_vs_eager"] == pytest.approx(eager["ms_per_image"] / bf16["ms_per_image"])
        assert bf16["ms_per_image"] == pytest.approx(bf16["ms"]["median"] / bf16["images"])
        assert {"normal_median_deg", "normal_p99_deg", "albedo_range", "recon_range", "light_rel"} <= set(bf16["metrics"])
        assert bf16["passed"] == (not bf16["failures"])
    # bf16 is auto's first candidate here and the only measured one below fp32
    assert (result["auto"]["0"] == "bf16") == all(rows[("bf16", s)]["passed"] for s in result["sets"])
    text = accuracy.format_table(result)
    assert "auto takes" in text and "budget vs fp32" in text


def test_decompose_cli_precision(tmp_path, capsys):
    import shutil

    from sfs_fast.cli import decompose

    src = tmp_path / "in"
    src.mkdir()
    from sfs_fast.samples import EXAMPLES

    for f in sorted(EXAMPLES.glob("*_face.png"))[:2]:
        shutil.copy(f, src / f.name)
    code = decompose.main([str(src), str(tmp_path / "out"), "--method", "0", "--precision", "bf16", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and '"precision": "bf16"' in out
    code = decompose.main([str(src), str(tmp_path / "out2"), "--method", "0", "--precision", "int8",
                           "--backend", "fused"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "int8" in err[0] and "Traceback" not in err[0]  # a bad command line
