// The per-pixel SH math of the fused shading op, written once for the compiled kernels:
// the constants and basis of sfs_fast/sh.py (the definition), the unit-normal scales and
// the two gradients. Included by csrc/sh_shade_impl.h (C++, once per instruction-set target)
// and by cuda/sh_shade_kernels.cu. tests/test_kernels.py parses the constants below and
// compares them with sfs_fast.sh, so the two cannot drift.
//
// Include it inside an anonymous namespace, after the standard headers (<cmath> on the host):
// every copy then has internal linkage, so a function compiled for AVX-512 in one translation
// unit is never picked by the linker for another.
#pragma once

#if defined(__CUDACC__)
#define SFS_BASIS_FN __host__ __device__ __forceinline__
#define SFS_BASIS_SQRT sqrt
#elif defined(__GNUC__)
// Forced inline: a call left in a pixel loop stops GCC vectorizing it.
#define SFS_BASIS_FN static inline __attribute__((always_inline))
#define SFS_BASIS_SQRT std::sqrt
#else
#define SFS_BASIS_FN static inline
#define SFS_BASIS_SQRT std::sqrt
#endif

// C1..C5 of sfs_fast/sh.py as round-trip doubles; kEps is its NORMAL_EPS.
constexpr double kC1 = 0.886226925452758;    // pi / sqrt(4 pi)
constexpr double kC2 = 1.0233267079464883;   // 2pi/3 * sqrt(3/(4pi))
constexpr double kC3 = 0.24770795610037571;  // pi/4 * 0.5 * sqrt(5/(4pi))
constexpr double kC4 = 0.8580855308097834;   // pi/4 * 3 * sqrt(5/(12pi))
constexpr double kC5 = 0.4290427654048917;   // pi/4 * 3 * sqrt(5/(48pi))
constexpr double kEps = 1e-8;

// u = n * inv_d with inv_d = 1 / (|n| + eps); inv_r = 1 / |n|, taken as 0 at n = 0 (where the
// backward's projection term vanishes). Branch-free (selects, no guarded division) so GCC
// if-converts and vectorizes the CPU loops.
template <typename A>
SFS_BASIS_FN void unit_scales(A x, A y, A z, A* inv_d, A* inv_r) {
  const A r = SFS_BASIS_SQRT(x * x + y * y + z * z);
  *inv_d = A(1) / (r + A(kEps));
  const bool nonzero = r > A(0);
  *inv_r = (nonzero ? A(1) : A(0)) / (nonzero ? r : A(1));
}

// The 9 basis values Y of a unit normal (x, y, z).
template <typename A>
SFS_BASIS_FN void sh_basis(A x, A y, A z, A* Y) {
  Y[0] = A(kC1);
  Y[1] = A(kC2) * z;
  Y[2] = A(kC2) * x;
  Y[3] = A(kC2) * y;
  Y[4] = A(kC3) * (A(2) * z * z - x * x - y * y);
  Y[5] = A(kC4) * x * z;
  Y[6] = A(kC4) * y * z;
  Y[7] = A(kC5) * (x * x - y * y);
  Y[8] = A(kC4) * x * y;
}

// Y . L for one colour's 9 coefficients, summed in basis order.
template <typename A>
SFS_BASIS_FN A sh_dot9(const A* L, const A* Y) {
  return L[0] * Y[0] + L[1] * Y[1] + L[2] * Y[2] + L[3] * Y[3] + L[4] * Y[4] + L[5] * Y[5] + L[6] * Y[6] +
         L[7] * Y[7] + L[8] * Y[8];
}

// g = d(Y(u) . Lw)/du, where Lw is the light weighted by the shading gradient.
template <typename A>
SFS_BASIS_FN void sh_basis_grad(A ux, A uy, A uz, const A* Lw, A* g) {
  g[0] = A(kC2) * Lw[2] - A(2 * kC3) * ux * Lw[4] + A(kC4) * uz * Lw[5] + A(2 * kC5) * ux * Lw[7] + A(kC4) * uy * Lw[8];
  g[1] = A(kC2) * Lw[3] - A(2 * kC3) * uy * Lw[4] + A(kC4) * uz * Lw[6] - A(2 * kC5) * uy * Lw[7] + A(kC4) * ux * Lw[8];
  g[2] = A(kC2) * Lw[1] + A(4 * kC3) * uz * Lw[4] + A(kC4) * ux * Lw[5] + A(kC4) * uy * Lw[6];
}

// Chain rule through u = n / (r + eps): du/dn = I/d - n n^T / (d^2 r), in place on g.
template <typename A>
SFS_BASIS_FN void unnormalize_grad(A x, A y, A z, A inv_d, A inv_r, A* g) {
  const A proj = (g[0] * x + g[1] * y + g[2] * z) * inv_d * inv_d * inv_r;
  g[0] = g[0] * inv_d - x * proj;
  g[1] = g[1] * inv_d - y * proj;
  g[2] = g[2] * inv_d - z * proj;
}
