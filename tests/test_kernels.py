"""The fused shading op: every backend against an independent float64 NumPy reference.

Gradients are checked against autograd through the float64 reference (and by finite
differences in gradcheck). The triton backend runs under the Triton interpreter on CPU
tensors (TRITON_INTERPRET=1 is set before its module is imported).
"""
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sfs_fast.kernels import BACKENDS, available_backends, sh_shade, sh_shade_reference

ROOT = Path(__file__).resolve().parents[1]
from kernel_checks import DTYPES, as_numpy, sh_constants, check_backward, check_forward, numpy_shade, rel_err


CPU_FUSED = [name for name in ("cpu",) if "cpu" in available_backends("cpu")]


def test_cpu_extension_is_built():
    from sfs_fast.kernels import cpu
    assert cpu.IMPORT_ERROR is None, f"the C++ extension did not build: {cpu.IMPORT_ERROR}"
    assert cpu._cpu.isa() in ("generic", "avx2", "avx512")
    assert "cpu" in available_backends("cpu")


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_forward_matches_numpy(backend, dtype, seed):
    check_forward(backend, dtype, seed)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(12))
def test_backward_matches_autograd_of_reference(backend, dtype, seed):
    check_backward(backend, dtype, seed)


def test_triton_backend_under_interpreter():
    """The triton kernels on CPU tensors: test_kernels_triton.py in a fresh process with
    TRITON_INTERPRET=1 set before triton is first imported (it decides at import time)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_kernels_triton.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 2 * 4 * 4, out.stdout[-2000:]  # fwd+bwd, 4 dtypes, 4 seeds


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_all_flag_combinations_and_larger_rows(backend):
    """Every residue/albedo/normalize combination, W not a multiple of the vector width."""
    rng = np.random.default_rng(7)
    for res in (False, True):
        for alb in (False, True):
            for normalize in (False, True):
                normal = torch.from_numpy(rng.normal(size=(2, 3, 5, 67))).float()
                light = torch.from_numpy(rng.normal(size=(2, 27))).float()
                residue = torch.from_numpy(rng.normal(size=(2, 3, 5, 67))).float() if res else None
                albedo = torch.from_numpy(rng.uniform(size=(2, 3, 5, 67))).float() if alb else None
                s, r = sh_shade(normal, light, residue, albedo, normalize=normalize, beta=1.0, backend=backend)
                ws, wr = numpy_shade(as_numpy(normal), as_numpy(light), as_numpy(residue), as_numpy(albedo), normalize, 1.0)
                assert rel_err(s, ws) <= 1e-5
                assert (r is None) == (not alb)
                if alb:
                    assert rel_err(r, wr) <= 1e-5


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_zero_normals_have_finite_gradients(backend):
    normal = torch.zeros(1, 3, 2, 3, requires_grad=True)
    light = torch.randn(1, 27, requires_grad=True)
    shading, _ = sh_shade(normal, light, backend=backend)
    c1 = sh_constants()[0]
    assert torch.allclose(shading, (c1 * light.detach().view(3, 9)[:, 0]).view(1, 3, 1, 1).expand(1, 3, 2, 3))
    shading.sum().backward()
    assert torch.isfinite(normal.grad).all() and torch.isfinite(light.grad).all()


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_empty_batch(backend):
    normal = torch.randn(0, 3, 5, 7, requires_grad=True)
    light = torch.randn(0, 27, requires_grad=True)
    s, r = sh_shade(normal, light, albedo=torch.rand(0, 3, 5, 7), backend=backend)
    assert s.shape == (0, 3, 5, 7) and r.shape == (0, 3, 5, 7)
    (s.sum() + r.sum()).backward()
    assert normal.grad.shape == normal.shape and light.grad.shape == light.shape


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_empty_image_has_zero_light_gradient(backend):
    """H > 0, W = 0: no pixel, so the light gradient is exactly 0 (the kernels write no partials)."""
    normal = torch.randn(2, 3, 4, 0, requires_grad=True)
    light = torch.randn(2, 27, requires_grad=True)
    s, r = sh_shade(normal, light, albedo=torch.rand(2, 3, 4, 0), backend=backend)
    (s.sum() + r.sum()).backward()
    assert torch.equal(light.grad, torch.zeros(2, 27))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_instruction_set_variants(isa):
    """The generic and AVX2 builds of the kernels (picked by SFS_FAST_CPU_ISA in a fresh process)
    agree with the NumPy reference too, forward and backward, in every dtype."""
    code = (
        "import sys, torch\n"
        "from sfs_fast.kernels import cpu\n"
        "from kernel_checks import DTYPES, check_backward, check_forward\n"
        "print(cpu._cpu.isa())\n"
        "for dtype in DTYPES:\n"
        "    for seed in range(4):\n"
        "        check_forward('cpu', dtype, 500 + seed)\n"
        "        check_backward('cpu', dtype, 600 + seed)\n"
        "print('ok')\n")
    env = dict(os.environ, SFS_FAST_CPU_ISA=isa, PYTHONPATH=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    if isa == "avx2" and lines[0] == "generic":
        pytest.skip("this CPU has no AVX2")
    assert lines == [isa, "ok"]


def test_auto_picks_cpu_on_cpu_tensors():
    from sfs_fast.kernels import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_light_gradient_independent_of_thread_count():
    """Per-row partial sums reduced once: bitwise the same for 1 and 2 threads."""
    normal, light = torch.randn(3, 3, 17, 29), torch.randn(3, 27, requires_grad=True)
    albedo = torch.rand(3, 3, 17, 29)
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            light.grad = None
            sh_shade(normal, light, albedo=albedo, backend="cpu")[1].sum().backward()
            grads.append(light.grad.clone())
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------ bad arguments
def _ok():
    return torch.randn(2, 3, 4, 5), torch.randn(2, 27)


@pytest.mark.parametrize("mutate,name", [
    (lambda n, L: dict(normal=torch.randn(2, 4, 4, 5)), "normal"),
    (lambda n, L: dict(normal=torch.randn(3, 4, 5)), "normal"),
    (lambda n, L: dict(normal=n.int()), "normal"),
    (lambda n, L: dict(light=torch.randn(2, 9)), "light"),
    (lambda n, L: dict(light=torch.randn(3, 27)), "light"),
    (lambda n, L: dict(light=L.double()), "light"),
    (lambda n, L: dict(residue=torch.randn(2, 3, 4, 6)), "residue"),
    (lambda n, L: dict(albedo=torch.rand(2, 3, 4, 5, dtype=torch.float64)), "albedo"),
    (lambda n, L: dict(albedo=torch.rand(2, 3, 4, 5, device="meta")), "albedo"),
    (lambda n, L: dict(residue=torch.rand(2, 3, 4, 5, device="meta")), "residue"),
    (lambda n, L: dict(backend="fastest"), "backend"),
    (lambda n, L: dict(backend="cuda"), "backend"),
])
def test_bad_arguments_name_the_argument(mutate, name):
    n, L = _ok()
    kw = dict(normal=n, light=L, residue=None, albedo=None, backend="cpu")
    kw.update(mutate(n, L))
    backend = kw.pop("backend")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        sh_shade(kw["normal"], kw["light"], kw["residue"], kw["albedo"], backend=backend)


# ------------------------------------------------------------------ torch.library
def _op_samples(dtype, shape=(2, 3, 3, 5)):
    g = torch.Generator().manual_seed(1)
    n = torch.randn(*shape, dtype=dtype, generator=g)
    L = torch.randn(shape[0], 27, dtype=dtype, generator=g)
    r = 0.2 * torch.randn(*shape, dtype=dtype, generator=g)
    a = torch.rand(*shape, dtype=dtype, generator=g)
    return [(n, L, r, a, True, 1.0, "cpu"), (n, L, None, a, False, 0.0, "cpu"),
            (n, L, r, None, True, 1.0, "cpu"), (n, L, None, None, True, 0.0, "cpu")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    op = torch.ops.sfs_fast.sh_shade.default
    for args in _op_samples(dtype):
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FUSED)
def test_gradcheck_float64(backend):
    # Small: finite differences cost two forward calls per input element.
    for n, L, r, a, normalize, beta, _ in _op_samples(torch.float64, (2, 3, 2, 3))[:3]:
        ins = [t.clone().requires_grad_() for t in (n, L, r, a) if t is not None]
        has_r, has_a = r is not None, a is not None

        def fn(*ts):
            it = iter(ts)
            n_, L_ = next(it), next(it)
            r_ = next(it) if has_r else None
            a_ = next(it) if has_a else None
            s, rc = sh_shade(n_, L_, r_, a_, normalize=normalize, beta=beta, backend=backend)
            return (s,) if rc is None else (s, rc)

        assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_op_matches_eager():
    torch._dynamo.reset()

    def fn(n, L, r, a):
        s, rc = sh_shade(n, L, r, a, beta=1.0)
        return s * 2 + rc

    n, L = torch.randn(2, 3, 6, 7), torch.randn(2, 27)
    r, a = 0.1 * torch.randn(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(n, L, r, a), fn(n, L, r, a), atol=1e-6, rtol=1e-6)
    # The graph holds the fused op (not a trace of the reference).
    gm = torch._dynamo.export(fn)(n, L, r, a).graph_module
    assert "sfs_fast.sh_shade" in gm.code


@pytest.mark.slow
def test_compile_fullgraph_model_matches_eager():
    from sfs_fast import build_model

    torch._dynamo.reset()
    model = build_model(0).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(got[k], v, atol=1e-4, rtol=1e-4), k


@pytest.mark.slow
def test_model_shading_backends_agree(calibrated_model):
    model = calibrated_model(0)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        fused = model(x)
        model.config.shading_backend = "reference"
        ref = model(x)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert rel_err(fused[k], v) <= 1e-5, k


# ------------------------------------------------------------------ the CUDA sources build
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    src = ROOT / "kernels" / "cuda" / "sh_shade_kernels.cu"
    out = subprocess.run([NVCC, "-c", "-O3", "-std=c++17", "-arch=sm_90", str(src), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


# Stand-ins for the .cu entry points, with a tile that is not the real 8 x 32: the binding and
# the launcher must take the geometry from the compiled code, not assume it.
_CUDA_STUB = """
#include <cstdint>
int sfs_cuda_forward(int, int64_t, int64_t, int64_t, const void*, const void*, const void*, const void*, double,
                     bool, void*, void*, void*) { return 0; }
int sfs_cuda_backward(int, int64_t, int64_t, int64_t, const void*, const void*, const void*, const void*, double,
                      bool, const void*, const void*, void*, void*, void*, void*, void*) { return 0; }
const char* sfs_cuda_error_string(int) { return "stub"; }
void sfs_cuda_tile_geometry(int* block_h, int* block_w) { *block_h = 4; *block_w = 16; }
"""


@pytest.fixture(scope="module")
def cuda_binding_on_stub(tmp_path_factory):
    """The real CUDA binding (sh_shade_binding.cpp) built with g++ against _CUDA_STUB."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    import importlib.util

    import pybind11

    tmp = tmp_path_factory.mktemp("cuda_binding")
    (tmp / "stub.cpp").write_text(_CUDA_STUB)
    target = tmp / ("sfs_stub_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["g++", "-O0", "-shared", "-fPIC", "-std=c++17", "-DTORCH_EXTENSION_NAME=sfs_stub_cuda",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(ROOT / "kernels" / "cuda" / "sh_shade_binding.cpp"), str(tmp / "stub.cpp"), "-o", str(target)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("sfs_stub_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_backward(module, h, w, partial_tiles):
    # Null pointers: the stub launches nothing; only the binding's own checks run.
    module.backward(0, 2, h, w, 1, 1, 0, 0, 0.0, True, 1, 0, 1, 0, 0, 1, partial_tiles, 0)


def test_cuda_launcher_sizes_partial_from_reported_tiles(cuda_binding_on_stub):
    from sfs_fast.kernels import cuda_sh_shade

    assert cuda_sh_shade.tile_geometry(cuda_binding_on_stub) == (4, 16)
    tiles = cuda_sh_shade.light_partial_tiles(cuda_binding_on_stub, 9, 33)
    assert tiles == 3 * 3  # ceil(9/4) * ceil(33/16); the real kernels' 8x32 tiles would give 2 * 2
    _stub_backward(cuda_binding_on_stub, 9, 33, tiles)


def test_cuda_binding_refuses_partial_sized_for_other_tiles(cuda_binding_on_stub):
    with pytest.raises(ValueError, match=r"^partial: 4 tiles per image, the kernels' 4x16 tiles need 9"):
        _stub_backward(cuda_binding_on_stub, 9, 33, 2 * 2)


@pytest.mark.parametrize("report", [None, (0, 32), (8,), (8.0, 32)])
def test_cuda_launcher_refuses_missing_or_malformed_tile_report(report):
    from types import SimpleNamespace

    from sfs_fast.kernels import cuda_sh_shade

    module = SimpleNamespace() if report is None else SimpleNamespace(tile_geometry=lambda: report)
    with pytest.raises((RuntimeError, ValueError)):
        cuda_sh_shade.light_partial_tiles(module, 9, 33)


def test_compiled_sh_constants_equal_sfs_fast_sh():
    """csrc/sh_basis.h (included by the C++ and the CUDA kernels) holds the same constants as
    sfs_fast.sh, and no other kernel source defines its own."""
    from sfs_fast import sh

    header = (ROOT / "kernels" / "csrc" / "sh_basis.h").read_text()
    found = dict(re.findall(r"constexpr double (k\w+) = ([-+.0-9eE]+);", header))
    want = {"kC1": sh.C1, "kC2": sh.C2, "kC3": sh.C3, "kC4": sh.C4, "kC5": sh.C5, "kEps": sh.NORMAL_EPS}
    assert {k: float(v) for k, v in found.items()} == want
    sources = [ROOT / "kernels" / "csrc" / "sh_shade_impl.h", ROOT / "kernels" / "cuda" / "sh_shade_kernels.cu"]
    for src in sources:
        text = src.read_text()
        assert "sh_basis.h" in text and not re.search(r"constexpr double kC\d", text), src.name


def test_backends_registry_lists_all():
    """BACKENDS is the one tuple of shading backend names (other modules build choices from it)."""
    assert BACKENDS == ("reference", "compile", "cpu", "triton", "cuda")
    assert set(available_backends("cpu")) <= set(BACKENDS)
    assert available_backends("meta") == ["reference", "compile"]


def test_op_benchmark_runs_and_reports():
    """The micro benchmark's plumbing (not its speed): rows, ratios, floor, error check, table."""
    from sfs_fast.bench import op

    result = op.run(shapes=[(2, 3, 8, 9)], backends=["reference", "cpu"], runs=2, warmup=1, threads=1)
    assert [r["mode"] for r in result["rows"]] == list(op.MODES)
    for row in result["rows"]:
        assert row["floor_ms"] > 0 and row["bytes"] == op.op_bytes((2, 3, 8, 9), row["mode"])
        cpu = row["backends"]["cpu"]
        assert cpu["status"] == "ok" and cpu["max_rel_err"] <= 1e-5 and cpu["ms"]["runs"] == 2
    table = op.format_table(result)
    assert "floor" in table and "ref/cpu" in table
    with pytest.raises(ValueError, match="backends"):
        op.run(shapes=[(1, 3, 4, 4)], backends=["cuda"], runs=1, warmup=0, threads=1)
