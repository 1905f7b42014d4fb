"""sfs_fast.plan: the one resolver (defaults, refusals), the named plans of the benchmarks,
the command-line flags, and the Decomposer built from a plan (``dec.plan`` is what runs,
``auto`` resolves to a concrete plan)."""
import argparse
import dataclasses

import pytest
import torch

from sfs_fast import build_model, precision as P
from sfs_fast.decomposer import Decomposer, auto_plan
from sfs_fast.optimize import eager_reference, with_shading_backend
from sfs_fast.plan import (AUTO_ORDER, BACKENDS, LOW_PRECISION_CPU_MICRO_BATCH, NAMED_PLANS, PRECISIONS,
                           SHADING_BACKENDS, RunPlan, add_plan_arguments, named_plan, plan_from_args, plan_name,
                           resolve_plan)


def test_defaults():
    plan = resolve_plan()
    assert plan == RunPlan.resolve() == RunPlan(backend="fused", precision="fp32", device="cpu",
                                                shading_backend="auto")
    assert resolve_plan(backend="eager").shading_backend == "reference"  # the eager baseline
    bf16 = resolve_plan(precision="bf16")
    assert bf16.micro_batch == LOW_PRECISION_CPU_MICRO_BATCH and resolve_plan(precision="bf16", micro_batch=16).micro_batch == 16
    int8 = resolve_plan(precision="int8")
    assert (int8.backend, int8.int8_layers, int8.shading_backend) == ("onnx", "budget", "reference")
    assert resolve_plan(onnx_file=True).precision is None  # the file's own
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.backend = "eager"


def test_the_tuples_come_from_one_place():
    from sfs_fast import kernels

    assert set(SHADING_BACKENDS) == {"auto", *kernels.BACKENDS}
    assert BACKENDS == ("eager", "fused", "compile", "onnx", "openvino") and "auto" not in PRECISIONS
    for pairs in AUTO_ORDER.values():
        assert pairs[-1][1] == "fp32"  # every list ends with the reference precision
        for backend, precision in pairs:
            resolve_plan(backend=backend, precision=precision, device="cuda" if precision == "fp16" else "cpu")


@pytest.mark.parametrize("settings, words", [
    ({"backend": "warp"}, "backend: unknown backend"),
    ({"precision": "fp64"}, "precision: unknown precision"),
    ({"device": "tpu"}, "device: unknown device"),
    ({"backend": "eager", "precision": "bf16"}, "baseline"),
    ({"precision": "int8", "device": "cuda"}, "CPU path"),
    ({"backend": "eager", "micro_batch": 2}, "micro_batch"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"threads": 0}, "threads"),
    ({"backend": "onnx", "optimizations": {"fold_bn": False}}, "optimizations"),
    ({"optimizations": {"warp_speed": True}}, "unknown optimisation"),
    ({"backend": "eager", "shading_backend": "cpu"}, "reference shading"),
    ({"shading_backend": "gpu-magic"}, "shading_backend: unknown"),
    ({"int8_layers": "all"}, "int8_layers: applies to int8"),
    ({"precision": "int8", "int8_layers": "some"}, "int8_layers"),
    ({"providers": ["CPUExecutionProvider"]}, "providers"),
    ({"onnx_file": True, "backend": "fused"}, "onnx"),
    ({"onnx_file": True, "precision": "auto"}, "auto needs a model"),
])
def test_refusals_are_one_line(settings, words):
    with pytest.raises(ValueError, match=words) as info:
        resolve_plan(**settings)
    assert "\n" not in str(info.value)


def test_shading_backend_spelled_as_a_fused_option():
    plan = resolve_plan(optimizations={"shading_backend": "reference", "channels_last": False})
    assert plan.shading_backend == "reference" and plan.optimizations == (("channels_last", False),)
    assert plan.fused_options() == {"channels_last": False, "shading_backend": "reference"}
    assert resolve_plan(**plan.settings()) == plan  # settings() round-trips through the resolver


def test_named_plans_are_plans():
    for name in NAMED_PLANS:
        settings = NAMED_PLANS[name]
        device = settings.get("device", "cuda" if name == "fp16" else "cpu")
        plan = named_plan(name, device=device, threads=2)
        assert plan.backend == settings["backend"] and plan.precision == settings.get("precision", "fp32")
        if "providers" not in settings:
            assert plan_name(plan.backend, plan.precision, plan.int8_layers) == name
    assert named_plan("tensorrt", device="cpu").device == "cuda"  # the path fixes its device
    assert named_plan("eager", optimizations={"fold_bn": False}).optimizations == ()  # fused-only settings
    with pytest.raises(ValueError, match="unknown path"):
        named_plan("warp")


def test_flags_and_plan_from_args():
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    parser.add_argument("--onnx", default=None)
    args = parser.parse_args(["--precision", "bf16", "--threads", "3", "--device", "cpu"])
    assert plan_from_args(args) == resolve_plan(precision="bf16", threads=3)
    assert plan_from_args(parser.parse_args(["--onnx", "m.onnx"])) == resolve_plan(onnx_file=True)
    # the commands default to auto; --precision fp32 is exact float32, no auto
    assert plan_from_args(parser.parse_args([])) == resolve_plan(precision="auto")
    assert plan_from_args(parser.parse_args(["--precision", "fp32"])) == resolve_plan()
    for bad in (["--backend", "warp"], ["--precision", "fp64"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    only = argparse.ArgumentParser()
    add_plan_arguments(only, flags=("device", "threads"))
    assert set(vars(only.parse_args([]))) == {"device", "threads"}


def test_decomposer_from_a_plan_matches_the_keywords():
    torch.manual_seed(0)
    model = build_model(0).eval()
    x = torch.rand(2, 3, 128, 128)
    plan = resolve_plan(backend="fused", optimizations={"channels_last": False})
    by_plan = Decomposer(model, plan=plan)
    by_keywords = Decomposer(model, backend="fused", optimizations={"channels_last": False})
    assert by_plan.plan == by_keywords.plan == plan and by_plan.backend == "fused"
    a, b = by_plan.decompose(x), by_keywords.decompose(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not both"):
        Decomposer(model, plan=plan, backend="eager")


def test_eager_reference_copies_and_leaves_the_model_alone():
    model = build_model(3, shading_backend="auto")
    ref = eager_reference(model)
    assert ref.config.shading_backend == "reference" and model.config.shading_backend == "auto"
    assert ref.config is not model.config and ref.training == model.training
    assert with_shading_backend(model, "cpu").config.shading_backend == "cpu"
    with pytest.raises(ValueError, match="shading_backend"):
        with_shading_backend(model, "warp")


def test_auto_plan_returns_a_concrete_plan(monkeypatch, without_openvino):
    monkeypatch.setattr(P, "AUTO_CHECK_IMAGES", 2)
    torch.manual_seed(0)
    model = build_model(0).eval()
    with P.forced_capabilities(bf16=False, int8=False):
        plan, report = auto_plan(model)
        dec = Decomposer(model, precision="auto")
    assert plan == resolve_plan() and not plan.is_auto
    # one candidate (fused fp32): decided without a check
    assert report["chosen"] == {"backend": "fused", "precision": "fp32"} and report["tried"] == []
    assert dec.plan == plan and dec.auto_report["chosen"] == report["chosen"]
    with pytest.raises(ValueError, match="auto expected"):
        auto_plan(model, resolve_plan())
