"""Shared test set-up: caches in a temporary folder, few threads, seeded randomness."""
import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="sfs_fast_test_cache_")
# ONNX Runtime and inductor write caches; keep them out of the user's home.
os.environ.setdefault("XDG_CACHE_HOME", _CACHE)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))
# Precision auto's decisions (sfs_fast.plan_cache): one folder per session, never the user's,
# so no test reads a decision another run made on other weights, software or hardware.
os.environ["SFS_FAST_PLAN_CACHE"] = os.path.join(_CACHE, "plans")
# The export cache (sfs_fast.export.export_cache) is off, so every test that exports does;
# tests/test_export_cache.py turns it on in a folder of its own.
os.environ["SFS_FAST_EXPORT_CACHE"] = "off"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread (for tests on tiny tensors, where thread
    hand-offs cost more than they save), restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def calibrate_batchnorm(model, steps=3, batch=4, seed=0):
    """``sfs_fast.models.calibrate_batchnorm`` on ``steps`` batches of seeded random images."""
    from sfs_fast.models import calibrate_batchnorm as calibrate

    gen = torch.Generator().manual_seed(seed)
    return calibrate(model, (torch.rand(batch, 3, 128, 128, generator=gen) for _ in range(steps)))


@pytest.fixture
def calibrated_model():
    """A factory: ``calibrated_model(method, **config)`` -> eval model with realistic BN stats."""
    from sfs_fast import build_model

    def make(method=0, **config):
        return calibrate_batchnorm(build_model(method, **config))

    return make


def _fast_bf16() -> bool:
    from sfs_fast.precision import capabilities

    return bool(capabilities("cpu")["bf16"])


# Tests that run bf16 convolutions on the CPU. Without AMX/AVX512-BF16 (an AVX2-only CPU such as
# the AMD EPYC machines this project is also run on) PyTorch emulates them: one 128-channel 64x64
# convolution measured 79 s against 0.23 s in float32, so these tests would take hours there.
# They run wherever the hardware has bf16 (the project's Xeons), and are skipped with the reason
# elsewhere; `auto` there never chooses bf16 (tested by test_auto_without_amx_takes_fp32).
NEEDS_BF16_HARDWARE = {
    "test_bf16_encoder_hands_on_float32", "test_micro_batch_slices_a_batch", "test_bf16_path_every_method",
    "test_auto_never_takes_a_path_over_budget", "test_bf16_on_demo_weights_meets_budget",
    "test_bench_accuracy_reports_budget_beside_time", "test_decompose_cli_precision",
}


def pytest_collection_modifyitems(config, items):
    if _fast_bf16():
        return
    skip = pytest.mark.skip(reason="bf16 has no hardware support on this CPU (no amx_bf16/avx512_bf16): "
                                   "emulated bf16 convolutions take minutes each")
    for item in items:
        if item.originalname in NEEDS_BF16_HARDWARE or item.name in NEEDS_BF16_HARDWARE:
            item.add_marker(skip)


# The modules that test precision ``auto`` itself (its candidates, its checks, its cache).
REAL_AUTO_MODULES = {"test_precision", "test_plan", "test_plan_cache"}


@pytest.fixture(autouse=True)
def _auto_is_fp32_outside_its_own_tests(request, monkeypatch):
    """Elsewhere ``auto`` (every command's default) runs its fp32 fallback without a check: on a
    CPU with bf16 and VNNI each first use would otherwise export, quantize, compile and time
    five paths (30-90 s per method and weights), which the command tests do not test. The plan cache's key holds
    the candidates, so the tests of auto never read a decision made among these."""
    if request.module.__name__.rsplit(".", 1)[-1] in REAL_AUTO_MODULES:
        return
    from sfs_fast import precision

    real = precision.auto_choices

    def fp32_only(backend, device="cpu"):
        candidates, ruled_out = real(backend, device)
        fallback = candidates[-1]  # fp32 on the asked backend (fused when none): chosen without a check
        skipped = [{"backend": b, "precision": p, "why": "not tried in tests outside the tests of auto"}
                   for b, p in candidates[:-1]]
        return [fallback], ruled_out + skipped

    monkeypatch.setattr(precision, "auto_choices", fp32_only)


@pytest.fixture
def without_openvino(monkeypatch):
    """``auto`` acts as where the openvino extra is not installed (its candidates ruled out)."""
    from sfs_fast import precision

    real = precision.missing_package
    monkeypatch.setattr(precision, "missing_package",
                        lambda backend: "openvino" if backend == "openvino" else real(backend))
