// racecheck_runtime.cc: the race check of sanitize="race" builds.
//
// The module's translation unit is compiled with GCC's ThreadSanitizer
// instrumentation and linked with this file (compiled without it) in place of
// ThreadSanitizer's runtime.  The __tsan_* functions at the end are what the
// instrumentation calls (memcpy, memset and memmove are replaced here too, as
// ThreadSanitizer's runtime would intercept them).  They keep a shadow of every
// byte of global memory (the launch's arrays) and shared memory (static and
// dynamic): the last plain write, the atomic writes and the reads since, each
// stamped with its thread and where that thread stood in CUDA's orderings.
// Only these order two accesses of different threads:
//
//   * __syncthreads() (every form), within a block: a block's accesses before
//     its k-th barrier come before those after it (each thread's "epoch");
//   * __syncwarp(mask), among the lanes it names (a vector clock per warp);
//   * a __threadfence() and then an atomic write to an address, paired with a
//     later atomic on that address in another thread: the second thread learns
//     what the first had done before its fence, and what its block had done
//     before its last __syncthreads() ("the last block merges the partials").
//     A fence followed by a barrier (or __syncwarp) lets any thread past the
//     barrier publish it.  __threadfence_block() and block-scoped atomics
//     (atomicAdd_block, ...) hand off within their own block only;
//   * atomics on one address never race with each other, unless they are
//     block-scoped and in different blocks;
//   * the end of a launch (each checked launch is a process of its own).
//
// The harness's own locks, atomics and waits order nothing here, and shuffles
// and votes exchange registers only.  Two accesses to one byte by different
// threads, at least one a write, that nothing above orders, are a race.
//
// Nothing is evicted.  A read (or atomic write) is dropped only when a newer one
// makes it redundant: the same thread's, or one in a later epoch of the same
// block, since whatever comes after the newer one comes after the old one.  The
// accesses of a byte are dropped only when a plain write has been checked
// against them.  So every racing pair is found, by whichever access comes
// second, however the threads were scheduled.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int kStack = 64;               // call sites kept per thread, for reports
constexpr std::size_t kShownReports = 32;

enum Space : int { kGlobal = 0, kDynamicShared = 1, kStaticShared = 2 };
enum Why : int { kWarps = 0, kLanes = 1, kBlocks = 2, kBlockScoped = 3 };
enum Kind : std::uint8_t { kPlain = 0, kAtomic = 1, kBlockAtomic = 2 };  // kBlockAtomic: atomicXxx_block

// One access, as the shadow of a byte keeps it.
struct Access {
  std::uint32_t block = 0;   // linear block index
  std::uint32_t tid = 0;     // linear thread index in the block
  std::uint32_t epoch = 0;   // barriers the thread had passed
  std::uint32_t wclock = 0;  // the thread's own __syncwarp clock
  std::uint32_t pos = 0;     // fences the thread had passed
  bool write = false;
  Kind kind = kPlain;
  std::uintptr_t pc = 0, caller = 0;
};

std::uint64_t thread_key(std::uint32_t block, std::uint32_t tid) {
  return (static_cast<std::uint64_t>(block) << 32) | tid;
}

// Whether two accesses of different threads to one byte can race at all.
bool conflict(const Access& a, const Access& b, Why* why) {
  if (!a.write && !b.write) return false;
  if (a.kind == kPlain || b.kind == kPlain) return true;
  if (a.kind == kAtomic && b.kind == kAtomic) return false;
  if (a.block == b.block) return false;  // a block-scoped atomic is atomic within its block
  *why = kBlockScoped;
  return true;
}

// Sorted (key, value) pairs: what a thread knows of other threads' accesses
// through fences and atomics.  floors[block] = e covers that block's accesses
// before its e-th barrier; threads[(block, tid)] = p covers that thread's
// accesses before its p-th fence.
using Entries = std::vector<std::pair<std::uint64_t, std::uint32_t>>;

void raise(Entries& v, std::uint64_t key, std::uint32_t value) {
  auto it = std::lower_bound(v.begin(), v.end(), std::make_pair(key, std::uint32_t{0}));
  if (it != v.end() && it->first == key) {
    it->second = std::max(it->second, value);
  } else {
    v.insert(it, {key, value});
  }
}

std::uint32_t get(const Entries& v, std::uint64_t key) {
  auto it = std::lower_bound(v.begin(), v.end(), std::make_pair(key, std::uint32_t{0}));
  return it != v.end() && it->first == key ? it->second : 0;
}

void merge_into(Entries& v, const Entries& o) {
  if (o.empty()) return;
  Entries out;
  out.reserve(v.size() + o.size());
  auto a = v.cbegin();
  auto b = o.cbegin();
  while (a != v.cend() || b != o.cend()) {
    if (b == o.cend() || (a != v.cend() && a->first < b->first)) {
      out.push_back(*a++);
    } else if (a == v.cend() || b->first < a->first) {
      out.push_back(*b++);
    } else {
      out.emplace_back(a->first, std::max(a->second, b->second));
      ++a, ++b;
    }
  }
  v.swap(out);
}

struct Knowledge {
  Entries floors, threads;
  void join(const Knowledge& o) {
    merge_into(floors, o.floors);
    merge_into(threads, o.threads);
  }
  bool covers(const Access& a) const {
    return get(floors, a.block) > a.epoch || get(threads, thread_key(a.block, a.tid)) > a.pos;
  }
  void clear() {
    floors.clear();
    threads.clear();
  }
};

// What a thread's atomic writes publish: as of its fences (its own, or those of
// threads it passed a barrier or __syncwarp with), to every block and to its own.
struct Fenced {
  bool device = false, block = false;
  Knowledge to_device, to_block;
  void join(const Fenced& o) {
    if (o.device) to_device.join(o.to_device), device = true;
    if (o.block) to_block.join(o.to_block), block = true;
  }
  void clear() {
    device = block = false;
    to_device.clear();
    to_block.clear();
  }
};

// One CUDA thread, for the block it is running.
struct Thread {
  bool active = false;   // running kernel code
  bool in_hook = false;  // inside the checker (its own accesses are not checked)
  int harness = 0;       // inside the harness's barriers and collectives
  int block_scope = 0;   // inside an atomicXxx_block
  std::uint32_t block = 0, tid = 0, epoch = 0, pos = 0;
  std::uint32_t wclock[32] = {};
  Knowledge known;
  Fenced fenced;
  std::uintptr_t stack[kStack] = {};
  int depth = 0;
};

// A plain pointer: reading it runs no code.
thread_local Thread* current = nullptr;

struct Cell {
  bool has_write = false;
  Access write;                // the last plain write
  std::vector<Access> atomics; // atomic writes since it
  std::vector<Access> reads;   // reads since it (plain and atomic)
};

struct Region {
  std::uintptr_t lo = 0, hi = 0;
  Space space = kGlobal;
  int index = 0;                    // the array (global memory)
  std::vector<std::uint32_t> cell;  // per byte: 0, or 1 + its index in cells
  std::vector<Cell> cells;
  std::size_t touched = 0;          // bytes [0, touched) may have cells
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
  // What atomic writes published, per address: to every block, and to one block.
  std::unordered_map<std::uintptr_t, Knowledge> released;
  std::map<std::pair<std::uintptr_t, std::uint32_t>, Knowledge> released_in_block;
  // One race per pair of code locations (and kinds of access).
  std::map<std::tuple<std::uintptr_t, bool, std::uintptr_t, bool>, Report> reports;
  unsigned long long races = 0;
  // The running block's barrier and __syncwarp exchanges (the block's lock guards them).
  Knowledge barrier_known[2];
  Fenced barrier_fenced[2];
  std::uint32_t warp_clock[32][32] = {};
  Knowledge warp_known[32];
  Fenced warp_fenced[32];
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

bool is_shared(std::uintptr_t a) {
  const Region* r = find(a);
  return r != nullptr && r->space != kGlobal;
}

// The running CUDA thread, marked busy; null when the access is not one to
// check (the harness's own code, or the checker's).
Thread* enter() {
  Thread* t = current;
  if (t == nullptr || !t->active || t->in_hook || t->harness > 0 || state == nullptr) return nullptr;
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

std::uint64_t thread_rank(const Access& a) { return thread_key(a.block, a.tid); }

// Of the racing pairs between the same two code locations, the report keeps the
// one with the lowest address and thread indices: every racing pair is found
// whatever the scheduling, so the one kept, and the report, are the same on every run.
bool precedes(const Report& a, const Report& b) {
  auto rank = [](const Report& r) {
    const auto x = thread_rank(r.first), y = thread_rank(r.second);
    return std::make_tuple(r.address, std::min(x, y), std::max(x, y));
  };
  return rank(a) < rank(b);
}

void report(const Access& first, const Access& second, const Region& r, std::uintptr_t a, Why why) {
  ++state->races;
  const Report found{first, second, r.space, r.index, a, a - r.lo, why};
  // The key does not depend on which of the two came first.
  auto key = first.pc < second.pc || (first.pc == second.pc && first.write < second.write)
                 ? std::make_tuple(first.pc, first.write, second.pc, second.write)
                 : std::make_tuple(second.pc, second.write, first.pc, first.write);
  auto [it, inserted] = state->reports.emplace(key, found);
  if (!inserted && precedes(found, it->second)) it->second = found;
}

void check_against(const Thread& t, const Access& me, const Access& old, const Region& r, std::uintptr_t a) {
  if (old.block == me.block && old.tid == me.tid) return;
  Why scoped = kWarps, why = kWarps;
  if (!conflict(old, me, &scoped) || ordered_before(t, old, &why)) return;
  report(old, me, r, a, scoped == kBlockScoped ? kBlockScoped : why);
}

// Keeps `list` free of accesses that `me` makes redundant, then adds `me`.
// Accesses are appended in time order and the blocks run one after another, so
// this block's accesses are the tail of the list.  A plain access is never
// replaced by an atomic one (an atomic write races with the plain one only).
void add_superseding(std::vector<Access>& list, const Access& me) {
  std::size_t first_mine = list.size();
  while (first_mine > 0 && list[first_mine - 1].block == me.block) --first_mine;
  std::size_t kept = first_mine;
  for (std::size_t i = first_mine; i < list.size(); ++i) {
    const Access& old = list[i];
    const bool redundant = (old.tid == me.tid || old.epoch < me.epoch) && (old.kind != kPlain || me.kind == kPlain);
    if (!redundant) list[kept++] = old;
  }
  list.resize(kept);
  list.push_back(me);
}

// Checks an access of n bytes at lo by thread t against the shadow, and records it.
void check(Thread* t, Region* r, std::uintptr_t lo, std::size_t n, bool write, Kind kind, std::uintptr_t pc) {
  Access me;
  me.block = t->block;
  me.tid = t->tid;
  me.epoch = t->epoch;
  me.wclock = t->wclock[t->tid % 32];
  me.pos = t->pos;
  me.write = write;
  me.kind = kind;
  me.pc = pc;
  me.caller = t->depth > 0 ? t->stack[std::min(t->depth, kStack) - 1] : 0;
  std::lock_guard<std::mutex> lock(state->m);
  const std::uintptr_t hi = std::min(lo + n, r->hi);
  r->touched = std::max<std::size_t>(r->touched, hi - r->lo);
  for (std::uintptr_t a = lo; a < hi; ++a) {
    std::uint32_t& slot = r->cell[a - r->lo];
    if (slot == 0) {
      r->cells.emplace_back();
      slot = static_cast<std::uint32_t>(r->cells.size());
    }
    Cell& c = r->cells[slot - 1];
    if (c.has_write) check_against(*t, me, c.write, *r, a);
    for (const Access& w : c.atomics) check_against(*t, me, w, *r, a);
    if (write) {
      for (const Access& read : c.reads) check_against(*t, me, read, *r, a);
    }
    if (write && kind == kPlain) {
      // Everything before was checked against this write: it alone remains.
      c.write = me;
      c.has_write = true;
      c.atomics.clear();
      c.reads.clear();
    } else if (write) {
      add_superseding(c.atomics, me);
    } else {
      add_superseding(c.reads, me);
    }
  }
}

void access(const volatile void* p, std::size_t n, bool write, std::uintptr_t pc) {
  Thread* t = enter();
  if (t == nullptr) return;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (Region* r = find(a)) check(t, r, a, n, write, kPlain, pc);
  t->in_hook = false;
}

// An atomic operation runs between atomic_begin (which takes the checker's
// lock) and atomic_end, so that what it publishes and learns follows the order
// in which the operations really happened.  Atomics on memory the check does not
// shadow (a __device__ counter, say) still hand off.
struct AtomicScope {
  Thread* t = nullptr;
  Region* r = nullptr;
};

AtomicScope atomic_begin(const volatile void* p) {
  AtomicScope s;
  s.t = enter();
  if (s.t == nullptr) return s;
  s.r = find(reinterpret_cast<std::uintptr_t>(p));
  state->m.lock();
  return s;
}

// stored: whether the operation wrote (a failed compare-and-swap only reads).
void atomic_end(AtomicScope s, const volatile void* p, std::size_t n, bool stored, std::uintptr_t pc) {
  Thread* t = s.t;
  if (t == nullptr) return;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const bool block_scoped = t->block_scope > 0;
  // Every atomic reads the location: it learns what was published there.
  if (!block_scoped) {
    auto device = state->released.find(a);
    if (device != state->released.end()) t->known.join(device->second);
  }
  auto own = state->released_in_block.find({a, t->block});
  if (own != state->released_in_block.end()) t->known.join(own->second);
  if (stored && t->fenced.device && !block_scoped) state->released[a].join(t->fenced.to_device);
  if (stored && t->fenced.block) state->released_in_block[{a, t->block}].join(t->fenced.to_block);
  state->m.unlock();
  if (s.r != nullptr) check(t, s.r, a, n, stored, block_scoped ? kBlockAtomic : kAtomic, pc);
  t->in_hook = false;
}

// The copies behind memcpy, memset and memmove: byte loops the compiler must
// not turn back into calls to the functions they implement.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_bytes(unsigned char* d,
                                                                              const unsigned char* s,
                                                                              std::size_t n) {
  if (d < s) {
    for (std::size_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    for (std::size_t i = n; i > 0; --i) d[i - 1] = s[i - 1];
  }
}

__attribute__((optimize("no-tree-loop-distribute-patterns"))) void set_bytes(unsigned char* d, unsigned char v,
                                                                             std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) d[i] = v;
}

}  // namespace

// ---- what the harness calls ------------------------------------------------------

extern "C" {

void hostcuda_race_init(unsigned char* dynamic_shared, std::size_t dynamic_size, unsigned char* static_shared,
                        std::size_t static_size) {
  state = new State;
  add_region(reinterpret_cast<std::uintptr_t>(dynamic_shared), dynamic_size, kDynamicShared, 0);
  add_region(reinterpret_cast<std::uintptr_t>(static_shared), static_size, kStaticShared, 0);
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
  t.fenced.clear();
  t.depth = 0;
  t.in_hook = false;
  t.harness = t.block_scope = 0;
  t.active = true;
}

void hostcuda_race_end_block() {
  if (current != nullptr) current->active = false;
}

// Called with no CUDA thread of the block running: the next block's shared
// memory is new memory, and nothing published through it carries over.
void hostcuda_race_reset_block() {
  if (state == nullptr) return;
  std::lock_guard<std::mutex> lock(state->m);
  for (Region& r : state->regions) {
    if (r.space == kGlobal) continue;
    std::fill(r.cell.begin(), r.cell.begin() + static_cast<std::ptrdiff_t>(r.touched), 0u);
    r.cells.clear();
    r.touched = 0;
  }
  for (auto it = state->released.begin(); it != state->released.end();) {
    it = is_shared(it->first) ? state->released.erase(it) : std::next(it);
  }
  for (auto it = state->released_in_block.begin(); it != state->released_in_block.end();) {
    it = is_shared(it->first.first) ? state->released_in_block.erase(it) : std::next(it);
  }
  for (Knowledge& k : state->barrier_known) k.clear();
  for (Fenced& f : state->barrier_fenced) f.clear();
  std::memset(state->warp_clock, 0, sizeof state->warp_clock);
  for (Knowledge& k : state->warp_known) k.clear();
  for (Fenced& f : state->warp_fenced) f.clear();
}

// The harness's barriers and collectives: their own atomics are not the kernel's.
void hostcuda_race_harness(int delta) {
  if (current != nullptr) current->harness += delta;
}

// An atomicXxx_block is running (its atomics are block-scoped).
void hostcuda_race_block_scope(int delta) {
  if (current != nullptr) current->block_scope += delta;
}

// The exchange buffer of a block's barrier e is e % 2.  The one of barrier e + 1
// is cleared when barrier e completes, by which time every thread has read it
// (as the buffer of e - 1) and none has yet written to it.
void hostcuda_race_barrier_arrive() {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  state->barrier_known[t->epoch % 2].join(t->known);
  state->barrier_fenced[t->epoch % 2].join(t->fenced);
}
void hostcuda_race_barrier_complete() {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  state->barrier_known[(t->epoch + 1) % 2].clear();
  state->barrier_fenced[(t->epoch + 1) % 2].clear();
}
void hostcuda_race_barrier_depart() {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  t->known.join(state->barrier_known[t->epoch % 2]);
  t->fenced.join(state->barrier_fenced[t->epoch % 2]);
  ++t->epoch;
}

// Each lane that arrives at a __syncwarp ticks its own clock and adds its clock
// to the round's; each leaves with the join of all of them.  Its accesses so far
// also join the round's knowledge (closing them off with a new position), so
// that a lane that fences after the __syncwarp publishes them to other blocks.
void hostcuda_race_syncwarp_round(unsigned warp) {
  if (state == nullptr) return;
  std::memset(state->warp_clock[warp], 0, sizeof state->warp_clock[warp]);
  state->warp_known[warp].clear();
  state->warp_fenced[warp].clear();
}
void hostcuda_race_syncwarp_arrive(unsigned warp, unsigned lane) {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  ++t->wclock[lane];
  for (int l = 0; l < 32; ++l) state->warp_clock[warp][l] = std::max(state->warp_clock[warp][l], t->wclock[l]);
  state->warp_known[warp].join(t->known);
  raise(state->warp_known[warp].threads, thread_key(t->block, t->tid), ++t->pos);
  state->warp_fenced[warp].join(t->fenced);
}
void hostcuda_race_syncwarp_depart(unsigned warp) {
  Thread* t = current;
  if (t == nullptr || state == nullptr) return;
  for (int l = 0; l < 32; ++l) t->wclock[l] = std::max(t->wclock[l], state->warp_clock[warp][l]);
  t->known.join(state->warp_known[warp]);
  t->fenced.join(state->warp_fenced[warp]);
}

// A fence: the thread's next atomic writes publish what it knows now, its own
// accesses so far and its block's before its last barrier.
void hostcuda_race_fence(int scope) {
  Thread* t = current;
  if (t == nullptr || !t->active) return;
  Knowledge k = t->known;
  raise(k.floors, t->block, t->epoch);
  raise(k.threads, thread_key(t->block, t->tid), t->pos + 1);
  ++t->pos;
  t->fenced.to_block.join(k);
  t->fenced.block = true;
  if (scope == 2) {
    t->fenced.to_device.join(k);
    t->fenced.device = true;
  }
}

// Prints the races found to stderr, a "hostcuda-race" line for each and a
// "hostcuda-race-access" line for each of its two accesses (Python turns them
// into the report), the first kShownReports in a fixed order; returns how many
// conflicting byte accesses there were.
unsigned long long hostcuda_race_finish(const unsigned grid[3], const unsigned block[3]) {
  if (state == nullptr || state->races == 0) return 0;
  static const char* const space_names[] = {"global", "dynamic-shared", "static-shared"};
  static const char* const why_names[] = {"warps", "lanes", "blocks", "block-scoped"};
  auto print_access = [&](const char* which, const Access& a) {
    const unsigned long long bx = a.block % grid[0], by = (a.block / grid[0]) % grid[1],
                             bz = a.block / (1ull * grid[0] * grid[1]);
    const unsigned tx = a.tid % block[0], ty = (a.tid / block[0]) % block[1], tz = a.tid / (block[0] * block[1]);
    std::fprintf(stderr,
                 "hostcuda-race-access which=%s op=%s atomic=%d block=%llu,%llu,%llu thread=%u,%u,%u warp=%u "
                 "lane=%u pc=0x%llx caller=0x%llx\n",
                 which, a.write ? "write" : "read", static_cast<int>(a.kind), bx, by, bz, tx, ty, tz, a.tid / 32,
                 a.tid % 32, static_cast<unsigned long long>(a.pc), static_cast<unsigned long long>(a.caller));
  };
  std::vector<Report> reports;
  for (const auto& [key, r] : state->reports) reports.push_back(r);
  std::sort(reports.begin(), reports.end(), precedes);
  const std::size_t shown = std::min(reports.size(), kShownReports);
  for (std::size_t i = 0; i < shown; ++i) {
    const Report& r = reports[i];
    std::fprintf(stderr, "hostcuda-race space=%s index=%d address=0x%llx offset=%llu why=%s\n", space_names[r.space],
                 r.index, static_cast<unsigned long long>(r.address), static_cast<unsigned long long>(r.offset),
                 why_names[r.why]);
    print_access("first", r.first);
    print_access("second", r.second);
  }
  std::fprintf(stderr, "hostcuda-race-total races=%llu pairs=%zu shown=%zu\n", state->races, reports.size(), shown);
  return state->races;
}

// ---- the instrumentation's entry points ----------------------------------------
//
// The names and signatures of ThreadSanitizer's interface, which GCC's
// -fsanitize=thread calls.  They run for the harness's own memory and atomics
// too; those fall outside the tracked regions (or inside the harness's scope)
// and are just done.

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
void __tsan_read_range(void* a, unsigned long n) { access(a, n, false, HOSTCUDA_PC); }
void __tsan_write_range(void* a, unsigned long n) { access(a, n, true, HOSTCUDA_PC); }

// Explicit calls in kernel code (GCC leaves them to the runtime to intercept).
void* memcpy(void* d, const void* s, std::size_t n) noexcept {
  access(s, n, false, HOSTCUDA_PC);
  access(d, n, true, HOSTCUDA_PC);
  copy_bytes(static_cast<unsigned char*>(d), static_cast<const unsigned char*>(s), n);
  return d;
}
void* memmove(void* d, const void* s, std::size_t n) noexcept {
  access(s, n, false, HOSTCUDA_PC);
  access(d, n, true, HOSTCUDA_PC);
  copy_bytes(static_cast<unsigned char*>(d), static_cast<const unsigned char*>(s), n);
  return d;
}
void* memset(void* d, int v, std::size_t n) noexcept {
  access(d, n, true, HOSTCUDA_PC);
  set_bytes(static_cast<unsigned char*>(d), static_cast<unsigned char>(v), n);
  return d;
}

#define HOSTCUDA_TSAN_PLAIN(n)                                                               \
  void __tsan_read##n(void* a) { access(a, n, false, HOSTCUDA_PC); }                         \
  void __tsan_write##n(void* a) { access(a, n, true, HOSTCUDA_PC); }                         \
  void __tsan_volatile_read##n(void* a) { access(a, n, false, HOSTCUDA_PC); }                \
  void __tsan_volatile_write##n(void* a) { access(a, n, true, HOSTCUDA_PC); }
HOSTCUDA_TSAN_PLAIN(1)
HOSTCUDA_TSAN_PLAIN(2)
HOSTCUDA_TSAN_PLAIN(4)
HOSTCUDA_TSAN_PLAIN(8)
HOSTCUDA_TSAN_PLAIN(16)
#undef HOSTCUDA_TSAN_PLAIN

#define HOSTCUDA_TSAN_UNALIGNED(n)                                                           \
  void __tsan_unaligned_read##n(void* a) { access(a, n, false, HOSTCUDA_PC); }               \
  void __tsan_unaligned_write##n(void* a) { access(a, n, true, HOSTCUDA_PC); }
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
