// Test kernels for the device math functions and intrinsics on the host
// harness.  Valid CUDA (the NVRTC gate compiles this file).  Every kernel uses a
// grid-stride loop; out[k * n + i] is result k for element i.
#include <cuda_fp16.h>

// CUDA's min/max overloads: the result types of the mixed forms, checked at
// compile time by both nvcc/NVRTC and the host compiler.
template <typename A, typename B>
struct same_type {
  static const bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static const bool value = true;
};
static_assert(same_type<decltype(min(1, 2)), int>::value, "min(int, int)");
static_assert(same_type<decltype(min(1, 2u)), unsigned int>::value, "min(int, unsigned)");
static_assert(same_type<decltype(max(1u, 2)), unsigned int>::value, "max(unsigned, int)");
static_assert(same_type<decltype(max(1LL, 2ULL)), unsigned long long>::value, "max(long long, ull)");
static_assert(same_type<decltype(min(1.0f, 2.0f)), float>::value, "min(float, float)");
static_assert(same_type<decltype(max(1.0f, 2.0)), double>::value, "max(float, double)");
static_assert(same_type<decltype(sqrt(1.0f)), float>::value, "sqrt(float) is a float function");
static_assert(same_type<decltype(fabs(1.0f)), float>::value, "fabs(float) is a float function");

// Correctly rounded float operations: 20 results per element.
extern "C" __global__ void float_exact(const float* __restrict__ a, const float* __restrict__ b,
                                       const float* __restrict__ c, float* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const float x = a[i], y = b[i], z = c[i];
    out[0 * n + i] = __fadd_rn(x, y);
    out[1 * n + i] = __fsub_rn(x, y);
    out[2 * n + i] = __fmul_rn(x, y);
    out[3 * n + i] = __fdiv_rn(x, y);
    out[4 * n + i] = __fmaf_rn(x, y, z);
    out[5 * n + i] = fmaf(x, y, z);
    out[6 * n + i] = __fadd_rn(__fmul_rn(x, y), z);  // two roundings, never fused
    out[7 * n + i] = __frcp_rn(x);
    out[8 * n + i] = __fsqrt_rn(fabsf(x));
    out[9 * n + i] = sqrtf(fabsf(x));
    out[10 * n + i] = __frsqrt_rn(fabsf(x));
    out[11 * n + i] = fminf(x, y);
    out[12 * n + i] = fmaxf(x, y);
    out[13 * n + i] = copysignf(x, y);
    out[14 * n + i] = floorf(x);
    out[15 * n + i] = ceilf(x);
    out[16 * n + i] = truncf(x);
    out[17 * n + i] = roundf(x);
    out[18 * n + i] = rintf(x);
    out[19 * n + i] = __saturatef(x);
  }
}

// Approximate float functions (compared with a tolerance): 10 results.
extern "C" __global__ void float_approx(const float* __restrict__ a, const float* __restrict__ b,
                                        float* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const float x = a[i], y = b[i];
    out[0 * n + i] = rsqrtf(fabsf(x));
    out[1 * n + i] = expf(x);
    out[2 * n + i] = exp2f(x);
    out[3 * n + i] = logf(fabsf(x));
    out[4 * n + i] = log2f(fabsf(x));
    out[5 * n + i] = powf(fabsf(x), y);
    out[6 * n + i] = __expf(x);
    out[7 * n + i] = __logf(fabsf(x));
    out[8 * n + i] = __fdividef(x, y);
    out[9 * n + i] = exp(x);  // the float overload
  }
}

// Double operations: 12 results (0-8 exact or correctly rounded, 9-11 approximate).
extern "C" __global__ void double_ops(const double* __restrict__ a, const double* __restrict__ b,
                                      const double* __restrict__ c, double* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const double x = a[i], y = b[i], z = c[i];
    out[0 * n + i] = __dadd_rn(x, y);
    out[1 * n + i] = __dmul_rn(x, y);
    out[2 * n + i] = __ddiv_rn(x, y);
    out[3 * n + i] = __fma_rn(x, y, z);
    out[4 * n + i] = fma(x, y, z);
    out[5 * n + i] = __drcp_rn(x);
    out[6 * n + i] = __dsqrt_rn(fabs(x));
    out[7 * n + i] = fmin(x, y);
    out[8 * n + i] = fmax(x, y);
    out[9 * n + i] = rsqrt(fabs(x));
    out[10 * n + i] = exp(x);
    out[11 * n + i] = log(fabs(x));
  }
}

// Float/double <-> integer conversions, as the GPU's cvt (saturating, NaN -> 0
// or, for 64-bit results, 0x8000000000000000).  out32[k*n+i] and out64[k*n+i].
extern "C" __global__ void conversions(const float* __restrict__ x, const double* __restrict__ d,
                                       const int* __restrict__ ints, const long long* __restrict__ longs,
                                       int* __restrict__ out32, long long* __restrict__ out64,
                                       float* __restrict__ outf, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    out32[0 * n + i] = __float2int_rn(x[i]);
    out32[1 * n + i] = __float2int_rz(x[i]);
    out32[2 * n + i] = static_cast<int>(__float2uint_rn(x[i]));
    out64[0 * n + i] = __float2ll_rn(x[i]);
    outf[0 * n + i] = __int2float_rn(ints[i]);
    outf[1 * n + i] = __ll2float_rn(longs[i]);
    outf[2 * n + i] = __double2float_rn(d[i]);
  }
}

// Integer and bit intrinsics: out[k * n + i], all as unsigned long long bits.
extern "C" __global__ void bit_intrinsics(const unsigned int* __restrict__ u, const unsigned int* __restrict__ v,
                                          const unsigned long long* __restrict__ w,
                                          unsigned long long* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const unsigned int x = u[i], y = v[i];
    const unsigned long long z = w[i];
    const int sx = static_cast<int>(x), sy = static_cast<int>(y);
    const long long sz = static_cast<long long>(z);
    int k = 0;
    out[k++ * n + i] = static_cast<unsigned long long>(__popc(x));
    out[k++ * n + i] = static_cast<unsigned long long>(__popcll(z));
    out[k++ * n + i] = static_cast<unsigned long long>(__clz(sx));
    out[k++ * n + i] = static_cast<unsigned long long>(__clzll(sz));
    out[k++ * n + i] = static_cast<unsigned long long>(__ffs(sx));
    out[k++ * n + i] = static_cast<unsigned long long>(__ffsll(sz));
    out[k++ * n + i] = __brev(x);
    out[k++ * n + i] = __umulhi(x, y);
    out[k++ * n + i] = static_cast<unsigned int>(__mulhi(sx, sy));
    out[k++ * n + i] = static_cast<unsigned int>(__float_as_int(__int_as_float(sx)));
    out[k++ * n + i] = __float_as_uint(__uint_as_float(x));
    out[k++ * n + i] = static_cast<unsigned long long>(__double_as_longlong(__longlong_as_double(sz)));
    out[k++ * n + i] = static_cast<unsigned int>(__double2hiint(__longlong_as_double(sz)));
    out[k++ * n + i] = static_cast<unsigned int>(__double2loint(__longlong_as_double(sz)));
    out[k++ * n + i] = static_cast<unsigned long long>(__double_as_longlong(__hiloint2double(sx, sy)));
    out[k++ * n + i] = static_cast<unsigned int>(min(sx, sy));
    out[k++ * n + i] = max(sx, y);  // mixed int/unsigned: compares as unsigned
    out[k++ * n + i] = min(x, y);
    out[k++ * n + i] = static_cast<unsigned long long>(max(sz, static_cast<long long>(sx)));
    out[k++ * n + i] = min(z, static_cast<unsigned long long>(y));
  }
}

// Classification of floats and doubles: out[i] bits.
extern "C" __global__ void classify(const float* __restrict__ x, const double* __restrict__ d,
                                    int* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    out[i] = (isnan(x[i]) ? 1 : 0) | (isinf(x[i]) ? 2 : 0) | (isfinite(x[i]) ? 4 : 0) | (signbit(x[i]) ? 8 : 0) |
             (isnan(d[i]) ? 16 : 0) | (isinf(d[i]) ? 32 : 0) | (isfinite(d[i]) ? 64 : 0) | (signbit(d[i]) ? 128 : 0);
  }
}

// __ldg on the element types a kernel streams: float, float4 and __half.
extern "C" __global__ void ldg_loads(const float* __restrict__ x, const __half* __restrict__ h,
                                     float* __restrict__ out, int n4) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += blockDim.x * gridDim.x) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(x) + i);
    out[4 * i + 0] = v.w;
    out[4 * i + 1] = v.x;
    out[4 * i + 2] = __ldg(x + 4 * i + 2);
    out[4 * i + 3] = __half2float(__ldg(h + i));
  }
}
