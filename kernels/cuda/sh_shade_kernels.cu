// CUDA kernels of the fused SH shading op (forward, backward) and their launchers.
//
// Same math as kernels/csrc/sh_shade_impl.h and the Triton kernels: one thread per pixel in
// 2-D blocks of 32 x 8 pixels, one block per tile per image (grid (tiles, B)). The backward
// reduces each block's 27 light-gradient sums (warp shuffles, then shared memory) and writes
// them to partial[B, tiles, 27]; the caller sums over tiles once (no atomics).
//
// No torch headers: the launchers take raw device pointers and a stream, so `nvcc -c` of this
// file alone proves it builds. dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kBlockW = 32;
constexpr int kBlockH = 8;
constexpr int kThreads = kBlockW * kBlockH;

#include "../csrc/sh_basis.h"  // constants and basis, shared with the C++ kernels

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type ld(const T* p, int64_t i) {
  return static_cast<typename Acc<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T, typename A> __device__ __forceinline__ void st(T* p, int64_t i, A v) { p[i] = static_cast<T>(v); }
template <> __device__ __forceinline__ void st<__half, float>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Unit normal u and its 9 basis values; inv_d = 1/(|n|+eps), inv_r = 1/|n| (1 and 0 without
// normalization, where u = n).
template <typename A>
__device__ __forceinline__ void unit_basis(A x, A y, A z, bool normalize, A* u, A* Y, A* inv_d, A* inv_r) {
  if (normalize) {
    unit_scales(x, y, z, inv_d, inv_r);
  } else {
    *inv_d = A(1);
    *inv_r = A(0);
  }
  x *= *inv_d; y *= *inv_d; z *= *inv_d;
  u[0] = x; u[1] = y; u[2] = z;
  sh_basis(x, y, z, Y);
}

// Tiles of kBlockH x kBlockW pixels covering one H x W image: the grid's first axis, and the
// second axis of the backward's partial[B, tiles, 27].
__host__ __device__ __forceinline__ int64_t tile_count(int64_t H, int64_t W) {
  return ((H + kBlockH - 1) / kBlockH) * ((W + kBlockW - 1) / kBlockW);
}

// Pixel of this thread: returns false outside the image. off = offset of channel 0.
__device__ __forceinline__ bool pixel(int64_t H, int64_t W, int64_t* off) {
  const int64_t tiles_w = (W + kBlockW - 1) / kBlockW;
  const int64_t t = blockIdx.x;
  const int64_t row = (t / tiles_w) * kBlockH + threadIdx.y;
  const int64_t col = (t % tiles_w) * kBlockW + threadIdx.x;
  *off = static_cast<int64_t>(blockIdx.y) * 3 * H * W + row * W + col;
  return row < H && col < W;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const T* __restrict__ normal, const typename Acc<T>::type* __restrict__ light, const T* __restrict__ residue,
    const T* __restrict__ albedo, T* __restrict__ shading, T* __restrict__ recon, int64_t H, int64_t W,
    typename Acc<T>::type beta, bool normalize) {
  using A = typename Acc<T>::type;
  int64_t off;
  if (!pixel(H, W, &off)) return;
  const int64_t plane = H * W;
  A u[3], Y[9], inv_d, inv_r;
  unit_basis<A>(ld(normal, off), ld(normal, off + plane), ld(normal, off + 2 * plane), normalize, u, Y, &inv_d, &inv_r);
  const A* L = light + 27 * static_cast<int64_t>(blockIdx.y);
  for (int c = 0; c < 3; ++c) {
    const int64_t j = off + c * plane;
    const A rc = residue ? ld(residue, j) : A(0);
    const A s = sh_dot9(L + 9 * c, Y) + rc;
    st(shading, j, s);
    if (albedo) st(recon, j, s * (ld(albedo, j) - beta * rc));
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const T* __restrict__ normal, const typename Acc<T>::type* __restrict__ light, const T* __restrict__ residue,
    const T* __restrict__ albedo, const T* __restrict__ grad_shading, const T* __restrict__ grad_recon,
    T* __restrict__ grad_normal, T* __restrict__ grad_residue, T* __restrict__ grad_albedo,
    typename Acc<T>::type* __restrict__ partial, int64_t H, int64_t W, typename Acc<T>::type beta, bool normalize) {
  using A = typename Acc<T>::type;
  __shared__ A block_sums[27][kThreads / 32];
  int64_t off;
  const bool inside = pixel(H, W, &off);
  const int64_t plane = H * W;
  const A* L = light + 27 * static_cast<int64_t>(blockIdx.y);
  A gl[27];
  for (int k = 0; k < 27; ++k) gl[k] = A(0);
  if (inside) {
    const A x = ld(normal, off), y = ld(normal, off + plane), z = ld(normal, off + 2 * plane);
    A u[3], Y[9], inv_d, inv_r;
    unit_basis<A>(x, y, z, normalize, u, Y, &inv_d, &inv_r);
    A Lw[9];
    for (int k = 0; k < 9; ++k) Lw[k] = A(0);
    for (int c = 0; c < 3; ++c) {
      const int64_t j = off + c * plane;
      A g = ld(grad_shading, j);
      if (albedo) {
        const A rc = residue ? ld(residue, j) : A(0);
        const A s = sh_dot9(L + 9 * c, Y) + rc;
        const A grc = ld(grad_recon, j);
        g += grc * (ld(albedo, j) - beta * rc);
        st(grad_albedo, j, grc * s);
        if (residue) st(grad_residue, j, g - beta * grc * s);
      } else if (residue) {
        st(grad_residue, j, g);
      }
      for (int k = 0; k < 9; ++k) {
        gl[9 * c + k] = g * Y[k];
        Lw[k] += g * L[9 * c + k];
      }
    }
    A g[3];
    sh_basis_grad(u[0], u[1], u[2], Lw, g);
    if (normalize) unnormalize_grad(x, y, z, inv_d, inv_r, g);
    st(grad_normal, off, g[0]);
    st(grad_normal, off + plane, g[1]);
    st(grad_normal, off + 2 * plane, g[2]);
  }
  const int tid = threadIdx.y * kBlockW + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  for (int k = 0; k < 27; ++k) {
    const A v = warp_sum(gl[k]);
    if (lane == 0) block_sums[k][warp] = v;
  }
  __syncthreads();
  if (tid < 27) {
    A t = A(0);
    for (int w = 0; w < kThreads / 32; ++w) t += block_sums[tid][w];
    partial[(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * 27 + tid] = t;
  }
}

template <typename T>
int launch_forward(int64_t B, int64_t H, int64_t W, const void* normal, const void* light, const void* residue,
                   const void* albedo, double beta, bool normalize, void* shading, void* recon, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 block(kBlockW, kBlockH);
  const dim3 grid(static_cast<unsigned>(tile_count(H, W)), static_cast<unsigned>(B));
  forward_kernel<T><<<grid, block, 0, stream>>>(
      static_cast<const T*>(normal), static_cast<const A*>(light), static_cast<const T*>(residue),
      static_cast<const T*>(albedo), static_cast<T*>(shading), static_cast<T*>(recon), H, W, static_cast<A>(beta),
      normalize);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(int64_t B, int64_t H, int64_t W, const void* normal, const void* light, const void* residue,
                    const void* albedo, double beta, bool normalize, const void* grad_shading, const void* grad_recon,
                    void* grad_normal, void* grad_residue, void* grad_albedo, void* partial, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const dim3 block(kBlockW, kBlockH);
  const dim3 grid(static_cast<unsigned>(tile_count(H, W)), static_cast<unsigned>(B));
  backward_kernel<T><<<grid, block, 0, stream>>>(
      static_cast<const T*>(normal), static_cast<const A*>(light), static_cast<const T*>(residue),
      static_cast<const T*>(albedo), static_cast<const T*>(grad_shading), static_cast<const T*>(grad_recon),
      static_cast<T*>(grad_normal), static_cast<T*>(grad_residue), static_cast<T*>(grad_albedo),
      static_cast<A*>(partial), H, W, static_cast<A>(beta), normalize);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Entry points for the binding (kernels/cuda/sh_shade_binding.cpp). Launches return a cudaError_t
// code; the backward's partial must hold B * tile_count(H, W) * 27 values (the binding checks).
int sfs_cuda_forward(int dtype, int64_t B, int64_t H, int64_t W, const void* normal, const void* light,
                     const void* residue, const void* albedo, double beta, bool normalize, void* shading, void* recon,
                     void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_forward<float>(B, H, W, normal, light, residue, albedo, beta, normalize, shading, recon, s);
    case 1: return launch_forward<double>(B, H, W, normal, light, residue, albedo, beta, normalize, shading, recon, s);
    case 2: return launch_forward<__half>(B, H, W, normal, light, residue, albedo, beta, normalize, shading, recon, s);
    default:
      return launch_forward<__nv_bfloat16>(B, H, W, normal, light, residue, albedo, beta, normalize, shading, recon, s);
  }
}

int sfs_cuda_backward(int dtype, int64_t B, int64_t H, int64_t W, const void* normal, const void* light,
                      const void* residue, const void* albedo, double beta, bool normalize, const void* grad_shading,
                      const void* grad_recon, void* grad_normal, void* grad_residue, void* grad_albedo, void* partial,
                      void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
#define SFS_BWD(T)                                                                                          \
  launch_backward<T>(B, H, W, normal, light, residue, albedo, beta, normalize, grad_shading, grad_recon,   \
                     grad_normal, grad_residue, grad_albedo, partial, s)
  switch (dtype) {
    case 0: return SFS_BWD(float);
    case 1: return SFS_BWD(double);
    case 2: return SFS_BWD(__half);
    default: return SFS_BWD(__nv_bfloat16);
  }
#undef SFS_BWD
}

const char* sfs_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// The tile of one thread block: the launcher sizes the backward's partial[B, tiles, 27] from it
// (a launcher with its own idea of the tile would under-size the buffer and the kernel would
// write past its end).
void sfs_cuda_tile_geometry(int* block_h, int* block_w) {
  *block_h = kBlockH;
  *block_w = kBlockW;
}

