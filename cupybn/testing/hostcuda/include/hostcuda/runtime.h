// runtime.h: the execution model of hostcuda.
//
// A launch runs its blocks one after the other (last, first, second last, ...).
// Every CUDA thread of a block is a real std::thread from a reused pool, so
// __syncthreads() is a real barrier.
// Warps are 32 consecutive threads (by linear thread index); they meet only at
// warp-level collectives (__syncwarp, shuffles, votes), which wait for exactly
// the lanes named in the mask.  All waiting in a block goes through one mutex,
// which lets the runtime tell a deadlock (a __syncthreads() that some threads
// skip, a shuffle whose lanes never arrive) from a slow thread and fail the
// launch with a diagnosis.  That mutex orders everything on the host, so the
// race check (racecheck.h) is told separately which of these events order
// memory in CUDA: barriers and __syncwarp do, shuffles and votes do not.
#ifndef CUPYBN_HOSTCUDA_RUNTIME_H
#define CUPYBN_HOSTCUDA_RUNTIME_H

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "racecheck.h"

struct uint3 {
  unsigned int x, y, z;
};
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

namespace hostcuda {

// Largest dynamic shared memory a launch may ask for (an H100 block's limit).
constexpr std::size_t kMaxDynamicShared = 227 * 1024;
// Dynamic shared memory starts with these bytes in every block, as a GPU's
// starts with whatever the last block left: code that reads before writing
// sees NaNs and -1s rather than convenient zeros.
constexpr unsigned char kSharedFill = 0xFF;

// The buffer behind every `extern __shared__` array (the harness rewrites such
// declarations into pointers to it).  In ASan builds the part beyond the
// launch's shared_mem is poisoned, so an overrun is reported.
alignas(256) inline unsigned char dynamic_smem[kMaxDynamicShared];

// The storage of every static __shared__ variable of the module (the harness
// rewrites `__shared__ T a[N];` into `auto& a = static_shared<T[N], Site, Align>(...)`):
// one slot per declaration and template instantiation, reserved on first use.
// The slots of one block's kernel are its shared memory; the used part is
// refilled for every block and shadowed by the race check.
constexpr std::size_t kStaticSharedArena = std::size_t(1) << 20;
alignas(256) inline unsigned char static_smem[kStaticSharedArena];

struct StaticSharedSlot {
  std::size_t offset, size;
  const char* name;
  const char* function;  // __PRETTY_FUNCTION__ of the declaring function, or ""
};

struct StaticSharedArena {
  std::mutex m;  // guards both
  std::size_t used = 0;
  std::vector<StaticSharedSlot> slots;
};
inline StaticSharedArena& static_shared_arena() {
  static StaticSharedArena arena;
  return arena;
}

// In ASan builds slots are kept apart by poisoned gaps, and the arena beyond
// the last slot is poisoned, so an overrun of a __shared__ array is reported.
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kStaticSharedGap = 32;
#else
constexpr std::size_t kStaticSharedGap = 0;
#endif

// For a new block: every slot refilled, and (ASan) everything else poisoned.
inline void refill_static_shared() {
  StaticSharedArena& arena = static_shared_arena();
  std::lock_guard<std::mutex> lock(arena.m);
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(static_smem, kStaticSharedArena);
  for (const StaticSharedSlot& s : arena.slots) ASAN_UNPOISON_MEMORY_REGION(static_smem + s.offset, s.size);
#endif
  for (const StaticSharedSlot& s : arena.slots) std::memset(static_smem + s.offset, kSharedFill, s.size);
}

inline void* reserve_static_shared(std::size_t size, std::size_t align, const char* name, const char* function) {
  race::HarnessScope harness;  // filling the new slot is not the kernel's write
  StaticSharedArena& arena = static_shared_arena();
  std::lock_guard<std::mutex> lock(arena.m);
  const std::size_t start = arena.used + kStaticSharedGap;
  const std::size_t offset = (start + align - 1) / align * align;
  if (offset + size > kStaticSharedArena) trap("the module's static __shared__ variables exceed the harness's 1 MiB");
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(static_smem + offset, size);
#endif
  std::memset(static_smem + offset, kSharedFill, size);
  arena.slots.push_back({offset, size, name, function});
  arena.used = offset + size;
  return static_smem + offset;
}

template <class V, class Site, std::size_t Align>
V& static_shared(const char* name, const char* function) {
  static V* const slot =
      static_cast<V*>(reserve_static_shared(sizeof(V), Align != 0 ? Align : alignof(V), name, function));
  return *slot;
}

struct LaunchConfig {
  unsigned int grid[3];
  unsigned int block[3];
  unsigned long long shared_mem;
};

// The generated entry point of one kernel: 0, or 1 with a message in err.
using LaunchFn = int (*)(const LaunchConfig*, void**, char*, std::size_t);

// Thrown through kernel code to stop a thread once the launch has failed.
struct Abort {};

struct Block;

struct ThreadState {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  unsigned linear = 0;  // linear thread index within the block
  Block* block = nullptr;
};
inline thread_local ThreadState tls;

struct LaunchDims {
  dim3 grid;
  dim3 block;
};
inline LaunchDims dims;

enum class Collective : unsigned char { None, Syncwarp, Shuffle, Ballot };

inline const char* collective_name(Collective c) {
  switch (c) {
    case Collective::Syncwarp: return "__syncwarp";
    case Collective::Shuffle: return "a __shfl*_sync";
    case Collective::Ballot: return "a vote (__ballot/__all/__any_sync)";
    default: return "none";
  }
}

// Waiting is on atomic counters ("signals"): a waiter notes the value under the
// block's lock, releases the lock and sleeps until the value moves.  Releasers
// move it under the lock with release order, so what they published is visible
// to every thread they wake.
using Signal = std::atomic<unsigned>;

struct Warp {
  unsigned existing = 0;   // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;     // lanes that have returned from the kernel in this block
  bool gathering = true;   // false while participants read each other's values
  Collective kind = Collective::None;
  unsigned mask = 0, expected = 0, arrived = 0, departed = 0, waiting_to_enter = 0;
  unsigned long long slots[32] = {};
  unsigned present = 0;    // lanes that have deposited a value this round
  Signal released{0};      // moves when every lane of the round has arrived
  Signal reset{0};         // moves when the round has been read and the warp is free
};

// Everything shared by the threads of the running block.  One mutex guards it all.
struct Block {
  std::mutex m;
  unsigned nthreads = 0;
  unsigned running = 0;  // threads not waiting on anything
  // __syncthreads() bookkeeping.
  unsigned at_sync = 0, finished = 0;
  Signal phase{0};       // moves when a __syncthreads() completes
  Signal next_block{0};  // moves when every thread has finished the block
  const char* sync_file = nullptr;
  int sync_line = 0;
  int sync_op = 0;       // 0 plain, 1 count, 2 and, 3 or
  unsigned long long sync_acc = 0;
  int sync_result = 0;
  std::unique_ptr<Warp[]> warps;
  unsigned nwarps = 0;
  // Failure of the launch: the first message wins.
  std::atomic<bool> aborted{false};
  std::string error;
};

inline std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

inline void move_signal(Signal& s) { s.fetch_add(1, std::memory_order_release); }

// Records the failure (with the lock held) and wakes every waiting thread.
inline void fail_locked(Block& b, const std::string& message) {
  if (!b.aborted.load(std::memory_order_relaxed)) {
    b.error = message;
    b.aborted.store(true, std::memory_order_release);
  }
  Signal* all[] = {&b.phase, &b.next_block};
  for (Signal* s : all) {
    move_signal(*s);
    s->notify_all();
  }
  for (unsigned w = 0; w < b.nwarps; ++w) {
    move_signal(b.warps[w].released);
    b.warps[w].released.notify_all();
    move_signal(b.warps[w].reset);
    b.warps[w].reset.notify_all();
  }
}

inline std::string block_name() {
  const uint3 bi = tls.block_idx;
  return format("block (%u,%u,%u)", bi.x, bi.y, bi.z);
}

inline std::string thread_name(unsigned linear) {
  const dim3 bd = dims.block;
  return format("thread (%u,%u,%u)", linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y));
}

// Called by a thread that is about to wait: if no thread of the block is left
// running, nothing can ever wake it, so the launch fails with a description.
inline void check_deadlock_locked(Block& b) {
  if (b.running != 0 || b.aborted.load(std::memory_order_relaxed)) return;
  std::string msg;
  if (b.at_sync && b.finished) {
    msg = format("__syncthreads() at %s:%d was reached by %u of %u threads of %s; the other %u returned "
                 "(a barrier in divergent code)",
                 b.sync_file, b.sync_line, b.at_sync, b.nthreads, block_name().c_str(), b.finished);
  } else {
    msg = "deadlock in " + block_name() + ":";
    for (unsigned w = 0; w < b.nwarps; ++w) {
      const Warp& wp = b.warps[w];
      if (wp.arrived && wp.gathering) {
        msg += format(" warp %u waits in %s with mask 0x%08x, %u of %u lanes arrived;", w, collective_name(wp.kind),
                      wp.mask, wp.arrived, wp.expected);
      }
    }
    if (b.at_sync) msg += format(" %u threads wait at __syncthreads() (%s:%d);", b.at_sync, b.sync_file, b.sync_line);
    if (b.finished) msg += format(" %u threads have returned;", b.finished);
  }
  fail_locked(b, msg);
}

// Waits (giving up the lock) until `signal` moves.  Whoever moves it counts the
// threads it releases as running again, so a thread that is woken but not yet
// scheduled is never mistaken for a blocked one.  Returns with the lock released.
inline void block_until_moved(Block& b, std::unique_lock<std::mutex>& lock, Signal& signal) {
  const unsigned seen = signal.load(std::memory_order_relaxed);
  --b.running;
  check_deadlock_locked(b);
  if (b.aborted.load(std::memory_order_relaxed)) throw Abort{};
  lock.unlock();
  signal.wait(seen, std::memory_order_acquire);
  if (b.aborted.load(std::memory_order_acquire)) throw Abort{};
}

inline void syncthreads_impl(const char* file, int line, int op, int predicate) {
  Block& b = *tls.block;
  race::HarnessScope harness;
  std::unique_lock<std::mutex> lock(b.m);
  if (b.aborted.load(std::memory_order_relaxed)) throw Abort{};
  if (b.at_sync == 0) {
    b.sync_file = file;
    b.sync_line = line;
    b.sync_op = op;
    b.sync_acc = 0;
  } else if (b.sync_line != line || std::strcmp(b.sync_file, file) != 0 || b.sync_op != op) {
    fail_locked(b, format("threads of %s meet at different barriers: %s:%d and %s:%d (a barrier in divergent code)",
                          block_name().c_str(), b.sync_file, b.sync_line, file, line));
    throw Abort{};
  }
  b.sync_acc += predicate != 0;
  race::barrier_arrive();
  if (++b.at_sync == b.nthreads) {
    // Last to arrive: compute the vote, release the others, open the next phase.
    const unsigned long long n = b.sync_acc;
    b.sync_result = b.sync_op == 1 ? static_cast<int>(n) : b.sync_op == 2 ? n == b.nthreads : n != 0;
    b.running += b.at_sync - 1;
    b.at_sync = 0;
    race::barrier_complete();
    move_signal(b.phase);
    lock.unlock();
    b.phase.notify_all();
  } else {
    block_until_moved(b, lock, b.phase);
  }
  race::barrier_depart();
}

// The vote of the barrier just passed; it stays until every thread has reached
// the next barrier, so reading it without the lock is safe.
inline int syncthreads_result() { return tls.block->sync_result; }

// ---- warp collectives -------------------------------------------------------

// Deposits this lane's value, waits for every lane of `mask`, then calls
// read(slots, present, lane) to compute this lane's result.  Returns that result.
template <class Read>
inline auto warp_collective(Collective kind, unsigned mask, unsigned long long value, Read read) {
  Block& b = *tls.block;
  race::HarnessScope harness;
  Warp& w = b.warps[tls.linear / 32u];
  const unsigned lane = tls.linear % 32u;
  std::unique_lock<std::mutex> lock(b.m);
  if (b.aborted.load(std::memory_order_relaxed)) throw Abort{};
  if (!(mask & (1u << lane))) {
    fail_locked(b, format("%s in %s of %s: mask 0x%08x does not name the calling lane %u", collective_name(kind),
                          thread_name(tls.linear).c_str(), block_name().c_str(), mask, lane));
    throw Abort{};
  }
  // Join the round being gathered if it is ours; otherwise wait until this
  // warp's current round (other lanes, or one still being read) is over.
  while (!(w.gathering && (w.arrived == 0 || (w.mask == mask && w.kind == kind)))) {
    if (w.gathering && (w.mask & (1u << lane))) {
      // The round in progress expects this lane, which called something else.
      fail_locked(b, format("lanes of warp %u of %s meet at different warp collectives: %s with mask 0x%08x and "
                            "%s with mask 0x%08x",
                            tls.linear / 32u, block_name().c_str(), collective_name(w.kind), w.mask,
                            collective_name(kind), mask));
      throw Abort{};
    }
    ++w.waiting_to_enter;
    block_until_moved(b, lock, w.reset);
    lock.lock();
  }
  const unsigned warp = tls.linear / 32u;
  if (w.arrived == 0) {
    w.kind = kind;
    w.mask = mask;
    // CUDA waits for the lanes of the mask that have not exited.
    w.expected = static_cast<unsigned>(__builtin_popcount(mask & w.existing & ~w.exited));
    w.present = 0;
    if (kind == Collective::Syncwarp) race::syncwarp_round(warp);
  }
  // Only __syncwarp orders memory; shuffles and votes exchange values alone.
  if (kind == Collective::Syncwarp) race::syncwarp_arrive(warp, lane);
  w.slots[lane] = value;
  w.present |= 1u << lane;
  if (++w.arrived == w.expected) {
    w.gathering = false;
    w.departed = 0;
    b.running += w.expected - 1;
    move_signal(w.released);
    lock.unlock();
    w.released.notify_all();
  } else {
    block_until_moved(b, lock, w.released);
  }
  // The slots stay put until every participant has departed, this one included.
  auto result = read(w.slots, w.present, lane);
  if (kind == Collective::Syncwarp) race::syncwarp_depart(warp);
  lock.lock();
  if (++w.departed == w.expected) {
    w.gathering = true;
    w.arrived = 0;
    w.kind = Collective::None;
    b.running += w.waiting_to_enter;
    w.waiting_to_enter = 0;
    move_signal(w.reset);
    lock.unlock();
    w.reset.notify_all();
  }
  return result;
}

template <class T>
inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  unsigned long long bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&v), sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(unsigned long long bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));  // __half's member is protected, as in CUDA
  return v;
}

inline void check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) {
    trap(format("shuffle width %d is not a power of two in [1, 32]", width).c_str());
  }
}

// A lane returns from the kernel (block lock held): a collective gathering with
// a mask that names it no longer waits for it, as on a GPU since Volta.
inline void lane_exited_locked(Block& b, unsigned linear) {
  Warp& w = b.warps[linear / 32u];
  const unsigned bit = 1u << (linear % 32u);
  w.exited |= bit;
  if (w.gathering && w.arrived != 0 && (w.mask & bit) && !(w.present & bit) && --w.expected == w.arrived) {
    w.gathering = false;
    w.departed = 0;
    b.running += w.arrived;  // every lane of the round was waiting
    move_signal(w.released);
    w.released.notify_all();
  }
}

// src: the lane to read, or -1 for "keep my own value".
template <class T, class SourceLane>
inline T shuffle(unsigned mask, T var, SourceLane source_lane) {
  return warp_collective(Collective::Shuffle, mask, to_bits(var),
                         [&](const unsigned long long* slots, unsigned present, unsigned lane) {
                           const int src = source_lane(static_cast<int>(lane));
                           if (src < 0) return var;
                           if (!(present & (1u << src))) {
                             trap(format("shuffle reads lane %d, which is not in mask 0x%08x, does not exist or has exited",
                                         src, mask)
                                      .c_str());
                           }
                           return from_bits<T>(slots[src]);
                         });
}

template <class T>
inline T shfl(unsigned mask, T var, int src_lane, int width) {
  check_width(width);
  return shuffle(mask, var, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); });
}
template <class T>
inline T shfl_up(unsigned mask, T var, unsigned delta, int width) {
  check_width(width);
  return shuffle(mask, var, [=](int lane) {
    return (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  });
}
template <class T>
inline T shfl_down(unsigned mask, T var, unsigned delta, int width) {
  check_width(width);
  return shuffle(mask, var, [=](int lane) {
    return (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  });
}
template <class T>
inline T shfl_xor(unsigned mask, T var, int lane_mask, int width) {
  check_width(width);
  return shuffle(mask, var, [=](int lane) {
    const int src = lane ^ lane_mask;
    // Lanes may read earlier groups of `width`, never later ones.
    return (src & ~(width - 1)) > (lane & ~(width - 1)) ? -1 : src;
  });
}

inline unsigned ballot(unsigned mask, int predicate) {
  return warp_collective(Collective::Ballot, mask, predicate != 0,
                         [](const unsigned long long* slots, unsigned present, unsigned) {
                           unsigned bits = 0;
                           for (unsigned l = 0; l < 32; ++l)
                             if ((present & (1u << l)) && slots[l]) bits |= 1u << l;
                           return bits;
                         });
}

// ---- launching ----------------------------------------------------------------

// Worker threads, created on demand and reused by every launch of this module.
// Each worker sleeps on its own atomic, so a launch wakes exactly the threads it
// needs (no thundering herd on a shared mutex); the launcher sleeps until the
// count of running workers drops to zero.  Launches are serialised by the
// caller (launch_mutex), so run() is never re-entered.
class Pool {
 public:
  static Pool& instance() {
    // Never destroyed: workers may outlive static destructors.  A forked child
    // has none of its parent's workers, so it starts a pool of its own.
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool;
      owner = getpid();
    }
    return *pool;
  }

  // Runs job(i) on threads 0..n-1 and waits for all of them.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    while (workers_.size() < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      const unsigned index = static_cast<unsigned>(workers_.size() - 1);
      std::thread([this, w, index] { work(*w, index); }).detach();
    }
    job_ = &job;
    remaining_.store(n, std::memory_order_relaxed);
    for (unsigned i = 0; i < n; ++i) {
      workers_[i]->go.fetch_add(1, std::memory_order_release);
      workers_[i]->go.notify_one();
    }
    for (unsigned left = remaining_.load(std::memory_order_acquire); left != 0;
         left = remaining_.load(std::memory_order_acquire)) {
      remaining_.wait(left, std::memory_order_acquire);
    }
    job_ = nullptr;
  }

 private:
  struct Worker {
    std::atomic<unsigned> go{0};
  };

  void work(Worker& w, unsigned index) {
    unsigned seen = 0;
    for (;;) {
      w.go.wait(seen, std::memory_order_acquire);
      seen = w.go.load(std::memory_order_acquire);
      (*job_)(index);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_one();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::atomic<unsigned> remaining_{0};
};

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline std::string check_config(const LaunchConfig& c) {
  const unsigned long long threads = 1ull * c.block[0] * c.block[1] * c.block[2];
  for (int i = 0; i < 3; ++i) {
    if (c.grid[i] == 0 || c.block[i] == 0) return "grid and block dimensions must be at least 1";
  }
  if (c.block[0] > 1024 || c.block[1] > 1024 || c.block[2] > 64 || threads > 1024) {
    return format("block (%u,%u,%u) exceeds CUDA's limits (x, y <= 1024, z <= 64, at most 1024 threads)",
                  c.block[0], c.block[1], c.block[2]);
  }
  if (c.grid[0] > 2147483647u || c.grid[1] > 65535u || c.grid[2] > 65535u) {
    return format("grid (%u,%u,%u) exceeds CUDA's limits (x < 2^31, y, z <= 65535)", c.grid[0], c.grid[1],
                  c.grid[2]);
  }
  if (c.shared_mem > kMaxDynamicShared) {
    return format("shared_mem=%llu exceeds the %zu bytes of dynamic shared memory a block may have", c.shared_mem,
                  kMaxDynamicShared);
  }
  return "";
}

// CuPy compiles every kernel with -ftz=true: float32 arithmetic on a GPU reads
// subnormal operands as zero and flushes subnormal results to zero.  The
// harness's threads do the same through the FPU's flush-to-zero and
// denormals-are-zero modes when the module was built with HOSTCUDA_FTZ=1 (which
// also flushes float64 subnormals, which a GPU keeps: see docs/hostcuda.md).
#if defined(HOSTCUDA_FTZ) && HOSTCUDA_FTZ
constexpr bool kFlushToZero = true;
#else
constexpr bool kFlushToZero = false;
#endif

inline void set_flush_to_zero(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bits 15 (flush to zero) and 6 (denormals are zero)
  _mm_setcsr(on ? (_mm_getcsr() | kFtzDaz) : (_mm_getcsr() & ~kFtzDaz));
#elif defined(__aarch64__)
  unsigned long fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  constexpr unsigned long kFz = 1ul << 24;  // flushes subnormal inputs and results
  fpcr = on ? (fpcr | kFz) : (fpcr & ~kFz);
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#else
  if (on) trap("flush-to-zero (-ftz=true) is supported on x86-64 and AArch64 hosts only");
#endif
}

inline void poison_dynamic_shared(std::size_t used) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(dynamic_smem, kMaxDynamicShared);
  ASAN_POISON_MEMORY_REGION(dynamic_smem + used, kMaxDynamicShared - used);
#else
  (void)used;
#endif
}

// The linear index of the block that runs `step`-th: the last, the first, the
// second last, the second, ... .  CUDA promises no order, and this one keeps
// both ends of the grid away from the end of the run: a kernel that assumes
// block 0 or the last block runs last (to merge the others' results) reads
// what is not written yet, and the race check sees it.
inline unsigned long long block_in_run_order(unsigned long long step, unsigned long long nblocks) {
  return step % 2 == 0 ? nblocks - 1 - step / 2 : step / 2;
}

// Runs body() once per CUDA thread of every block; returns 0 or writes the
// failure into err and returns 1.
inline int run_grid(const LaunchConfig& cfg, const std::function<void()>& body, char* err, std::size_t errlen) {
  std::lock_guard<std::mutex> launch_lock(launch_mutex());
  std::string problem = check_config(cfg);
  if (!problem.empty()) {
    std::snprintf(err, errlen, "%s", problem.c_str());
    return 1;
  }
  dims.grid = dim3(cfg.grid[0], cfg.grid[1], cfg.grid[2]);
  dims.block = dim3(cfg.block[0], cfg.block[1], cfg.block[2]);
  const unsigned nthreads = cfg.block[0] * cfg.block[1] * cfg.block[2];
  const unsigned long long nblocks = 1ull * cfg.grid[0] * cfg.grid[1] * cfg.grid[2];
  poison_dynamic_shared(cfg.shared_mem);

  auto block = std::make_unique<Block>();
  Block& b = *block;
  b.nthreads = nthreads;
  b.nwarps = (nthreads + 31) / 32;
  b.warps = std::make_unique<Warp[]>(b.nwarps);
  for (unsigned w = 0; w < b.nwarps; ++w) {
    const unsigned lanes = std::min(32u, nthreads - 32 * w);
    b.warps[w].existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }

  // Per block: reset the bookkeeping, refill dynamic shared memory, then run.
  // Threads march through the blocks together: a block starts only when every
  // thread has finished the one before.
  auto start_block = [&] {
    b.running = nthreads;
    b.at_sync = b.finished = 0;
    for (unsigned w = 0; w < b.nwarps; ++w) b.warps[w].exited = 0;
    std::memset(dynamic_smem, kSharedFill, cfg.shared_mem);
    refill_static_shared();
    race::reset_block();
  };
  start_block();

  std::function<void(unsigned)> job = [&](unsigned linear) {
    set_flush_to_zero(kFlushToZero);
    tls.block = &b;
    tls.linear = linear;
    tls.thread_idx = uint3{linear % cfg.block[0], (linear / cfg.block[0]) % cfg.block[1],
                           linear / (cfg.block[0] * cfg.block[1])};
    try {
      for (unsigned long long step = 0; step < nblocks; ++step) {
        const unsigned long long blk = block_in_run_order(step, nblocks);
        tls.block_idx = uint3{static_cast<unsigned>(blk % cfg.grid[0]),
                              static_cast<unsigned>((blk / cfg.grid[0]) % cfg.grid[1]),
                              static_cast<unsigned>(blk / (1ull * cfg.grid[0] * cfg.grid[1]))};
        race::begin_block(blk, linear);
        body();
        race::end_block();
        std::unique_lock<std::mutex> lock(b.m);
        if (b.aborted.load(std::memory_order_relaxed)) return;
        lane_exited_locked(b, linear);
        if (++b.finished == nthreads) {
          // Last thread of the block: open the next one.
          start_block();
          move_signal(b.next_block);
          lock.unlock();
          b.next_block.notify_all();
        } else {
          block_until_moved(b, lock, b.next_block);
        }
      }
    } catch (Abort&) {
      // The failure is recorded and every waiting thread woken; just stop.
    }
  };
  Pool::instance().run(nthreads, job);
  poison_dynamic_shared(kMaxDynamicShared);
  if (b.aborted.load()) {
    std::snprintf(err, errlen, "%s", b.error.c_str());
    return 1;
  }
  return 0;
}

template <class... P, std::size_t... I>
inline void call_kernel(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <class... P>
inline int launch(void (*kernel)(P...), const LaunchConfig* cfg, void** args, char* err, std::size_t errlen) {
  std::function<void()> body = [&] { call_kernel(kernel, args, std::index_sequence_for<P...>{}); };
  try {
    return run_grid(*cfg, body, err, errlen);
  } catch (std::exception& e) {
    std::snprintf(err, errlen, "host exception: %s", e.what());
    return 1;
  }
}

// ---- describing parameters to Python ------------------------------------------

// A short code per parameter type: NumPy dtype strings for scalars, "*" + the
// pointee's code for pointers ("*f4", "*V" for void, "*f4x4" for float4), "?"
// for anything else (which Python refuses to pass).
template <class T>
struct TypeCode {
  static std::string get() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>) return "b1";
    else if constexpr (std::is_same_v<U, __half>) return "f2";
    else if constexpr (std::is_same_v<U, void>) return "V";
    else if constexpr (std::is_floating_point_v<U>) return "f" + std::to_string(sizeof(U));
    else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) return "i" + std::to_string(sizeof(U));
    else if constexpr (std::is_integral_v<U>) return "u" + std::to_string(sizeof(U));
    else if constexpr (std::is_pointer_v<U>) return "*" + TypeCode<std::remove_pointer_t<U>>::get();
    else return "?" + std::to_string(sizeof(U));
  }
};

#define HOSTCUDA_VECTOR_CODE(type, component, n)                                                   \
  template <>                                                                                       \
  struct TypeCode<type> {                                                                          \
    static std::string get() { return TypeCode<component>::get() + "x" #n; }                       \
  };                                                                                                \
  template <>                                                                                       \
  struct TypeCode<const type> : TypeCode<type> {};
HOSTCUDA_VECTOR_CODE(float2, float, 2)
HOSTCUDA_VECTOR_CODE(float4, float, 4)
HOSTCUDA_VECTOR_CODE(double2, double, 2)
HOSTCUDA_VECTOR_CODE(int2, int, 2)
HOSTCUDA_VECTOR_CODE(int4, int, 4)
HOSTCUDA_VECTOR_CODE(uint2, unsigned int, 2)
HOSTCUDA_VECTOR_CODE(uint4, unsigned int, 4)
HOSTCUDA_VECTOR_CODE(__half2, __half, 2)
#undef HOSTCUDA_VECTOR_CODE

template <class... P>
inline const char* signature(void (*)(P...)) {
  static const std::string s = [] {
    std::string out;
    ((out += TypeCode<P>::get() + ","), ...);
    return out;
  }();
  return s.c_str();
}

}  // namespace hostcuda

// ---- the CUDA names ---------------------------------------------------------------

#define threadIdx (::hostcuda::tls.thread_idx)
#define blockIdx (::hostcuda::tls.block_idx)
#define blockDim (::hostcuda::dims.block)
#define gridDim (::hostcuda::dims.grid)

#define __syncthreads() ::hostcuda::syncthreads_impl(__FILE__, __LINE__, 0, 0)
#define __syncthreads_count(p) \
  (::hostcuda::syncthreads_impl(__FILE__, __LINE__, 1, (p)), ::hostcuda::syncthreads_result())
#define __syncthreads_and(p) \
  (::hostcuda::syncthreads_impl(__FILE__, __LINE__, 2, (p)), ::hostcuda::syncthreads_result())
#define __syncthreads_or(p) \
  (::hostcuda::syncthreads_impl(__FILE__, __LINE__, 3, (p)), ::hostcuda::syncthreads_result())

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::hostcuda::warp_collective(::hostcuda::Collective::Syncwarp, mask, 0,
                              [](const unsigned long long*, unsigned, unsigned) { return 0; });
}

// The overload set of CUDA's shuffles: other types fail to compile, as on a GPU.
#define HOSTCUDA_SHUFFLES(T)                                                                                  \
  inline T __shfl_sync(unsigned mask, T var, int src, int width = warpSize) {                                 \
    return ::hostcuda::shfl(mask, var, src, width);                                                          \
  }                                                                                                           \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {                       \
    return ::hostcuda::shfl_up(mask, var, delta, width);                                                     \
  }                                                                                                           \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {                     \
    return ::hostcuda::shfl_down(mask, var, delta, width);                                                   \
  }                                                                                                           \
  inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {                       \
    return ::hostcuda::shfl_xor(mask, var, lane_mask, width);                                                \
  }
HOSTCUDA_SHUFFLES(int)
HOSTCUDA_SHUFFLES(unsigned int)
HOSTCUDA_SHUFFLES(long)
HOSTCUDA_SHUFFLES(unsigned long)
HOSTCUDA_SHUFFLES(long long)
HOSTCUDA_SHUFFLES(unsigned long long)
HOSTCUDA_SHUFFLES(float)
HOSTCUDA_SHUFFLES(double)
HOSTCUDA_SHUFFLES(__half)
HOSTCUDA_SHUFFLES(__half2)
#undef HOSTCUDA_SHUFFLES

inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::hostcuda::ballot(mask, predicate); }
// True when every lane that took part (the mask's lanes that have not exited) has a true predicate.
inline int __all_sync(unsigned mask, int predicate) {
  return ::hostcuda::warp_collective(::hostcuda::Collective::Ballot, mask, predicate != 0,
                                     [](const unsigned long long* slots, unsigned present, unsigned) {
                                       for (unsigned l = 0; l < 32; ++l)
                                         if ((present & (1u << l)) && !slots[l]) return 0;
                                       return 1;
                                     });
}
inline int __any_sync(unsigned mask, int predicate) { return ::hostcuda::ballot(mask, predicate) != 0; }
// The lanes of this warp that exist; the harness cannot know which lanes a GPU
// would have converged, so kernels must not rely on more than that.
inline unsigned __activemask() { return ::hostcuda::tls.block->warps[::hostcuda::tls.linear / 32].existing; }

inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }

[[noreturn]] inline void hostcuda::trap(const char* message) {
  race::HarnessScope harness;
  Block* b = tls.block;
  if (b) {
    std::lock_guard<std::mutex> lock(b->m);
    fail_locked(*b, format("%s (in %s of %s)", message, thread_name(tls.linear).c_str(), block_name().c_str()));
  }
  throw Abort{};
}
inline void __trap() { ::hostcuda::trap("__trap() called"); }

#endif  // CUPYBN_HOSTCUDA_RUNTIME_H
