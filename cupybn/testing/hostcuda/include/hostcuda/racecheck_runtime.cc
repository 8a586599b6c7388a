// racecheck_runtime.cc: the race check of sanitize="race" builds.
//
// The module's translation unit is compiled with GCC's ThreadSanitizer
// instrumentation and linked with this file (compiled without it) in place of
// ThreadSanitizer's runtime.  The __tsan_* functions at the end are what the
// instrumentation calls; they keep a shadow of every byte of global memory (the
// launch's arrays) and shared memory (static and dynamic): the last write and
// the reads since, each stamped with its thread and where that thread stood in
// CUDA's orderings.  Only these order two accesses of different threads:
//
//   * __syncthreads() (every form), within a block: a block's accesses before
//     its k-th barrier come before those after it (each thread's "epoch");
//   * __syncwarp(mask), among the lanes it names (a vector clock per warp);
//   * a __threadfence() and then an atomic write to an address, paired with a
//     later atomic on that address in another thread: the second thread learns
//     the first thread's accesses before its fence, and its block's accesses
//     before its last __syncthreads() (the "last block merges" hand-off).
//     __threadfence_block() does the same for threads of its own block only;
//   * atomics on one address never race with each other;
//   * the end of a launch (each checked launch is a process of its own).
//
// The harness's locks, atomics and waits order nothing here, and shuffles and
// votes exchange registers only.  Blocks run one after another, but two blocks
// are unordered unless a fence and an atomic order them.  Two accesses to one
// byte by different threads, at least one a write and not both atomic, that
// nothing above orders, are a race.
//
// Nothing is evicted.  A read is dropped only when a newer read makes it
// redundant (the same thread's, or one in a later epoch of the same block:
// whatever comes after the newer read comes after the old one), and the reads
// of a byte are dropped when a write is checked against them; so whether a race
// is found does not depend on how the threads happened to be scheduled.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int kStack = 64;               // call sites kept per thread, for reports
constexpr std::size_t kMaxReports = 32;  // distinct pairs of source locations

enum Space : int { kGlobal = 0, kDynamicShared = 1, kStaticShared = 2 };
enum Why : int { kWarps = 0, kLanes = 1, kBlocks = 2 };

// One access, as the shadow of a byte keeps it.
struct Access {
  std::uint32_t block = 0;   // linear block index
  std::uint32_t tid = 0;     // linear thread index in the block
  std::uint32_t epoch = 0;   // barriers the thread had passed
  std::uint32_t wclock = 0;  // the thread's own __syncwarp clock
  std::uint32_t pos = 0;     // fences the thread had passed
  bool write = false, atomic = false;
  std::uintptr_t pc = 0, caller = 0;
};

std::uint64_t thread_key(std::uint32_t block, std::uint32_t tid) {
  return (static_cast<std::uint64_t>(block) << 32) | tid;
}

using Entries = std::vector<std::pair<std::uint64_t, std::uint32_t>>;

// What a thread knows of other threads' accesses through fences and atomics:
// floors[block] = e covers that block's accesses before its e-th barrier;
// threads[(block, tid)] = p covers that thread's accesses before its p-th fence.
// Short lists: a kernel hands off between few threads.
struct Knowledge {
  Entries floors, threads;

  static void raise(Entries& v, std::uint64_t key, std::uint32_t value) {
    for (auto& [k, x] : v) {
      if (k == key) {
        x = std::max(x, value);
        return;
      }
    }
    v.emplace_back(key, value);
  }
  static std::uint32_t get(const Entries& v, std::uint64_t key) {
    for (const auto& [k, x] : v)
      if (k == key) return x;
    return 0;
  }
  void join(const Knowledge& o) {
    for (const auto& [k, x] : o.floors) raise(floors, k, x);
    for (const auto& [k, x] : o.threads) raise(threads, k, x);
  }
  bool covers(const Access& a) const {
    return get(floors, a.block) > a.epoch || get(threads, thread_key(a.block, a.tid)) > a.pos;
  }
  void clear() {
    floors.clear();
    threads.clear();
  }
};

// One CUDA thread, for the block it is running.
struct Thread {
  bool active = false;   // running kernel code
  bool in_hook = false;  // inside the checker (its own accesses are not checked)
  std::uint32_t block = 0, tid = 0, epoch = 0, pos = 0;
  std::uint32_t wclock[32] = {};
  Knowledge known;
  // What the thread's atomic writes publish: as of its last __threadfence()
  // (to every block), and as of its last fence of any scope (to its own block).
  bool fenced_device = false, fenced_block = false;
  Knowledge at_device_fence, at_block_fence;
  std::uintptr_t stack[kStack] = {};
  int depth = 0;
};

// A plain pointer: reading it runs no code.
thread_local Thread* current = nullptr;

struct Cell {
  bool has_write = false;
  Access write;
  std::vector<Access> reads;
};

struct Region {
  std::uintptr_t lo = 0, hi = 0;
  Space space = kGlobal;
  int index = 0;                    // the array (global memory)
  std::vector<std::uint32_t> cell;  // per byte: 0, or 1 + its index in cells
  std::vector<Cell> cells;
};

struct Report {
  Access first, second;
  Space space;
  int index;
  std::uintptr_t address, offset;
  Why why;
};

struct State {
  std::mutex m;  // the shadow, `released` and the reports
  std::vector<Region> regions;
  // What atomic writes after a fence published, per address (block-scoped
  // fences publish to their own block only).
  std::unordered_map<std::uintptr_t, Knowledge> released;
  std::unordered_map<std::uintptr_t, std::unordered_map<std::uint32_t, Knowledge>> released_in_block;
  std::vector<Report> reports;
  unsigned long long races = 0;
  // The running block's barrier and __syncwarp exchanges (the block's lock guards them).
  Knowledge barrier_known[2];
  std::uint32_t warp_clock[32][32] = {};
  Knowledge warp_known[32];
};

State* state = nullptr;  // made by hostcuda_race_init, before any CUDA thread runs

void add_region(std::uintptr_t lo, std::size_t size, Space space, int index) {
  Region r;
  r.lo = lo;
  r.hi = lo + size;
  r.space = space;
  r.index = index;
  r.cell.assign(size, 0);
  state->regions.push_back(std::move(r));
}

Region* find(std::uintptr_t a) {
  for (Region& r : state->regions)
    if (a >= r.lo && a < r.hi) return &r;
  return nullptr;
}

// The running CUDA thread, marked busy; null when the access is not one to
// check (the harness's own code, or the checker's).
Thread* enter() {
  Thread* t = current;
  if (t == nullptr || !t->active || t->in_hook || state == nullptr) return nullptr;
  t->in_hook = true;
  return t;
}

bool ordered_before(const Thread& t, const Access& a, Why* why) {
  if (a.block == t.block) {
    if (a.tid == t.tid || a.epoch < t.epoch) return true;
    const bool same_warp = a.tid / 32 == t.tid / 32;
    if (same_warp && t.wclock[a.tid % 32] > a.wclock) return true;
    *why = same_warp ? kLanes : kWarps;
  } else {
    *why = kBlocks;
  }
  return t.known.covers(a);
}

// Races are kept one per pair of code locations (and kinds of access), by the
// instance with the lowest address and thread indices: every racing pair is
// found whatever the scheduling (the later of the two accesses finds the
// earlier), so the instance kept, and the report, are the same on every run.
std::uint64_t thread_rank(const Access& a) { return thread_key(a.block, a.tid); }

bool same_sites(const Report& r, const Access& a, const Access& b) {
  auto same = [](const Access& x, const Access& y) { return x.pc == y.pc && x.write == y.write; };
  return (same(r.first, a) && same(r.second, b)) || (same(r.first, b) && same(r.second, a));
}

bool precedes(std::uintptr_t address, const Access& a, const Access& b, const Report& r) {
  const auto lo = std::min(thread_rank(a), thread_rank(b)), hi = std::max(thread_rank(a), thread_rank(b));
  const auto rlo = std::min(thread_rank(r.first), thread_rank(r.second));
  const auto rhi = std::max(thread_rank(r.first), thread_rank(r.second));
  if (address != r.address) return address < r.address;
  return lo != rlo ? lo < rlo : hi < rhi;
}

void report(const Access& first, const Access& second, const Region& r, std::uintptr_t a, Why why) {
  ++state->races;
  const Report found{first, second, r.space, r.index, a, a - r.lo, why};
  for (Report& old : state->reports) {
    if (same_sites(old, first, second)) {
      if (precedes(a, first, second, old)) old = found;
      return;
    }
  }
  if (state->reports.size() < kMaxReports) state->reports.push_back(found);
}

// Checks an access of n bytes at p by thread t against the shadow, and records it.
void check(Thread* t, Region* r, std::uintptr_t lo, std::size_t n, bool write, bool atomic, std::uintptr_t pc) {
  Access me;
  me.block = t->block;
  me.tid = t->tid;
  me.epoch = t->epoch;
  me.wclock = t->wclock[t->tid % 32];
  me.pos = t->pos;
  me.write = write;
  me.atomic = atomic;
  me.pc = pc;
  me.caller = t->depth > 0 ? t->stack[std::min(t->depth, kStack) - 1] : 0;
  std::lock_guard<std::mutex> lock(state->m);
  const std::uintptr_t hi = std::min(lo + n, r->hi);
  for (std::uintptr_t a = lo; a < hi; ++a) {
    std::uint32_t& slot = r->cell[a - r->lo];
    if (slot == 0) {
      r->cells.emplace_back();
      slot = static_cast<std::uint32_t>(r->cells.size());
    }
    Cell& c = r->cells[slot - 1];
    Why why = kWarps;
    if (c.has_write && !(atomic && c.write.atomic) && !ordered_before(*t, c.write, &why)) {
      report(c.write, me, *r, a, why);
    }
    if (write) {
      for (const Access& read : c.reads) {
        if (!(atomic && read.atomic) && !ordered_before(*t, read, &why)) report(read, me, *r, a, why);
      }
      c.write = me;
      c.has_write = true;
      c.reads.clear();
    } else {
      // Drop the reads this one makes redundant; a plain read is never
      // replaced by an atomic one (an atomic write races with the plain one).
      std::size_t kept = 0;
      for (const Access& old : c.reads) {
        const bool redundant =
            old.block == me.block && (old.tid == me.tid || old.epoch < me.epoch) && (old.atomic || !me.atomic);
        if (!redundant) c.reads[kept++] = old;
      }
      c.reads.resize(kept);
      c.reads.push_back(me);
    }
  }
}

void access(const volatile void* p, std::size_t n, bool write, bool atomic, std::uintptr_t pc) {
  Thread* t = enter();
  if (t == nullptr) return;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (Region* r = find(a)) check(t, r, a, n, write, atomic, pc);
  t->in_hook = false;
}

// An atomic operation on a tracked address runs between atomic_begin (which
// takes the checker's lock) and atomic_end, so that what it publishes and
// learns follows the order in which the operations really happened.
struct AtomicScope {
  Thread* t = nullptr;
  Region* r = nullptr;
};

AtomicScope atomic_begin(const volatile void* p) {
  AtomicScope s;
  s.t = enter();
  if (s.t == nullptr) return s;
  s.r = find(reinterpret_cast<std::uintptr_t>(p));
  if (s.r == nullptr) {
    s.t->in_hook = false;
    s.t = nullptr;
    return s;
  }
  state->m.lock();
  return s;
}

// stored: whether the operation wrote (a failed compare-and-swap only reads).
void atomic_end(AtomicScope s, const volatile void* p, std::size_t n, bool stored, std::uintptr_t pc) {
  if (s.t == nullptr) return;
  Thread* t = s.t;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  // Every atomic reads the location: it learns what was published there.
  t->known.join(state->released[a]);
  auto scoped = state->released_in_block.find(a);
  if (scoped != state->released_in_block.end()) t->known.join(scoped->second[t->block]);
  if (stored && t->fenced_device) state->released[a].join(t->at_device_fence);
  if (stored && t->fenced_block) state->released_in_block[a][t->block].join(t->at_block_fence);
  state->m.unlock();
  check(t, s.r, a, n, stored, true, pc);
  t->in_hook = false;
}

}  // namespace

// ---- what the harness calls ------------------------------------------------------

extern "C" {

void hostcuda_race_init(unsigned char* dynamic_shared, std::size_t dynamic_size, unsigned char* static_shared,
                        std::size_t static_size) {
  state = new State;
  add_region(reinterpret_cast<std::uintptr_t>(dynamic_shared), dynamic_size, kDynamicShared, 0);
  if (static_size != 0) add_region(reinterpret_cast<std::uintptr_t>(static_shared), static_size, kStaticShared, 0);
}

void hostcuda_race_add_global(const void* p, std::size_t size, int index) {
  add_region(reinterpret_cast<std::uintptr_t>(p), size, kGlobal, index);
}

void hostcuda_race_begin_block(unsigned long long block, unsigned tid) {
  if (state == nullptr) return;
  if (current == nullptr) current = new Thread;
  Thread& t = *current;
  t.block = static_cast<std::uint32_t>(block);
  t.tid = tid;
  t.epoch = t.pos = 0;
  std::memset(t.wclock, 0, sizeof t.wclock);
  t.known.clear();
  t.at_device_fence.clear();
  t.at_block_fence.clear();
  t.fenced_device = t.fenced_block = false;
  t.depth = 0;
  t.in_hook = false;
  t.active = true;
}

void hostcuda_race_end_block() {
  if (current != nullptr) current->active = false;
}

// Called with no CUDA thread of the block running.  A slot reserved during the
// block (at its declaration's first run) is new memory: nothing to forget.
void hostcuda_race_reset_block(std::size_t static_shared_used) {
  if (state == nullptr) return;
  std::lock_guard<std::mutex> lock(state->m);
  for (Region& r : state->regions) {
    if (r.space == kGlobal) continue;
    // Only the used part of the static arena can have been touched.
    const std::size_t n = r.space == kStaticShared ? std::min(static_shared_used, r.cell.size()) : r.cell.size();
    std::fill(r.cell.begin(), r.cell.begin() + static_cast<std::ptrdiff_t>(n), 0u);
    r.cells.clear();
  }
  for (Knowledge& k : state->barrier_known) k.clear();
  std::memset(state->warp_clock, 0, sizeof state->warp_clock);
  for (Knowledge& k : state->warp_known) k.clear();
}

// The exchange buffer of a block's barrier e is e % 2.  The one of barrier e + 1
// is cleared when barrier e completes, by which time every thread has read it
// (as the buffer of e - 1) and none has yet written to it.
void hostcuda_race_barrier_arrive() {
  if (Thread* t = current; t != nullptr && state != nullptr) state->barrier_known[t->epoch % 2].join(t->known);
}
void hostcuda_race_barrier_complete() {
  if (Thread* t = current; t != nullptr && state != nullptr) state->barrier_known[(t->epoch + 1) % 2].clear();
}
void hostcuda_race_barrier_depart() {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  t->known.join(state->barrier_known[t->epoch % 2]);
  ++t->epoch;
}

// Each lane that arrives at a __syncwarp ticks its own clock and adds its clock
// to the round's; each leaves with the join of all of them.
void hostcuda_race_syncwarp_round(unsigned warp) {
  if (state == nullptr) return;
  std::memset(state->warp_clock[warp], 0, sizeof state->warp_clock[warp]);
  state->warp_known[warp].clear();
}
void hostcuda_race_syncwarp_arrive(unsigned warp, unsigned lane) {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  ++t->wclock[lane];
  for (int l = 0; l < 32; ++l) state->warp_clock[warp][l] = std::max(state->warp_clock[warp][l], t->wclock[l]);
  state->warp_known[warp].join(t->known);
}
void hostcuda_race_syncwarp_depart(unsigned warp) {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  for (int l = 0; l < 32; ++l) t->wclock[l] = std::max(t->wclock[l], state->warp_clock[warp][l]);
  t->known.join(state->warp_known[warp]);
}

void hostcuda_race_fence(int scope) {
  Thread* t = current;
  if (t == nullptr || !t->active) return;
  Knowledge& k = t->at_block_fence;
  k = t->known;
  Knowledge::raise(k.floors, t->block, t->epoch);
  Knowledge::raise(k.threads, thread_key(t->block, t->tid), t->pos + 1);
  ++t->pos;
  t->fenced_block = true;
  if (scope == 2) {
    t->at_device_fence = k;
    t->fenced_device = true;
  }
}

// Prints the races found to stderr, a "hostcuda-race" line for each and a
// "hostcuda-race-access" line for each of its two accesses (Python turns them
// into the report); returns how many races there were.
unsigned long long hostcuda_race_finish(const unsigned grid[3], const unsigned block[3]) {
  if (state == nullptr || state->races == 0) return 0;
  static const char* const space_names[] = {"global", "dynamic-shared", "static-shared"};
  static const char* const why_names[] = {"warps", "lanes", "blocks"};
  auto print_access = [&](const char* which, const Access& a) {
    const unsigned long long bx = a.block % grid[0], by = (a.block / grid[0]) % grid[1],
                             bz = a.block / (1ull * grid[0] * grid[1]);
    const unsigned tx = a.tid % block[0], ty = (a.tid / block[0]) % block[1], tz = a.tid / (block[0] * block[1]);
    std::fprintf(stderr,
                 "hostcuda-race-access which=%s op=%s atomic=%d block=%llu,%llu,%llu thread=%u,%u,%u warp=%u "
                 "lane=%u pc=0x%llx caller=0x%llx\n",
                 which, a.write ? "write" : "read", a.atomic ? 1 : 0, bx, by, bz, tx, ty, tz, a.tid / 32, a.tid % 32,
                 static_cast<unsigned long long>(a.pc), static_cast<unsigned long long>(a.caller));
  };
  std::sort(state->reports.begin(), state->reports.end(),
            [](const Report& a, const Report& b) { return precedes(a.address, a.first, a.second, b); });
  for (const Report& r : state->reports) {
    std::fprintf(stderr, "hostcuda-race space=%s index=%d address=0x%llx offset=%llu why=%s\n", space_names[r.space],
                 r.index, static_cast<unsigned long long>(r.address), static_cast<unsigned long long>(r.offset),
                 why_names[r.why]);
    print_access("first", r.first);
    print_access("second", r.second);
  }
  std::fprintf(stderr, "hostcuda-race-total races=%llu shown=%zu\n", state->races, state->reports.size());
  return state->races;
}

// ---- the instrumentation's entry points ----------------------------------------
//
// The names and signatures of ThreadSanitizer's interface, which GCC's
// -fsanitize=thread calls.  They run for the harness's own memory and atomics
// too; those fall outside the tracked regions and are just done.

#define HOSTCUDA_PC reinterpret_cast<std::uintptr_t>(__builtin_return_address(0))

void __tsan_init() {}
void __tsan_func_entry(void* caller) {
  Thread* t = current;
  if (t == nullptr || !t->active) return;
  if (t->depth < kStack) t->stack[t->depth] = reinterpret_cast<std::uintptr_t>(caller);
  ++t->depth;
}
void __tsan_func_exit() {
  Thread* t = current;
  if (t != nullptr && t->active && t->depth > 0) --t->depth;
}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* a, unsigned long n) { access(a, n, false, false, HOSTCUDA_PC); }
void __tsan_write_range(void* a, unsigned long n) { access(a, n, true, false, HOSTCUDA_PC); }

#define HOSTCUDA_TSAN_PLAIN(n)                                                                       \
  void __tsan_read##n(void* a) { access(a, n, false, false, HOSTCUDA_PC); }                          \
  void __tsan_write##n(void* a) { access(a, n, true, false, HOSTCUDA_PC); }                          \
  void __tsan_volatile_read##n(void* a) { access(a, n, false, false, HOSTCUDA_PC); }                 \
  void __tsan_volatile_write##n(void* a) { access(a, n, true, false, HOSTCUDA_PC); }
HOSTCUDA_TSAN_PLAIN(1)
HOSTCUDA_TSAN_PLAIN(2)
HOSTCUDA_TSAN_PLAIN(4)
HOSTCUDA_TSAN_PLAIN(8)
HOSTCUDA_TSAN_PLAIN(16)
#undef HOSTCUDA_TSAN_PLAIN

#define HOSTCUDA_TSAN_UNALIGNED(n)                                                                   \
  void __tsan_unaligned_read##n(void* a) { access(a, n, false, false, HOSTCUDA_PC); }                \
  void __tsan_unaligned_write##n(void* a) { access(a, n, true, false, HOSTCUDA_PC); }
HOSTCUDA_TSAN_UNALIGNED(2)
HOSTCUDA_TSAN_UNALIGNED(4)
HOSTCUDA_TSAN_UNALIGNED(8)
HOSTCUDA_TSAN_UNALIGNED(16)
#undef HOSTCUDA_TSAN_UNALIGNED

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

// Every atomic is done sequentially consistent, at least as strong as asked.
#define HOSTCUDA_TSAN_RMW(bits, T, name, builtin)                                 \
  T __tsan_atomic##bits##_##name(volatile T* a, T v, int) {                       \
    const AtomicScope s = atomic_begin(a);                                        \
    const T old = builtin(a, v, __ATOMIC_SEQ_CST);                                \
    atomic_end(s, a, sizeof(T), true, HOSTCUDA_PC);                               \
    return old;                                                                   \
  }
#define HOSTCUDA_TSAN_CAS(bits, T, name)                                                           \
  int __tsan_atomic##bits##_##name(volatile T* a, T* expected, T v, int, int) {                    \
    const AtomicScope s = atomic_begin(a);                                                         \
    const bool ok = __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST,           \
                                                __ATOMIC_SEQ_CST);                                 \
    atomic_end(s, a, sizeof(T), ok, HOSTCUDA_PC);                                                  \
    return ok;                                                                                     \
  }
#define HOSTCUDA_TSAN_ATOMICS(bits, T)                                                             \
  T __tsan_atomic##bits##_load(const volatile T* a, int) {                                         \
    const AtomicScope s = atomic_begin(a);                                                         \
    const T v = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                              \
    atomic_end(s, a, sizeof(T), false, HOSTCUDA_PC);                                               \
    return v;                                                                                      \
  }                                                                                                \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                                      \
    const AtomicScope s = atomic_begin(a);                                                         \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                      \
    atomic_end(s, a, sizeof(T), true, HOSTCUDA_PC);                                                \
  }                                                                                                \
  HOSTCUDA_TSAN_RMW(bits, T, exchange, __atomic_exchange_n)                                        \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_add, __atomic_fetch_add)                                        \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_sub, __atomic_fetch_sub)                                        \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_and, __atomic_fetch_and)                                        \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_or, __atomic_fetch_or)                                          \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_xor, __atomic_fetch_xor)                                        \
  HOSTCUDA_TSAN_RMW(bits, T, fetch_nand, __atomic_fetch_nand)                                      \
  HOSTCUDA_TSAN_CAS(bits, T, compare_exchange_strong)                                              \
  HOSTCUDA_TSAN_CAS(bits, T, compare_exchange_weak)                                                \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T expected, T v, int, int) {         \
    const AtomicScope s = atomic_begin(a);                                                         \
    const bool ok = __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST,          \
                                                __ATOMIC_SEQ_CST);                                 \
    atomic_end(s, a, sizeof(T), ok, HOSTCUDA_PC);                                                  \
    return expected;                                                                               \
  }
HOSTCUDA_TSAN_ATOMICS(8, unsigned char)
HOSTCUDA_TSAN_ATOMICS(16, unsigned short)
HOSTCUDA_TSAN_ATOMICS(32, unsigned int)
HOSTCUDA_TSAN_ATOMICS(64, unsigned long long)
#undef HOSTCUDA_TSAN_ATOMICS
#undef HOSTCUDA_TSAN_CAS
#undef HOSTCUDA_TSAN_RMW
#undef HOSTCUDA_PC

}  // extern "C"
