// pybind11 binding of the CUDA kernels (sh_shade_kernels.cu): raw device pointers and a stream
// handle as integers, no torch types, like the CPU module. Built on first use by
// sfs_fast.kernels.cuda_sh_shade through torch.utils.cpp_extension.load (which defines
// TORCH_EXTENSION_NAME).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME sfs_sh_shade_cuda
#endif

int sfs_cuda_forward(int dtype, int64_t B, int64_t H, int64_t W, const void* normal, const void* light,
                     const void* residue, const void* albedo, double beta, bool normalize, void* shading, void* recon,
                     void* stream);
int sfs_cuda_backward(int dtype, int64_t B, int64_t H, int64_t W, const void* normal, const void* light,
                      const void* residue, const void* albedo, double beta, bool normalize, const void* grad_shading,
                      const void* grad_recon, void* grad_normal, void* grad_residue, void* grad_albedo, void* partial,
                      void* stream);
const char* sfs_cuda_error_string(int code);
void sfs_cuda_tile_geometry(int* block_h, int* block_w);

namespace py = pybind11;

namespace {

const void* cp(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mp(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": " + sfs_cuda_error_string(code));
}

py::tuple tile_geometry() {
  int block_h = 0, block_w = 0;
  sfs_cuda_tile_geometry(&block_h, &block_w);
  return py::make_tuple(block_h, block_w);
}

// The backward writes one 27-sum row per tile per image: a buffer sized for other tiles would be
// overrun, so refuse it (ValueError in Python) before launching.
void check_partial_tiles(int64_t H, int64_t W, int64_t partial_tiles) {
  int block_h = 0, block_w = 0;
  sfs_cuda_tile_geometry(&block_h, &block_w);
  const int64_t want = ((H + block_h - 1) / block_h) * ((W + block_w - 1) / block_w);
  if (partial_tiles != want)
    throw std::invalid_argument("partial: " + std::to_string(partial_tiles) + " tiles per image, the kernels' " +
                                std::to_string(block_h) + "x" + std::to_string(block_w) + " tiles need " +
                                std::to_string(want));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SH shading CUDA kernels on raw device buffers; see sfs_fast.kernels.cuda_sh_shade.";
  m.def("forward", [](int dtype, int64_t B, int64_t H, int64_t W, std::uintptr_t normal, std::uintptr_t light,
                      std::uintptr_t residue, std::uintptr_t albedo, double beta, bool normalize,
                      std::uintptr_t shading, std::uintptr_t recon, std::uintptr_t stream) {
    if (B == 0 || H == 0 || W == 0) return;
    check(sfs_cuda_forward(dtype, B, H, W, cp(normal), cp(light), cp(residue), cp(albedo), beta, normalize,
                           mp(shading), mp(recon), mp(stream)),
          "sh_shade forward");
  });
  m.def("backward", [](int dtype, int64_t B, int64_t H, int64_t W, std::uintptr_t normal, std::uintptr_t light,
                       std::uintptr_t residue, std::uintptr_t albedo, double beta, bool normalize,
                       std::uintptr_t grad_shading, std::uintptr_t grad_recon, std::uintptr_t grad_normal,
                       std::uintptr_t grad_residue, std::uintptr_t grad_albedo, std::uintptr_t partial,
                       int64_t partial_tiles, std::uintptr_t stream) {
    if (B == 0 || H == 0 || W == 0) return;
    check_partial_tiles(H, W, partial_tiles);
    check(sfs_cuda_backward(dtype, B, H, W, cp(normal), cp(light), cp(residue), cp(albedo), beta, normalize,
                            cp(grad_shading), cp(grad_recon), mp(grad_normal), mp(grad_residue), mp(grad_albedo),
                            mp(partial), mp(stream)),
          "sh_shade backward");
  });
  m.def("tile_geometry", &tile_geometry, "(block_h, block_w): the pixels of one thread block's tile.");
}
