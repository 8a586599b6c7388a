// Batch Normalization kernels of cupybn's CuPy backend.
//
// Every fast-path input is a C-contiguous (outer, C, inner) view
// (cupybn/_layout.py): NCHW is (N, C, H*W) and channels-last or 2-D data is
// (N*H*W, C, 1).  Two families of reductions follow the memory order:
//   planar  (inner > 1): a channel is `outer` rows of `inner` contiguous values;
//                        one block reduces a slice of one channel;
//   rows    (inner == 1): channels are the contiguous columns of an (outer, C)
//                        matrix; a block reduces 32 channels over a slice of rows.
// A channel with much data is split over several blocks (gridDim.y slices).
// Each block writes a partial result; the block that arrives last at its
// channel's ticket (an integer atomic after __threadfence) merges the partials
// in slice order and finishes the channel: statistics, coefficients and the
// running statistics (forward), or dgamma, dbeta and the dx coefficients
// (backward).  No floating-point atomics, so results are identical from run to
// run.  A call is then two or three launches: reduction (x2 in the rare case of
// a far shift, below), then one elementwise kernel.
//
// T is the storage type (cupybn::half, float, double); Acc the arithmetic type
// (float for half and float, double for double).  Statistics are Welford
// accumulations of x - shift (a sample of the channel), merged with Chan's
// formula; the last block works in double.  See docs/cupy-backend.md.

// Half precision without cuda_fp16.h: NVRTC does not build that header in, and
// where and how CuPy finds it (and the headers it needs in turn) differs from
// one CUDA and CuPy release to the next.  Storage and the three conversions
// are all these kernels need: PTX's cvt, as cuda_fp16.h itself does it (no
// flush to zero: float16 subnormals are kept).  The host harness has its own
// __half.
#if defined(__CUDACC__HOSTCUDA)
#include <cuda_fp16.h>
namespace cupybn {
using half = __half;
__device__ __forceinline__ float half_to_float(half h) { return __half2float(h); }
__device__ __forceinline__ half float_to_half(float f) { return __float2half_rn(f); }
__device__ __forceinline__ half double_to_half(double d) { return __double2half(d); }
}  // namespace cupybn
#else
namespace cupybn {
struct __align__(2) half {
  unsigned short bits;
};
__device__ __forceinline__ float half_to_float(half h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
}
__device__ __forceinline__ half float_to_half(float f) {
  half h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
__device__ __forceinline__ half double_to_half(double d) {
  half h;
  asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h.bits) : "d"(d));
  return h;
}
}  // namespace cupybn
#endif

namespace cupybn {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }

template <typename Acc, typename T>
__device__ __forceinline__ Acc widen(T v) {
  return static_cast<Acc>(v);
}
template <>
__device__ __forceinline__ float widen<float, half>(half v) {
  return half_to_float(v);
}
template <typename Acc, typename T>
__device__ __forceinline__ Acc load(const T* p, long long i) {
  return widen<Acc>(p[i]);
}

// kVec consecutive values moved as one load or store: 16 bytes (float4-sized)
// when kVec = 16 / sizeof(T); the host picks that only for 16-byte aligned arrays.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, typename Acc>
__device__ __forceinline__ T store_value(Acc v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ half store_value<half, float>(float v) {
  return float_to_half(v);
}

// The fused epilogue of a launch.  Whether a kernel has one at all is a
// template parameter (kEpilogue): the variants without it load, keep and test
// nothing for it, so they use the registers they did before it existed, and
// calls without an epilogue (most calls) keep their occupancy.  The variants
// with it take this bit set as a kernel argument (cupybn.kernels.ADD_RESIDUAL,
// ...), the same for every thread, so its branches never diverge.
enum Epilogue : int {
  kAddResidual = 1,   // forward: y = bn(x) + z
  kRelu = 2,          // forward: y = max(., 0); backward: dy through that ReLU
  kWriteGradient = 4  // backward: also store the gradient of z, dy through the ReLU
};

// What the forward kernels store for the normalised value p (rounded once by
// the caller): p + z in Acc, then the ReLU written as a comparison so that NaN
// stays NaN and -0 and negatives become +0.  z is read only with kAddResidual.
template <typename Acc, typename T>
__device__ __forceinline__ Acc apply_epilogue(Acc p, const T& z, int epilogue) {
  if (epilogue & kAddResidual) p += widen<Acc>(z);
  if (epilogue & kRelu) p = p <= Acc(0) ? Acc(0) : p;
  return p;
}

// The gradient that reaches BN through the ReLU whose output was y (when
// `relu`): 0 where y <= 0, y == 0 exactly included (PyTorch's convention), dy
// elsewhere, a NaN y included.  In the storage type, so that a pack of it
// stays packed (and is dz as it is); y is read only when `relu`.
template <typename Acc, typename T>
__device__ __forceinline__ T through_relu(const T& dy, const T& y, bool relu) {
  return relu && widen<Acc>(y) <= Acc(0) ? store_value<T>(Acc(0)) : dy;
}

// dy as the gradient reductions sum it, widened: through_relu in a variant
// with the epilogue; dy itself without one, y (maybe a stand-in) not read.
template <bool kEpilogue, typename Acc, typename T>
__device__ __forceinline__ Acc summed_gradient(const T& dy, const T& y, bool relu) {
  if constexpr (kEpilogue) {
    return widen<Acc>(through_relu<Acc>(dy, y, relu));
  } else {
    return widen<Acc>(dy);
  }
}

// Running moments of a set of values: count, mean and sum of squared deviations.
template <typename Acc>
struct Moments {
  Acc n, mean, m2;
};

// Welford's update with one value.
template <typename Acc>
__device__ __forceinline__ void add_value(Moments<Acc>& a, Acc d) {
  a.n += Acc(1);
  const Acc delta = d - a.mean;
  a.mean += delta / a.n;
  a.m2 = mul_add(delta, d - a.mean, a.m2);
}

// Chan's merge of b into a (exact when either side is empty).
template <typename Acc>
__device__ __forceinline__ void merge(Moments<Acc>& a, const Moments<Acc>& b) {
  if (b.n == Acc(0)) return;
  if (a.n == Acc(0)) {
    a = b;
    return;
  }
  const Acc n = a.n + b.n;
  const Acc delta = b.mean - a.mean;
  const Acc wb = b.n / n;
  a.mean = mul_add(delta, wb, a.mean);
  a.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  a.n = n;
}

// kN values (a power of two) at once: their own moments (the mean is a sum
// scaled exactly by 1/kN), merged into a with one division.  The values are
// independent, so their loads are in flight together and no division chain
// runs through them, as one Welford update per value would.
template <typename Acc, int kN>
__device__ __forceinline__ void add_values(Moments<Acc>& a, const Acc (&d)[kN]) {
  static_assert((kN & (kN - 1)) == 0, "the scaling by 1/kN must be exact");
  Acc sum = d[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) sum += d[i];
  const Acc mean = sum * (Acc(1) / Acc(kN));
  Acc m2 = Acc(0);
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const Acc e = d[i] - mean;
    m2 = mul_add(e, e, m2);
  }
  merge(a, Moments<Acc>{Acc(kN), mean, m2});
}

// Rows a rows-kernel thread takes four at a time (loads in flight together).
constexpr int kRowsAtOnce = 4;
// Single values a planar-kernel thread loads at once: four, or eight halves
// (as many bytes in flight as four floats).
template <typename T>
constexpr int kSinglesAtOnce = sizeof(T) == 2 ? 8 : 4;

// Shuffles a pair of values down the warp: two floats travel as one 64-bit
// shuffle, two doubles as two.
__device__ __forceinline__ void shfl_down_pair(float& u, float& v, int offset) {
  const unsigned long long packed =
      (static_cast<unsigned long long>(__float_as_uint(u)) << 32) | __float_as_uint(v);
  const unsigned long long got = __shfl_down_sync(kFullMask, packed, offset);
  u = __uint_as_float(static_cast<unsigned>(got >> 32));
  v = __uint_as_float(static_cast<unsigned>(got & 0xffffffffu));
}
__device__ __forceinline__ void shfl_down_pair(double& u, double& v, int offset) {
  u = __shfl_down_sync(kFullMask, u, offset);
  v = __shfl_down_sync(kFullMask, v, offset);
}

// The values of a slice of `len` are dealt round-robin to `threads` threads:
// how many did threads [first, first + width) get?  Counts are known, so they
// need not travel with the moments.
__device__ __forceinline__ long long dealt(long long len, int threads, int first, int width) {
  const long long q = len / threads, r = len % threads;
  return q * width + max(0LL, min(static_cast<long long>(first) + width, r) - first);
}

// Merges the moments of the 32 lanes of each warp; lane 0 ends with the result.
// With offsets 1, 2, 4, ... lane L (a multiple of 2 * offset) holds lanes
// [L, L + offset) and receives [L + offset, L + 2 * offset): a fixed tree,
// so the result is deterministic.  `group(first, width)` counts the values of
// lanes [first, first + width).
template <typename Acc, typename Count>
__device__ __forceinline__ void warp_merge(Moments<Acc>& a, Count group) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Moments<Acc> b;
    b.mean = a.mean;
    b.m2 = a.m2;
    shfl_down_pair(b.mean, b.m2, offset);
    b.n = static_cast<Acc>(group(lane + offset, offset));
    if (lane % (2 * offset) == 0) merge(a, b);
  }
}

// Thread 0 ends with the merge over the whole (1-D) block, whose threads were
// dealt the `len` units of the slice round-robin, `unit` values each, and
// then its `singles` values, also round-robin.
template <typename Acc, int kThreads>
__device__ __forceinline__ void block_merge(Moments<Acc>& a, long long len, int unit, long long singles) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  __shared__ Acc shared_mean[kWarps], shared_m2[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto count = [&](int first, int width) {
    return unit * dealt(len, kThreads, first, width) + dealt(singles, kThreads, first, width);
  };
  warp_merge(a, [&](int first_lane, int width) { return count(warp * 32 + first_lane, width); });
  if (lane == 0) {
    shared_mean[warp] = a.mean;
    shared_m2[warp] = a.m2;
  }
  __syncthreads();
  if (warp == 0) {
    a.mean = lane < kWarps ? shared_mean[lane] : Acc(0);
    a.m2 = lane < kWarps ? shared_m2[lane] : Acc(0);
    a.n = lane < kWarps ? static_cast<Acc>(count(lane * 32, 32)) : Acc(0);
    // lane L now stands for warp L: threads [32 L, 32 (L + 1))
    warp_merge(a, [&](int first_warp, int width) {
      return first_warp >= kWarps ? 0LL : count(first_warp * 32, 32 * min(width, kWarps - first_warp));
    });
  }
}

// Lane 0 ends with the warp's sums of two values (the fixed tree of warp_merge).
template <typename Acc>
__device__ __forceinline__ void warp_sum2(Acc& u, Acc& v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Acc bu = u, bv = v;
    shfl_down_pair(bu, bv, offset);
    if (lane % (2 * offset) == 0) {
      u += bu;
      v += bv;
    }
  }
}

// Thread 0 ends with the block's sums of two values.
template <typename Acc, int kThreads>
__device__ __forceinline__ void block_sum2(Acc& u, Acc& v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ Acc shared_u[kWarps], shared_v[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_sum2(u, v);
  if (lane == 0) {
    shared_u[warp] = u;
    shared_v[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    u = lane < kWarps ? shared_u[lane] : Acc(0);
    v = lane < kWarps ? shared_v[lane] : Acc(0);
    warp_sum2(u, v);
  }
}

// Walks the elements j, j + step, ... of one planar channel: element j is at
// row j / inner, column j % inner.  The row and column advance by constants,
// so the loop needs no division.
struct PlanarCursor {
  long long row, col, step_row, step_col;
  __device__ PlanarCursor(long long j, long long step, long long inner)
      : row(j / inner), col(j % inner), step_row(step / inner), step_col(step % inner) {}
  __device__ __forceinline__ long long offset(long long row_stride) const { return row * row_stride + col; }
  __device__ __forceinline__ void advance(long long inner) {
    row += step_row;
    col += step_col;
    if (col >= inner) {
      col -= inner;
      ++row;
    }
  }
};

// Row n of planar channel c holds the `inner` values from element
// (n C + c) inner on: a whole number of packs when inner is a multiple of
// kVec, and otherwise a head before its first aligned pack and a tail after
// its last.  The planar reductions read `slots` aligned packs of each row
// (the host picks slots: every row has that many whole packs), then the
// other inner - kVec slots values of the rows ("singles") one at a time.
template <int kVec>
struct PlanarRows {
  long long row_values, first, slots;  // C * inner; c * inner; packs read per row
  // The index (in packs) of the first aligned pack of row `row`.
  __device__ __forceinline__ long long first_pack(long long row) const {
    return static_cast<long long>((static_cast<unsigned long long>(row * row_values + first) + (kVec - 1)) / kVec);
  }
  // Pack `col` of row `row`, in packs.
  __device__ __forceinline__ long long pack(const PlanarCursor& at) const { return first_pack(at.row) + at.col; }
  // Single `col` of row `row` (head values first, then the tail's), in values.
  __device__ __forceinline__ long long single(const PlanarCursor& at) const {
    const long long start = at.row * row_values + first;
    const long long head = first_pack(at.row) * kVec - start;
    return start + (at.col < head ? at.col : at.col + slots * kVec);
  }
};

// Walks the flat elements j, j + step, ... of an (outer, C, inner) array,
// keeping track of each element's channel without a division per element.
struct ChannelCursor {
  long long col, step_col;
  int channel, step_channel;
  __device__ ChannelCursor(long long j, long long step, long long inner, int channels)
      : col(j % inner),
        step_col(step % inner),
        channel(static_cast<int>((j / inner) % channels)),
        step_channel(static_cast<int>((step / inner) % channels)) {}
  // To the next element (within a pack of consecutive values).
  __device__ __forceinline__ void next(long long inner, int channels) {
    if (++col == inner) {
      col = 0;
      if (++channel == channels) channel = 0;
    }
  }
  __device__ __forceinline__ void advance(long long inner, int channels) {
    col += step_col;
    int carry = 0;
    if (col >= inner) {
      col -= inner;
      carry = 1;
    }
    channel += step_channel + carry;
    if (channel >= channels) channel -= channels;
  }
};


// ---- per-channel arrays in the caller's dtype and strides ------------------------
// gamma, beta and the running statistics are read (and the running statistics
// and dgamma/dbeta written) where they are, in their own dtype: kind 0 = absent,
// 1 = half, 2 = float, 3 = double (cupy_backend._KIND); stride in elements.
// That spares the host a cast and a copy per call.
template <typename V>  // const void: read only; void: read and write
struct ChannelArray {
  V* p;
  int kind;
  long long stride;
  __device__ __forceinline__ double at(int c, double absent) const {
    const long long i = static_cast<long long>(c) * stride;
    switch (kind) {
      case 1: return static_cast<double>(half_to_float(static_cast<const half*>(p)[i]));
      case 2: return static_cast<double>(static_cast<const float*>(p)[i]);
      case 3: return static_cast<const double*>(p)[i];
      default: return absent;
    }
  }
  __device__ __forceinline__ void set(int c, double v) const {
    const long long i = static_cast<long long>(c) * stride;
    switch (kind) {
      case 1: static_cast<half*>(p)[i] = double_to_half(v); break;
      case 2: static_cast<float*>(p)[i] = static_cast<float>(v); break;
      case 3: static_cast<double*>(p)[i] = v; break;
      default: break;
    }
  }
};
using ChannelIn = ChannelArray<const void>;
using ChannelInOut = ChannelArray<void>;

// Rows of the per-channel statistics array (Acc, kStatRows x C) of a forward call.
enum StatRow { kMeanHi, kMeanLo, kVar, kInvStd, kScale, kOffset, kNextShift, kStatRows };
// Rows of the backward coefficients (Acc, 3 x C): dx = a*dy + b*(x - mean_hi) + k.
enum CoefRow { kCoefA, kCoefB, kCoefK };

// A second statistics pass is made for channels whose shift (one sample) lay
// more than 4 standard deviations from the mean: x - shift then has
// log2(4) bits fewer below the spread than an ideal shift, which the float
// bars still absorb (docs/cupy-backend.md); farther shifts lose more.
// (maybe_unused: a module of the epilogue variants alone has no statistics kernel.)
[[maybe_unused]] constexpr double kFarShift = 16.0;  // (mean - shift)^2 > kFarShift * var

struct ForwardParams {
  ChannelIn gamma, beta;
  ChannelInOut running_mean, running_var;
  double eps, momentum, unbias;
};

// The block whose threads have just written its partials takes a ticket; true,
// in every thread, for the last of the `blocks` blocks counting on *ticket.
// atomicInc wraps the ticket back to 0 for the next launch on this stream.
// The barrier lets thread 0's fence publish every thread's partial (rows
// kernels write 32) before the ticket is taken; the last block reads the
// partials only after it has its ticket.
__device__ __forceinline__ bool arrive_last(unsigned int* ticket, unsigned int blocks) {
  __shared__ int is_last;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    is_last = atomicInc(ticket, blocks - 1u) == blocks - 1u;
  }
  __syncthreads();
  const bool last = is_last != 0;
  if (last) __threadfence();
  return last;
}

// The last block reads the partial pairs of one channel: this thread takes
// slices first, first + kStride, ... (< slices); slice t's pair is at
// index(t) and partials further on, and take(t, a, b) gets them in slice
// order.  Four slices' loads are issued before any is used.
constexpr int kSlicesAtOnce = 4;
template <int kStride, typename Acc, typename Index, typename Take>
__device__ __forceinline__ void read_partials(const Acc* part, long long partials, int first, int slices,
                                              Index index, Take take) {
  int t = first;
  for (; t + (kSlicesAtOnce - 1) * kStride < slices; t += kSlicesAtOnce * kStride) {
    double a[kSlicesAtOnce], b[kSlicesAtOnce];
#pragma unroll
    for (int i = 0; i < kSlicesAtOnce; ++i) {
      const long long p = index(t + i * kStride);
      a[i] = static_cast<double>(__ldcg(part + p));
      b[i] = static_cast<double>(__ldcg(part + partials + p));
    }
#pragma unroll
    for (int i = 0; i < kSlicesAtOnce; ++i) take(t + i * kStride, a[i], b[i]);
  }
  for (; t < slices; t += kStride) {
    const long long p = index(t);
    take(t, static_cast<double>(__ldcg(part + p)), static_cast<double>(__ldcg(part + partials + p)));
  }
}

// Thread 0 ends with the merge over the whole (1-D) block of moments whose
// counts travel with them (the fixed tree of warp_merge, then warp 0).
template <int kThreads>
__device__ __forceinline__ void block_merge_counted(Moments<double>& a) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double shared_n[kWarps], shared_mean[kWarps], shared_m2[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto tree = [&]() {
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      Moments<double> b;
      b.n = __shfl_down_sync(kFullMask, a.n, offset);
      b.mean = __shfl_down_sync(kFullMask, a.mean, offset);
      b.m2 = __shfl_down_sync(kFullMask, a.m2, offset);
      if (lane % (2 * offset) == 0) merge(a, b);
    }
  };
  tree();
  if (lane == 0) {
    shared_n[warp] = a.n;
    shared_mean[warp] = a.mean;
    shared_m2[warp] = a.m2;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? Moments<double>{shared_n[lane], shared_mean[lane], shared_m2[lane]}
                      : Moments<double>{0.0, 0.0, 0.0};
    tree();
  }
}

// Channel c's moments of x - shift are complete: the statistics, the
// coefficients of y = (x - mean_hi) * scale + offset and the running
// statistics.  In the first pass a channel whose shift was far from the mean
// is only flagged (far[c]) with a better shift; the second pass finishes it.
template <typename Acc>
__device__ void finish_stats(int c, int channels, const Moments<double>& m, double shift, int pass, Acc* stats,
                             int* far, const ForwardParams& fp) {
  const double v = m.m2 / m.n;
  if (pass == 0) {
    const bool is_far = m.mean * m.mean > kFarShift * v;  // false for NaN: nothing to gain
    far[c] = is_far ? 1 : 0;
    if (is_far) {
      stats[kNextShift * channels + c] = static_cast<Acc>(shift + m.mean);
      return;
    }
  }
  // mean of x = shift + mean, as a hi/lo pair (TwoSum: exact in double arithmetic).
  const double sum = shift + m.mean;
  const double bb = sum - shift;
  const double err = (shift - (sum - bb)) + (m.mean - bb);
  const Acc hi = static_cast<Acc>(sum);
  const Acc lo = static_cast<Acc>((sum - static_cast<double>(hi)) + err);
  const double inv = 1.0 / sqrt(v + fp.eps);
  const double sc = inv * fp.gamma.at(c, 1.0);
  stats[kMeanHi * channels + c] = hi;
  stats[kMeanLo * channels + c] = lo;
  stats[kVar * channels + c] = static_cast<Acc>(v);
  stats[kInvStd * channels + c] = static_cast<Acc>(inv);
  stats[kScale * channels + c] = static_cast<Acc>(sc);
  stats[kOffset * channels + c] = static_cast<Acc>(fp.beta.at(c, 0.0) - static_cast<double>(lo) * sc);
  if (fp.running_mean.kind != 0) {  // in double, rounded once to the running statistics' type
    const double mean = static_cast<double>(hi) + static_cast<double>(lo);
    const double keep = 1.0 - fp.momentum;
    fp.running_mean.set(c, keep * fp.running_mean.at(c, 0.0) + fp.momentum * mean);
    fp.running_var.set(c, keep * fp.running_var.at(c, 0.0) + fp.momentum * v * fp.unbias);
  }
}

// Channel c's backward sums are complete: dgamma, dbeta (in their arrays'
// dtypes) and the coefficients of dx = a * dy + b * (x - mean_hi) + k.
template <typename Acc>
__device__ void finish_grad(int c, int channels, double sum_dy, double sum_dyx, double count, double mean_lo,
                            double inv, double gamma, int training, Acc* coef, const ChannelInOut& dgamma,
                            const ChannelInOut& dbeta) {
  const double dg = inv * (sum_dyx - mean_lo * sum_dy);  // sum(dy * x_hat)
  dgamma.set(c, dg);
  dbeta.set(c, sum_dy);
  const double ac = gamma * inv;
  // dx = a * (dy - dbeta / m - x_hat * dgamma / m) with x_hat = (x - mean_hi - mean_lo) * inv
  const double bc = training ? -ac * inv * dg / count : 0.0;
  const double kc = training ? -ac * sum_dy / count - bc * mean_lo : 0.0;
  coef[kCoefA * channels + c] = static_cast<Acc>(ac);
  coef[kCoefB * channels + c] = static_cast<Acc>(bc);
  coef[kCoefK * channels + c] = static_cast<Acc>(kc);
}

// y = (x - centre) * scale + offset for one channel.
template <typename Acc>
struct Affine {
  Acc centre, scale, offset;
};

// The inference coefficients of channel c from the running statistics: the
// running mean as centre (hi) plus a correction folded into the offset (lo).
template <typename Acc>
struct InferCoefficients {
  Acc centre, inv_std, scale, offset, lo;
};
// Not inlined: a double division and square root, met in every unrolled
// value of a pack, would multiply the code (and the compile time) by the pack.
template <typename Acc>
__device__ __noinline__ InferCoefficients<Acc> infer_coefficients(int c, const ChannelIn& running_mean,
                                                                     const ChannelIn& running_var,
                                                                     const ChannelIn& gamma, const ChannelIn& beta,
                                                                     double eps) {
  const double rm = running_mean.at(c, 0.0);
  const Acc hi = static_cast<Acc>(rm);
  const double lo = rm - static_cast<double>(hi);
  const double inv = 1.0 / sqrt(running_var.at(c, 1.0) + eps);
  const double sc = inv * gamma.at(c, 1.0);
  return {hi, static_cast<Acc>(inv), static_cast<Acc>(sc), static_cast<Acc>(beta.at(c, 0.0) - lo * sc),
          static_cast<Acc>(lo)};
}

// What a saved inference call gives the backward pass (stats rows kMeanHi..kInvStd).
template <typename Acc>
__device__ __forceinline__ void save_infer_stats(int c, int channels, const InferCoefficients<Acc>& k,
                                                 const ChannelIn& running_var, Acc* stats) {
  stats[kMeanHi * channels + c] = k.centre;
  stats[kMeanLo * channels + c] = k.lo;
  stats[kVar * channels + c] = static_cast<Acc>(running_var.at(c, 1.0));
  stats[kInvStd * channels + c] = k.inv_std;
  stats[kScale * channels + c] = k.scale;
  stats[kOffset * channels + c] = k.offset;
}

}  // namespace cupybn

// The per-channel arrays of the forward kernels, as kernel parameters.
#define CUPYBN_FORWARD_PARAMS                                                                                  \
  const void *gamma, int gamma_kind, long long gamma_stride, const void *beta, int beta_kind,                 \
      long long beta_stride, double eps, void *running_mean, int running_mean_kind,                           \
      long long running_mean_stride, void *running_var, int running_var_kind, long long running_var_stride,   \
      double momentum, double unbias
#define CUPYBN_FORWARD_PARAMS_STRUCT                                                                           \
  cupybn::ForwardParams {                                                                                      \
    {gamma, gamma_kind, gamma_stride}, {beta, beta_kind, beta_stride},                                         \
        {running_mean, running_mean_kind, running_mean_stride},                                                \
        {running_var, running_var_kind, running_var_stride}, eps, momentum, unbias                            \
  }

// ---- forward statistics ------------------------------------------------------------

// Grid (C, slices), kThreads threads.  Block (c, s) reduces packs
// [s * per_block, (s + 1) * per_block) of channel c (PlanarRows: `slots` per
// row, in channel order) and singles [s * singles_per_block, ...), writes
// partial (c, s), and the last block of channel c finishes it.  pass 0 takes
// every channel with x[0, c, 0] as shift; pass 1 only the channels pass 0
// flagged as far, with the shift it left in stats[kNextShift].
// part: 2 * C * slices values (means, then sums of squared deviations).
// Three blocks of 256 per SM at least: left alone, ptxas squeezes the float
// packs into 64 registers with spills to keep a fourth.
template <typename T, typename Acc, int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads, 768 / kThreads)
    bn_stats_planar(const T* __restrict__ x, long long outer, int channels, long long inner, long long slots,
                    long long per_block, long long singles_per_block, int pass, Acc* __restrict__ part,
                    unsigned int* __restrict__ tickets, Acc* __restrict__ stats, int* __restrict__ far,
                    CUPYBN_FORWARD_PARAMS) {
  using namespace cupybn;
  using P = Pack<T, kVec>;
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  const int slices = gridDim.y;
  if (pass == 1 && !far[c]) return;  // the whole block leaves together
  const Acc k = pass == 0 ? widen<Acc>(x[static_cast<long long>(c) * inner]) : stats[kNextShift * channels + c];
  const PlanarRows<kVec> rows{static_cast<long long>(channels) * inner, static_cast<long long>(c) * inner, slots};
  const long long rest = inner - slots * kVec;  // singles per row
  const long long packs = outer * slots, singles = outer * rest;
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(packs, begin + per_block);
  const long long singles_begin = static_cast<long long>(s) * singles_per_block;
  const long long singles_end = min(singles, singles_begin + singles_per_block);
  const P* x_packs = reinterpret_cast<const P*>(x);
  Moments<Acc> a{Acc(0), Acc(0), Acc(0)};
  long long j = begin + threadIdx.x;
  if (j < end) {
    PlanarCursor at(j, kThreads, slots);
    // kGroup packs at a time (two at least, and at least 8 values): their
    // loads in flight together, one merge (with its division) for them all.
    constexpr int kGroup = kVec >= 4 ? 2 : 8 / kVec;
    for (; j + (kGroup - 1) * kThreads < end; j += kGroup * kThreads) {
      P v[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        v[g] = x_packs[rows.pack(at)];
        at.advance(slots);
      }
      Acc d[kGroup * kVec];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[g * kVec + e] = widen<Acc>(v[g].v[e]) - k;
      }
      add_values(a, d);
    }
    for (; j < end; j += kThreads) {
      const P v = x_packs[rows.pack(at)];
      Acc d[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) d[e] = widen<Acc>(v.v[e]) - k;
      add_values(a, d);
      at.advance(slots);
    }
  }
  j = singles_begin + threadIdx.x;
  if (j < singles_end) {  // the heads and tails of rows that are not whole packs
    PlanarCursor at(j, kThreads, rest);
    for (; j + (kSinglesAtOnce<T> - 1) * kThreads < singles_end; j += kSinglesAtOnce<T> * kThreads) {
      Acc d[kSinglesAtOnce<T>];
#pragma unroll
      for (int g = 0; g < kSinglesAtOnce<T>; ++g) {
        d[g] = widen<Acc>(x[rows.single(at)]) - k;
        at.advance(rest);
      }
      add_values(a, d);
    }
    for (; j < singles_end; j += kThreads) {
      add_value(a, widen<Acc>(x[rows.single(at)]) - k);
      at.advance(rest);
    }
  }
  block_merge<Acc, kThreads>(a, max(0LL, end - begin), kVec, max(0LL, singles_end - singles_begin));
  const long long partials = static_cast<long long>(channels) * slices;
  if (threadIdx.x == 0) {
    const long long p = static_cast<long long>(c) * slices + s;
    part[p] = a.mean;
    part[partials + p] = a.m2;
  }
  if (!arrive_last(tickets + c, slices)) return;
  Moments<double> m{0.0, 0.0, 0.0};
  read_partials<kThreads>(
      part, partials, threadIdx.x, slices, [&](int t) { return static_cast<long long>(c) * slices + t; },
      [&](int t, double mean, double m2) {
        const long long in_packs = max(0LL, min(per_block, packs - static_cast<long long>(t) * per_block));
        const long long in_singles =
            max(0LL, min(singles_per_block, singles - static_cast<long long>(t) * singles_per_block));
        merge(m, Moments<double>{static_cast<double>(kVec * in_packs + in_singles), mean, m2});
      });
  block_merge_counted<kThreads>(m);
  if (threadIdx.x == 0) finish_stats(c, channels, m, static_cast<double>(k), pass, stats, far, CUPYBN_FORWARD_PARAMS_STRUCT);
}

// Grid (ceil(C / 32), slices), block (32, kRows).  Thread (tx, ty) of block
// (bx, s) reduces rows s * per_block + ty, + kRows, ... of channel bx * 32 + tx;
// the last block of tile bx finishes its channels.  Passes and stats as
// bn_stats_planar (shift x[0, c]); part is slice-major here (s * C + c), so
// that the 32 lanes of the last block read 32 neighbouring partials at once.
template <typename T, typename Acc, int kRows>
__global__ void __launch_bounds__(32 * kRows)
    bn_stats_rows(const T* __restrict__ x, long long outer, int channels, long long per_block, int pass,
                  Acc* __restrict__ part, unsigned int* __restrict__ tickets, Acc* __restrict__ stats,
                  int* __restrict__ far, CUPYBN_FORWARD_PARAMS) {
  using namespace cupybn;
  __shared__ Acc shared_mean[kRows][32], shared_m2[kRows][32];
  __shared__ double merged_n[kRows][32], merged_mean[kRows][32], merged_m2[kRows][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int s = blockIdx.y;
  const int slices = gridDim.y;
  const bool live = c < channels && (pass == 0 || far[c]);
  if (!__syncthreads_or(live)) return;  // no channel of this tile in this pass
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(outer, begin + per_block);
  const Acc k = !live ? Acc(0) : pass == 0 ? load<Acc>(x, c) : stats[kNextShift * channels + c];
  Moments<Acc> a{Acc(0), Acc(0), Acc(0)};
  if (live) {
    long long row = begin + threadIdx.y;
    for (; row + (kRowsAtOnce - 1) * kRows < end; row += kRowsAtOnce * kRows) {
      Acc d[kRowsAtOnce];
#pragma unroll
      for (int i = 0; i < kRowsAtOnce; ++i) d[i] = load<Acc>(x, (row + i * kRows) * channels + c) - k;
      add_values(a, d);
    }
    for (; row < end; row += kRows) add_value(a, load<Acc>(x, row * channels + c) - k);
  }
  shared_mean[threadIdx.y][threadIdx.x] = a.mean;
  shared_m2[threadIdx.y][threadIdx.x] = a.m2;
  __syncthreads();
  const long long partials = static_cast<long long>(channels) * slices;
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      const long long rows_r = max(0LL, (end - begin - r + kRows - 1) / kRows);  // rows thread row r took
      merge(a, Moments<Acc>{static_cast<Acc>(rows_r), shared_mean[r][threadIdx.x], shared_m2[r][threadIdx.x]});
    }
    const long long p = static_cast<long long>(s) * channels + c;  // slice-major: the last block's loads coalesce
    part[p] = a.mean;
    part[partials + p] = a.m2;
  }
  if (!arrive_last(tickets + blockIdx.x, slices)) return;
  Moments<double> m{0.0, 0.0, 0.0};
  if (live) {
    read_partials<kRows>(
        part, partials, threadIdx.y, slices, [&](int t) { return static_cast<long long>(t) * channels + c; },
        [&](int t, double mean, double m2) {
          const double n = static_cast<double>(min(per_block, outer - static_cast<long long>(t) * per_block));
          merge(m, Moments<double>{n, mean, m2});
        });
  }
  merged_n[threadIdx.y][threadIdx.x] = m.n;
  merged_mean[threadIdx.y][threadIdx.x] = m.mean;
  merged_m2[threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      merge(m, Moments<double>{merged_n[r][threadIdx.x], merged_mean[r][threadIdx.x], merged_m2[r][threadIdx.x]});
    }
    finish_stats(c, channels, m, static_cast<double>(k), pass, stats, far, CUPYBN_FORWARD_PARAMS_STRUCT);
  }
}

// One thread per channel, for the general path (strided views), whose
// reductions give each channel's moments about `shift` in double (n = count).
template <typename Acc>
__global__ void bn_stats_channelwise(const double* __restrict__ shift, const double* __restrict__ mean,
                                     const double* __restrict__ m2, double count, int channels,
                                     Acc* __restrict__ stats, int* __restrict__ far, CUPYBN_FORWARD_PARAMS) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  cupybn::finish_stats(c, channels, cupybn::Moments<double>{count, mean[c], m2[c]}, shift[c], 1, stats, far,
                       CUPYBN_FORWARD_PARAMS_STRUCT);
}

// One thread per channel, for the general path: the inference coefficients
// and the saved statistics (rows kMeanHi..kOffset of stats).
template <typename Acc>
__global__ void bn_infer_channelwise(const void* running_mean, int running_mean_kind, long long running_mean_stride,
                                     const void* running_var, int running_var_kind, long long running_var_stride,
                                     const void* gamma, int gamma_kind, long long gamma_stride, const void* beta,
                                     int beta_kind, long long beta_stride, double eps, int channels,
                                     Acc* __restrict__ stats) {
  using namespace cupybn;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const ChannelIn rv{running_var, running_var_kind, running_var_stride};
  save_infer_stats(c, channels,
                   infer_coefficients<Acc>(c, {running_mean, running_mean_kind, running_mean_stride}, rv,
                                           {gamma, gamma_kind, gamma_stride}, {beta, beta_kind, beta_stride}, eps),
                   rv, stats);
}

// ---- elementwise ------------------------------------------------------------------

// The elementwise kernels walk the flat (outer, C, inner) array in packs of
// kVec consecutive values (total % kVec == 0), grid-stride.  Each value needs
// its channel's coefficients (a struct K from `coefficients(c)`).  Where the
// grid's stride is a whole number of (C, inner) planes (`fixed`, which the host
// arranges where it costs little), every thread meets the same channels in
// every iteration: it gets their coefficients once and keeps them in
// registers.  Otherwise a cursor tracks each value's channel (no division per
// value) and the coefficients are fetched when the channel changes.
// `load(u)` reads pack u (and what goes with it) and `store(u, loaded, k)`
// writes its result, k[e] being the coefficients of its value e.
namespace cupybn {
template <int kVec, typename K, typename Coefficients, typename Load, typename Store>
__device__ __forceinline__ void for_each_pack(long long total, long long inner, int channels, int fixed,
                                              Coefficients coefficients, Load load, Store store) {
  const long long packs = total / kVec;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  long long u = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= packs) return;
  K k[kVec];
  ChannelCursor at(u * kVec, (step - 1) * kVec, inner, channels);
  if (fixed) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      k[e] = coefficients(at.channel);
      at.next(inner, channels);
    }
    // Two packs a thread at a time, both loads issued before either is used:
    // twice the bytes in flight that one pack per iteration would have.
    for (; u + step < packs; u += 2 * step) {
      const auto first = load(u);
      const auto second = load(u + step);
      store(u, first, k);
      store(u + step, second, k);
    }
    if (u < packs) store(u, load(u), k);
    return;
  }
  int cached = -1;  // the channel whose coefficients `last` holds
  K last{};
  for (; u < packs; u += step) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (at.channel != cached) {  // consecutive values mostly share a channel
        cached = at.channel;
        last = coefficients(cached);
      }
      k[e] = last;
      at.next(inner, channels);
    }
    store(u, load(u), k);
    at.advance(inner, channels);
  }
}

// Pack u of x, and with the epilogue of the residual z when it adds one (z is
// left unset otherwise, and never read).  Without the epilogue there is no z.
template <typename T, int kVec, bool kEpilogue>
struct ForwardPacks {
  Pack<T, kVec> x, z;
};
template <typename T, int kVec>
struct ForwardPacks<T, kVec, false> {
  Pack<T, kVec> x;
};
template <typename T, int kVec, bool kEpilogue>
__device__ __forceinline__ ForwardPacks<T, kVec, kEpilogue> load_forward(const T* __restrict__ x,
                                                                         const T* __restrict__ residual,
                                                                         int epilogue, long long u) {
  ForwardPacks<T, kVec, kEpilogue> in;
  in.x = reinterpret_cast<const Pack<T, kVec>*>(x)[u];
  if constexpr (kEpilogue) {
    if (epilogue & kAddResidual) in.z = reinterpret_cast<const Pack<T, kVec>*>(residual)[u];
  }
  return in;
}

// y = (x - centre) * scale + offset for the values of one pack, then the epilogue.
template <typename T, typename Acc, int kVec, bool kEpilogue>
__device__ __forceinline__ void normalize_pack(T* __restrict__ y, long long u,
                                               const ForwardPacks<T, kVec, kEpilogue>& in, int epilogue,
                                               const Affine<Acc> (&k)[kVec]) {
  Acc p[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) p[e] = mul_add(widen<Acc>(in.x.v[e]) - k[e].centre, k[e].scale, k[e].offset);
  if constexpr (kEpilogue) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) p[e] = apply_epilogue(p[e], in.z.v[e], epilogue);
  }
  Pack<T, kVec> out;
#pragma unroll
  for (int e = 0; e < kVec; ++e) out.v[e] = store_value<T>(p[e]);
  reinterpret_cast<Pack<T, kVec>*>(y)[u] = out;
}

// Pack u of dy and x for the backward elementwise kernel, and with the
// epilogue of the ReLU's output y (set only with kRelu).
template <typename T, int kVec, bool kEpilogue>
struct BackwardPacks {
  Pack<T, kVec> g, v, y;
};
template <typename T, int kVec>
struct BackwardPacks<T, kVec, false> {
  Pack<T, kVec> g, v;
};
}  // namespace cupybn

// Training: y = (x - mean_hi[c]) * scale[c] + offset[c], from the statistics
// kernel's rows, then with kEpilogue the epilogue (kAddResidual, kRelu;
// residual: an array like x, or a stand-in pointer that is never read).
// Without kEpilogue, residual and epilogue are ignored.
template <typename T, typename Acc, int kVec, bool kEpilogue>
__global__ void bn_normalize(const T* __restrict__ x, T* __restrict__ y, long long total, long long inner,
                             int channels, int fixed, const Acc* __restrict__ stats, const T* __restrict__ residual,
                             int epilogue) {
  using namespace cupybn;
  using In = ForwardPacks<T, kVec, kEpilogue>;
  for_each_pack<kVec, Affine<Acc>>(
      total, inner, channels, fixed,
      [&](int c) {
        return Affine<Acc>{stats[kMeanHi * channels + c], stats[kScale * channels + c],
                           stats[kOffset * channels + c]};
      },
      [&](long long u) { return load_forward<T, kVec, kEpilogue>(x, residual, epilogue, u); },
      [&](long long u, const In& in, const Affine<Acc>(&k)[kVec]) {
        normalize_pack<T, Acc, kVec, kEpilogue>(y, u, in, epilogue, k);
      });
}

// Inference in one launch: the coefficients come from the running statistics
// inside the kernel, and the first threads also write what the backward pass
// needs (stats rows kMeanHi..kOffset).  Epilogue as bn_normalize.
template <typename T, typename Acc, int kVec, bool kEpilogue>
__global__ void bn_normalize_running(const T* __restrict__ x, T* __restrict__ y, long long total, long long inner,
                                     int channels, int fixed, const void* running_mean, int running_mean_kind,
                                     long long running_mean_stride, const void* running_var, int running_var_kind,
                                     long long running_var_stride, const void* gamma, int gamma_kind,
                                     long long gamma_stride, const void* beta, int beta_kind, long long beta_stride,
                                     double eps, Acc* __restrict__ stats, const T* __restrict__ residual,
                                     int epilogue) {
  using namespace cupybn;
  using In = ForwardPacks<T, kVec, kEpilogue>;
  const ChannelIn rm{running_mean, running_mean_kind, running_mean_stride};
  const ChannelIn rv{running_var, running_var_kind, running_var_stride};
  const ChannelIn g{gamma, gamma_kind, gamma_stride};
  const ChannelIn b{beta, beta_kind, beta_stride};
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += step) {
    save_infer_stats(static_cast<int>(c), channels,
                     infer_coefficients<Acc>(static_cast<int>(c), rm, rv, g, b, eps), rv, stats);
  }
  for_each_pack<kVec, Affine<Acc>>(
      total, inner, channels, fixed,
      [&](int c) {
        const InferCoefficients<Acc> k = infer_coefficients<Acc>(c, rm, rv, g, b, eps);
        return Affine<Acc>{k.centre, k.scale, k.offset};
      },
      [&](long long u) { return load_forward<T, kVec, kEpilogue>(x, residual, epilogue, u); },
      [&](long long u, const In& in, const Affine<Acc>(&k)[kVec]) {
        normalize_pack<T, Acc, kVec, kEpilogue>(y, u, in, epilogue, k);
      });
}

// dx = a[c] * g + b[c] * (x - centre[c]) + k[c]; in inference (with_x == 0)
// dx = a[c] * g, which leaves x (even where it is not finite) out of it.
// g is dy, or with kRelu dy through the ReLU whose output was relu_y
// (through_relu), which kWriteGradient also stores in dz.  relu_y and dz are
// stand-in pointers, never touched, where their flags are off; without
// kEpilogue they and `epilogue` are ignored, and g is dy.
// coef: rows kCoefA, kCoefB, kCoefK of the gradient kernel.
template <typename T, typename Acc, int kVec, bool kEpilogue>
__global__ void bn_backward_elementwise(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long total, long long inner, int channels, int fixed, int with_x,
                                        const Acc* __restrict__ centre, const Acc* __restrict__ coef,
                                        const T* __restrict__ relu_y, T* __restrict__ dz, int epilogue) {
  using namespace cupybn;
  using P = Pack<T, kVec>;
  struct K {
    Acc centre, a, b, k;
  };
  using Loaded = BackwardPacks<T, kVec, kEpilogue>;
  for_each_pack<kVec, K>(
      total, inner, channels, fixed,
      [&](int c) {
        return K{centre[c], coef[kCoefA * channels + c], coef[kCoefB * channels + c], coef[kCoefK * channels + c]};
      },
      [&](long long u) {
        Loaded in;
        in.g = reinterpret_cast<const P*>(dy)[u];
        if (with_x) in.v = reinterpret_cast<const P*>(x)[u];
        if constexpr (kEpilogue) {
          if (epilogue & kRelu) in.y = reinterpret_cast<const P*>(relu_y)[u];
        }
        return in;
      },
      [&](long long u, const Loaded& in, const K(&k)[kVec]) {
        P g = in.g;
        if constexpr (kEpilogue) {
          if (epilogue & kRelu) {  // one uniform branch per pack
#pragma unroll
            for (int e = 0; e < kVec; ++e) g.v[e] = through_relu<Acc>(in.g.v[e], in.y.v[e], true);
          }
        }
        P out;
        if (with_x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            out.v[e] = store_value<T>(mul_add(k[e].a, widen<Acc>(g.v[e]),
                                              mul_add(k[e].b, widen<Acc>(in.v.v[e]) - k[e].centre, k[e].k)));
          }
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) out.v[e] = store_value<T>(k[e].a * widen<Acc>(g.v[e]));
        }
        reinterpret_cast<P*>(dx)[u] = out;
        if constexpr (kEpilogue) {
          if (epilogue & kWriteGradient) reinterpret_cast<P*>(dz)[u] = g;
        }
      });
}

// ---- backward reductions ---------------------------------------------------------

// The per-channel arrays of the gradient kernels, as kernel parameters.
#define CUPYBN_GRAD_PARAMS                                                                                     \
  const Acc *__restrict__ mean_hi, const Acc *__restrict__ mean_lo, const Acc *__restrict__ inv_std,            \
      const void *gamma, int gamma_kind, long long gamma_stride, int training, double count,                  \
      Acc *__restrict__ coef, void *dgamma, int dgamma_kind, void *dbeta, int dbeta_kind
#define CUPYBN_FINISH_GRAD(c, sum_dy, sum_dyx)                                                                 \
  cupybn::finish_grad<Acc>((c), channels, (sum_dy), (sum_dyx), count, static_cast<double>(mean_lo[c]),         \
                           static_cast<double>(inv_std[c]),                                                   \
                           cupybn::ChannelIn{gamma, gamma_kind, gamma_stride}.at((c), 1.0), training, coef,   \
                           cupybn::ChannelInOut{dgamma, dgamma_kind, 1}, cupybn::ChannelInOut{dbeta, dbeta_kind, 1})

// sum(g) and sum(g * (x - mean_hi)) per channel slice, layout (packs and
// singles) as bn_stats_planar; the last block of a channel finishes it.  g is
// dy, or with kEpilogue and kRelu in `epilogue` dy through the ReLU whose
// output was relu_y (read only then; a stand-in pointer otherwise; without
// kEpilogue relu_y and `epilogue` are ignored).  part: 2 * C * slices.
template <typename T, typename Acc, int kThreads, int kVec, bool kEpilogue>
__global__ void __launch_bounds__(kThreads)
    bn_grad_planar(const T* __restrict__ dy, const T* __restrict__ x, long long outer, int channels,
                   long long inner, long long slots, long long per_block, long long singles_per_block,
                   Acc* __restrict__ part, unsigned int* __restrict__ tickets, CUPYBN_GRAD_PARAMS,
                   const T* __restrict__ relu_y, int epilogue) {
  using namespace cupybn;
  const bool relu = kEpilogue && (epilogue & kRelu) != 0;  // a constant false without the epilogue
  using P = Pack<T, kVec>;
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  const int slices = gridDim.y;
  const PlanarRows<kVec> rows{static_cast<long long>(channels) * inner, static_cast<long long>(c) * inner, slots};
  const long long rest = inner - slots * kVec;
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(outer * slots, begin + per_block);
  const long long singles_begin = static_cast<long long>(s) * singles_per_block;
  const long long singles_end = min(outer * rest, singles_begin + singles_per_block);
  const P* dy_packs = reinterpret_cast<const P*>(dy);
  const P* x_packs = reinterpret_cast<const P*>(x);
  const P* y_packs = reinterpret_cast<const P*>(relu_y);
  const Acc m = mean_hi[c];
  Acc sum_dy = Acc(0), sum_dyx = Acc(0);
  long long j = begin + threadIdx.x;
  if (j < end) {
    PlanarCursor at(j, kThreads, slots);
    constexpr int kGroup = kVec >= 4 ? 1 : 4 / kVec;  // packs whose loads are in flight together
    for (; j < end;) {
      P g[kGroup], v[kGroup], y[kGroup];
      int taken = 0;
#pragma unroll
      for (int q = 0; q < kGroup; ++q) {
        if (j + static_cast<long long>(q) * kThreads < end) {
          const long long i = rows.pack(at);
          g[q] = dy_packs[i];
          v[q] = x_packs[i];
          if constexpr (kEpilogue) {
            if (relu) y[q] = y_packs[i];
          }
          at.advance(slots);
          taken = q + 1;
        }
      }
#pragma unroll
      for (int q = 0; q < kGroup; ++q) {  // the sums in the order of the values, as one at a time
        if (q < taken) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const Acc ge = summed_gradient<kEpilogue, Acc>(g[q].v[e], y[q].v[e], relu);
            sum_dy += ge;
            sum_dyx = mul_add(ge, widen<Acc>(v[q].v[e]) - m, sum_dyx);
          }
        }
      }
      j += static_cast<long long>(taken) * kThreads;
    }
  }
  j = singles_begin + threadIdx.x;
  if (j < singles_end) {  // the heads and tails of rows that are not whole packs
    PlanarCursor at(j, kThreads, rest);
    constexpr int kAtOnce = kSinglesAtOnce<T>;
    for (; j + (kAtOnce - 1) * kThreads < singles_end; j += kAtOnce * kThreads) {
      T g[kAtOnce], y[kAtOnce];
      Acc v[kAtOnce];
#pragma unroll
      for (int q = 0; q < kAtOnce; ++q) {  // every load first, then the sums in order
        const long long i = rows.single(at);
        g[q] = dy[i];
        v[q] = load<Acc>(x, i);
        if constexpr (kEpilogue) {
          if (relu) y[q] = relu_y[i];
        }
        at.advance(rest);
      }
#pragma unroll
      for (int q = 0; q < kAtOnce; ++q) {
        const Acc gq = summed_gradient<kEpilogue, Acc>(g[q], y[q], relu);
        sum_dy += gq;
        sum_dyx = mul_add(gq, v[q] - m, sum_dyx);
      }
    }
    for (; j < singles_end; j += kThreads) {
      const long long i = rows.single(at);
      const Acc g1 = summed_gradient<kEpilogue, Acc>(dy[i], relu_y[i], relu);  // relu_y[i] is read only if relu
      sum_dy += g1;
      sum_dyx = mul_add(g1, load<Acc>(x, i) - m, sum_dyx);
      at.advance(rest);
    }
  }
  block_sum2<Acc, kThreads>(sum_dy, sum_dyx);
  const long long partials = static_cast<long long>(channels) * slices;
  if (threadIdx.x == 0) {
    const long long p = static_cast<long long>(c) * slices + s;
    part[p] = sum_dy;
    part[partials + p] = sum_dyx;
  }
  if (!arrive_last(tickets + c, slices)) return;
  double total_dy = 0.0, total_dyx = 0.0;
  read_partials<kThreads>(part, partials, threadIdx.x, slices,
                          [&](int t) { return static_cast<long long>(c) * slices + t; },
                          [&](int, double sum_dy_t, double sum_dyx_t) {
                            total_dy += sum_dy_t;
                            total_dyx += sum_dyx_t;
                          });
  block_sum2<double, kThreads>(total_dy, total_dyx);
  if (threadIdx.x == 0) CUPYBN_FINISH_GRAD(c, total_dy, total_dyx);
}

// The same sums for the rows family; layout as bn_stats_rows, epilogue as bn_grad_planar.
template <typename T, typename Acc, int kRows, bool kEpilogue>
__global__ void __launch_bounds__(32 * kRows)
    bn_grad_rows(const T* __restrict__ dy, const T* __restrict__ x, long long outer, int channels,
                 long long per_block, Acc* __restrict__ part, unsigned int* __restrict__ tickets,
                 CUPYBN_GRAD_PARAMS, const T* __restrict__ relu_y, int epilogue) {
  using namespace cupybn;
  const bool relu = kEpilogue && (epilogue & kRelu) != 0;  // a constant false without the epilogue
  __shared__ Acc shared_dy[kRows][32], shared_dyx[kRows][32];
  __shared__ double merged_dy[kRows][32], merged_dyx[kRows][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int s = blockIdx.y;
  const int slices = gridDim.y;
  const bool live = c < channels;
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(outer, begin + per_block);
  Acc sum_dy = Acc(0), sum_dyx = Acc(0);
  if (live) {
    const Acc m = mean_hi[c];
    long long row = begin + threadIdx.y;
    for (; row + (kRowsAtOnce - 1) * kRows < end; row += kRowsAtOnce * kRows) {
      T g[kRowsAtOnce], y[kRowsAtOnce];
      Acc v[kRowsAtOnce];
#pragma unroll
      for (int i = 0; i < kRowsAtOnce; ++i) {  // every load first, then the sums in row order
        const long long at = (row + i * kRows) * channels + c;
        g[i] = dy[at];
        v[i] = load<Acc>(x, at);
        if constexpr (kEpilogue) {
          if (relu) y[i] = relu_y[at];
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsAtOnce; ++i) {
        const Acc gi = summed_gradient<kEpilogue, Acc>(g[i], y[i], relu);
        sum_dy += gi;
        sum_dyx = mul_add(gi, v[i] - m, sum_dyx);
      }
    }
    for (; row < end; row += kRows) {
      const long long i = row * channels + c;
      const Acc g1 = summed_gradient<kEpilogue, Acc>(dy[i], relu_y[i], relu);  // relu_y[i] is read only if relu
      sum_dy += g1;
      sum_dyx = mul_add(g1, load<Acc>(x, i) - m, sum_dyx);
    }
  }
  shared_dy[threadIdx.y][threadIdx.x] = sum_dy;
  shared_dyx[threadIdx.y][threadIdx.x] = sum_dyx;
  __syncthreads();
  const long long partials = static_cast<long long>(channels) * slices;
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      sum_dy += shared_dy[r][threadIdx.x];
      sum_dyx += shared_dyx[r][threadIdx.x];
    }
    const long long p = static_cast<long long>(s) * channels + c;  // slice-major, as bn_stats_rows
    part[p] = sum_dy;
    part[partials + p] = sum_dyx;
  }
  if (!arrive_last(tickets + blockIdx.x, slices)) return;
  double total_dy = 0.0, total_dyx = 0.0;
  if (live) {
    read_partials<kRows>(part, partials, threadIdx.y, slices,
                         [&](int t) { return static_cast<long long>(t) * channels + c; },
                         [&](int, double sum_dy_t, double sum_dyx_t) {
                           total_dy += sum_dy_t;
                           total_dyx += sum_dyx_t;
                         });
  }
  merged_dy[threadIdx.y][threadIdx.x] = total_dy;
  merged_dyx[threadIdx.y][threadIdx.x] = total_dyx;
  __syncthreads();
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      total_dy += merged_dy[r][threadIdx.x];
      total_dyx += merged_dyx[r][threadIdx.x];
    }
    CUPYBN_FINISH_GRAD(c, total_dy, total_dyx);
  }
}

// One thread per channel, for the general path, whose reductions give the sums in double.
template <typename Acc>
__global__ void bn_grad_channelwise(const double* __restrict__ sum_dy, const double* __restrict__ sum_dyx,
                                    int channels, CUPYBN_GRAD_PARAMS) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  CUPYBN_FINISH_GRAD(c, sum_dy[c], sum_dyx[c]);
}
