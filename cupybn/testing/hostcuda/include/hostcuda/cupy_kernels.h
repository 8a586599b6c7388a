// hostcuda/cupy_kernels.h: what CuPy's ElementwiseKernel and ReductionKernel
// give their kernel code (the float16 type, the CArray and CIndexer views, the
// CUPY_FOR loop), for the host versions of those classes
// (cupybn/testing/hostcuda/_cupy_kernels.py).  Written from CuPy's documented
// behaviour; CuPy's nextafter(float16, float16) is not provided.
//
// The generated kernels receive every array as a data pointer plus its shape
// and byte strides in one int64 metadata array, and build these views from
// them.  The names and member functions follow CuPy's CArray and CIndexer, so
// that operation strings written for CuPy compile unchanged:
//   CArray<T, ndim>   size(), shape(), strides(), a[i] (i: C-order linear
//                     index), a[idx] (idx: ptrdiff_t[ndim] multi-index)
//   CIndexer<ndim>    size(), set(i), get() (the multi-index of i)
// All index arithmetic is in 64 bits (ptrdiff_t).  CuPy's contiguity and
// 32-bit-indexing template flags are accepted and ignored: every access goes
// through the strides, which gives the same elements.
#ifndef CUPYBN_HOSTCUDA_CUPY_KERNELS_H
#define CUPYBN_HOSTCUDA_CUPY_KERNELS_H

#include <cstddef>

// CuPy's float16: half-precision storage that computes as float.  Arithmetic
// and comparisons convert both sides to float (so `x * x` is not rounded to
// half until it is stored back), and a float converts implicitly on the way
// in, rounding to nearest even; other types convert explicitly, as with
// CuPy's float16.  Arrays of float16 are passed as __half* and viewed as
// float16, which has the same size and bits.
class float16 {
 public:
  float16() = default;
  __device__ float16(float v) : data_(__float2half_rn(v)) {}
  explicit __device__ float16(bool v) : data_(__float2half_rn(v ? 1.0f : 0.0f)) {}
  explicit __device__ float16(double v) : data_(__double2half(v)) {}
  explicit __device__ float16(int v) : data_(__int2half_rn(v)) {}
  explicit __device__ float16(unsigned int v) : data_(__uint2half_rn(v)) {}
  explicit __device__ float16(long long v) : data_(__ll2half_rn(v)) {}
  explicit __device__ float16(unsigned long long v) : data_(__ull2half_rn(v)) {}
  explicit __device__ float16(const __half& v) : data_(v) {}

  __device__ operator float() const { return __half2float(data_); }

  static const unsigned short nan = 0x7e00u;

  __device__ int iszero() const { return (bits() & 0x7fffu) == 0; }
  __device__ int isnan() const { return (bits() & 0x7c00u) == 0x7c00u && (bits() & 0x03ffu) != 0; }
  __device__ int isinf() const { return (bits() & 0x7fffu) == 0x7c00u; }
  __device__ int isfinite() const { return (bits() & 0x7c00u) != 0x7c00u; }
  __device__ int signbit() const { return (bits() & 0x8000u) != 0; }

  // Compound assignment computes in float (or wider) and rounds once on storing.
  template <typename T>
  __device__ float16& operator+=(const T& rhs) { return *this = *this + rhs; }
  template <typename T>
  __device__ float16& operator-=(const T& rhs) { return *this = *this - rhs; }
  template <typename T>
  __device__ float16& operator*=(const T& rhs) { return *this = *this * rhs; }
  template <typename T>
  __device__ float16& operator/=(const T& rhs) { return *this = *this / rhs; }

  friend __device__ float16 copysign(float16 x, float16 y) {
    return float16(__ushort_as_half(static_cast<unsigned short>((x.bits() & 0x7fffu) | (y.bits() & 0x8000u))));
  }

 private:
  __device__ unsigned short bits() const { return __half_as_ushort(data_); }

  __half data_;
};
static_assert(sizeof(float16) == sizeof(__half) && alignof(float16) == alignof(__half),
              "float16 views __half arrays in place");

// As in CuPy: the float function's result, stored back as float16.
__device__ inline float16 min(float16 x, float16 y) { return float16(min(float(x), float(y))); }
__device__ inline float16 max(float16 x, float16 y) { return float16(max(float(x), float(y))); }
__device__ inline float16 fmin(float16 x, float16 y) { return float16(fminf(float(x), float(y))); }
__device__ inline float16 fmax(float16 x, float16 y) { return float16(fmaxf(float(x), float(y))); }
__device__ inline int iszero(float16 x) { return x.iszero(); }
__device__ inline int isnan(float16 x) { return x.isnan(); }
__device__ inline int isinf(float16 x) { return x.isinf(); }
__device__ inline int isfinite(float16 x) { return x.isfinite(); }
__device__ inline int signbit(float16 x) { return x.signbit(); }

// The grid-stride loop of CuPy's elementwise kernels: each thread visits
// indices tid, tid + nthreads, ... below n.
#define CUPY_FOR(i, n)                                                              \
  for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       i < static_cast<ptrdiff_t>(n); i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x)

template <typename T, int _ndim, bool _c_contiguous = false, bool _use_32bit_indexing = false>
class CArray {
 public:
  static const int ndim = _ndim;

  template <typename Int1, typename Int2>
  __device__ CArray(T* data, const Int1* shape, const Int2* strides) : data_(data), size_(1) {
    for (int d = 0; d < ndim; ++d) {
      shape_[d] = static_cast<ptrdiff_t>(shape[d]);
      strides_[d] = static_cast<ptrdiff_t>(strides[d]);
      size_ *= shape_[d];
    }
  }

  __device__ ptrdiff_t size() const { return size_; }
  __device__ const ptrdiff_t* shape() const { return shape_; }
  __device__ const ptrdiff_t* strides() const { return strides_; }

  // Element at a multi-index.  A const view gives const elements, as in CuPy
  // (the views of input parameters are const).  The ptrdiff_t overloads also
  // take a braced list of mixed integer types: a[{i, j}].
  __device__ T& operator[](const ptrdiff_t (&idx)[ndim]) { return *element(multi_index_offset(idx)); }
  __device__ const T& operator[](const ptrdiff_t (&idx)[ndim]) const {
    return *element(multi_index_offset(idx));
  }
  template <typename Int>
  __device__ T& operator[](const Int (&idx)[ndim]) {
    return *element(multi_index_offset(idx));
  }
  template <typename Int>
  __device__ const T& operator[](const Int (&idx)[ndim]) const {
    return *element(multi_index_offset(idx));
  }

  // Element at a linear index, counted in C order over the shape.
  __device__ T& operator[](ptrdiff_t i) { return *element(linear_index_offset(i)); }
  __device__ const T& operator[](ptrdiff_t i) const { return *element(linear_index_offset(i)); }

 private:
  template <typename Int>
  __device__ ptrdiff_t multi_index_offset(const Int (&idx)[ndim]) const {
    ptrdiff_t offset = 0;
    for (int d = 0; d < ndim; ++d) offset += strides_[d] * static_cast<ptrdiff_t>(idx[d]);
    return offset;
  }

  __device__ ptrdiff_t linear_index_offset(ptrdiff_t i) const {
    ptrdiff_t offset = 0;
    for (int d = ndim - 1; d > 0; --d) {
      offset += strides_[d] * (i % shape_[d]);
      i /= shape_[d];
    }
    return offset + strides_[0] * i;
  }

  // Byte offsets: strides are in bytes, as NumPy and CuPy count them.
  __device__ T* element(ptrdiff_t byte_offset) const {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(data_) + byte_offset);
  }

  T* data_;
  ptrdiff_t size_;
  ptrdiff_t shape_[ndim];
  ptrdiff_t strides_[ndim];
};

// A 0-d array: one element, whatever the index.
template <typename T, bool _c_contiguous, bool _use_32bit_indexing>
class CArray<T, 0, _c_contiguous, _use_32bit_indexing> {
 public:
  static const int ndim = 0;

  template <typename Int1, typename Int2>
  __device__ CArray(T* data, const Int1*, const Int2*) : data_(data) {}

  __device__ ptrdiff_t size() const { return 1; }
  __device__ const ptrdiff_t* shape() const { return nullptr; }
  __device__ const ptrdiff_t* strides() const { return nullptr; }

  template <typename U>
  __device__ T& operator[](const U&) { return *data_; }
  template <typename U>
  __device__ const T& operator[](const U&) const { return *data_; }

 private:
  T* data_;
};

template <int _ndim, bool _use_32bit_indexing = false>
class CIndexer {
 public:
  static const int ndim = _ndim;

  template <typename Int>
  __device__ explicit CIndexer(const Int* shape) : size_(1) {
    for (int d = 0; d < ndim; ++d) {
      shape_[d] = static_cast<ptrdiff_t>(shape[d]);
      index_[d] = 0;
      size_ *= shape_[d];
    }
  }

  __device__ ptrdiff_t size() const { return size_; }
  __device__ const ptrdiff_t* shape() const { return shape_; }

  // Makes get() the multi-index of the C-order linear index i.
  __device__ void set(ptrdiff_t i) {
    for (int d = ndim - 1; d > 0; --d) {
      index_[d] = i % shape_[d];
      i /= shape_[d];
    }
    index_[0] = i;
  }

  __device__ const ptrdiff_t (&get() const)[ndim] { return index_; }

 private:
  ptrdiff_t size_;
  ptrdiff_t shape_[ndim];
  ptrdiff_t index_[ndim];
};

// The index space of a 0-d loop: a single point.
template <bool _use_32bit_indexing>
class CIndexer<0, _use_32bit_indexing> {
 public:
  static const int ndim = 0;

  template <typename Int>
  __device__ explicit CIndexer(const Int*) {}

  __device__ ptrdiff_t size() const { return 1; }
  __device__ const ptrdiff_t* shape() const { return nullptr; }
  __device__ void set(ptrdiff_t) {}
  __device__ const ptrdiff_t* get() const { return nullptr; }
};

#endif  // CUPYBN_HOSTCUDA_CUPY_KERNELS_H
