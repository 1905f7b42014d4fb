#!/usr/bin/env bash
# GPU check of the fused shading op, for a CUDA machine (under 8 minutes):
#   1. builds the cuda backend (torch.utils.cpp_extension, cached under $OUT_DIR/cuda_build),
#   2. runs the GPU tests: cuda and triton backends vs the float64 reference, forward and
#      backward, fp32/fp16/bf16/fp64, plus the triton tests on the GPU,
#   3. runs the GPU micro benchmark (reference, compile, triton, cuda; floor = device copy),
#      printing its table last.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (JSON and logs go to OUT_DIR, default ./out/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-out}/gpu_check}"
mkdir -p "$OUT_DIR"
export SFS_FAST_CUDA_BUILD_DIR="${SFS_FAST_CUDA_BUILD_DIR:-$PWD/$OUT_DIR/cuda_build}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/$OUT_DIR/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/$OUT_DIR/triton}"
unset TRITON_INTERPRET

python - <<'PY'
import time, torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda, flush=True)
t = time.time()
from sfs_fast.kernels import cuda_sh_shade
cuda_sh_shade.load()
print(f"cuda backend built/loaded in {time.time() - t:.1f} s", flush=True)
PY

set +e
timeout 300 python -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
    tests/test_kernels_gpu.py tests/test_kernels_triton.py > "$OUT_DIR/tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT_DIR/tests.log"

timeout 240 python -m sfs_fast.bench.cli op --device cuda --runs 30 --warmup 5 \
    --json "$OUT_DIR/op_gpu.json" 2>"$OUT_DIR/bench.log"
bench_rc=$?
[ $bench_rc -ne 0 ] && tail -5 "$OUT_DIR/bench.log"
[ $tests_rc -ne 0 ] && echo "gpu_check: GPU TESTS FAILED (see $OUT_DIR/tests.log)" >&2
exit $(( tests_rc != 0 || bench_rc != 0 ))
