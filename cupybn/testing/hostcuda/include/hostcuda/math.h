// hostcuda/math.h: CUDA's device math functions and intrinsics, host versions.
//
// Exact (bit-identical to the GPU, which is correctly rounded or exact there):
//   sqrtf sqrt fmaf fma fabsf fabs fminf fmin fmaxf fmax floorf ceilf truncf
//   roundf rintf copysignf, division `/`, __f{add,sub,mul,div}_rn, __fmaf_rn,
//   __fma_rn, __frcp_rn, __fsqrt_rn, __frsqrt_rn, __d{add,sub,mul,div}_rn,
//   __drcp_rn, __dsqrt_rn, __saturatef, all conversions and bit intrinsics,
//   min/max.  (The GPU's sqrtf and `/` are correctly rounded under NVRTC's
//   defaults -prec-sqrt=true -prec-div=true -ftz=false, which kernels here use.)
//
// Approximate on the GPU, more exact here (results may differ in the last bits):
//   rsqrtf   GPU: <= 2 ulp          host: 1/sqrt in double, rounded to float
//   rsqrt    GPU: <= 1 ulp          host: 1.0 / sqrt(x), two double roundings
//   __fdividef GPU: approx, 0 for 2^126 < |y| < 2^128   host: x / y
//   __expf, __logf   GPU: fast hardware approximations  host: expf, logf
//   expf exp2f logf log2f powf exp log and the other libm functions:
//            GPU: CUDA's documented ulp bounds (e.g. expf 2, logf 1, powf 4)
//            host: glibc (mostly < 1 ulp)
// Other differences:
//   fminf fmaxf fmin fmax (and min/max on floating types) given a *signaling*
//   NaN return NaN here (glibc) but the other operand on the GPU; arithmetic
//   never produces signaling NaNs.  NaN results may differ in payload/sign.
// Plain float expressions (a * b + c) may be contracted into an fma by nvcc
// (--fmad=true); the host compiler on x86-64 does not.  The *_rn intrinsics
// are never contracted on either side.
#ifndef CUPYBN_HOSTCUDA_MATH_H
#define CUPYBN_HOSTCUDA_MATH_H

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "half.h"
#include "vector_types.h"

// CUDA's global overloads of the C++ math functions (sqrt(float) is a float
// function on the GPU, not sqrt(double)).  Listed one by one rather than via
// <math.h>, which would also pull std's special functions (beta, ...) into
// the global namespace where kernel variables may use those names.
using std::abs;
using std::acos;
using std::acosh;
using std::asin;
using std::asinh;
using std::atan;
using std::atan2;
using std::atanh;
using std::cbrt;
using std::ceil;
using std::copysign;
using std::cos;
using std::cosh;
using std::erf;
using std::erfc;
using std::exp;
using std::exp2;
using std::expm1;
using std::fabs;
using std::fdim;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::fmod;
using std::frexp;
using std::hypot;
using std::ilogb;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::ldexp;
using std::lgamma;
using std::llrint;
using std::llround;
using std::log;
using std::log10;
using std::log1p;
using std::log2;
using std::logb;
using std::lrint;
using std::lround;
using std::modf;
using std::nearbyint;
using std::nextafter;
using std::pow;
using std::remainder;
using std::remquo;
using std::rint;
using std::round;
using std::scalbln;
using std::scalbn;
using std::signbit;
using std::sin;
using std::sinh;
using std::sqrt;
using std::tan;
using std::tanh;
using std::tgamma;
using std::trunc;
// The float C functions (sqrtf, expf, fmaf, ...) come from the C library.

namespace hostcuda::detail {
// Reading through a volatile hides where a value came from and forces it to
// be materialised, so the compiler can neither fuse an *_rn operation with a
// neighbouring multiply/add (fp contraction) nor keep extra precision.
template <class T>
inline T opaque(T value) {
  volatile T stored = value;
  return stored;
}
}  // namespace hostcuda::detail

// ------------------------------------------------- correctly rounded float ops
inline float __fadd_rn(float a, float b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) + opaque(b));
}
inline float __fsub_rn(float a, float b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) - opaque(b));
}
inline float __fmul_rn(float a, float b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) * opaque(b));
}
inline float __fdiv_rn(float a, float b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) / opaque(b));
}
inline float __frcp_rn(float a) { return __fdiv_rn(1.0f, a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return __fdiv_rn(a, b); }  // GPU: approximate
inline float __saturatef(float a) { return a >= 1.0f ? 1.0f : (a > 0.0f ? a : 0.0f); }  // NaN, -0 -> +0
inline float __expf(float a) { return std::exp(a); }  // GPU: fast approximation
inline float __logf(float a) { return std::log(a); }  // GPU: fast approximation

// 1/sqrt(a) correctly rounded.  The double estimate is within an ulp; the exact
// midpoint tests m*m*a <=> 1 (m*m is exact in double, fma rounds once so its
// sign is exact) pick the right neighbour.  1/sqrt(a) is never a midpoint.
inline float __frsqrt_rn(float a) {
  const double x = a;
  float r = static_cast<float>(1.0 / std::sqrt(x));
  if (!(a > 0.0f) || std::isinf(a)) return r;  // NaN, negative, +-0, +inf: IEEE special values
  for (;;) {
    const double below = (static_cast<double>(r) + std::nextafter(r, 0.0f)) / 2;
    const double above = (static_cast<double>(r) + std::nextafter(r, INFINITY)) / 2;
    if (std::fma(below * below, x, -1.0) > 0.0) {         // 1/sqrt(a) < below
      r = std::nextafter(r, 0.0f);
    } else if (std::fma(above * above, x, -1.0) < 0.0) {  // 1/sqrt(a) > above
      r = std::nextafter(r, INFINITY);
    } else {
      return r;
    }
  }
}
inline float rsqrtf(float a) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(a))); }

// ------------------------------------------------ correctly rounded double ops
inline double __dadd_rn(double a, double b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) + opaque(b));
}
inline double __dsub_rn(double a, double b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) - opaque(b));
}
inline double __dmul_rn(double a, double b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) * opaque(b));
}
inline double __ddiv_rn(double a, double b) {
  using hostcuda::detail::opaque;
  return opaque(opaque(a) / opaque(b));
}
inline double __drcp_rn(double a) { return __ddiv_rn(1.0, a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

// --------------------------------------------------------- min / max (CUDA's)
// Mixed signed/unsigned pairs compare as unsigned, as in CUDA's headers; other
// mixes (int with long long, ...) are ambiguous there and here.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long min(long a, unsigned long b) { return min(static_cast<unsigned long>(a), b); }
inline unsigned long min(unsigned long a, long b) { return min(a, static_cast<unsigned long>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long min(long long a, unsigned long long b) { return min(static_cast<unsigned long long>(a), b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, static_cast<unsigned long long>(b)); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }

inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long max(long a, unsigned long b) { return max(static_cast<unsigned long>(a), b); }
inline unsigned long max(unsigned long a, long b) { return max(a, static_cast<unsigned long>(b)); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long max(long long a, unsigned long long b) { return max(static_cast<unsigned long long>(a), b); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, static_cast<unsigned long long>(b)); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

inline unsigned int umin(unsigned int a, unsigned int b) { return min(a, b); }
inline unsigned int umax(unsigned int a, unsigned int b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

// ------------------------------------------------------- integer intrinsics
inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) {  // 1-based position of the lowest set bit, 0 for 0
  return x == 0 ? 0 : std::countr_zero(static_cast<unsigned int>(x)) + 1;
}
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline unsigned long long __brevll(unsigned long long x) {
  unsigned long long reversed = 0;
  for (int bit = 0; bit < 64; ++bit, x >>= 1) reversed = (reversed << 1) | (x & 1);
  return reversed;
}
inline unsigned int __brev(unsigned int x) { return static_cast<unsigned int>(__brevll(x) >> 32); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<std::uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<std::int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  __extension__ using uint128 = unsigned __int128;
  return static_cast<unsigned long long>((static_cast<uint128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  __extension__ using int128 = __int128;
  return static_cast<long long>((static_cast<int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) {  // low 32 bits of the product of the sign-extended low 24 bits
  const auto low24 = [](int v) { return static_cast<std::int64_t>(static_cast<std::int32_t>(static_cast<std::uint32_t>(v) << 8) >> 8); };
  return static_cast<int>(static_cast<std::uint32_t>(low24(a) * low24(b)));
}
inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }

// ------------------------------------------------------------ reinterpretation
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __double2hiint(double x) { return static_cast<int>(std::bit_cast<std::uint64_t>(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(std::bit_cast<std::uint64_t>(x) & 0xffffffffu); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((static_cast<std::uint64_t>(static_cast<std::uint32_t>(hi)) << 32) |
                               static_cast<std::uint32_t>(lo));
}

// ----------------------------------------------------------------- conversions
// To integers as the GPU's cvt: round in the named mode, saturate, NaN -> 0
// (NaN -> 0x8000000000000000 for the 64-bit results).
inline int __float2int_rn(float x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::nearest_even); }
inline int __float2int_rz(float x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::toward_zero); }
inline int __float2int_rd(float x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::down); }
inline int __float2int_ru(float x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::up); }
inline unsigned int __float2uint_rn(float x) { return hostcuda::detail::float_to_integer<unsigned int>(x, hostcuda::detail::Round::nearest_even); }
inline unsigned int __float2uint_rz(float x) { return hostcuda::detail::float_to_integer<unsigned int>(x, hostcuda::detail::Round::toward_zero); }
inline long long __float2ll_rn(float x) { return hostcuda::detail::float_to_integer<long long>(x, hostcuda::detail::Round::nearest_even); }
inline long long __float2ll_rz(float x) { return hostcuda::detail::float_to_integer<long long>(x, hostcuda::detail::Round::toward_zero); }
inline unsigned long long __float2ull_rn(float x) { return hostcuda::detail::float_to_integer<unsigned long long>(x, hostcuda::detail::Round::nearest_even); }
inline unsigned long long __float2ull_rz(float x) { return hostcuda::detail::float_to_integer<unsigned long long>(x, hostcuda::detail::Round::toward_zero); }
inline int __double2int_rn(double x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::nearest_even); }
inline int __double2int_rz(double x) { return hostcuda::detail::float_to_integer<int>(x, hostcuda::detail::Round::toward_zero); }
inline unsigned int __double2uint_rn(double x) { return hostcuda::detail::float_to_integer<unsigned int>(x, hostcuda::detail::Round::nearest_even); }
inline long long __double2ll_rn(double x) { return hostcuda::detail::float_to_integer<long long>(x, hostcuda::detail::Round::nearest_even); }
// Integer -> floating: the host's conversions round to nearest even, like cvt.rn.
inline float __int2float_rn(int x) { return static_cast<float>(hostcuda::detail::opaque(x)); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(hostcuda::detail::opaque(x)); }
inline float __ll2float_rn(long long x) { return static_cast<float>(hostcuda::detail::opaque(x)); }
inline float __ull2float_rn(unsigned long long x) { return static_cast<float>(hostcuda::detail::opaque(x)); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(hostcuda::detail::opaque(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(hostcuda::detail::opaque(x)); }

// ------------------------------------------------------------ cached loads
// __ldg and the cache-hinted loads/stores are plain accesses on the host.  They
// exist for exactly CUDA's element types; anything else does not compile.
namespace hostcuda::detail {
template <class T>
inline constexpr bool is_ldg_type =
    std::is_same_v<T, char> || std::is_same_v<T, signed char> || std::is_same_v<T, unsigned char> ||
    std::is_same_v<T, short> || std::is_same_v<T, unsigned short> || std::is_same_v<T, int> ||
    std::is_same_v<T, unsigned int> || std::is_same_v<T, long> || std::is_same_v<T, unsigned long> ||
    std::is_same_v<T, long long> || std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> ||
    std::is_same_v<T, double> || std::is_same_v<T, char2> || std::is_same_v<T, char4> ||
    std::is_same_v<T, uchar2> || std::is_same_v<T, uchar4> || std::is_same_v<T, short2> ||
    std::is_same_v<T, short4> || std::is_same_v<T, ushort2> || std::is_same_v<T, ushort4> ||
    std::is_same_v<T, int2> || std::is_same_v<T, int4> || std::is_same_v<T, uint2> || std::is_same_v<T, uint4> ||
    std::is_same_v<T, longlong2> || std::is_same_v<T, ulonglong2> || std::is_same_v<T, float2> ||
    std::is_same_v<T, float4> || std::is_same_v<T, double2> || std::is_same_v<T, __half> ||
    std::is_same_v<T, __half2>;
}  // namespace hostcuda::detail

template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldg(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldcg(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldca(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldcs(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldlu(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline T __ldcv(const T* p) { return *p; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline void __stwb(T* p, std::type_identity_t<T> value) { *p = value; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline void __stcg(T* p, std::type_identity_t<T> value) { *p = value; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline void __stcs(T* p, std::type_identity_t<T> value) { *p = value; }
template <class T, class = std::enable_if_t<hostcuda::detail::is_ldg_type<T>>>
inline void __stwt(T* p, std::type_identity_t<T> value) { *p = value; }

#endif  // CUPYBN_HOSTCUDA_MATH_H
