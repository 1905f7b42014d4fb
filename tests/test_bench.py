"""sfs-bench: each subcommand at tiny settings (schema, correctness diffs, skip reasons),
the floors' FLOP count against an independent count, and the fused path's rewrites against
the unmodified model. No timing assertions: benchmarks report speed, tests check correctness."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sfs_fast import build_model
from sfs_fast.bench import cli
from sfs_fast.bench.floors import count_flops, measure_copy_bandwidth, measure_gemm_rate
from sfs_fast.bench.timing import summarize
from sfs_fast.models import GenerationNet, ImageHead
from sfs_fast.optimize import FUSED_OPTIONS, ConvBeforeUpsample, optimize_for_inference

STAT_KEYS = {"median", "p10", "p90", "min", "mean", "runs"}
ENV_KEYS = {"cpu", "cores", "gpu", "threads", "dtype", "versions", "ort_providers", "date_utc"}


def _randomize_batchnorm(module, gen):
    """Non-trivial eval statistics and affine parameters for every BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen, dtype=m.bias.dtype))
    return module.eval()


def _run_cli(tmp_path, capsys, *argv):
    out = tmp_path / "r.json"
    code = cli.main(list(argv) + ["--json", str(out), "--quiet", "--gemm-size", "256"])
    captured = capsys.readouterr()
    assert code in (0, 3), captured.err  # 3: a path failed; the rows say which and why
    return json.loads(out.read_text()), captured


def _check_rows(result, expected_paths):
    """Every row has timings and a correctness diff, or a reason why it cannot run here; a
    ``failed`` row is a defect."""
    assert {r["path"] for r in result["results"]} == set(expected_paths)
    for r in result["results"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] != "ok":
            assert isinstance(r["reason"], str) and r["reason"].strip(), r
            continue
        assert STAT_KEYS <= set(r["ms"]) and r["ms"]["runs"] == 2
        assert r["ms"]["min"] <= r["ms"]["median"] <= r["ms"]["p90"]
        diff = r["diff"]
        assert math.isfinite(diff["max_abs"]) and math.isfinite(diff["max_rel_range"])
        assert set(diff["per_output"]) >= {"normal", "albedo", "shading", "recon"}
        # the ratios are this run's own times, not numbers of their own
        assert r["ratio_to_floor"] == pytest.approx(r["ms"]["median"] / r["floor_ms"])
        eager = next(e for e in result["results"] if e["path"] == result.get("baseline", "eager")
                     and e["method"] == r["method"] and e["batch"] == r["batch"])
        assert r["speedup_vs_eager"] == pytest.approx(eager["ms"]["median"] / r["ms"]["median"])


# --------------------------------------------------------------------------------------
# subcommands


def test_e2e_every_path_reports_a_diff_or_a_reason(tmp_path, capsys):
    paths = ["eager", "fused", "onnx", "onnx-int8"]
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    result, captured = _run_cli(tmp_path, capsys, "e2e", "--method", "0", "--batch", "1", "--paths", ",".join(paths),
                                "--threads", "2", "--warmup", "0", "--runs", "2",
                                "--markdown", str(md), "--plot", str(png))
    assert result["kind"] == "e2e"
    assert ENV_KEYS <= set(result["env"]) and result["env"]["threads"] == 2
    assert result["settings"]["runs"] == 2 and result["settings"]["dtype"] == "float32"
    assert result["floor"]["gemm"]["gflops_median"] > 0
    assert result["floor"]["models"]["0"]["flops_per_image"] == pytest.approx(34.41e9, rel=0.01)
    _check_rows(result, paths)
    rows = {r["path"]: r for r in result["results"]}
    assert rows["eager"]["diff"]["max_abs"] == 0.0
    # the fused path is exact up to float32 rounding
    assert rows["fused"]["status"] == "ok" and rows["fused"]["diff"]["max_rel_range"] < 1e-3
    # ONNX Runtime is a test dependency: its paths run here, only a missing package skips them
    expected = "ok" if importlib.util.find_spec("onnxruntime") else "skipped"
    assert rows["onnx"]["status"] == expected and rows["onnx-int8"]["status"] == expected
    assert expected == "skipped" or rows["onnx"]["diff"]["max_rel_range"] < 1e-3
    text = md.read_text()
    assert "| method | batch | path |" in text and "GFLOP/image" in text and "command: `sfs-bench e2e" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x floor" in captured.out  # the table goes to stdout


def test_e2e_unavailable_path_is_skipped_with_its_reason(tmp_path, capsys, monkeypatch):
    from sfs_fast.bench import e2e

    def unavailable(*args, **kwargs):
        raise e2e.PathUnavailable("no ONNX Runtime on this test machine")

    monkeypatch.setattr(e2e, "_onnx_file_decomposer", unavailable)
    result, captured = _run_cli(tmp_path, capsys, "e2e", "--method", "0", "--batch", "1", "--paths", "eager,onnx-fp16",
                                "--warmup", "0", "--runs", "2")
    _check_rows(result, ["eager", "onnx-fp16"])
    row = next(r for r in result["results"] if r["path"] == "onnx-fp16")
    assert row["status"] == "skipped" and row["reason"] == "no ONNX Runtime on this test machine"
    assert "skipped: no ONNX Runtime" in captured.out


@pytest.mark.slow
def test_e2e_compile_path(tmp_path, capsys):
    result, _ = _run_cli(tmp_path, capsys, "e2e", "--method", "0", "--batch", "1", "--paths", "eager,compile",
                         "--warmup", "0", "--runs", "2")
    _check_rows(result, ["eager", "compile"])
    row = next(r for r in result["results"] if r["path"] == "compile")
    assert row["status"] == "ok" and row["diff"]["max_rel_range"] < 1e-3 and row["first_call_s"] > 0


def test_train_reference_vs_fused(tmp_path, capsys):
    result, _ = _run_cli(tmp_path, capsys, "train", "--method", "0", "--batch", "2", "--size", "32",
                         "--warmup", "0", "--runs", "2")
    assert result["kind"] == "train" and ENV_KEYS <= set(result["env"])
    _check_rows(result, ["reference", "fused"])
    fused = next(r for r in result["results"] if r["path"] == "fused")
    assert fused["diff"]["max_rel_range"] < 1e-3
    assert 0.0 <= fused["diff"]["grad_max_rel"] < 1e-3
    # forward + backward is about 3x the forward
    assert 2.5 < result["floor"]["models"]["0"]["flops_per_image"] / (34.41e9 / 16) < 3.5


def test_op_subcommand_delegates_or_says_why(tmp_path, capsys):
    from sfs_fast.kernels import available_backends

    backends = [b for b in available_backends("cpu") if b != "compile"]  # compile: minutes, not seconds
    out = tmp_path / "op.json"
    code = cli.main(["op", "--batch", "2", "--size", "32", "--paths", ",".join(backends), "--warmup", "0",
                     "--runs", "2", "--threads", "2", "--json", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["kind"] == "op" and ENV_KEYS <= set(result["env"])
    assert result["results"]
    for r in result["results"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"].strip()
        else:  # every backend is checked against the reference in the same run
            assert r["batch"] == 2 and r["shape"] == [2, 3, 32, 32] and r["max_rel_err"] < 1e-4
    for row in result.get("rows", []):
        assert row["floor_ms"] > 0  # bytes over the copy bandwidth measured in the run
    assert "floor" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["--batch", "0"], "--batch"),
    (["--method", "9"], "unknown method"),
    (["--size", "64"], "--size"),
    (["--gemm-size", "1"], "--gemm-size"),
    (["--paths", "eager,warp"], "warp"),
    (["--fused-off", "nonsense"], "nonsense"),
    (["--runs", "0"], "--runs"),
])
def test_bad_arguments_give_one_line_and_an_exit_code(argv, fragment, capsys):
    with pytest.raises(SystemExit) if argv[0] in ("--batch", "--method") else _nothing():
        code = cli.main(["e2e"] + argv)
        assert code != 0
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# floors and statistics


def _hook_flops(model, x):
    """2 x multiply-adds of every Conv2d / ConvTranspose2d / Linear, counted with forward
    hooks from the layer shapes (independent of FlopCounterMode)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total[0] += 2 * k * out.numel()
        elif isinstance(m, nn.Linear):
            total[0] += 2 * m.in_features * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("method", [0, 3])
def test_flop_count_matches_an_independent_count(method):
    model = build_model(method).eval()
    assert count_flops(model, size=48) == _hook_flops(model, torch.rand(1, 3, 48, 48))


def test_rates_follow_from_the_measured_times(monkeypatch):
    """The rates are work over the timer's median and minimum: with a stubbed timer (2 ms
    median, 1 ms best) a 128^3 GEMM is 2*128^3 FLOP / 2 ms, a 64 KiB copy 2*64 KiB / 2 ms."""
    from sfs_fast.bench import floors

    calls = []

    def timer(fn, inputs, *, warmup, runs, device="cpu"):
        calls.append((warmup, runs))
        fn(inputs[0])  # the timed function really runs on the inputs
        return {"median": 2.0, "min": 1.0, "p10": 1.0, "p90": 3.0, "mean": 2.0, "runs": runs}

    monkeypatch.setattr(floors, "time_calls", timer)
    gemm = measure_gemm_rate(128, warmup=0, runs=3)
    assert gemm["gflops_median"] == pytest.approx(2 * 128 ** 3 / 2e-3 / 1e9)
    assert gemm["gflops_best"] == pytest.approx(2 * 128 ** 3 / 1e-3 / 1e9)
    copy = measure_copy_bandwidth(1 << 16, warmup=0, runs=3)
    assert copy["bytes"] == 1 << 16 and copy["gbps_median"] == pytest.approx(2 * (1 << 16) / 2e-3 / 1e9)
    assert calls == [(0, 3), (0, 3)]


def test_rate_measurements_run_the_asked_runs():
    gemm = measure_gemm_rate(64, warmup=0, runs=2)
    assert gemm["ms"]["runs"] == 2 and gemm["gflops_best"] >= gemm["gflops_median"]


def test_a_runtime_floor_counts_what_ran_at_its_precision_and_skips_merged_layers():
    from sfs_fast.bench.floors import mixed_floor_ms, precision_mix
    from sfs_fast.bench.peers import module_precisions

    flops = {"trunk.0": 4e9, "twin.0": 4e9, "head": 2e9}  # twin: merged with trunk by the runtime
    executed = {"layer_precisions": {"/model/trunk/trunk.0/Conv/WithoutBiases": "bf16",
                                     "/model/head/Conv/WithoutBiases": "fp32"}}
    precisions = module_precisions(executed, flops)
    assert precisions == {"trunk.0": "bf16", "twin.0": "merged"}
    mix = precision_mix(flops, precisions)
    assert mix == {"bf16": 4e9, "merged": 4e9, "fp32": 2e9}
    # 4 GFLOP at 400 GFLOP/s and 2 at 100, per image, 2 images: 20 + 40 ms
    assert mixed_floor_ms(mix, 2, {"bf16": 400.0, "fp32": 100.0}) == pytest.approx(60.0)
    assert module_precisions({}, flops) == {}  # nothing reported: nothing known, all fp32


def test_summary_statistics():
    s = summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert s["median"] == pytest.approx(3.0) and s["min"] == pytest.approx(1.0)
    assert s["p10"] == pytest.approx(1.4) and s["p90"] == pytest.approx(4.6) and s["runs"] == 5


# --------------------------------------------------------------------------------------
# the fused path's rewrites, each against the unmodified modules (float64)


def _upsample_then_conv_head(head, x):
    """The head's definition written out: upsample first, then its layers (the order of
    SPEC B.1/B.3), independent of the rewrite."""
    if isinstance(head, ImageHead):
        y = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        layers = [head.conv1, head.conv2, head.conv3, head.conv4]
    else:
        y = head.upsample(x)
        layers = [head.conv1, head.conv2, head.conv3]
    for layer in layers:
        y = layer(y)
    return y


@pytest.mark.parametrize("make", [lambda: ImageHead(), lambda: GenerationNet("bilinear"),
                                  lambda: GenerationNet("caffe")], ids=["image-head", "gen-bilinear", "gen-caffe"])
def test_conv_before_upsample_is_exact(make):
    gen = torch.Generator().manual_seed(3)
    head = _randomize_batchnorm(make().double(), gen)
    for m in head.modules():  # non-zero biases: the constant part is what can go wrong
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    cin = head.conv1[0].in_channels
    x = torch.randn(2, cin, 6, 7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = _upsample_then_conv_head(head, x)
        got = ConvBeforeUpsample(head)(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_an_equal_second_trunk_is_computed_once_and_changes_nothing():
    from sfs_fast.bench.floors import path_layer_precisions
    from sfs_fast.optimize import equal_trunks
    from sfs_fast.plan import resolve_plan

    gen = torch.Generator().manual_seed(6)
    model = _randomize_batchnorm(build_model(3).double(), gen)
    assert equal_trunks(model) == {}  # trained apart: both computed
    model.albedo_residual_model_2.load_state_dict(model.albedo_residual_model.state_dict())
    assert equal_trunks(model) == {"Fa2": "Fa"}
    fused = optimize_for_inference(model)
    calls = []
    fused.albedo_residual_model_2.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert calls == []
    for name in expected:
        assert float((got[name] - expected[name]).abs().max()) <= 1e-9 * max(float(expected[name].abs().max()), 1.0)
    # the floor leaves the merged trunk out of the fused path, not out of eager
    merged = path_layer_precisions(resolve_plan(backend="fused"), model)
    assert merged and all(n.startswith("albedo_residual_model_2.") and p == "merged" for n, p in merged.items())
    assert path_layer_precisions(resolve_plan(backend="eager"), model) == {}


@pytest.mark.parametrize("off", [None] + list(FUSED_OPTIONS))
def test_each_fused_option_matches_the_model(off):
    gen = torch.Generator().manual_seed(5)
    model = _randomize_batchnorm(build_model(1).double(), gen)  # method 1: image head + shading head
    x = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)  # fully convolutional: small is enough
    options = {} if off is None else {off: "reference" if off == "shading_backend" else False}
    fused = optimize_for_inference(model, **options)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert set(got) == set(expected)
    for name in expected:
        scale = float(expected[name].abs().max())
        assert float((got[name] - expected[name]).abs().max()) <= 1e-9 * max(scale, 1.0), name
    assert not any(isinstance(m, ConvBeforeUpsample) for m in model.modules())  # original untouched


def test_unknown_fused_option_is_rejected():
    with pytest.raises(ValueError, match="unknown optimisation"):
        optimize_for_inference(build_model(0), warp_speed=True)


def test_folder_speed_runs_the_same_pictures_both_ways(tmp_path, capsys):
    from sfs_fast.bench import cli

    assert cli.main(["folder-speed", "--pictures", "2", "--batch-size", "1", "--paths", "eager", "--rounds", "2",
                     "--json", str(tmp_path / "fs.json")]) == 0
    row = json.loads((tmp_path / "fs.json").read_text())["rows"][0]
    assert row["path"] == "eager" and row["plan"] == "eager fp32" and row["pictures"] == row["ok"] == 2
    assert row["ratio"] == pytest.approx(row["folder_img_s"] / row["model_img_s"])
    assert row["rounds"] == 2 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert 0 < row["folder_model_s"] and 0 <= row["pipeline_s"] < 2 / row["folder_img_s"]  # below the wall time
    assert "| eager | eager fp32 |" in capsys.readouterr().out
    assert cli.main(["folder-speed", "--paths", "nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_latency_curve_measures_each_batch_in_its_own_process(tmp_path, capsys):
    """The curve's rows come from fresh children (one per path and batch); the budget checked
    in the first batch's child is on every row; a path this machine lacks is skipped."""
    from sfs_fast.bench import latency

    assert latency.main(["--method", "0", "--parts", "curve", "--paths", "fused,fp16", "--batch", "1,2", "--runs", "1",
                         "--warmup", "0", "--threads", "1", "--quiet", "--json", str(tmp_path / "lat.json")]) == 0
    rows = json.loads((tmp_path / "lat.json").read_text())["curve"]
    fused = [r for r in rows if r["path"] == "fused"]
    assert [r["batch"] for r in fused] == [1, 2] and all(r["status"] == "ok" for r in fused)
    assert all(r["budget"]["passed"] and r["ms"]["runs"] == 1 for r in fused)
    assert fused[1]["images_per_s"] == pytest.approx(2e3 / fused[1]["ms"]["median"])
    assert {r["status"] for r in rows if r["path"] == "fp16"} == {"skipped"}
    assert "fused           2" in capsys.readouterr().out
