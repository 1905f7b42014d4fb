// Kernels compiled for AVX512 (x86-64 only), chosen at run time when the CPU has it.
// Standard headers come before the target pragma so no inline library function is compiled
// for AVX512 and shared with other translation units; the kernels have internal linkage.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sh_shade.h"

#if defined(SFS_HAVE_X86_VARIANTS)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace sfs {
#define SFS_ENTRY(name) name##_avx512
#include "sh_shade_impl.h"
}  // namespace sfs
#pragma GCC pop_options
#endif
