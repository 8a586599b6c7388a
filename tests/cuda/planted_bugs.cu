// Kernels with deliberate bugs: the sanitizer runs of the host harness must
// report each one (tests/test_hostcuda_sanitizers.py).  They are valid CUDA and
// pass the NVRTC gate; the bugs are in what they do, not in how they are written.

// A shared-memory tree reduction with the barrier after the first store
// missing: thread t reads buf[t + k], which thread t + k may not have written.
extern "C" __global__ void sum_missing_barrier(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  buf[t] = t < n ? x[t] : 0.0f;
  // __syncthreads() belongs here.
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) out[0] = buf[0];
}

// The same reduction written correctly, as the control.
extern "C" __global__ void sum_with_barriers(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  buf[t] = t < n ? x[t] : 0.0f;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  if (t == 0) out[0] = buf[0];
}

// Writes one element past the end of its output: the bounds check uses <=.
extern "C" __global__ void copy_one_past_end(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = i < n ? x[i] : 0.0f;
}

// Reads one element before the start of its input.
extern "C" __global__ void read_before_start(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i - 1];
}

// A signed overflow in an index computation (undefined behaviour).
extern "C" __global__ void overflowing_index(const int* __restrict__ x, int* __restrict__ y, int scale) {
  const int i = threadIdx.x;
  y[i] = x[i] * scale;
}

// Dynamic shared memory overrun: the launch gives blockDim.x floats, the
// kernel writes blockDim.x + 1.
extern "C" __global__ void dynamic_shared_overrun(float* __restrict__ y) {
  extern __shared__ float tile[];
  const int t = threadIdx.x;
  tile[t + 1] = static_cast<float>(t);
  __syncthreads();
  y[t] = tile[t];
}

// Static shared memory overrun: a 4-element __shared__ array written by 8
// threads, through a pointer (so only the bounds of the memory can tell).
extern "C" __global__ void static_shared_overrun(int* __restrict__ out) {
  __shared__ int slots[4];
  const int t = threadIdx.x;
  int* slot = slots;
  slot[t] = t;
  __syncthreads();
  out[t] = slots[t % 4];
}
