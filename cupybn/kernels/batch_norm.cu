// Batch Normalization kernels of cupybn's CuPy backend.
//
// Every input is a C-contiguous (outer, C, inner) view (cupybn/_layout.py):
// NCHW is (N, C, H*W) and channels-last or 2-D data is (N*H*W, C, 1).  Two
// families of reductions follow the memory order:
//   planar  (inner > 1): a channel is `outer` rows of `inner` contiguous values;
//                        one block reduces a slice of one channel;
//   rows    (inner == 1): channels are the contiguous columns of an (outer, C)
//                        matrix; a block reduces 32 channels over a slice of rows.
// A channel with much data is split over several blocks (gridDim.y slices).
// Each block writes a partial result and a per-channel finalize kernel merges
// the partials in slice order: no floating-point atomics, so results are
// identical from run to run.  Elementwise kernels work on the flat array.
//
// T is the storage type (__half, float, double); Acc the arithmetic type
// (float for __half and float, double for double).  Statistics are Welford
// accumulations of x - shift (a sample of the channel), merged with Chan's
// formula; the finalize kernels work in double.  See docs/cupy-backend.md.
#include <cuda_fp16.h>

namespace cupybn {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }

template <typename Acc, typename T>
__device__ __forceinline__ Acc widen(T v) {
  return static_cast<Acc>(v);
}
template <>
__device__ __forceinline__ float widen<float, __half>(__half v) {
  return __half2float(v);
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
__device__ __forceinline__ __half store_value<__half, float>(float v) {
  return __float2half_rn(v);
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
// dealt the `len` units of the slice round-robin, `unit` values each.
template <typename Acc, int kThreads>
__device__ __forceinline__ void block_merge(Moments<Acc>& a, long long len, int unit) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  __shared__ Acc shared_mean[kWarps], shared_m2[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_merge(a, [&](int first_lane, int width) {
    return unit * dealt(len, kThreads, warp * 32 + first_lane, width);
  });
  if (lane == 0) {
    shared_mean[warp] = a.mean;
    shared_m2[warp] = a.m2;
  }
  __syncthreads();
  if (warp == 0) {
    a.mean = lane < kWarps ? shared_mean[lane] : Acc(0);
    a.m2 = lane < kWarps ? shared_m2[lane] : Acc(0);
    a.n = lane < kWarps ? static_cast<Acc>(unit * dealt(len, kThreads, lane * 32, 32)) : Acc(0);
    // lane L now stands for warp L: threads [32 L, 32 (L + 1))
    warp_merge(a, [&](int first_warp, int width) {
      return first_warp >= kWarps ? 0LL
                                  : unit * dealt(len, kThreads, first_warp * 32, 32 * min(width, kWarps - first_warp));
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

}  // namespace cupybn

// ---- statistics -----------------------------------------------------------------

// Grid (C, slices), kThreads threads.  Block (c, s) reduces elements
// [s * per_block, (s + 1) * per_block) of channel c (in channel order) and
// writes partial (c, s).  Channels with active[c] == 0 are skipped.
template <typename T, typename Acc, int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_stats_planar(const T* __restrict__ x, long long outer, int channels, long long inner, long long per_block,
                    const Acc* __restrict__ shift, const int* __restrict__ active, Acc* __restrict__ part_n,
                    Acc* __restrict__ part_mean, Acc* __restrict__ part_m2) {
  // In packs of kVec values: the host makes inner and per_block multiples of kVec.
  using namespace cupybn;
  using P = Pack<T, kVec>;
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  if (!active[c]) return;  // the whole block leaves together
  const long long count = outer * inner / kVec;
  const long long inner_packs = inner / kVec;
  const long long begin = static_cast<long long>(s) * (per_block / kVec);
  const long long end = min(count, begin + per_block / kVec);
  const Acc k = shift[c];
  const P* channel = reinterpret_cast<const P*>(x + static_cast<long long>(c) * inner);
  const long long row_stride = static_cast<long long>(channels) * inner_packs;
  Moments<Acc> a{Acc(0), Acc(0), Acc(0)};
  long long j = begin + threadIdx.x;
  if (j < end) {
    PlanarCursor at(j, kThreads, inner_packs);
    for (; j < end; j += kThreads) {
      const P v = channel[at.offset(row_stride)];
#pragma unroll
      for (int e = 0; e < kVec; ++e) add_value(a, widen<Acc>(v.v[e]) - k);
      at.advance(inner_packs);
    }
  }
  block_merge<Acc, kThreads>(a, max(0LL, end - begin), kVec);
  if (threadIdx.x == 0) {
    const long long p = static_cast<long long>(c) * gridDim.y + s;
    part_n[p] = a.n;
    part_mean[p] = a.mean;
    part_m2[p] = a.m2;
  }
}

// Grid (ceil(C / 32), slices), block (32, kRows).  Thread (tx, ty) of block
// (bx, s) reduces rows s * per_block + ty, + kRows, ... of channel bx * 32 + tx.
template <typename T, typename Acc, int kRows>
__global__ void __launch_bounds__(32 * kRows)
    bn_stats_rows(const T* __restrict__ x, long long outer, int channels, long long per_block,
                  const Acc* __restrict__ shift, const int* __restrict__ active, Acc* __restrict__ part_n,
                  Acc* __restrict__ part_mean, Acc* __restrict__ part_m2) {
  using namespace cupybn;
  __shared__ Acc shared_n[kRows][32], shared_mean[kRows][32], shared_m2[kRows][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int s = blockIdx.y;
  const bool live = c < channels && active[c];
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(outer, begin + per_block);
  Moments<Acc> a{Acc(0), Acc(0), Acc(0)};
  if (live) {
    const Acc k = shift[c];
    for (long long row = begin + threadIdx.y; row < end; row += kRows) {
      add_value(a, load<Acc>(x, row * channels + c) - k);
    }
  }
  shared_n[threadIdx.y][threadIdx.x] = a.n;
  shared_mean[threadIdx.y][threadIdx.x] = a.mean;
  shared_m2[threadIdx.y][threadIdx.x] = a.m2;
  __syncthreads();
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      merge(a, Moments<Acc>{shared_n[r][threadIdx.x], shared_mean[r][threadIdx.x], shared_m2[r][threadIdx.x]});
    }
    const long long p = static_cast<long long>(c) * gridDim.y + s;
    part_n[p] = a.n;
    part_mean[p] = a.mean;
    part_m2[p] = a.m2;
  }
}

// One thread per channel: merges the slices of channel c (in slice order, in
// double), then writes the statistics and the coefficients of
// y = (x - mean_hi) * scale + offset.  far_shift[c] is set where the shift was
// so far from the mean that the accumulation lost digits; a second pass with
// shift = mean_hi (next_shift) then recomputes those channels.
template <typename Acc>
__global__ void bn_stats_finalize(const Acc* __restrict__ part_n, const Acc* __restrict__ part_mean,
                                  const Acc* __restrict__ part_m2, int channels, int slices,
                                  const Acc* __restrict__ shift, const int* __restrict__ active,
                                  const double* __restrict__ gamma, const double* __restrict__ beta, double eps,
                                  Acc* __restrict__ mean_hi, Acc* __restrict__ mean_lo, double* __restrict__ var,
                                  Acc* __restrict__ inv_std, Acc* __restrict__ scale, Acc* __restrict__ offset,
                                  int* __restrict__ far_shift, Acc* __restrict__ next_shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels || !active[c]) return;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int s = 0; s < slices; ++s) {
    const long long p = static_cast<long long>(c) * slices + s;
    const double nb = part_n[p];
    if (nb == 0.0) continue;
    const double delta = static_cast<double>(part_mean[p]) - mean;
    const double total = n + nb;
    mean += delta * (nb / total);
    m2 += static_cast<double>(part_m2[p]) + delta * delta * n * (nb / total);
    n = total;
  }
  const double v = m2 / n;
  // mean of x = shift + mean, as a hi/lo pair (TwoSum: exact in double arithmetic).
  const double k = shift[c];
  const double sum = k + mean;
  const double bb = sum - k;
  const double err = (k - (sum - bb)) + (mean - bb);
  const Acc hi = static_cast<Acc>(sum);
  const Acc lo = static_cast<Acc>((sum - static_cast<double>(hi)) + err);
  const double inv = 1.0 / sqrt(v + eps);
  const double sc = inv * gamma[c];
  mean_hi[c] = hi;
  mean_lo[c] = lo;
  var[c] = v;
  inv_std[c] = static_cast<Acc>(inv);
  scale[c] = static_cast<Acc>(sc);
  offset[c] = static_cast<Acc>(beta[c] - static_cast<double>(lo) * sc);
  // Accumulating x - shift costs digits in proportion to |mean - shift| / std.
  far_shift[c] = mean * mean > v ? 1 : 0;
  next_shift[c] = hi;
}

// One thread per channel: the coefficients for inference from the running
// statistics (given in double, whatever their dtype), with the running mean as
// centre (hi) plus a correction folded into the offset (lo).
template <typename Acc>
__global__ void bn_infer_coefficients(const double* __restrict__ running_mean, const double* __restrict__ running_var,
                                      const double* __restrict__ gamma, const double* __restrict__ beta, double eps,
                                      int channels, Acc* __restrict__ centre, Acc* __restrict__ inv_std,
                                      Acc* __restrict__ scale, Acc* __restrict__ offset) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const Acc hi = static_cast<Acc>(running_mean[c]);
  const double lo = running_mean[c] - static_cast<double>(hi);
  const double inv = 1.0 / sqrt(running_var[c] + eps);
  const double sc = inv * gamma[c];
  centre[c] = hi;
  inv_std[c] = static_cast<Acc>(inv);
  scale[c] = static_cast<Acc>(sc);
  offset[c] = static_cast<Acc>(beta[c] - lo * sc);
}

// Running statistics, updated in place in one launch (instead of a dozen small
// array operations per training call): the same formula as the generic path in
// api.py, in double, rounded once to the running statistics' type R.
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(float v) { return v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ void store_double(__half* p, double v) { *p = __double2half(v); }
__device__ __forceinline__ void store_double(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store_double(double* p, double v) { *p = v; }

template <typename Acc, typename R>
__global__ void bn_update_running(const Acc* __restrict__ mean_hi, const Acc* __restrict__ mean_lo,
                                  const double* __restrict__ var, double momentum, double unbias, int channels,
                                  R* __restrict__ running_mean, R* __restrict__ running_var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const double mean = static_cast<double>(mean_hi[c]) + static_cast<double>(mean_lo[c]);
  const double keep = 1.0 - momentum;
  store_double(running_mean + c, keep * to_double(running_mean[c]) + momentum * mean);
  store_double(running_var + c, keep * to_double(running_var[c]) + momentum * var[c] * unbias);
}

// ---- elementwise ------------------------------------------------------------------

// The elementwise kernels walk the flat (outer, C, inner) array in packs of
// kVec consecutive values (total % kVec == 0), grid-stride; each value's channel
// comes from a cursor, so there is no division per value.

// y = (x - centre[c]) * scale[c] + offset[c]
template <typename T, typename Acc, int kVec>
__global__ void bn_affine(const T* __restrict__ x, T* __restrict__ y, long long total, long long inner,
                          int channels, const Acc* __restrict__ centre, const Acc* __restrict__ scale,
                          const Acc* __restrict__ offset) {
  using namespace cupybn;
  using P = Pack<T, kVec>;
  const long long packs = total / kVec;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  long long u = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= packs) return;
  ChannelCursor at(u * kVec, (step - 1) * kVec, inner, channels);
  const P* xs = reinterpret_cast<const P*>(x);
  P* ys = reinterpret_cast<P*>(y);
  for (; u < packs; u += step) {
    const P in = xs[u];
    P out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int c = at.channel;
      out.v[e] = store_value<T>(mul_add(widen<Acc>(in.v[e]) - centre[c], scale[c], offset[c]));
      at.next(inner, channels);
    }
    ys[u] = out;
    at.advance(inner, channels);
  }
}

// dx = a[c] * dy + b[c] * (x - centre[c]) + k[c]; in inference (with_x == 0)
// dx = a[c] * dy, which leaves x (even where it is not finite) out of it.
template <typename T, typename Acc, int kVec>
__global__ void bn_backward_elementwise(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                        long long total, long long inner, int channels, int with_x,
                                        const Acc* __restrict__ centre, const Acc* __restrict__ a,
                                        const Acc* __restrict__ b, const Acc* __restrict__ k) {
  using namespace cupybn;
  using P = Pack<T, kVec>;
  const long long packs = total / kVec;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  long long u = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= packs) return;
  ChannelCursor at(u * kVec, (step - 1) * kVec, inner, channels);
  const P* dys = reinterpret_cast<const P*>(dy);
  const P* xs = reinterpret_cast<const P*>(x);
  P* dxs = reinterpret_cast<P*>(dx);
  for (; u < packs; u += step) {
    const P g = dys[u];
    P out;
    if (with_x) {
      const P in = xs[u];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int c = at.channel;
        out.v[e] = store_value<T>(
            mul_add(a[c], widen<Acc>(g.v[e]), mul_add(b[c], widen<Acc>(in.v[e]) - centre[c], k[c])));
        at.next(inner, channels);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        out.v[e] = store_value<T>(a[at.channel] * widen<Acc>(g.v[e]));
        at.next(inner, channels);
      }
    }
    dxs[u] = out;
    at.advance(inner, channels);
  }
}

// ---- backward reductions ---------------------------------------------------------

// sum(dy) and sum(dy * (x - centre)) per channel slice; layout (and packs) as bn_stats_planar.
template <typename T, typename Acc, int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_grad_sums_planar(const T* __restrict__ dy, const T* __restrict__ x, long long outer, int channels,
                        long long inner, long long per_block, const Acc* __restrict__ centre,
                        Acc* __restrict__ part_dy, Acc* __restrict__ part_dyx) {
  using namespace cupybn;
  using P = Pack<T, kVec>;
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  const long long count = outer * inner / kVec;
  const long long inner_packs = inner / kVec;
  const long long begin = static_cast<long long>(s) * (per_block / kVec);
  const long long end = min(count, begin + per_block / kVec);
  const long long base = static_cast<long long>(c) * inner_packs;
  const long long row_stride = static_cast<long long>(channels) * inner_packs;
  const P* dys = reinterpret_cast<const P*>(dy);
  const P* xs = reinterpret_cast<const P*>(x);
  const Acc m = centre[c];
  Acc sum_dy = Acc(0), sum_dyx = Acc(0);
  long long j = begin + threadIdx.x;
  if (j < end) {
    PlanarCursor at(j, kThreads, inner_packs);
    for (; j < end; j += kThreads) {
      const long long i = base + at.offset(row_stride);
      const P g = dys[i];
      const P v = xs[i];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const Acc ge = widen<Acc>(g.v[e]);
        sum_dy += ge;
        sum_dyx = mul_add(ge, widen<Acc>(v.v[e]) - m, sum_dyx);
      }
      at.advance(inner_packs);
    }
  }
  block_sum2<Acc, kThreads>(sum_dy, sum_dyx);
  if (threadIdx.x == 0) {
    const long long p = static_cast<long long>(c) * gridDim.y + s;
    part_dy[p] = sum_dy;
    part_dyx[p] = sum_dyx;
  }
}

// The same sums for the rows family; layout as bn_stats_rows.
template <typename T, typename Acc, int kRows>
__global__ void __launch_bounds__(32 * kRows)
    bn_grad_sums_rows(const T* __restrict__ dy, const T* __restrict__ x, long long outer, int channels,
                      long long per_block, const Acc* __restrict__ centre, Acc* __restrict__ part_dy,
                      Acc* __restrict__ part_dyx) {
  using namespace cupybn;
  __shared__ Acc shared_dy[kRows][32], shared_dyx[kRows][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int s = blockIdx.y;
  const bool live = c < channels;
  const long long begin = static_cast<long long>(s) * per_block;
  const long long end = min(outer, begin + per_block);
  Acc sum_dy = Acc(0), sum_dyx = Acc(0);
  if (live) {
    const Acc m = centre[c];
    for (long long row = begin + threadIdx.y; row < end; row += kRows) {
      const long long i = row * channels + c;
      const Acc g = load<Acc>(dy, i);
      sum_dy += g;
      sum_dyx = mul_add(g, load<Acc>(x, i) - m, sum_dyx);
    }
  }
  shared_dy[threadIdx.y][threadIdx.x] = sum_dy;
  shared_dyx[threadIdx.y][threadIdx.x] = sum_dyx;
  __syncthreads();
  if (threadIdx.y == 0 && live) {
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      sum_dy += shared_dy[r][threadIdx.x];
      sum_dyx += shared_dyx[r][threadIdx.x];
    }
    const long long p = static_cast<long long>(c) * gridDim.y + s;
    part_dy[p] = sum_dy;
    part_dyx[p] = sum_dyx;
  }
}

// One thread per channel: dgamma and dbeta (double), and the coefficients of
// dx = a * dy + b * (x - mean_hi) + k.
template <typename Acc>
__global__ void bn_grad_finalize(const Acc* __restrict__ part_dy, const Acc* __restrict__ part_dyx, int channels,
                                 int slices, double count, const Acc* __restrict__ mean_lo,
                                 const Acc* __restrict__ inv_std, const double* __restrict__ gamma, int training,
                                 double* __restrict__ dgamma, double* __restrict__ dbeta, Acc* __restrict__ a,
                                 Acc* __restrict__ b, Acc* __restrict__ k) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double sum_dy = 0.0, sum_dyx = 0.0;
  for (int s = 0; s < slices; ++s) {
    const long long p = static_cast<long long>(c) * slices + s;
    sum_dy += static_cast<double>(part_dy[p]);
    sum_dyx += static_cast<double>(part_dyx[p]);
  }
  const double inv = inv_std[c];
  const double lo = mean_lo[c];
  const double dg = inv * (sum_dyx - lo * sum_dy);  // sum(dy * x_hat)
  dgamma[c] = dg;
  dbeta[c] = sum_dy;
  const double ac = gamma[c] * inv;
  // dx = a * (dy - dbeta / m - x_hat * dgamma / m) with x_hat = (x - mean_hi - mean_lo) * inv
  const double bc = training ? -ac * inv * dg / count : 0.0;
  const double kc = training ? -ac * sum_dy / count - bc * lo : 0.0;
  a[c] = static_cast<Acc>(ac);
  b[c] = static_cast<Acc>(bc);
  k[c] = static_cast<Acc>(kc);
}
