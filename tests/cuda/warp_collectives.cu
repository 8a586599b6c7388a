// Test kernels for warp-level collectives on the host harness: shuffles of
// every kind and width, votes and __syncwarp.  Valid CUDA (the NVRTC gate
// compiles this file).

// out[4 * i + k]: the four shuffles of value x[i] for lane parameter p, width w.
template <typename T>
__global__ void shuffles(const T* __restrict__ x, T* __restrict__ out, int p, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const T v = x[i];
  out[4 * i + 0] = __shfl_sync(0xffffffffu, v, p, width);
  out[4 * i + 1] = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(p), width);
  out[4 * i + 2] = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(p), width);
  out[4 * i + 3] = __shfl_xor_sync(0xffffffffu, v, p, width);
}

// A warp sum with the butterfly pattern: every lane ends with the total.
extern "C" __global__ void warp_sums(const float* __restrict__ x, float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[i] = v;
}

// Votes on "x[i] != 0": ballot bits, all, any, per thread.
extern "C" __global__ void warp_votes(const int* __restrict__ x, unsigned int* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = x[i] != 0;
  out[3 * i + 0] = __ballot_sync(0xffffffffu, p);
  out[3 * i + 1] = __all_sync(0xffffffffu, p);
  out[3 * i + 2] = __any_sync(0xffffffffu, p);
}

// Only the even lanes take part, with a mask that names exactly them.
extern "C" __global__ void even_lanes_sum(const int* __restrict__ x, int* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  if (lane % 2 == 0) {
    int v = x[i];
    for (int o = 16; o >= 2; o >>= 1) v += __shfl_down_sync(0x55555555u, v, o);
    out[i] = v;
  } else {
    out[i] = -1;
  }
}

// Lanes exchange through shared memory, ordered by __syncwarp.
extern "C" __global__ void rotate_through_shared(const int* __restrict__ x, int* __restrict__ out) {
  __shared__ int slot[32];
  const int lane = threadIdx.x & 31;
  slot[lane] = x[threadIdx.x];
  __syncwarp();
  out[threadIdx.x] = slot[(lane + 1) & 31];
}

// The same exchange without __syncwarp: a race that the race check reports.
extern "C" __global__ void rotate_without_syncwarp(const int* __restrict__ x, int* __restrict__ out) {
  __shared__ int slot[32];
  const int lane = threadIdx.x & 31;
  slot[lane] = x[threadIdx.x];
  out[threadIdx.x] = slot[(lane + 1) & 31];
}

// Lane 0 returns before a full-warp shuffle: the others go ahead without it (a
// collective waits for the lanes that have not exited), but reading lane 0
// (shifting up) is an error.
extern "C" __global__ void shuffle_missing_lane(const float* __restrict__ x, float* __restrict__ out, int up) {
  const int lane = threadIdx.x & 31;
  if (lane == 0) return;
  out[threadIdx.x] = up ? __shfl_up_sync(0xffffffffu, x[threadIdx.x], 1) : __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
}

// Lane 0 waits in __syncwarp while the others wait in a shuffle: a deadlock.
extern "C" __global__ void shuffle_and_syncwarp(const float* __restrict__ x, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    __syncwarp();
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
  }
}

// Lanes 16..31 return at once; the others exchange through shared memory at a
// full-mask __syncwarp and vote with full masks.  Since Volta a collective waits
// only for the lanes of its mask that have not exited.
extern "C" __global__ void collectives_after_exit(const int* __restrict__ x, int* __restrict__ out) {
  __shared__ int slot[32];
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  slot[lane] = x[lane];
  __syncwarp();
  const int neighbour = slot[(lane + 1) % 16];
  out[lane] = neighbour;
  out[16 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, neighbour > 0));
  out[32 + lane] = __all_sync(0xffffffffu, neighbour > -1000);
}
