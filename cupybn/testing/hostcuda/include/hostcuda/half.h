// hostcuda/half.h: CUDA's __half and __half2 (cuda_fp16.h) for the host harness.
//
// Layout and API follow CUDA 12/13: __half is 2 bytes, alignment 2, trivially
// copyable, with a protected `__x`; __half2 is {__half x, y}, 4 bytes,
// alignment 4.  The implicit conversions are CUDA's (from float, double and the
// integer types; to float, the integer types and bool), so mixed expressions
// such as `h * 2.0f` are ambiguous here exactly as they are under nvcc.
//
// Every result is the correctly rounded binary16 value, computed from the bits:
//  * float/double/integer -> half rounds the exact value once (no double
//    rounding through float); NaN becomes CUDA's canonical NaN 0x7fff.
//  * + - * / compute in float and round once more: float's 24-bit significand
//    is >= 2*11+2 bits, which makes that double rounding innocuous.
//  * __hfma rounds the exact a*b+c (computed in 128-bit integers) once.
//  * hsqrt is correctly rounded here (the GPU's may be off by one ulp).
// Differences from the GPU: nvcc may contract __hmul + __hadd into an fma (the
// *_rn variants never are); here they are always two roundings.  NaN results
// are the canonical 0x7fff.
#ifndef CUPYBN_HOSTCUDA_HALF_H
#define CUPYBN_HOSTCUDA_HALF_H

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vector_types.h"

struct alignas(2) __half_raw {
  unsigned short x;
};
struct alignas(4) __half2_raw {
  unsigned short x;
  unsigned short y;
};

namespace hostcuda::detail {

enum class Round { nearest_even, toward_zero, down, up };

// Largest finite magnitude for toward-zero-ish overflow, inf otherwise.
constexpr unsigned short half_overflow(bool negative, Round mode) {
  const bool to_inf = mode == Round::nearest_even || (mode == Round::down && negative) ||
                      (mode == Round::up && !negative);
  return static_cast<unsigned short>((negative ? 0x8000u : 0u) | (to_inf ? 0x7c00u : 0x7bffu));
}

// The binary16 bits of (-1)^negative * significand * 2^exponent, rounded once.
constexpr unsigned short round_to_half(bool negative, std::uint64_t significand, int exponent, Round mode) {
  const unsigned sign = negative ? 0x8000u : 0u;
  if (significand == 0) return static_cast<unsigned short>(sign);
  const int top = static_cast<int>(std::bit_width(significand)) - 1 + exponent;  // value in [2^top, 2^(top+1))
  if (top > 15) return half_overflow(negative, mode);
  const int ulp = (top < -14 ? -14 : top) - 10;  // exponent of the last bit kept (subnormals: 2^-24)
  const int shift = ulp - exponent;
  std::uint64_t kept;
  bool inexact;
  int versus_half;  // sign of (discarded part - half an ulp)
  if (shift <= 0) {
    kept = significand << -shift;  // fewer than 11 bits: exact
    inexact = false;
    versus_half = -1;
  } else if (shift < 64) {
    kept = significand >> shift;
    const std::uint64_t rest = significand & ((std::uint64_t{1} << shift) - 1);
    const std::uint64_t half = std::uint64_t{1} << (shift - 1);
    inexact = rest != 0;
    versus_half = rest < half ? -1 : (rest > half ? 1 : 0);
  } else {  // everything is discarded; only 2^63 itself can reach half an ulp
    kept = 0;
    inexact = true;
    const std::uint64_t half = std::uint64_t{1} << 63;
    versus_half = shift > 64 || significand < half ? -1 : (significand > half ? 1 : 0);
  }
  bool up = false;
  switch (mode) {
    case Round::nearest_even: up = versus_half > 0 || (versus_half == 0 && (kept & 1) != 0); break;
    case Round::toward_zero: break;
    case Round::down: up = inexact && negative; break;
    case Round::up: up = inexact && !negative; break;
  }
  kept += up ? 1 : 0;
  // `kept` includes the implicit bit (1024) for normal numbers, so the exponent
  // field is top+14, and a carry out of the significand bumps it (up to inf).
  const unsigned field = top < -14 ? 0u : static_cast<unsigned>(top + 14);
  return static_cast<unsigned short>(sign | ((field << 10) + static_cast<unsigned>(kept)));
}

constexpr unsigned short canonical_half_nan = 0x7fff;

constexpr unsigned short float_to_half_bits(float value, Round mode) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const bool negative = (bits >> 31) != 0;
  const unsigned exponent = (bits >> 23) & 0xffu;
  const std::uint32_t mantissa = bits & 0x7fffffu;
  if (exponent == 0xff) return mantissa != 0 ? canonical_half_nan : static_cast<unsigned short>(negative ? 0xfc00 : 0x7c00);
  if (exponent == 0) return round_to_half(negative, mantissa, -149, mode);
  return round_to_half(negative, mantissa | 0x800000u, static_cast<int>(exponent) - 150, mode);
}

constexpr unsigned short double_to_half_bits(double value, Round mode) {
  const auto bits = std::bit_cast<std::uint64_t>(value);
  const bool negative = (bits >> 63) != 0;
  const unsigned exponent = static_cast<unsigned>((bits >> 52) & 0x7ffu);
  const std::uint64_t mantissa = bits & 0xfffffffffffffull;
  if (exponent == 0x7ff) return mantissa != 0 ? canonical_half_nan : static_cast<unsigned short>(negative ? 0xfc00 : 0x7c00);
  if (exponent == 0) return round_to_half(negative, mantissa, -1074, mode);
  return round_to_half(negative, mantissa | (std::uint64_t{1} << 52), static_cast<int>(exponent) - 1075, mode);
}

template <class Int>
constexpr unsigned short integer_to_half_bits(Int value, Round mode) {
  static_assert(std::is_integral_v<Int> && sizeof(Int) <= 8);
  const bool negative = value < 0;
  // 0 - unsigned(v) is the magnitude even for the most negative value.
  const auto magnitude = negative ? std::uint64_t{0} - static_cast<std::uint64_t>(value) : static_cast<std::uint64_t>(value);
  return round_to_half(negative, magnitude, 0, mode);
}

constexpr float half_bits_to_float(unsigned short bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const unsigned exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) {
    if (mantissa != 0) return std::bit_cast<float>(std::uint32_t{0x7fffffff});  // CUDA's canonical NaN
    return std::bit_cast<float>(sign | 0x7f800000u);
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign != 0 ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

constexpr bool half_bits_are_nan(unsigned short bits) { return (bits & 0x7fffu) > 0x7c00u; }

// Float/half -> integer conversion as the GPU's cvt.rni/rzi/rmi/rpi: round in
// the given mode, saturate to the integer range, NaN -> 0 (64-bit: 0x8000...).
template <class Int>
Int float_to_integer(double value, Round mode) {
  static_assert(std::is_integral_v<Int> && sizeof(Int) <= 8);
  if (std::isnan(value)) return sizeof(Int) == 8 ? static_cast<Int>(std::uint64_t{1} << 63) : Int{0};
  switch (mode) {
    case Round::nearest_even: value = std::nearbyint(value); break;  // threads run in the default FE mode
    case Round::toward_zero: value = std::trunc(value); break;
    case Round::down: value = std::floor(value); break;
    case Round::up: value = std::ceil(value); break;
  }
  constexpr double lowest = static_cast<double>(std::numeric_limits<Int>::min());  // 0 or -2^k: exact
  constexpr double beyond = 2.0 * static_cast<double>(Int{1} << (std::numeric_limits<Int>::digits - 1));
  if (value < lowest) return std::numeric_limits<Int>::min();
  if (value >= beyond) return std::numeric_limits<Int>::max();
  return static_cast<Int>(value);
}

}  // namespace hostcuda::detail

struct __half;
constexpr __half __float2half(float a);
constexpr __half __double2half(double a);
constexpr float __half2float(__half a);

// The integer conversions, declared for __half's constructors and operators.
__half __short2half_rn(short i);
__half __ushort2half_rn(unsigned short i);
__half __int2half_rn(int i);
__half __uint2half_rn(unsigned int i);
__half __ll2half_rn(long long i);
__half __ull2half_rn(unsigned long long i);
signed char __half2char_rz(__half h);
unsigned char __half2uchar_rz(__half h);
short __half2short_rz(__half h);
unsigned short __half2ushort_rz(__half h);
int __half2int_rz(__half h);
unsigned int __half2uint_rz(__half h);
long long __half2ll_rz(__half h);
unsigned long long __half2ull_rz(__half h);

struct alignas(2) __half {
 protected:
  unsigned short __x;

 public:
  __half() = default;
  constexpr __half(const __half_raw& raw) : __x(raw.x) {}
  __half& operator=(const __half_raw& raw) {
    __x = raw.x;
    return *this;
  }
  // volatile access (old-style warp reductions use volatile shared memory).
  volatile __half& operator=(const __half_raw& raw) volatile {
    __x = raw.x;
    return *this;
  }
  volatile __half& operator=(const volatile __half_raw& raw) volatile {
    __x = raw.x;
    return *this;
  }
  constexpr operator __half_raw() const { return __half_raw{__x}; }
  operator __half_raw() const volatile { return __half_raw{__x}; }

  // From/to float and double (there is no conversion to double: CUDA leaves it
  // out so that up-casts are not ambiguous).
  constexpr __half(float f) : __x(hostcuda::detail::float_to_half_bits(f, hostcuda::detail::Round::nearest_even)) {}
  constexpr __half(double d) : __x(hostcuda::detail::double_to_half_bits(d, hostcuda::detail::Round::nearest_even)) {}
  constexpr operator float() const { return hostcuda::detail::half_bits_to_float(__x); }
  __half& operator=(float f) { return *this = __half(f); }
  __half& operator=(double d) { return *this = __half(d); }

  // From integers: round to nearest even; to integers: truncate and saturate.
  __half(short v) : __half(__short2half_rn(v)) {}
  __half(unsigned short v) : __half(__ushort2half_rn(v)) {}
  __half(int v) : __half(__int2half_rn(v)) {}
  __half(unsigned int v) : __half(__uint2half_rn(v)) {}
  __half(long v) : __half(__ll2half_rn(v)) {}
  __half(unsigned long v) : __half(__ull2half_rn(v)) {}
  __half(long long v) : __half(__ll2half_rn(v)) {}
  __half(unsigned long long v) : __half(__ull2half_rn(v)) {}
  operator signed char() const { return __half2char_rz(*this); }
  operator unsigned char() const { return __half2uchar_rz(*this); }
  operator char() const { return static_cast<char>(__half2char_rz(*this)); }
  operator short() const { return __half2short_rz(*this); }
  operator unsigned short() const { return __half2ushort_rz(*this); }
  operator int() const { return __half2int_rz(*this); }
  operator unsigned int() const { return __half2uint_rz(*this); }
  operator long() const { return __half2ll_rz(*this); }
  operator unsigned long() const { return __half2ull_rz(*this); }
  operator long long() const { return __half2ll_rz(*this); }
  operator unsigned long long() const { return __half2ull_rz(*this); }
  __half& operator=(short v) { return *this = __half(v); }
  __half& operator=(unsigned short v) { return *this = __half(v); }
  __half& operator=(int v) { return *this = __half(v); }
  __half& operator=(unsigned int v) { return *this = __half(v); }
  __half& operator=(long long v) { return *this = __half(v); }
  __half& operator=(unsigned long long v) { return *this = __half(v); }
  constexpr operator bool() const { return (__x & 0x7fffu) != 0; }
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2);
static_assert(std::is_trivially_copyable_v<__half> && std::is_trivially_default_constructible_v<__half>);

struct alignas(4) __half2 {
  __half x;
  __half y;

  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
  constexpr __half2(const __half2_raw& raw) : x(__half_raw{raw.x}), y(__half_raw{raw.y}) {}
  __half2& operator=(const __half2_raw& raw) { return *this = __half2(raw); }
  constexpr operator __half2_raw() const {
    return __half2_raw{static_cast<__half_raw>(x).x, static_cast<__half_raw>(y).x};
  }
};

static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4);
static_assert(std::is_trivially_copyable_v<__half2>);

using half = __half;
using half2 = __half2;
using __nv_half = __half;
using __nv_half2 = __half2;
using __nv_half_raw = __half_raw;
using __nv_half2_raw = __half2_raw;
using nv_half = __half;
using nv_half2 = __half2;

namespace hostcuda::detail {
constexpr unsigned short bits_of(__half h) { return static_cast<__half_raw>(h).x; }
constexpr __half half_from_bits(unsigned short bits) { return __half(__half_raw{bits}); }
constexpr __half half_from_float(float f, Round mode) { return half_from_bits(float_to_half_bits(f, mode)); }
template <class Int>
__half half_from_integer(Int v, Round mode) { return half_from_bits(integer_to_half_bits(v, mode)); }
}  // namespace hostcuda::detail

// ---------------------------------------------------------------- conversions
constexpr __half __float2half(float a) { return __half(a); }
constexpr __half __float2half_rn(float a) { return __half(a); }
constexpr __half __float2half_rz(float a) {
  return hostcuda::detail::half_from_float(a, hostcuda::detail::Round::toward_zero);
}
constexpr __half __float2half_rd(float a) { return hostcuda::detail::half_from_float(a, hostcuda::detail::Round::down); }
constexpr __half __float2half_ru(float a) { return hostcuda::detail::half_from_float(a, hostcuda::detail::Round::up); }
constexpr __half __double2half(double a) { return __half(a); }
constexpr float __half2float(__half a) { return static_cast<float>(a); }

inline __half __short2half_rn(short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __short2half_rz(short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __short2half_rd(short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __short2half_ru(short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }
inline __half __ushort2half_rn(unsigned short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __ushort2half_rz(unsigned short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __ushort2half_rd(unsigned short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __ushort2half_ru(unsigned short i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }
inline __half __int2half_rn(int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __int2half_rz(int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __int2half_rd(int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __int2half_ru(int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }
inline __half __uint2half_rn(unsigned int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __uint2half_rz(unsigned int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __uint2half_rd(unsigned int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __uint2half_ru(unsigned int i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }
inline __half __ll2half_rn(long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __ll2half_rz(long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __ll2half_rd(long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __ll2half_ru(long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }
inline __half __ull2half_rn(unsigned long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::nearest_even); }
inline __half __ull2half_rz(unsigned long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::toward_zero); }
inline __half __ull2half_rd(unsigned long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::down); }
inline __half __ull2half_ru(unsigned long long i) { return hostcuda::detail::half_from_integer(i, hostcuda::detail::Round::up); }

namespace hostcuda::detail {
template <class Int>
Int half_to_integer(__half h, Round mode) { return float_to_integer<Int>(__half2float(h), mode); }
}  // namespace hostcuda::detail

inline signed char __half2char_rz(__half h) { return hostcuda::detail::half_to_integer<signed char>(h, hostcuda::detail::Round::toward_zero); }
inline unsigned char __half2uchar_rz(__half h) { return hostcuda::detail::half_to_integer<unsigned char>(h, hostcuda::detail::Round::toward_zero); }
inline short __half2short_rn(__half h) { return hostcuda::detail::half_to_integer<short>(h, hostcuda::detail::Round::nearest_even); }
inline short __half2short_rz(__half h) { return hostcuda::detail::half_to_integer<short>(h, hostcuda::detail::Round::toward_zero); }
inline short __half2short_rd(__half h) { return hostcuda::detail::half_to_integer<short>(h, hostcuda::detail::Round::down); }
inline short __half2short_ru(__half h) { return hostcuda::detail::half_to_integer<short>(h, hostcuda::detail::Round::up); }
inline unsigned short __half2ushort_rn(__half h) { return hostcuda::detail::half_to_integer<unsigned short>(h, hostcuda::detail::Round::nearest_even); }
inline unsigned short __half2ushort_rz(__half h) { return hostcuda::detail::half_to_integer<unsigned short>(h, hostcuda::detail::Round::toward_zero); }
inline unsigned short __half2ushort_rd(__half h) { return hostcuda::detail::half_to_integer<unsigned short>(h, hostcuda::detail::Round::down); }
inline unsigned short __half2ushort_ru(__half h) { return hostcuda::detail::half_to_integer<unsigned short>(h, hostcuda::detail::Round::up); }
inline int __half2int_rn(__half h) { return hostcuda::detail::half_to_integer<int>(h, hostcuda::detail::Round::nearest_even); }
inline int __half2int_rz(__half h) { return hostcuda::detail::half_to_integer<int>(h, hostcuda::detail::Round::toward_zero); }
inline int __half2int_rd(__half h) { return hostcuda::detail::half_to_integer<int>(h, hostcuda::detail::Round::down); }
inline int __half2int_ru(__half h) { return hostcuda::detail::half_to_integer<int>(h, hostcuda::detail::Round::up); }
inline unsigned int __half2uint_rn(__half h) { return hostcuda::detail::half_to_integer<unsigned int>(h, hostcuda::detail::Round::nearest_even); }
inline unsigned int __half2uint_rz(__half h) { return hostcuda::detail::half_to_integer<unsigned int>(h, hostcuda::detail::Round::toward_zero); }
inline unsigned int __half2uint_rd(__half h) { return hostcuda::detail::half_to_integer<unsigned int>(h, hostcuda::detail::Round::down); }
inline unsigned int __half2uint_ru(__half h) { return hostcuda::detail::half_to_integer<unsigned int>(h, hostcuda::detail::Round::up); }
inline long long __half2ll_rn(__half h) { return hostcuda::detail::half_to_integer<long long>(h, hostcuda::detail::Round::nearest_even); }
inline long long __half2ll_rz(__half h) { return hostcuda::detail::half_to_integer<long long>(h, hostcuda::detail::Round::toward_zero); }
inline long long __half2ll_rd(__half h) { return hostcuda::detail::half_to_integer<long long>(h, hostcuda::detail::Round::down); }
inline long long __half2ll_ru(__half h) { return hostcuda::detail::half_to_integer<long long>(h, hostcuda::detail::Round::up); }
inline unsigned long long __half2ull_rn(__half h) { return hostcuda::detail::half_to_integer<unsigned long long>(h, hostcuda::detail::Round::nearest_even); }
inline unsigned long long __half2ull_rz(__half h) { return hostcuda::detail::half_to_integer<unsigned long long>(h, hostcuda::detail::Round::toward_zero); }
inline unsigned long long __half2ull_rd(__half h) { return hostcuda::detail::half_to_integer<unsigned long long>(h, hostcuda::detail::Round::down); }
inline unsigned long long __half2ull_ru(__half h) { return hostcuda::detail::half_to_integer<unsigned long long>(h, hostcuda::detail::Round::up); }

// Bit reinterpretation.
constexpr unsigned short __half_as_ushort(__half h) { return hostcuda::detail::bits_of(h); }
constexpr short __half_as_short(__half h) { return static_cast<short>(hostcuda::detail::bits_of(h)); }
constexpr __half __ushort_as_half(unsigned short i) { return hostcuda::detail::half_from_bits(i); }
constexpr __half __short_as_half(short i) { return hostcuda::detail::half_from_bits(static_cast<unsigned short>(i)); }

// ------------------------------------------------------------ classification
constexpr bool __hisnan(__half a) { return hostcuda::detail::half_bits_are_nan(hostcuda::detail::bits_of(a)); }
constexpr int __hisinf(__half a) {  // -1 for -inf, 1 for +inf, else 0
  const unsigned short bits = hostcuda::detail::bits_of(a);
  return bits == 0x7c00u ? 1 : (bits == 0xfc00u ? -1 : 0);
}

// ---------------------------------------------------------------- arithmetic
namespace hostcuda::detail {
// The float result of + - * / on two halves, rounded once more to half, is the
// correctly rounded half result (24 >= 2*11 + 2).  Bit-level rounding keeps
// the compiler from contracting this with neighbouring float code.
constexpr __half round_float(float f) { return half_from_float(f, Round::nearest_even); }
constexpr __half saturate01(__half h) {  // [0, 1], NaN -> +0
  const float f = __half2float(h);
  return f >= 1.0f ? __half(__half_raw{0x3c00}) : (f > 0.0f ? h : __half(__half_raw{0}));
}

// A finite half as an integer count of 2^-24 (the subnormal quantum); |result| < 2^40.
constexpr std::int64_t half_in_quanta(__half h) {
  const unsigned short bits = bits_of(h);
  const unsigned exponent = (bits >> 10) & 0x1fu;
  const std::int64_t mantissa = bits & 0x3ffu;
  const std::int64_t magnitude = exponent == 0 ? mantissa : (mantissa | 0x400) << (exponent - 1);
  return (bits & 0x8000u) != 0 ? -magnitude : magnitude;
}

inline __half exact_fma(__half a, __half b, __half c) {
  const float fa = __half2float(a), fb = __half2float(b), fc = __half2float(c);
  if (!std::isfinite(fa) || !std::isfinite(fb) || !std::isfinite(fc)) {
    // inf/NaN: IEEE's special cases (inf*0, inf-inf) are those of the double fma.
    return __half(std::fma(static_cast<double>(fa), static_cast<double>(fb), static_cast<double>(fc)));
  }
  __extension__ using int128 = __int128;
  __extension__ using uint128 = unsigned __int128;
  // a*b + c exactly, in units of 2^-48.
  const int128 product = static_cast<int128>(half_in_quanta(a)) * half_in_quanta(b);
  const int128 sum = product + (static_cast<int128>(half_in_quanta(c)) << 24);
  if (sum == 0) {
    // An exact zero is -0 only when both addends are -0 (or a negative zero product plus -0).
    const bool product_negative = std::signbit(fa) != std::signbit(fb);
    const bool negative = product == 0 && half_in_quanta(c) == 0 && product_negative && std::signbit(fc);
    return half_from_bits(negative ? 0x8000 : 0);
  }
  uint128 magnitude = sum < 0 ? static_cast<uint128>(-sum) : static_cast<uint128>(sum);
  int exponent = -48;
  // Squeeze into 64 bits; the dropped bits only matter as a sticky bit, far
  // below the rounding position (half keeps 11 of the 64).
  while ((magnitude >> 64) != 0) {
    const bool sticky = (magnitude & 1) != 0;
    magnitude = (magnitude >> 1) | (sticky ? 1 : 0);
    ++exponent;
  }
  return half_from_bits(round_to_half(sum < 0, static_cast<std::uint64_t>(magnitude), exponent, Round::nearest_even));
}
}  // namespace hostcuda::detail

constexpr __half __hadd(__half a, __half b) { return hostcuda::detail::round_float(__half2float(a) + __half2float(b)); }
constexpr __half __hsub(__half a, __half b) { return hostcuda::detail::round_float(__half2float(a) - __half2float(b)); }
constexpr __half __hmul(__half a, __half b) { return hostcuda::detail::round_float(__half2float(a) * __half2float(b)); }
constexpr __half __hdiv(__half a, __half b) { return hostcuda::detail::round_float(__half2float(a) / __half2float(b)); }
// The _rn forms are never contracted into an fma on the GPU; here nothing is.
constexpr __half __hadd_rn(__half a, __half b) { return __hadd(a, b); }
constexpr __half __hsub_rn(__half a, __half b) { return __hsub(a, b); }
constexpr __half __hmul_rn(__half a, __half b) { return __hmul(a, b); }
constexpr __half __hadd_sat(__half a, __half b) { return hostcuda::detail::saturate01(__hadd(a, b)); }
constexpr __half __hsub_sat(__half a, __half b) { return hostcuda::detail::saturate01(__hsub(a, b)); }
constexpr __half __hmul_sat(__half a, __half b) { return hostcuda::detail::saturate01(__hmul(a, b)); }
inline __half __hfma(__half a, __half b, __half c) { return hostcuda::detail::exact_fma(a, b, c); }
inline __half __hfma_sat(__half a, __half b, __half c) { return hostcuda::detail::saturate01(__hfma(a, b, c)); }
inline __half __hfma_relu(__half a, __half b, __half c) {  // negative -> +0, NaN -> canonical NaN
  const __half r = __hfma(a, b, c);
  return __half2float(r) < 0.0f ? __ushort_as_half(0) : r;
}

constexpr __half __hneg(__half a) {
  const unsigned short bits = hostcuda::detail::bits_of(a);
  return __ushort_as_half(hostcuda::detail::half_bits_are_nan(bits) ? hostcuda::detail::canonical_half_nan
                                                                   : static_cast<unsigned short>(bits ^ 0x8000u));
}
constexpr __half __habs(__half a) {
  const unsigned short bits = hostcuda::detail::bits_of(a);
  return __ushort_as_half(hostcuda::detail::half_bits_are_nan(bits) ? hostcuda::detail::canonical_half_nan
                                                                   : static_cast<unsigned short>(bits & 0x7fffu));
}

// max/min: a NaN operand is ignored (two NaNs give NaN); +0 > -0.
constexpr __half __hmax(__half a, __half b) {
  if (__hisnan(a) && __hisnan(b)) return __ushort_as_half(hostcuda::detail::canonical_half_nan);
  if (__hisnan(a)) return b;
  if (__hisnan(b)) return a;
  const float fa = __half2float(a), fb = __half2float(b);
  if (fa == fb) return std::signbit(fa) ? b : a;
  return fa > fb ? a : b;
}
constexpr __half __hmin(__half a, __half b) {
  if (__hisnan(a) && __hisnan(b)) return __ushort_as_half(hostcuda::detail::canonical_half_nan);
  if (__hisnan(a)) return b;
  if (__hisnan(b)) return a;
  const float fa = __half2float(a), fb = __half2float(b);
  if (fa == fb) return std::signbit(fa) ? a : b;
  return fa < fb ? a : b;
}
// The _nan forms propagate NaN instead.
constexpr __half __hmax_nan(__half a, __half b) {
  return __hisnan(a) || __hisnan(b) ? __ushort_as_half(hostcuda::detail::canonical_half_nan) : __hmax(a, b);
}
constexpr __half __hmin_nan(__half a, __half b) {
  return __hisnan(a) || __hisnan(b) ? __ushort_as_half(hostcuda::detail::canonical_half_nan) : __hmin(a, b);
}

// sqrt via float is correctly rounded (24 >= 2*11 + 2); rsqrt via double.
inline __half hsqrt(__half a) { return hostcuda::detail::round_float(std::sqrt(__half2float(a))); }
inline __half hrsqrt(__half a) { return __double2half(1.0 / std::sqrt(static_cast<double>(__half2float(a)))); }
inline __half hrcp(__half a) { return hostcuda::detail::round_float(1.0f / __half2float(a)); }
inline __half htrunc(__half a) { return hostcuda::detail::round_float(std::trunc(__half2float(a))); }
inline __half hfloor(__half a) { return hostcuda::detail::round_float(std::floor(__half2float(a))); }
inline __half hceil(__half a) { return hostcuda::detail::round_float(std::ceil(__half2float(a))); }
inline __half hrint(__half a) { return hostcuda::detail::round_float(std::nearbyint(__half2float(a))); }

// ---------------------------------------------------------------- comparisons
// Ordered (false when either is NaN) and unordered (true when either is NaN).
constexpr bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
constexpr bool __hne(__half a, __half b) { return __half2float(a) < __half2float(b) || __half2float(a) > __half2float(b); }
constexpr bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
constexpr bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
constexpr bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
constexpr bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
constexpr bool __hequ(__half a, __half b) { return !__hne(a, b); }
constexpr bool __hneu(__half a, __half b) { return !__heq(a, b); }
constexpr bool __hltu(__half a, __half b) { return !__hge(a, b); }
constexpr bool __hleu(__half a, __half b) { return !__hgt(a, b); }
constexpr bool __hgtu(__half a, __half b) { return !__hle(a, b); }
constexpr bool __hgeu(__half a, __half b) { return !__hlt(a, b); }

// ------------------------------------------------------------------ operators
constexpr __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
constexpr __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
constexpr __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
constexpr __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
constexpr __half& operator+=(__half& a, const __half& b) { return a = __hadd(a, b); }
constexpr __half& operator-=(__half& a, const __half& b) { return a = __hsub(a, b); }
constexpr __half& operator*=(__half& a, const __half& b) { return a = __hmul(a, b); }
constexpr __half& operator/=(__half& a, const __half& b) { return a = __hdiv(a, b); }
constexpr __half& operator++(__half& h) { return h += __ushort_as_half(0x3c00); }
constexpr __half& operator--(__half& h) { return h -= __ushort_as_half(0x3c00); }
constexpr __half operator++(__half& h, int) {
  const __half old = h;
  ++h;
  return old;
}
constexpr __half operator--(__half& h, int) {
  const __half old = h;
  --h;
  return old;
}
constexpr __half operator+(const __half& h) { return h; }
constexpr __half operator-(const __half& h) { return __hneg(h); }
constexpr bool operator==(const __half& a, const __half& b) { return __heq(a, b); }
constexpr bool operator!=(const __half& a, const __half& b) { return __hneu(a, b); }
constexpr bool operator<(const __half& a, const __half& b) { return __hlt(a, b); }
constexpr bool operator<=(const __half& a, const __half& b) { return __hle(a, b); }
constexpr bool operator>(const __half& a, const __half& b) { return __hgt(a, b); }
constexpr bool operator>=(const __half& a, const __half& b) { return __hge(a, b); }

// ===================================================================== __half2
constexpr __half2 make_half2(__half x, __half y) { return __half2(x, y); }
constexpr __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
constexpr __half2 __half2half2(__half a) { return __half2(a, a); }
constexpr __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
constexpr __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
constexpr __half2 __float22half2_rn(float2 a) { return __half2(__half(a.x), __half(a.y)); }
constexpr float2 __half22float2(__half2 a) { return float2{__half2float(a.x), __half2float(a.y)}; }
constexpr float __low2float(__half2 a) { return __half2float(a.x); }
constexpr float __high2float(__half2 a) { return __half2float(a.y); }
constexpr __half __low2half(__half2 a) { return a.x; }
constexpr __half __high2half(__half2 a) { return a.y; }
constexpr __half2 __low2half2(__half2 a) { return __half2(a.x, a.x); }
constexpr __half2 __high2half2(__half2 a) { return __half2(a.y, a.y); }
constexpr __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
constexpr __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }
constexpr __half2 __lowhigh2highlow(__half2 a) { return __half2(a.y, a.x); }

namespace hostcuda::detail {
template <class Op>
constexpr __half2 lanewise(__half2 a, __half2 b, Op op) { return __half2(op(a.x, b.x), op(a.y, b.y)); }
}  // namespace hostcuda::detail

constexpr __half2 __hadd2(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hadd); }
constexpr __half2 __hsub2(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hsub); }
constexpr __half2 __hmul2(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hmul); }
constexpr __half2 __h2div(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hdiv); }
constexpr __half2 __hadd2_rn(__half2 a, __half2 b) { return __hadd2(a, b); }
constexpr __half2 __hsub2_rn(__half2 a, __half2 b) { return __hsub2(a, b); }
constexpr __half2 __hmul2_rn(__half2 a, __half2 b) { return __hmul2(a, b); }
constexpr __half2 __hadd2_sat(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hadd_sat); }
constexpr __half2 __hsub2_sat(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hsub_sat); }
constexpr __half2 __hmul2_sat(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hmul_sat); }
constexpr __half2 __hmax2(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hmax); }
constexpr __half2 __hmin2(__half2 a, __half2 b) { return hostcuda::detail::lanewise(a, b, __hmin); }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }
inline __half2 __hfma2_sat(__half2 a, __half2 b, __half2 c) {
  return __half2(__hfma_sat(a.x, b.x, c.x), __hfma_sat(a.y, b.y, c.y));
}
constexpr __half2 __hneg2(__half2 a) { return __half2(__hneg(a.x), __hneg(a.y)); }
constexpr __half2 __habs2(__half2 a) { return __half2(__habs(a.x), __habs(a.y)); }
constexpr __half2 __hisnan2(__half2 a) {  // 1.0 where NaN, else 0.0
  return __half2(__ushort_as_half(__hisnan(a.x) ? 0x3c00 : 0), __ushort_as_half(__hisnan(a.y) ? 0x3c00 : 0));
}

// Both lanes satisfy the comparison (the __hb*2 forms, used by the operators).
constexpr bool __hbeq2(__half2 a, __half2 b) { return __heq(a.x, b.x) && __heq(a.y, b.y); }
constexpr bool __hbne2(__half2 a, __half2 b) { return __hne(a.x, b.x) && __hne(a.y, b.y); }
constexpr bool __hblt2(__half2 a, __half2 b) { return __hlt(a.x, b.x) && __hlt(a.y, b.y); }
constexpr bool __hble2(__half2 a, __half2 b) { return __hle(a.x, b.x) && __hle(a.y, b.y); }
constexpr bool __hbgt2(__half2 a, __half2 b) { return __hgt(a.x, b.x) && __hgt(a.y, b.y); }
constexpr bool __hbge2(__half2 a, __half2 b) { return __hge(a.x, b.x) && __hge(a.y, b.y); }
constexpr bool __hbequ2(__half2 a, __half2 b) { return __hequ(a.x, b.x) && __hequ(a.y, b.y); }
constexpr bool __hbneu2(__half2 a, __half2 b) { return __hneu(a.x, b.x) && __hneu(a.y, b.y); }
constexpr bool __hbltu2(__half2 a, __half2 b) { return __hltu(a.x, b.x) && __hltu(a.y, b.y); }
constexpr bool __hbleu2(__half2 a, __half2 b) { return __hleu(a.x, b.x) && __hleu(a.y, b.y); }
constexpr bool __hbgtu2(__half2 a, __half2 b) { return __hgtu(a.x, b.x) && __hgtu(a.y, b.y); }
constexpr bool __hbgeu2(__half2 a, __half2 b) { return __hgeu(a.x, b.x) && __hgeu(a.y, b.y); }

constexpr __half2 operator+(const __half2& a, const __half2& b) { return __hadd2(a, b); }
constexpr __half2 operator-(const __half2& a, const __half2& b) { return __hsub2(a, b); }
constexpr __half2 operator*(const __half2& a, const __half2& b) { return __hmul2(a, b); }
constexpr __half2 operator/(const __half2& a, const __half2& b) { return __h2div(a, b); }
constexpr __half2& operator+=(__half2& a, const __half2& b) { return a = __hadd2(a, b); }
constexpr __half2& operator-=(__half2& a, const __half2& b) { return a = __hsub2(a, b); }
constexpr __half2& operator*=(__half2& a, const __half2& b) { return a = __hmul2(a, b); }
constexpr __half2& operator/=(__half2& a, const __half2& b) { return a = __h2div(a, b); }
constexpr __half2& operator++(__half2& h) { return h += __half2half2(__ushort_as_half(0x3c00)); }
constexpr __half2& operator--(__half2& h) { return h -= __half2half2(__ushort_as_half(0x3c00)); }
constexpr __half2 operator++(__half2& h, int) {
  const __half2 old = h;
  ++h;
  return old;
}
constexpr __half2 operator--(__half2& h, int) {
  const __half2 old = h;
  --h;
  return old;
}
constexpr __half2 operator+(const __half2& h) { return h; }
constexpr __half2 operator-(const __half2& h) { return __hneg2(h); }
constexpr bool operator==(const __half2& a, const __half2& b) { return __hbeq2(a, b); }
constexpr bool operator!=(const __half2& a, const __half2& b) { return __hbneu2(a, b); }
constexpr bool operator<(const __half2& a, const __half2& b) { return __hblt2(a, b); }
constexpr bool operator<=(const __half2& a, const __half2& b) { return __hble2(a, b); }
constexpr bool operator>(const __half2& a, const __half2& b) { return __hbgt2(a, b); }
constexpr bool operator>=(const __half2& a, const __half2& b) { return __hbge2(a, b); }

#endif  // CUPYBN_HOSTCUDA_HALF_H
