// Test kernels for the host harness' execution model and language support:
// indices in 3-D, static and dynamic shared memory, barriers, templates,
// __device__ helpers, qualifiers and pragmas.  Valid CUDA: the NVRTC gate
// compiles this file for sm_70, sm_80 and sm_90.

// Every thread writes its global linear index and its six coordinates.
extern "C" __global__ void __launch_bounds__(1024) record_indices(int* __restrict__ coords) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned linear = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  int* c = coords + 8 * linear;
  c[0] = static_cast<int>(threadIdx.x);
  c[1] = static_cast<int>(threadIdx.y);
  c[2] = static_cast<int>(threadIdx.z);
  c[3] = static_cast<int>(blockIdx.x);
  c[4] = static_cast<int>(blockIdx.y);
  c[5] = static_cast<int>(blockIdx.z);
  c[6] = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  c[7] = static_cast<int>(gridDim.x * gridDim.y * gridDim.z);
}

template <typename T>
__device__ __forceinline__ T twice(T v) {
  return v + v;
}

// A templated block reduction over a static __shared__ array: each block sums
// its slice of x (in the accumulator type Acc) and writes one partial sum.
template <typename T, typename Acc, int kBlock>
__global__ void __launch_bounds__(kBlock) block_sums(const T* __restrict__ x, Acc* __restrict__ partial, long long n) {
  __shared__ Acc buf[kBlock];
  const int t = threadIdx.x;
  Acc acc = Acc(0);
  for (long long i = static_cast<long long>(blockIdx.x) * kBlock + t; i < n;
       i += static_cast<long long>(gridDim.x) * kBlock) {
    acc += static_cast<Acc>(x[i]);
  }
  buf[t] = acc;
  __syncthreads();
#pragma unroll
  for (int k = kBlock / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

// Dynamic shared memory: each block reverses its tile of x into y, through an
// extern __shared__ array whose size is given at launch.
extern "C" __global__ void reverse_tiles(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ float tile[];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  if (i < n) tile[t] = x[i];
  __syncthreads();
  const int last = min(static_cast<int>(blockDim.x), n - static_cast<int>(blockIdx.x * blockDim.x)) - 1;
  if (t <= last) y[blockIdx.x * blockDim.x + t] = twice(tile[last - t]) * 0.5f;
}

// Reads dynamic shared memory before writing it: what it finds is whatever the
// previous block left (the harness fills it with 0xFF bytes).
extern "C" __global__ void read_uninitialised_shared(unsigned int* __restrict__ out) {
  extern __shared__ __align__(16) unsigned int scratch[];
  out[blockIdx.x * blockDim.x + threadIdx.x] = scratch[threadIdx.x];
  __syncthreads();
  scratch[threadIdx.x] = 0u;
}

// The same with static shared memory, declared in a template (where a plain
// function-local static would keep the previous block's values).
template <int kBlock>
__device__ void read_static_scratch(unsigned int* out) {
  __shared__ unsigned int scratch[kBlock];
  out[blockIdx.x * blockDim.x + threadIdx.x] = scratch[threadIdx.x];
  __syncthreads();
  scratch[threadIdx.x] = blockIdx.x;
}

extern "C" __global__ void read_uninitialised_static_shared(unsigned int* __restrict__ out) {
  read_static_scratch<32>(out);
}

// __syncthreads_count / _and / _or over the predicate "x[i] > 0".
extern "C" __global__ void barrier_votes(const int* __restrict__ x, int* __restrict__ out) {
  const int p = x[blockIdx.x * blockDim.x + threadIdx.x] > 0;
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x + 0] = count;
    out[3 * blockIdx.x + 1] = all;
    out[3 * blockIdx.x + 2] = any;
  }
}

// A barrier in divergent code: threads past n return before the barrier that
// the others wait at.  On a GPU this hangs or corrupts; the harness reports it.
extern "C" __global__ void divergent_barrier(float* __restrict__ y, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  y[i] = 1.0f;
  __syncthreads();
  const float next = y[(i + 1) % n];
  __syncthreads();
  y[i] += next;
}

// Device-side assert: fails the launch.
extern "C" __global__ void assert_positive(const float* __restrict__ x) {
  assert(x[threadIdx.x] > 0.0f);
}

// Scalar parameters of every width, written back as doubles.
extern "C" __global__ void echo_scalars(double* __restrict__ out, signed char a, short b, int c, long long d,
                                        unsigned int e, unsigned long long f, float g, double h, bool k) {
  out[0] = a; out[1] = b; out[2] = c; out[3] = static_cast<double>(d);
  out[4] = e; out[5] = static_cast<double>(f); out[6] = g; out[7] = h; out[8] = k ? 1.0 : 0.0;
}

// A 16-byte vector load: the pointer parameter is float4, the array float32.
extern "C" __global__ void sum_float4(const float4* __restrict__ x, float* __restrict__ out, int n4) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n4) {
    const float4 v = x[i];
    out[i] = v.x + v.y + v.z + v.w;
  }
}

// Writes through one pointer, then reads through another: when a and b are
// the same memory, the reads see the writes (as they do on a GPU).
extern "C" __global__ void write_then_read(float* a, const float* b, float* __restrict__ out) {
  const int i = threadIdx.x;
  a[i] = static_cast<float>(i);
  __syncthreads();
  out[i] = b[i];
}
