// hostcuda.h: compile CUDA C++ kernel source, unchanged, with the host C++ compiler.
//
// The harness force-includes this header before the kernel source.  It maps the
// CUDA language extensions the kernels use onto C++20 and a small runtime in
// which every CUDA thread of a block is a real std::thread, __syncthreads() is a
// real barrier, and warps meet only at warp-level sync points.  Whatever is not
// defined here fails to compile: nothing unsupported is silently accepted.
#ifndef CUPYBN_HOSTCUDA_H
#define CUPYBN_HOSTCUDA_H

#define __HOSTCUDA__ 1

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

// Function and variable qualifiers.  The harness rewrites every __shared__
// declaration of the kernel source (see _build.py: rewrite_shared) into a
// reference to storage in its shared memory, one copy for all the threads of the
// running block (the blocks of a grid run one after the other), refilled for
// every block and known to the race check.  A __shared__ left for this macro is
// one the rewrite did not see (in an #included header, or in a macro): refused.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ \
  _Pragma("GCC error \"hostcuda: declare __shared__ variables in the .cu source given to RawModule, not in an #included header or a macro\"")
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __CUDACC__HOSTCUDA 1

namespace hostcuda {
// Ends the launch with an error that Python raises as KernelError (defined in
// runtime.h; declared here so that every part of the header can use it).
[[noreturn]] inline void trap(const char* message);
}  // namespace hostcuda

// Device-side assert: fails the launch instead of aborting the Python process.
#undef assert
#define HOSTCUDA_STR2(x) #x
#define HOSTCUDA_STR(x) HOSTCUDA_STR2(x)
#define assert(e) \
  ((e) ? (void)0 : ::hostcuda::trap("assertion failed: " #e " at " __FILE__ ":" HOSTCUDA_STR(__LINE__)))

#include "hostcuda/half.h"
#include "hostcuda/vector_types.h"
#include "hostcuda/math.h"
#include "hostcuda/runtime.h"
#include "hostcuda/atomic.h"

#endif  // CUPYBN_HOSTCUDA_H
