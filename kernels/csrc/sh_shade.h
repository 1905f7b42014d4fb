// Shared declarations of the fused SH shading kernels (see sh_shade_impl.h for the math).
#pragma once
#include <cstdint>

namespace sfs {

// One call's buffers: NCHW contiguous [B,3,H,W] tensors of one dtype; light [B,27] and
// light_partial [B*H,27] in the accumulation type (double for float64 tensors, else float).
// Optional buffers are nullptr when absent.
struct Problem {
  int64_t B, H, W;
  const void *normal, *light, *residue, *albedo;
  const void *grad_shading, *grad_recon;
  void *shading, *recon;
  void *grad_normal, *grad_residue, *grad_albedo, *light_partial;
  double beta;
  bool normalize;
};

// One pair of entry points per instruction-set target; the module picks one at run time.
void forward_generic(const Problem& p, int dtype);
void backward_generic(const Problem& p, int dtype);
#if defined(__x86_64__) && defined(__GNUC__)
#define SFS_HAVE_X86_VARIANTS 1
void forward_avx2(const Problem& p, int dtype);
void backward_avx2(const Problem& p, int dtype);
void forward_avx512(const Problem& p, int dtype);
void backward_avx512(const Problem& p, int dtype);
#endif

}  // namespace sfs
