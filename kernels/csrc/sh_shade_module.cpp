// pybind11 module sfs_fast.kernels._cpu: the fused SH shading op on raw buffers.
//
// Takes data pointers (integers) and sizes, not torch tensors, so the extension has no
// coupling to the torch C++ ABI; kernels/cpu.py owns the tensors (contiguous, alive for the
// call) and passes their data_ptr(). The GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sh_shade.h"

namespace py = pybind11;

namespace {

using Kernel = void (*)(const sfs::Problem&, int);

struct Variant {
  const char* name;
  Kernel forward;
  Kernel backward;
};

// The widest variant the CPU runs; SFS_FAST_CPU_ISA=generic|avx2 asks for a narrower one
// (tests use it to check every variant on one machine).
Variant pick_variant() {
  const char* want_env = std::getenv("SFS_FAST_CPU_ISA");
  const std::string want = want_env ? want_env : "";
  if (want == "generic") return {"generic", sfs::forward_generic, sfs::backward_generic};
#if defined(SFS_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (want != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {"avx512", sfs::forward_avx512, sfs::backward_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {"avx2", sfs::forward_avx2, sfs::backward_avx2};
#endif
  return {"generic", sfs::forward_generic, sfs::backward_generic};
}

const Variant& variant() {
  static const Variant v = pick_variant();
  return v;
}

const void* cptr(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("dtype: expected a code 0..3, got " + std::to_string(dtype));
}

void check_sizes(int64_t B, int64_t H, int64_t W) {
  if (B < 0 || H < 0 || W < 0) throw std::invalid_argument("normal: negative size");
}

void forward(int dtype, int64_t B, int64_t H, int64_t W, std::uintptr_t normal, std::uintptr_t light,
             std::uintptr_t residue, std::uintptr_t albedo, double beta, bool normalize, std::uintptr_t shading,
             std::uintptr_t recon) {
  check_dtype(dtype);
  check_sizes(B, H, W);
  if (B == 0 || H == 0 || W == 0) return;
  if (!normal || !light || !shading || (albedo && !recon))
    throw std::invalid_argument("forward: missing buffer");
  sfs::Problem p{};
  p.B = B; p.H = H; p.W = W;
  p.normal = cptr(normal); p.light = cptr(light); p.residue = cptr(residue); p.albedo = cptr(albedo);
  p.shading = mptr(shading); p.recon = mptr(recon);
  p.beta = beta; p.normalize = normalize;
  py::gil_scoped_release release;
  variant().forward(p, dtype);
}

void backward(int dtype, int64_t B, int64_t H, int64_t W, std::uintptr_t normal, std::uintptr_t light,
              std::uintptr_t residue, std::uintptr_t albedo, double beta, bool normalize,
              std::uintptr_t grad_shading, std::uintptr_t grad_recon, std::uintptr_t grad_normal,
              std::uintptr_t grad_residue, std::uintptr_t grad_albedo, std::uintptr_t light_partial) {
  check_dtype(dtype);
  check_sizes(B, H, W);
  if (B == 0 || H == 0 || W == 0) return;
  if (!normal || !light || !grad_shading || !grad_normal || !light_partial || (albedo && (!grad_recon || !grad_albedo)) ||
      (residue && !grad_residue))
    throw std::invalid_argument("backward: missing buffer");
  sfs::Problem p{};
  p.B = B; p.H = H; p.W = W;
  p.normal = cptr(normal); p.light = cptr(light); p.residue = cptr(residue); p.albedo = cptr(albedo);
  p.grad_shading = cptr(grad_shading); p.grad_recon = cptr(grad_recon);
  p.grad_normal = mptr(grad_normal); p.grad_residue = mptr(grad_residue); p.grad_albedo = mptr(grad_albedo);
  p.light_partial = mptr(light_partial);
  p.beta = beta; p.normalize = normalize;
  py::gil_scoped_release release;
  variant().backward(p, dtype);
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "Fused SH shading kernels on raw NCHW buffers (forward, backward); see sfs_fast.kernels.cpu.";
  m.def("forward", &forward,
        "forward(dtype, B, H, W, normal, light, residue, albedo, beta, normalize, shading, recon): pointers as ints, "
        "0 for an absent buffer; light in the accumulation type.");
  m.def("backward", &backward,
        "backward(dtype, B, H, W, normal, light, residue, albedo, beta, normalize, grad_shading, grad_recon, "
        "grad_normal, grad_residue, grad_albedo, light_partial[B*H,27])");
  m.def("isa", []() { return std::string(variant().name); }, "The instruction-set variant in use.");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use.");
  m.def("set_threads", &set_threads, "Set the OpenMP thread count of the kernels.");
  m.attr("has_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
}
