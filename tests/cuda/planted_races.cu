// Kernels with a race a GPU would have, each beside its clean twin: the twin is
// the same kernel with `correct` set, which adds the one barrier, __syncwarp or
// fence the race needs (every such condition is uniform across the block, as a
// barrier's must be).  The race check (sanitize="race") must report each race on
// every run and nothing in the twins (tests/test_hostcuda_races.py).
//
// Welford statistics of a block: the block reduction that cupybn's kernels use.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return Moments{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Moments warp_merge(Moments m) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Moments other;
    other.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    other.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m = merge(m, other);
  }
  return m;
}

// Lane 0 of every warp writes the warp's moments to `partials`; warp 0 reads and
// merges them.  Without the barrier between, warp 0 may read a partial before its
// warp has written it: the shuffles in between order nothing.
__device__ __forceinline__ Moments block_moments(const float* x, int n, Moments* partials, int correct) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, warps = blockDim.x / 32;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int i = t; i < n; i += blockDim.x) m = merge(m, Moments{1.0f, x[i], 0.0f});
  m = warp_merge(m);
  if (lane == 0) partials[warp] = m;  // race: partial written
  if (correct) __syncthreads();
  if (warp == 0) {
    m = lane < warps ? partials[lane] : Moments{0.0f, 0.0f, 0.0f};  // race: partial read
    m = warp_merge(m);
  }
  return m;
}

// Blocks of 32 * k threads (k <= 32); out: mean and biased variance.
extern "C" __global__ void moments_static_shared(const float* __restrict__ x, float* __restrict__ out, int n,
                                                 int correct) {
  __shared__ Moments partials[32];
  const Moments m = block_moments(x, n, partials, correct);
  if (threadIdx.x == 0) {
    out[0] = m.mean;
    out[1] = m.m2 / m.n;
  }
}

extern "C" __global__ void moments_dynamic_shared(const float* __restrict__ x, float* __restrict__ out, int n,
                                                  int correct) {
  extern __shared__ Moments dynamic_partials[];
  const Moments m = block_moments(x, n, dynamic_partials, correct);
  if (threadIdx.x == 0) {
    out[0] = m.mean;
    out[1] = m.m2 / m.n;
  }
}

// Two lanes of one warp: each lane writes its slot, then reads its neighbour's.
// A shuffle between orders nothing; __syncwarp() does.
extern "C" __global__ void rotate_in_warp(const int* __restrict__ x, int* __restrict__ y, int correct) {
  __shared__ int slots[32];
  const int lane = threadIdx.x % 32;
  slots[lane] = x[lane];  // race: slot written
  const int total = __shfl_xor_sync(0xffffffffu, x[lane], 1);
  if (correct) __syncwarp();
  y[lane] = slots[(lane + 1) % 32] + (total - x[lane ^ 1]);  // race: neighbour's slot read
}

// Two reductions through one shared buffer: every thread reads the first
// phase's result from buf[0], then thread 0 starts the second phase by
// overwriting buf[0].  Without a barrier between, that write may come before
// another thread's read (a write-after-read hazard).
extern "C" __global__ void two_phase_sums(const float* __restrict__ a, const float* __restrict__ b,
                                          float* __restrict__ out, int correct) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = a[t];
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  const float first = buf[0];  // race: first result read
  if (correct) __syncthreads();
  buf[t] = b[t] * first;  // race: buffer reused
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) out[0] = buf[0];
}

// "The last block merges the partials": each block's thread 0 writes its sum to
// partial[block], then takes a ticket; the block that draws the last ticket adds
// the partials.  The writer needs __threadfence() between its partial and its
// ticket, or the last block may read a partial that is not there yet.
extern "C" __global__ void last_block_merge(const float* __restrict__ x, float* partial,
                                            unsigned int* __restrict__ ticket, float* __restrict__ total,
                                            int correct) {
  __shared__ float sums[256];
  __shared__ bool last;
  const int t = threadIdx.x;
  sums[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) sums[t] += sums[t + k];
    __syncthreads();
  }
  if (t == 0) {
    partial[blockIdx.x] = sums[0];  // race: block partial written
    if (correct) __threadfence();
    last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && t == 0) {
    float s = 0.0f;
    for (unsigned int b = 0; b < gridDim.x; ++b) s += partial[b];  // race: partials merged
    *total = s;
  }
}

// Every block writes its row of y, then reads a value back: its own (the twin)
// or the next block's, which nothing orders with that block's write.
extern "C" __global__ void neighbour_block_read(const float* __restrict__ x, float* y, float* __restrict__ z,
                                                int correct) {
  const int row = blockIdx.x, t = threadIdx.x, n = blockDim.x;
  y[row * n + t] = 2.0f * x[row * n + t];  // race: row written
  __syncthreads();
  const int from = correct ? row : (row + 1) % gridDim.x;
  z[row * n + t] = y[from * n + (n - 1 - t)];  // race: row read
}

// A counter zeroed inside the kernel by block 0, then counted up with atomics by
// every block: the plain store races with the other blocks' atomics (the twin
// leaves the zeroing to the host).  Atomics after a plain access must not hide it.
extern "C" __global__ void zero_then_count(unsigned int* counter, int correct) {
  if (!correct && blockIdx.x == 0 && threadIdx.x == 0) *counter = 0u;  // race: counter zeroed
  atomicAdd(counter, 1u);  // race: counter counted
}

// The merging block chosen by index, not by the ticket it drew: on a GPU the
// last block may run first, before the others' partials exist.  (The twin
// merges in the block that drew the last ticket.)
extern "C" __global__ void highest_block_merges(const float* __restrict__ x, float* partial,
                                                unsigned int* __restrict__ ticket, float* __restrict__ total,
                                                int correct) {
  if (threadIdx.x != 0) return;
  partial[blockIdx.x] = x[blockIdx.x];  // race: partial stored
  __threadfence();
  const bool last_ticket = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
  if (correct ? last_ticket : blockIdx.x == gridDim.x - 1) {
    float s = 0.0f;
    for (unsigned int b = 0; b < gridDim.x; ++b) s += partial[b];  // race: partials summed
    *total = s;
  }
}

// Every thread stages its value and fences, the block meets at a barrier, and
// thread 0 takes the ticket with no fence of its own (the staging pattern of
// PyTorch's global reductions): the barrier passes the fences on.  The racy
// version leaves the fences out.
extern "C" __global__ void staged_block_sums(const float* __restrict__ x, float* staging,
                                             unsigned int* __restrict__ ticket, float* __restrict__ out,
                                             int correct) {
  __shared__ bool last;
  const int t = threadIdx.x;
  staging[blockIdx.x * blockDim.x + t] = x[blockIdx.x * blockDim.x + t];  // race: staged
  if (correct) __threadfence();
  __syncthreads();
  if (t == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) {
    float s = 0.0f;
    for (unsigned int b = 0; b < gridDim.x; ++b) s += staging[b * blockDim.x + t];  // race: stages summed
    out[t] = s;
  }
}

// A block-scoped atomic counts only within its block: from several blocks on
// one address it races (the twin uses the device-scoped atomicAdd).
extern "C" __global__ void count_in_blocks(unsigned int* total, int correct) {
  if (correct) {
    atomicAdd(total, 1u);
  } else {
    atomicAdd_block(total, 1u);  // race: counted in blocks
  }
}

// memcpy and memset are memory accesses too: warp 0 fills a row with them and
// warp 1 reads it, with no barrier between in the racy version.  The two calls
// fill different halves, so both races are there whichever side runs first.
extern "C" __global__ void row_by_memcpy(const float* __restrict__ x, float* rows, float* __restrict__ out,
                                         int correct) {
  const int t = threadIdx.x;
  float* row = rows + blockIdx.x * 64;
  if (t == 0) {
    memcpy(row, x, 32 * sizeof(float));        // race: row copied
    memset(row + 32, 0, 32 * sizeof(float));  // race: row cleared
  }
  if (correct) __syncthreads();
  if (t >= 32) out[blockIdx.x * 32 + t - 32] = row[t - 32] + row[t];  // race: copied row read
}

// Lanes of warp 0 stage their values, meet at __syncwarp, and lane 0 fences and
// takes the ticket: the __syncwarp lets lane 0's fence cover the other lanes'
// stores.  The racy version leaves that __syncwarp out.  (The second one passes
// on what lane 0's ticket learnt: the shuffle alone orders no memory.)
extern "C" __global__ void warp_staged_sums(const float* __restrict__ x, float* staging,
                                            unsigned int* __restrict__ ticket, float* __restrict__ out,
                                            int correct) {
  const int lane = threadIdx.x;
  staging[blockIdx.x * 32 + lane] = x[blockIdx.x * 32 + lane];  // race: lane staged
  if (correct) __syncwarp();
  bool last = false;
  if (lane == 0) {
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncwarp();
  if (__shfl_sync(0xffffffffu, last, 0)) {
    float s = 0.0f;
    for (unsigned int b = 0; b < gridDim.x; ++b) s += staging[b * 32 + lane];  // race: lanes summed
    out[lane] = s;
  }
}
