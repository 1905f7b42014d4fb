// One-pass SH shading kernels (forward and backward), included once per instruction-set
// target by sh_shade_{generic,avx2,avx512}.cpp. Everything here has internal linkage
// (anonymous namespace), so a copy compiled for AVX-512 can never be picked by the linker
// for a machine that lacks it.
//
// Layout: NCHW contiguous, float tensors of dtype T (float, double, or 16-bit half/bfloat16
// passed as uint16_t bit patterns); accumulation type A is double for double, float otherwise.
// Must be included after all standard headers (see the .cpp files), with SFS_ENTRY(name)
// defined to give the two entry points (forward, backward) a per-target name.
//
// Math (sfs_fast/sh.py is the definition; its constants and basis are in sh_basis.h, shared
// with the CUDA kernels): u = n / (|n| + 1e-8) (or n when !normalize),
// Y = 9 SH basis values of u, s_c = Y . L[9c:9c+9] + res_c, recon_c = s_c * (alb_c - beta*res_c).

// Every per-pixel helper is forced inline: in a translation unit holding 64 instantiations
// GCC's inlining budget otherwise leaves some as calls, and a call stops vectorization
// (measured: float16 forward 28 ms instead of 1.5 ms at 16x3x128x128).
#if defined(__GNUC__)
#define SFS_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define SFS_ALWAYS_INLINE static inline
#endif

namespace {

#include "sh_basis.h"

// Below this many pixels one thread does the work: waking a team costs more than it saves
// (the same threshold idea as ATen's GRAIN_SIZE = 32768 elements).
constexpr int64_t kParallelGrain = 16384;

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

SFS_ALWAYS_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
SFS_ALWAYS_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// IEEE half -> float, exact. Selects on bit patterns (not on floats) keep it branch-free.
SFS_ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t rest = h & 0x7fffu;
  const uint32_t normal = (rest << 13) + 0x38000000u;                   // re-bias by (127 - 15) << 23
  const uint32_t sub = float_to_bits((float)(int32_t)rest * 5.9604644775390625e-08f);  // mantissa * 2^-24
  const uint32_t infnan = (rest << 13) | 0x7f800000u;
  uint32_t bits = rest < 0x0400u ? sub : normal;
  bits = rest >= 0x7c00u ? infnan : bits;
  return bits_to_float(bits | sign);
}

// float -> IEEE half, round to nearest even, overflow to inf. Every case is computed and the
// answer selected (no branches), so loops that store halves still vectorize.
SFS_ALWAYS_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  // Normal halves: re-bias the exponent (-(112 << 23)) and round at mantissa bit 13.
  const uint32_t normal = (au + 0xc8000fffu + ((au >> 13) & 1u)) >> 13;
  // Below 2^-14 (subnormal half or zero): adding 0.5 makes the FPU round at the 2^-24 position.
  const uint32_t sub = float_to_bits(bits_to_float(au) + 0.5f) - 0x3f000000u;
  uint32_t out = au < 0x38800000u ? sub : normal;
  out = au >= 0x477ff000u ? 0x7c00u : out;                              // rounds to >= 65520: inf
  out = au > 0x7f800000u ? 0x7e00u : out;                               // nan stays nan
  return (uint16_t)(out | sign);
}

SFS_ALWAYS_INLINE float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

SFS_ALWAYS_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;     // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

template <typename T> struct Io;
template <> struct Io<float> {
  using Acc = float;
  SFS_ALWAYS_INLINE float load(const float* p, int64_t i) { return p[i]; }
  SFS_ALWAYS_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Io<double> {
  using Acc = double;
  SFS_ALWAYS_INLINE double load(const double* p, int64_t i) { return p[i]; }
  SFS_ALWAYS_INLINE void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <> struct Io<Half> {
  using Acc = float;
  SFS_ALWAYS_INLINE float load(const Half* p, int64_t i) { return half_to_float(p[i].bits); }
  SFS_ALWAYS_INLINE void store(Half* p, int64_t i, float v) { p[i].bits = float_to_half(v); }
};
template <> struct Io<BFloat16> {
  using Acc = float;
  SFS_ALWAYS_INLINE float load(const BFloat16* p, int64_t i) { return bf16_to_float(p[i].bits); }
  SFS_ALWAYS_INLINE void store(BFloat16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }
};

// Unit normal and the 9 basis values of one pixel, with the scales of unit_scales (1 and 0
// without normalization, where u = n).
template <typename A, bool NORM>
SFS_ALWAYS_INLINE void basis(A x, A y, A z, A* u, A* Y, A* inv_d, A* inv_r) {
  if (NORM) {
    unit_scales(x, y, z, inv_d, inv_r);
    x *= *inv_d; y *= *inv_d; z *= *inv_d;
  } else {
    *inv_d = A(1);
    *inv_r = A(0);
  }
  u[0] = x; u[1] = y; u[2] = z;
  sh_basis(x, y, z, Y);
}

// Forward over one image row of W pixels; pointers are at the row's first pixel of channel 0.
template <typename T, bool RES, bool ALB, bool NORM>
static void forward_row(const T* __restrict n, const T* __restrict res, const T* __restrict alb,
                        const typename Io<T>::Acc* __restrict L, typename Io<T>::Acc beta,
                        T* __restrict shading, T* __restrict recon, int64_t W, int64_t plane) {
  using A = typename Io<T>::Acc;
  using IO = Io<T>;
  A Lr[27];
  for (int k = 0; k < 27; ++k) Lr[k] = L[k];
  for (int64_t i = 0; i < W; ++i) {
    A u[3], Y[9], inv_d, inv_r;
    basis<A, NORM>(IO::load(n, i), IO::load(n, i + plane), IO::load(n, i + 2 * plane), u, Y, &inv_d, &inv_r);
#pragma GCC unroll 3
    for (int c = 0; c < 3; ++c) {
      const int64_t j = i + c * plane;
      const A* Lc = Lr + 9 * c;
      A s = sh_dot9(Lc, Y);
      A rc = A(0);
      if (RES) rc = IO::load(res, j);
      s += rc;
      IO::store(shading, j, s);
      if (ALB) {
        const A refl = RES ? IO::load(alb, j) - beta * rc : IO::load(alb, j);
        IO::store(recon, j, s * refl);
      }
    }
  }
}

// Backward of one pixel. Writes grad_normal/residue/albedo at i and adds this pixel's light
// gradient into acc[k * V + lane] (lane-strided so a block of V pixels vectorizes).
template <typename T, bool RES, bool ALB, bool NORM, int V>
SFS_ALWAYS_INLINE void backward_pixel(const T* __restrict n, const T* __restrict res, const T* __restrict alb,
                                  const T* __restrict gs, const T* __restrict gr,
                                  const typename Io<T>::Acc* __restrict L, typename Io<T>::Acc beta,
                                  T* __restrict gn, T* __restrict gres, T* __restrict galb,
                                  typename Io<T>::Acc* __restrict acc, int lane, int64_t i, int64_t plane) {
  using A = typename Io<T>::Acc;
  using IO = Io<T>;
  const A x = IO::load(n, i), y = IO::load(n, i + plane), z = IO::load(n, i + 2 * plane);
  A u[3], Y[9], inv_d, inv_r;
  basis<A, NORM>(x, y, z, u, Y, &inv_d, &inv_r);
  A Lw[9];
  for (int k = 0; k < 9; ++k) Lw[k] = A(0);
  // Fully unrolled, so the caller's loop over pixels has no inner loops left to vectorize.
#pragma GCC unroll 3
  for (int c = 0; c < 3; ++c) {
    const int64_t j = i + c * plane;
    const A* Lc = L + 9 * c;
    A g = IO::load(gs, j);
    if (ALB) {
      A s = sh_dot9(Lc, Y);
      const A rc = RES ? IO::load(res, j) : A(0);
      s += rc;
      const A grc = IO::load(gr, j);
      const A a = IO::load(alb, j);
      g += grc * (RES ? a - beta * rc : a);
      IO::store(galb, j, grc * s);
      if (RES) IO::store(gres, j, g - beta * grc * s);
    } else if (RES) {
      IO::store(gres, j, g);
    }
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) {
      acc[(9 * c + k) * V + lane] += g * Y[k];
      Lw[k] += g * Lc[k];
    }
  }
  A g[3];
  sh_basis_grad(u[0], u[1], u[2], Lw, g);
  if (NORM) unnormalize_grad(x, y, z, inv_d, inv_r, g);
  IO::store(gn, i, g[0]);
  IO::store(gn, i + plane, g[1]);
  IO::store(gn, i + 2 * plane, g[2]);
}

// Backward over one row; writes the row's 27 light-gradient partial sums to light_partial.
template <typename T, bool RES, bool ALB, bool NORM>
static void backward_row(const T* __restrict n, const T* __restrict res, const T* __restrict alb,
                         const T* __restrict gs, const T* __restrict gr, const typename Io<T>::Acc* __restrict L,
                         typename Io<T>::Acc beta, T* __restrict gn, T* __restrict gres, T* __restrict galb,
                         typename Io<T>::Acc* __restrict light_partial, int64_t W, int64_t plane) {
  // __restrict here matters: without it the pixel loop needs ~170 run-time alias checks and
  // GCC gives up vectorizing it.
  using A = typename Io<T>::Acc;
  constexpr int V = 16;
  A Lr[27];
  for (int k = 0; k < 27; ++k) Lr[k] = L[k];
  A acc[27 * V];
  for (int k = 0; k < 27 * V; ++k) acc[k] = A(0);
  int64_t i = 0;
  for (; i + V <= W; i += V) {
    for (int lane = 0; lane < V; ++lane)
      backward_pixel<T, RES, ALB, NORM, V>(n, res, alb, gs, gr, Lr, beta, gn, gres, galb, acc, lane, i + lane, plane);
  }
  for (; i < W; ++i)
    backward_pixel<T, RES, ALB, NORM, V>(n, res, alb, gs, gr, Lr, beta, gn, gres, galb, acc, 0, i, plane);
  for (int k = 0; k < 27; ++k) {
    A t = A(0);
    for (int lane = 0; lane < V; ++lane) t += acc[k * V + lane];
    light_partial[k] = t;
  }
}

// Calls row(b, r, off) for each of the B*H image rows: b the image, r the row's index, off
// the offset of its first pixel in channel 0. OpenMP threads split the rows (statically, so
// each row's light partial sums are the same for any thread count).
template <typename Row>
static void for_each_row(const sfs::Problem& p, const Row& row) {
  const int64_t plane = p.H * p.W, rows = p.B * p.H;
#pragma omp parallel for schedule(static) if (rows * p.W >= kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / p.H, y = r % p.H;
    row(b, r, b * 3 * plane + y * p.W);
  }
}

template <typename T, bool RES, bool ALB, bool NORM>
static void forward_all(const sfs::Problem& p) {
  using A = typename Io<T>::Acc;
  const int64_t plane = p.H * p.W;
  const T *n = static_cast<const T*>(p.normal), *res = static_cast<const T*>(p.residue);
  const T* alb = static_cast<const T*>(p.albedo);
  T *sh = static_cast<T*>(p.shading), *rc = static_cast<T*>(p.recon);
  const A* L = static_cast<const A*>(p.light);
  const A beta = (A)p.beta;
  for_each_row(p, [&](int64_t b, int64_t, int64_t off) {
    forward_row<T, RES, ALB, NORM>(n + off, RES ? res + off : nullptr, ALB ? alb + off : nullptr, L + 27 * b, beta,
                                   sh + off, ALB ? rc + off : nullptr, p.W, plane);
  });
}

template <typename T, bool RES, bool ALB, bool NORM>
static void backward_all(const sfs::Problem& p) {
  using A = typename Io<T>::Acc;
  const int64_t plane = p.H * p.W;
  const T *n = static_cast<const T*>(p.normal), *res = static_cast<const T*>(p.residue);
  const T *alb = static_cast<const T*>(p.albedo), *gs = static_cast<const T*>(p.grad_shading);
  const T* gr = static_cast<const T*>(p.grad_recon);
  T *gn = static_cast<T*>(p.grad_normal), *gres = static_cast<T*>(p.grad_residue);
  T* galb = static_cast<T*>(p.grad_albedo);
  const A* L = static_cast<const A*>(p.light);
  A* partial = static_cast<A*>(p.light_partial);
  const A beta = (A)p.beta;
  for_each_row(p, [&](int64_t b, int64_t r, int64_t off) {
    backward_row<T, RES, ALB, NORM>(n + off, RES ? res + off : nullptr, ALB ? alb + off : nullptr, gs + off,
                                    ALB ? gr + off : nullptr, L + 27 * b, beta, gn + off,
                                    RES ? gres + off : nullptr, ALB ? galb + off : nullptr, partial + 27 * r,
                                    p.W, plane);
  });
}

#define SFS_DISPATCH_FLAGS(FN, T, p)                                  \
  do {                                                                \
    const bool res_ = (p).residue != nullptr;                         \
    const bool alb_ = (p).albedo != nullptr;                          \
    if (res_ && alb_) { if ((p).normalize) FN<T, true, true, true>(p); else FN<T, true, true, false>(p); }      \
    else if (res_)    { if ((p).normalize) FN<T, true, false, true>(p); else FN<T, true, false, false>(p); }    \
    else if (alb_)    { if ((p).normalize) FN<T, false, true, true>(p); else FN<T, false, true, false>(p); }    \
    else              { if ((p).normalize) FN<T, false, false, true>(p); else FN<T, false, false, false>(p); }  \
  } while (0)

// dtype codes shared with the Python side (kernels/_launch.py DTYPE_CODES):
// 0 float32, 1 float64, 2 float16, 3 bfloat16.
#define SFS_DISPATCH(FN, p, dtype)                                    \
  switch (dtype) {                                                    \
    case 0: SFS_DISPATCH_FLAGS(FN, float, p); break;                  \
    case 1: SFS_DISPATCH_FLAGS(FN, double, p); break;                 \
    case 2: SFS_DISPATCH_FLAGS(FN, Half, p); break;                   \
    default: SFS_DISPATCH_FLAGS(FN, BFloat16, p); break;              \
  }

}  // namespace

#ifndef SFS_KERNELS_ONLY  // (a vectorization report compiles just the templates)
void SFS_ENTRY(forward)(const sfs::Problem& p, int dtype) { SFS_DISPATCH(forward_all, p, dtype) }

void SFS_ENTRY(backward)(const sfs::Problem& p, int dtype) { SFS_DISPATCH(backward_all, p, dtype) }
#endif  // SFS_KERNELS_ONLY
