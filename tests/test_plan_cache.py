"""Precision auto's decision and its cache (sfs_fast.plan_cache): decided once and then read
back, decided anew when the weights, the capabilities or the versions change, a corrupt file
recomputed, no model run at all when there is one candidate, the fastest candidate taken
(not the first), and the commands' summary line and manifest saying which path ran and why.

Cheap by construction: a random method-0 model, one check image, and two fp32 candidates
(eager and fused) in place of the AUTO_ORDER of the hardware, so the multi-candidate path
runs here without emulated bf16 (minutes per convolution on a CPU without it); auto's
stand-in choices are eager, the cheaper one to build."""
import copy
import json
import shutil

import pytest
import torch

from sfs_fast import build_model, decomposer, plan_cache, precision as P
from sfs_fast.decomposer import Decomposer
from sfs_fast.plan import resolve_plan

TWO_FP32_PATHS = (("fused", "fp32"), ("eager", "fp32"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty plan cache of this test's own."""
    folder = tmp_path / "plans"
    monkeypatch.setenv(plan_cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(0).eval()


@pytest.fixture
def two_candidates(monkeypatch):
    """auto chooses between fused and eager fp32 (in that order) on one check image."""
    monkeypatch.setitem(P.AUTO_ORDER, "cpu", TWO_FP32_PATHS)
    monkeypatch.setattr(P, "AUTO_CHECK_IMAGES", 1)


def _count(monkeypatch, module, name):
    """Wrap ``module.name`` so that calls are counted; returns the list of calls' args."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_auto_measures_once_then_reads_the_cache(model, cache, two_candidates, monkeypatch):
    checks = _count(monkeypatch, P, "check_budget")
    # eager is made the faster one: auto must take it although fused comes first in the order
    fake_ms = {"fused": 9.0, "eager": 5.0}
    monkeypatch.setattr(decomposer, "_ms_per_image", lambda dec, images, calls: fake_ms[dec.backend])
    dec = Decomposer(model, precision="auto")
    report = dec.auto_report
    assert report["decided"] == "measured" and len(checks) == 2
    assert dec.plan == resolve_plan(backend="eager") and report["chosen"] == {"backend": "eager", "precision": "fp32"}
    assert [(t["backend"], t["ms_per_image"]) for t in report["tried"]] == [("fused", 9.0), ("eager", 5.0)]
    assert all(t["passed"] for t in report["tried"])
    [path] = cache.glob("*.json")
    assert report["cache"] == str(path) and any("checked against fp32" in n for n in dec.notes)
    stored = json.loads(path.read_text())
    assert stored["key"]["weights"]["tensors_sha256"] and stored["decision"]["chosen"] == report["chosen"]

    again = Decomposer(model, plan=resolve_plan(precision="auto"))  # the plan API reads it too
    assert again.auto_report["decided"] == "cached" and len(checks) == 2  # no check ran
    assert again.plan == dec.plan and not any("checked against fp32" in n for n in again.notes)
    assert again.plan_reason == ("auto: cached; fastest within budget of fused-fp32 9.0 ms/img, "
                                 "eager-fp32 5.0 ms/img")


def _fake_measure(monkeypatch):
    """Replace the check and timing by a counted stand-in that chooses eager (cheap to
    build): what is left is the cache's own logic."""
    decisions = []

    def measure(model, request, candidates, onnx):
        decisions.append([tuple(c) for c in candidates])
        tried = [{"backend": b, "precision": p, "passed": True, "metrics": {}, "failures": [], "ms_per_image": 1.0}
                 for b, p in candidates]
        return (decomposer._build_candidate(model, request, ("eager", "fp32"), onnx),
                {"chosen": {"backend": "eager", "precision": "fp32"}, "tried": tried, "images": 1})

    monkeypatch.setattr(decomposer, "_measure_candidates", measure)
    return decisions


def test_the_key_changes_with_weights_capabilities_and_versions(model, cache, two_candidates, monkeypatch):
    decisions = _fake_measure(monkeypatch)

    def decided():
        return Decomposer(model_now, precision="auto").auto_report["decided"]

    model_now = model
    assert decided() == "measured" and decided() == "cached" and len(decisions) == 1
    model_now = copy.deepcopy(model)
    with torch.no_grad():
        next(model_now.parameters()).view(-1)[0] += 1e-3  # one number of one tensor
    assert decided() == "measured" and decided() == "cached" and len(decisions) == 2
    model_now = model
    assert decided() == "cached"  # the first weights' decision is still there
    with P.forced_capabilities(fp16=True):  # the candidates stay the same, the hardware does not
        assert decided() == "measured" and len(decisions) == 3
    monkeypatch.setattr(torch, "__version__", "0.0-test")
    assert decided() == "measured" and decided() == "cached" and len(decisions) == 4
    assert len(list(cache.glob("*.json"))) == 4


def test_onnxruntime_version_is_in_the_key_only_where_it_runs_a_candidate(model):
    ort = pytest.importorskip("onnxruntime")
    request = resolve_plan(precision="auto")
    torch_only = plan_cache.decision_key(model, request, TWO_FP32_PATHS)["versions"]
    with_onnx = plan_cache.decision_key(model, request, [("onnx", "int8"), ("fused", "fp32")])["versions"]
    assert "onnxruntime" not in torch_only and with_onnx["onnxruntime"] == ort.__version__
    assert with_onnx["torch"] == torch.__version__


def test_the_key_changes_with_the_low_precision_rules(model, monkeypatch):
    """A new float island or another int8 quantizer is decided anew (same package version)."""
    request, cands = resolve_plan(precision="auto"), [("fused", "bf16"), ("onnx", "int8"), ("fused", "fp32")]
    before = plan_cache.decision_key(model, request, cands)
    assert set(before["numerics"]) == {"bf16", "int8"} and before["numerics"]["int8"]
    assert plan_cache.decision_key(model, request, TWO_FP32_PATHS)["numerics"] == {}
    real = P.float_islands
    monkeypatch.setattr(P, "float_islands", lambda m, dtype=torch.bfloat16: real(m, dtype)[1:])
    after = plan_cache.decision_key(model, request, cands)
    assert after["numerics"]["bf16"] != before["numerics"]["bf16"]
    assert after["numerics"]["int8"] == before["numerics"]["int8"]
    assert plan_cache.key_path(after) != plan_cache.key_path(before) or plan_cache.key_path(after) is None


@pytest.mark.parametrize("damage", ["{not json", "", "[1, 2]", '{"key": {}, "decision": {"chosen": {}}}', b"\xff\xfe"])
def test_a_corrupt_cache_file_is_decided_again_and_rewritten(model, cache, two_candidates, monkeypatch, damage):
    decisions = _fake_measure(monkeypatch)
    Decomposer(model, precision="auto")
    [path] = cache.glob("*.json")
    path.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    assert Decomposer(model, precision="auto").auto_report["decided"] == "measured" and len(decisions) == 2
    assert json.loads(path.read_text())["decision"]["chosen"] == {"backend": "eager", "precision": "fp32"}
    assert Decomposer(model, precision="auto").auto_report["decided"] == "cached"


def test_cache_off_decides_every_time_and_writes_nothing(model, tmp_path, two_candidates, monkeypatch):
    monkeypatch.setenv(plan_cache.CACHE_ENV, "off")
    monkeypatch.setenv("SFS_FAST_HOME", str(tmp_path / "home"))
    decisions = _fake_measure(monkeypatch)
    for _ in range(2):
        dec = Decomposer(model, precision="auto")
        assert dec.auto_report["decided"] == "measured" and dec.auto_report["cache"] is None
    assert len(decisions) == 2 and not (tmp_path / "home").exists()
    assert any("plan cache is off" in n for n in dec.notes)


def test_one_candidate_runs_no_model_for_the_decision(model, cache, monkeypatch, without_openvino):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a model ran for a decision with one candidate")

    for name in ("reference_outputs", "check_budget"):
        monkeypatch.setattr(P, name, must_not_run)
    monkeypatch.setattr(decomposer, "_ms_per_image", must_not_run)
    with P.forced_capabilities(bf16=False, int8=False):
        dec = Decomposer(model, precision="auto")
    assert (dec.backend, dec.precision) == ("fused", "fp32") and dec.auto_report["decided"] == "only candidate"
    assert dec.plan_reason == ("auto: only candidate; bf16 not supported here: forced; "
                               "openvino-fp32 not tried: openvino is not installed; int8 not supported here: forced")
    with P.forced_capabilities(bf16=True, int8=True):  # the eager baseline is fp32 only, whatever the CPU
        eager = Decomposer(model, backend="eager", precision="auto")
    assert eager.plan == resolve_plan(backend="eager") and eager.auto_report["ruled_out"] == []
    assert not cache.exists()  # nothing decided, nothing stored
    assert Decomposer(model, precision="fp32").auto_report is None  # fp32 bypasses auto


@pytest.mark.slow  # five model calls per candidate on a busy 2-core machine
def test_auto_times_each_candidate_and_takes_the_fastest(model, cache, two_candidates, monkeypatch):
    """Real timings: each candidate within budget gets AUTO_TIMED_CALLS timed calls after its
    check (the warm-up); the one with the fewest ms per image runs."""
    timed = _count(monkeypatch, decomposer, "_ms_per_image")
    dec = Decomposer(model, precision="auto")
    tried = dec.auto_report["tried"]
    assert len(timed) == 2 and all(args[2] == P.AUTO_TIMED_CALLS for args in timed)
    assert all(t["ms_per_image"] > 0 for t in tried)
    fastest = min(tried, key=lambda t: t["ms_per_image"])
    assert dec.auto_report["chosen"] == {"backend": fastest["backend"], "precision": "fp32"} == \
        {"backend": dec.backend, "precision": dec.precision}


# ---------------------------------------------------------------------------------------
# The commands say which path ran and why


def _one_face(tmp_path):
    from sfs_fast.samples import EXAMPLES

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted(EXAMPLES.glob("*_face.png"))[0], src / "a_face.png")
    return src


def test_decompose_summary_and_manifest_say_which_path_and_why(tmp_path, cache, capsys, monkeypatch,
                                                              without_openvino):
    from sfs_fast.cli import decompose

    monkeypatch.setenv("SFS_FAST_FORCE_CAPS", "bf16=0,int8=0")  # the same on any machine
    src = _one_face(tmp_path)
    assert decompose.main([str(src), str(tmp_path / "out"), "--method", "0", "--faces", "off"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    why = ("auto: only candidate; bf16 not supported here: forced; "
           "openvino-fp32 not tried: openvino is not installed; int8 not supported here: forced")
    assert f"(fused fp32, {why}); manifest" in summary
    [row] = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert row["plan"] == {"backend": "fused", "precision": "fp32", "reason": why}

    assert decompose.main([str(src), str(tmp_path / "out2"), "--method", "0", "--faces", "off",
                           "--precision", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["backend"], data["precision"], data["plan_reason"]) == ("fused", "fp32", "as requested")
    # a rerun skips the input and keeps the record of the run that wrote its files
    assert decompose.main([str(src), str(tmp_path / "out"), "--method", "0", "--faces", "off",
                           "--precision", "fp32"]) == 0
    [row] = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "skipped" and row["plan"]["reason"] == why
