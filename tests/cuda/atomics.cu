// Test kernels for atomic functions and memory fences on the host harness:
// many threads in several blocks update shared counters.  Valid CUDA (the NVRTC
// gate compiles this file; atomicCAS on unsigned short and atomicAdd on __half
// need sm_70, the gate's lowest target).
#include <cuda_fp16.h>

// Every thread adds to each counter `reps` times; returns nothing but the sums.
// fsum/dsum get small integers, so every order of the additions is exact.
extern "C" __global__ void atomic_sums(int* __restrict__ icount, unsigned int* __restrict__ ucount,
                                       unsigned long long* __restrict__ ullcount, float* __restrict__ fsum,
                                       double* __restrict__ dsum, int* __restrict__ isub, unsigned int* __restrict__ usub,
                                       __half* __restrict__ hsum, int* __restrict__ scoped, int reps) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  for (int r = 0; r < reps; ++r) {
    atomicAdd(icount, 1);
    atomicAdd(ucount, 2u);
    atomicAdd(ullcount, 3ull);
    atomicAdd(fsum, static_cast<float>(gid % 5));
    atomicAdd(dsum, static_cast<double>(gid % 7));
    atomicSub(isub, 1);
    atomicSub(usub, 1u);
    atomicAdd(hsum, __float2half(1.0f));
    atomicAdd_block(scoped, 1);
    atomicAdd_system(scoped, 1);
  }
}

// The GPU's float atomicAdd flushes subnormal operands and results to zero.
extern "C" __global__ void atomic_add_subnormal(float* __restrict__ target, const float* __restrict__ addend,
                                                float* __restrict__ old) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *old = atomicAdd(target, *addend);
}

// Max/min of values[gid] over all threads, in every integer type.
extern "C" __global__ void atomic_extrema(const int* __restrict__ values, int* __restrict__ imax,
                                          int* __restrict__ imin, unsigned int* __restrict__ umax,
                                          unsigned int* __restrict__ umin, long long* __restrict__ llmax,
                                          unsigned long long* __restrict__ ullmin, int n) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= n) return;
  const int v = values[gid];
  atomicMax(imax, v);
  atomicMin(imin, v);
  atomicMax(umax, static_cast<unsigned int>(v));
  atomicMin(umin, static_cast<unsigned int>(v));
  atomicMax(llmax, static_cast<long long>(v) * 1000000000LL);
  atomicMin(ullmin, static_cast<unsigned long long>(static_cast<unsigned int>(v)) << 20);
}

// Each thread exchanges its id into the slot and records what it took out: the
// old values plus the final slot are the initial value and all ids, once each.
extern "C" __global__ void atomic_exchanges(int* __restrict__ slot, int* __restrict__ taken,
                                            float* __restrict__ fslot, float* __restrict__ ftaken,
                                            unsigned long long* __restrict__ uslot,
                                            unsigned long long* __restrict__ utaken, int n) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= n) return;
  taken[gid] = atomicExch(slot, gid);
  ftaken[gid] = atomicExch(fslot, static_cast<float>(gid));
  utaken[gid] = atomicExch(uslot, static_cast<unsigned long long>(gid) << 33);
}

// atomicInc/atomicDec wrap: taken[gid] is the old value each thread saw.
extern "C" __global__ void atomic_wrapping(unsigned int* __restrict__ inc, unsigned int* __restrict__ inc_taken,
                                           unsigned int* __restrict__ dec, unsigned int* __restrict__ dec_taken,
                                           unsigned int limit, int n) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= n) return;
  inc_taken[gid] = atomicInc(inc, limit);
  dec_taken[gid] = atomicDec(dec, limit);
}

// Bitwise atomics: thread gid sets, clears and toggles bit gid % 32 (or % 64).
extern "C" __global__ void atomic_bits(int* __restrict__ or_word, unsigned int* __restrict__ and_word,
                                       unsigned int* __restrict__ xor_word, unsigned long long* __restrict__ or64,
                                       int n) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= n) return;
  atomicOr(or_word, 1 << (gid % 31));
  atomicAnd(and_word, ~(1u << (gid % 32)));
  atomicXor(xor_word, 1u << (gid % 32));
  atomicOr(or64, 1ull << (gid % 64));
}

// Spinning gives up after about 2^32 clock ticks (seconds, on a GPU and on the
// host), so that a broken atomic shows up as a wrong count instead of a hang.
__device__ bool spun_too_long(long long start) { return clock64() - start > (1LL << 32); }

// A spin lock built from atomicCAS/atomicExch and fences guards a plain
// read-modify-write of `counter`: no update is lost.  The fences are needed on
// the GPU (the atomics are relaxed) and make the critical sections ordered for
// the race check on the host.
extern "C" __global__ void cas_lock(int* __restrict__ lock, int* counter, unsigned short* __restrict__ small,
                                    unsigned long long* __restrict__ wide, int reps) {
  for (int r = 0; r < reps; ++r) {
    const long long start = clock64();
    bool done = false;
    while (!done && !spun_too_long(start)) {
      if (atomicCAS(lock, 0, 1) == 0) {
        __threadfence();
        *counter = *counter + 1;
        __threadfence();
        atomicExch(lock, 0);
        done = true;
      }
    }
  }
  // Increment a 16-bit and a 64-bit word by CAS loops.  The first guess is 0
  // rather than a plain read of the word, which would race with the other
  // threads' atomics (a race in CUDA's memory model, and a report of the race check).
  const long long start = clock64();
  unsigned short seen = 0, assumed;
  do {
    assumed = seen;
    seen = atomicCAS(small, assumed, static_cast<unsigned short>(assumed + 1));
  } while (seen != assumed && !spun_too_long(start));
  unsigned long long wseen = 0, wassumed;
  do {
    wassumed = wseen;
    wseen = atomicCAS(wide, wassumed, wassumed + (1ull << 32));
  } while (wseen != wassumed && !spun_too_long(start));
}

// The classic "last block" reduction: each block publishes a partial sum, fences,
// and takes a ticket; the block that takes the last ticket adds the partials.
extern "C" __global__ void last_block_sum(const int* __restrict__ x, int* partial, unsigned int* __restrict__ ticket,
                                          int* __restrict__ total) {
  __shared__ int block_sum;
  __shared__ bool is_last;
  if (threadIdx.x == 0) block_sum = 0;
  __syncthreads();
  atomicAdd(&block_sum, x[blockIdx.x * blockDim.x + threadIdx.x]);
  __syncthreads();
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_sum;
    __threadfence();
    is_last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    __threadfence();
    int sum = 0;
    for (unsigned int b = 0; b < gridDim.x; ++b) sum += partial[b];
    *total = sum;
  }
}
