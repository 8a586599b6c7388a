// hostcuda/atomic.h: CUDA's atomic functions and memory fences on the host.
//
// Every atomic is a std::atomic_ref operation, which the race check
// (sanitize="race") sees as an atomic.  They are relaxed, as CUDA's atomicXxx
// are: ordering other memory accesses takes __syncthreads() or a
// __threadfence*() before the atomic, exactly as on the GPU, so a kernel that
// forgets its fence shows up as a race.
// Each returns the old value, as CUDA's do.
//
// Like the GPU's, atomicAdd on float flushes subnormal inputs and results to
// a zero of the same sign (PTX atom.add.f32); double and half do not flush.
// A null or misaligned address ends the launch, as it does on the GPU.
//
// The *_block and *_system variants are the same operations: the host has one
// coherent memory, so a stronger scope is always correct.  The race check tells
// them apart: a *_block atomic is atomic within its block only.
#ifndef CUPYBN_HOSTCUDA_ATOMIC_H
#define CUPYBN_HOSTCUDA_ATOMIC_H

#include <atomic>
#include <cmath>
#include <cstdint>

#include "half.h"

namespace hostcuda {
[[noreturn]] void trap(const char* message);

namespace detail {

inline constexpr std::memory_order atomic_order = std::memory_order_relaxed;

template <class T>
std::atomic_ref<T> atomic_at(T* address) {
  if (address == nullptr) trap("atomic operation on a null address");
  if (reinterpret_cast<std::uintptr_t>(address) % std::atomic_ref<T>::required_alignment != 0) {
    trap("misaligned address in an atomic operation");
  }
  return std::atomic_ref<T>(*address);
}

// A read-modify-write computed by `update(old)`, retried until no other thread
// intervened; returns the old value.  (compare_exchange compares bits, so NaN
// and -0 stored values do not make it spin.)
template <class T, class Update>
T atomic_update(T* address, Update update) {
  std::atomic_ref<T> ref = atomic_at(address);
  T old = ref.load(atomic_order);
  while (!ref.compare_exchange_weak(old, update(old), atomic_order, atomic_order)) {
  }
  return old;
}

inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

// scope: 1 block, 2 device.  The host has one coherent memory, so the real
// fence is the same for both; the race check (sanitize="race") tells them apart.
inline void fence(int scope) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  race::fence(scope);
}

}  // namespace detail
}  // namespace hostcuda

// ------------------------------------------------------------------ atomicAdd
inline int atomicAdd(int* address, int val) { return hostcuda::detail::atomic_at(address).fetch_add(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).fetch_add(val, hostcuda::detail::atomic_order);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::atomic_at(address).fetch_add(val, hostcuda::detail::atomic_order);
}
inline float atomicAdd(float* address, float val) {
  using hostcuda::detail::flush_subnormal;
  return hostcuda::detail::atomic_update(
      address, [val](float old) { return flush_subnormal(flush_subnormal(old) + flush_subnormal(val)); });
}
inline double atomicAdd(double* address, double val) {
  return hostcuda::detail::atomic_update(address, [val](double old) { return old + val; });
}
inline __half atomicAdd(__half* address, __half val) {
  return hostcuda::detail::atomic_update(address, [val](__half old) { return __hadd(old, val); });
}
inline __half2 atomicAdd(__half2* address, __half2 val) {
  return hostcuda::detail::atomic_update(address, [val](__half2 old) { return __hadd2(old, val); });
}

inline int atomicSub(int* address, int val) { return hostcuda::detail::atomic_at(address).fetch_sub(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicSub(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).fetch_sub(val, hostcuda::detail::atomic_order);
}

// ----------------------------------------------------------- exchange and CAS
inline int atomicExch(int* address, int val) { return hostcuda::detail::atomic_at(address).exchange(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicExch(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).exchange(val, hostcuda::detail::atomic_order);
}
inline unsigned long long atomicExch(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::atomic_at(address).exchange(val, hostcuda::detail::atomic_order);
}
inline float atomicExch(float* address, float val) {
  return hostcuda::detail::atomic_at(address).exchange(val, hostcuda::detail::atomic_order);
}

namespace hostcuda::detail {
template <class T>
T compare_and_swap(T* address, T compare, T val) {
  T old = compare;  // on failure compare_exchange stores the current value here
  atomic_at(address).compare_exchange_strong(old, val, atomic_order, atomic_order);
  return old;
}
}  // namespace hostcuda::detail

inline int atomicCAS(int* address, int compare, int val) { return hostcuda::detail::compare_and_swap(address, compare, val); }
inline unsigned int atomicCAS(unsigned int* address, unsigned int compare, unsigned int val) {
  return hostcuda::detail::compare_and_swap(address, compare, val);
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long val) {
  return hostcuda::detail::compare_and_swap(address, compare, val);
}
inline unsigned short atomicCAS(unsigned short* address, unsigned short compare, unsigned short val) {
  return hostcuda::detail::compare_and_swap(address, compare, val);
}

// ------------------------------------------------------------------ min / max
namespace hostcuda::detail {
template <class T>
T fetch_max(T* address, T val) { return atomic_update(address, [val](T old) { return old < val ? val : old; }); }
template <class T>
T fetch_min(T* address, T val) { return atomic_update(address, [val](T old) { return val < old ? val : old; }); }
}  // namespace hostcuda::detail

inline int atomicMax(int* address, int val) { return hostcuda::detail::fetch_max(address, val); }
inline unsigned int atomicMax(unsigned int* address, unsigned int val) { return hostcuda::detail::fetch_max(address, val); }
inline long long atomicMax(long long* address, long long val) { return hostcuda::detail::fetch_max(address, val); }
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::fetch_max(address, val);
}
inline int atomicMin(int* address, int val) { return hostcuda::detail::fetch_min(address, val); }
inline unsigned int atomicMin(unsigned int* address, unsigned int val) { return hostcuda::detail::fetch_min(address, val); }
inline long long atomicMin(long long* address, long long val) { return hostcuda::detail::fetch_min(address, val); }
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::fetch_min(address, val);
}

// ---------------------------------------------------------------- bitwise ops
inline int atomicAnd(int* address, int val) { return hostcuda::detail::atomic_at(address).fetch_and(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicAnd(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).fetch_and(val, hostcuda::detail::atomic_order);
}
inline unsigned long long atomicAnd(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::atomic_at(address).fetch_and(val, hostcuda::detail::atomic_order);
}
inline int atomicOr(int* address, int val) { return hostcuda::detail::atomic_at(address).fetch_or(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicOr(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).fetch_or(val, hostcuda::detail::atomic_order);
}
inline unsigned long long atomicOr(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::atomic_at(address).fetch_or(val, hostcuda::detail::atomic_order);
}
inline int atomicXor(int* address, int val) { return hostcuda::detail::atomic_at(address).fetch_xor(val, hostcuda::detail::atomic_order); }
inline unsigned int atomicXor(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_at(address).fetch_xor(val, hostcuda::detail::atomic_order);
}
inline unsigned long long atomicXor(unsigned long long* address, unsigned long long val) {
  return hostcuda::detail::atomic_at(address).fetch_xor(val, hostcuda::detail::atomic_order);
}

// ------------------------------------------------------ wrapping inc / dec
// atomicInc: old >= val ? 0 : old + 1.  atomicDec: (old == 0 || old > val) ? val : old - 1.
inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_update(address, [val](unsigned int old) { return old >= val ? 0u : old + 1u; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int val) {
  return hostcuda::detail::atomic_update(address,
                                         [val](unsigned int old) { return old == 0u || old > val ? val : old - 1u; });
}

// ----------------------------------------------------- scoped variants
// Templates that forward to the overloads above, so they accept exactly the
// argument types those accept.
template <class T, class U>
auto atomicAdd_block(T* a, U v) -> decltype(atomicAdd(a, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicAdd(a, v); }
template <class T, class U>
auto atomicAdd_system(T* a, U v) -> decltype(atomicAdd(a, v)) { return atomicAdd(a, v); }
template <class T, class U>
auto atomicSub_block(T* a, U v) -> decltype(atomicSub(a, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicSub(a, v); }
template <class T, class U>
auto atomicSub_system(T* a, U v) -> decltype(atomicSub(a, v)) { return atomicSub(a, v); }
template <class T, class U>
auto atomicExch_block(T* a, U v) -> decltype(atomicExch(a, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicExch(a, v); }
template <class T, class U>
auto atomicExch_system(T* a, U v) -> decltype(atomicExch(a, v)) { return atomicExch(a, v); }
template <class T, class U, class V>
auto atomicCAS_block(T* a, U c, V v) -> decltype(atomicCAS(a, c, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicCAS(a, c, v); }
template <class T, class U, class V>
auto atomicCAS_system(T* a, U c, V v) -> decltype(atomicCAS(a, c, v)) { return atomicCAS(a, c, v); }
template <class T, class U>
auto atomicMax_block(T* a, U v) -> decltype(atomicMax(a, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicMax(a, v); }
template <class T, class U>
auto atomicMax_system(T* a, U v) -> decltype(atomicMax(a, v)) { return atomicMax(a, v); }
template <class T, class U>
auto atomicMin_block(T* a, U v) -> decltype(atomicMin(a, v)) {
  hostcuda::race::BlockScopedAtomics scope;  // atomic within the block only
  return atomicMin(a, v); }
template <class T, class U>
auto atomicMin_system(T* a, U v) -> decltype(atomicMin(a, v)) { return atomicMin(a, v); }

// ---------------------------------------------------------------- fences
inline void __threadfence_block() { hostcuda::detail::fence(1); }
inline void __threadfence() { hostcuda::detail::fence(2); }
inline void __threadfence_system() { hostcuda::detail::fence(2); }

#endif  // CUPYBN_HOSTCUDA_ATOMIC_H
