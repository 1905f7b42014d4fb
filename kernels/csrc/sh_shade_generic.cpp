// Kernels for the baseline instruction set of the compiler's target.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sh_shade.h"

namespace sfs {
#define SFS_ENTRY(name) name##_generic
#include "sh_shade_impl.h"
}  // namespace sfs
