// racecheck.h: what the harness tells the race check (sanitize="race").
//
// A "race" build compiles the module with GCC's ThreadSanitizer instrumentation
// (-fsanitize=thread), which calls __tsan_read4, __tsan_write8, __tsan_atomic*
// and so on around every memory access, and links it without ThreadSanitizer's
// runtime but with racecheck_runtime.cc, which defines those functions: a race
// check with CUDA's idea of "ordered" (the model is described there and in
// docs/hostcuda.md).  The harness's own locks, atomics and waits order nothing
// for it; the harness reports the events that do (barriers, __syncwarp,
// fences, blocks starting and ending) through the functions below, which are
// empty in every other build.
#ifndef CUPYBN_HOSTCUDA_RACECHECK_H
#define CUPYBN_HOSTCUDA_RACECHECK_H

#include <cstddef>

#if defined(HOSTCUDA_RACECHECK)
extern "C" {
void hostcuda_race_init(unsigned char* dynamic_shared, std::size_t dynamic_size, unsigned char* static_shared,
                        std::size_t static_size);
void hostcuda_race_add_global(const void* p, std::size_t size, int index);
void hostcuda_race_begin_block(unsigned long long block, unsigned tid);
void hostcuda_race_end_block();
void hostcuda_race_reset_block();
void hostcuda_race_barrier_arrive();
void hostcuda_race_barrier_complete();
void hostcuda_race_barrier_depart();
void hostcuda_race_syncwarp_round(unsigned warp);
void hostcuda_race_syncwarp_arrive(unsigned warp, unsigned lane);
void hostcuda_race_syncwarp_depart(unsigned warp);
void hostcuda_race_fence(int scope);
void hostcuda_race_harness(int delta);
void hostcuda_race_block_scope(int delta);
unsigned long long hostcuda_race_finish(const unsigned grid[3], const unsigned block[3]);
}
#define HOSTCUDA_RACE_CALL(call) call
#else
#define HOSTCUDA_RACE_CALL(call) ((void)0)
#endif

namespace hostcuda::race {

// A CUDA thread starts or ends its part of a block (block: linear index).
inline void begin_block(unsigned long long block, unsigned tid) {
  HOSTCUDA_RACE_CALL(hostcuda_race_begin_block(block, tid));
  (void)block, (void)tid;
}
inline void end_block() { HOSTCUDA_RACE_CALL(hostcuda_race_end_block()); }
// A new block is about to start: its shared memory is new memory.
inline void reset_block() { HOSTCUDA_RACE_CALL(hostcuda_race_reset_block()); }
// __syncthreads(): arrive and complete with the block's lock held, depart after.
inline void barrier_arrive() { HOSTCUDA_RACE_CALL(hostcuda_race_barrier_arrive()); }
inline void barrier_complete() { HOSTCUDA_RACE_CALL(hostcuda_race_barrier_complete()); }
inline void barrier_depart() { HOSTCUDA_RACE_CALL(hostcuda_race_barrier_depart()); }
// __syncwarp(mask): round (first lane in), arrive (each lane, lock held), depart.
inline void syncwarp_round(unsigned warp) {
  HOSTCUDA_RACE_CALL(hostcuda_race_syncwarp_round(warp));
  (void)warp;
}
inline void syncwarp_arrive(unsigned warp, unsigned lane) {
  HOSTCUDA_RACE_CALL(hostcuda_race_syncwarp_arrive(warp, lane));
  (void)warp, (void)lane;
}
inline void syncwarp_depart(unsigned warp) {
  HOSTCUDA_RACE_CALL(hostcuda_race_syncwarp_depart(warp));
  (void)warp;
}
// scope: 1 for __threadfence_block(), 2 for __threadfence() and __threadfence_system().
inline void fence(int scope) {
  HOSTCUDA_RACE_CALL(hostcuda_race_fence(scope));
  (void)scope;
}

// While one lives, the thread runs the harness's own code (a barrier, a warp
// collective): its atomics and waits are the harness's, not the kernel's.
struct HarnessScope {
  HarnessScope() { HOSTCUDA_RACE_CALL(hostcuda_race_harness(1)); }
  ~HarnessScope() { HOSTCUDA_RACE_CALL(hostcuda_race_harness(-1)); }
  HarnessScope(const HarnessScope&) = delete;
  HarnessScope& operator=(const HarnessScope&) = delete;
};

// While one lives, the thread's atomics are block-scoped (atomicXxx_block).
struct BlockScopedAtomics {
  BlockScopedAtomics() { HOSTCUDA_RACE_CALL(hostcuda_race_block_scope(1)); }
  ~BlockScopedAtomics() { HOSTCUDA_RACE_CALL(hostcuda_race_block_scope(-1)); }
  BlockScopedAtomics(const BlockScopedAtomics&) = delete;
  BlockScopedAtomics& operator=(const BlockScopedAtomics&) = delete;
};

}  // namespace hostcuda::race

#undef HOSTCUDA_RACE_CALL

#endif  // CUPYBN_HOSTCUDA_RACECHECK_H
