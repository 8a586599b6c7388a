// Test kernels for __half / __half2 on the host harness: conversions in every
// rounding mode, arithmetic, comparisons, integer conversions and the half2
// helpers.  Valid CUDA (the NVRTC gate compiles this file).  Every kernel uses a
// grid-stride loop, so any launch shape covers all n elements.
#include <cuda_fp16.h>

// float -> half in the four rounding modes, the implicit conversion, and back.
extern "C" __global__ void float_to_half(const float* __restrict__ x, __half* __restrict__ rn,
                                         __half* __restrict__ rz, __half* __restrict__ rd,
                                         __half* __restrict__ ru, __half* __restrict__ implicit,
                                         float* __restrict__ back, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    rn[i] = __float2half_rn(x[i]);
    rz[i] = __float2half_rz(x[i]);
    rd[i] = __float2half_rd(x[i]);
    ru[i] = __float2half_ru(x[i]);
    implicit[i] = x[i];
    back[i] = __half2float(__float2half(x[i]));
  }
}

// double -> half, rounded once (not through float), by function and by conversion.
extern "C" __global__ void double_to_half(const double* __restrict__ x, __half* __restrict__ out,
                                          __half* __restrict__ implicit, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    out[i] = __double2half(x[i]);
    implicit[i] = __half(x[i]);
  }
}

// Bit patterns -> half -> float, and the bit reinterpretations round trip.
extern "C" __global__ void half_bits_to_float(const unsigned short* __restrict__ bits, float* __restrict__ out,
                                              float* __restrict__ implicit, unsigned short* __restrict__ ubits,
                                              short* __restrict__ sbits, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const __half h = __ushort_as_half(bits[i]);
    out[i] = __half2float(h);
    implicit[i] = h;
    ubits[i] = __half_as_ushort(h);
    sbits[i] = __half_as_short(__short_as_half(static_cast<short>(bits[i])));
  }
}

// out[k * n + i]: operation k on (a[i], b[i], c[i]).
extern "C" __global__ void half_arithmetic(const __half* __restrict__ a, const __half* __restrict__ b,
                                           const __half* __restrict__ c, __half* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const __half x = a[i], y = b[i], z = c[i];
    out[0 * n + i] = __hadd(x, y);
    out[1 * n + i] = __hsub(x, y);
    out[2 * n + i] = __hmul(x, y);
    out[3 * n + i] = __hdiv(x, y);
    out[4 * n + i] = __hfma(x, y, z);
    out[5 * n + i] = x + y;
    out[6 * n + i] = x - y;
    out[7 * n + i] = x * y;
    out[8 * n + i] = x / y;
    __half t = x;
    t += y;
    t *= z;
    out[9 * n + i] = t;
    out[10 * n + i] = __hneg(x);
    out[11 * n + i] = -x;
    out[12 * n + i] = __habs(x);
    out[13 * n + i] = __hmax(x, y);
    out[14 * n + i] = __hmin(x, y);
  }
}

// out[i]: bit k is comparison k of (a[i], b[i]).
extern "C" __global__ void half_compare(const __half* __restrict__ a, const __half* __restrict__ b,
                                       int* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const __half x = a[i], y = b[i];
    const bool r[] = {x == y,        x != y,        x < y,         x <= y,        x > y,
                      x >= y,        __heq(x, y),   __hne(x, y),   __hlt(x, y),   __hle(x, y),
                      __hgt(x, y),   __hge(x, y),   __hisnan(x),   __hisinf(x) == 1, __hisinf(x) == -1};
    int bits = 0;
    for (int k = 0; k < static_cast<int>(sizeof(r) / sizeof(r[0])); ++k) bits |= (r[k] ? 1 : 0) << k;
    out[i] = bits;
  }
}

// int -> half (round to nearest even, also by conversion) and half -> int
// (nearest even and truncation, saturating).
extern "C" __global__ void half_int_conversions(const int* __restrict__ x, __half* __restrict__ from_int,
                                               __half* __restrict__ implicit, const __half* __restrict__ h,
                                               int* __restrict__ to_int_rn, int* __restrict__ to_int_rz,
                                               int* __restrict__ implicit_int, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    from_int[i] = __int2half_rn(x[i]);
    implicit[i] = x[i];
    to_int_rn[i] = __half2int_rn(h[i]);
    to_int_rz[i] = __half2int_rz(h[i]);
    implicit_int[i] = h[i];
  }
}

// The half2 helpers on pairs (x[2j], x[2j+1]); out[8 * j + k]: result k.
extern "C" __global__ void half2_ops(const float* __restrict__ x, float* __restrict__ out, int pairs) {
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < pairs; j += blockDim.x * gridDim.x) {
    const __half2 p = __floats2half2_rn(x[2 * j], x[2 * j + 1]);
    const __half2 sum = __hadd2(p, __float2half2_rn(1.0f));
    const __half2 product = __hmul2(p, p);
    const float2 swapped = __half22float2(__halves2half2(__high2half(p), __low2half(p)));
    out[8 * j + 0] = __low2float(p);
    out[8 * j + 1] = __high2float(p);
    out[8 * j + 2] = __low2float(sum);
    out[8 * j + 3] = __high2float(sum);
    out[8 * j + 4] = __low2float(product);
    out[8 * j + 5] = __high2float(product);
    out[8 * j + 6] = swapped.x;
    out[8 * j + 7] = swapped.y;
  }
}
