// Test kernels for CUDA's vector types on the host harness: sizes and
// alignments, member order, make_<type>, and vector loads/stores through
// reinterpret_cast.  Valid CUDA (the NVRTC gate compiles this file).

// CUDA 13 deprecates the 4-wide 64-bit types in favour of *_16a / *_32a; their
// layout under CUDA 12's name is what is tested here.
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 13
#pragma nv_diag_suppress deprecated_entity_with_custom_message
#endif

template <typename T>
__device__ void record_layout(int* out, int& k) {
  out[k++] = static_cast<int>(sizeof(T));
  out[k++] = static_cast<int>(alignof(T));
}

// out: sizeof and alignof of the 48 types, in the order below.
extern "C" __global__ void vector_layouts(int* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int k = 0;
  record_layout<char1>(out, k), record_layout<char2>(out, k), record_layout<char3>(out, k), record_layout<char4>(out, k);
  record_layout<uchar1>(out, k), record_layout<uchar2>(out, k), record_layout<uchar3>(out, k), record_layout<uchar4>(out, k);
  record_layout<short1>(out, k), record_layout<short2>(out, k), record_layout<short3>(out, k), record_layout<short4>(out, k);
  record_layout<ushort1>(out, k), record_layout<ushort2>(out, k), record_layout<ushort3>(out, k);
  record_layout<ushort4>(out, k);
  record_layout<int1>(out, k), record_layout<int2>(out, k), record_layout<int3>(out, k), record_layout<int4>(out, k);
  record_layout<uint1>(out, k), record_layout<uint2>(out, k), record_layout<uint3>(out, k), record_layout<uint4>(out, k);
  record_layout<long1>(out, k), record_layout<long2>(out, k), record_layout<long3>(out, k), record_layout<long4>(out, k);
  record_layout<ulong1>(out, k), record_layout<ulong2>(out, k), record_layout<ulong3>(out, k), record_layout<ulong4>(out, k);
  record_layout<longlong1>(out, k), record_layout<longlong2>(out, k), record_layout<longlong3>(out, k);
  record_layout<longlong4>(out, k);
  record_layout<ulonglong1>(out, k), record_layout<ulonglong2>(out, k), record_layout<ulonglong3>(out, k);
  record_layout<ulonglong4>(out, k);
  record_layout<float1>(out, k), record_layout<float2>(out, k), record_layout<float3>(out, k), record_layout<float4>(out, k);
  record_layout<double1>(out, k), record_layout<double2>(out, k), record_layout<double3>(out, k);
  record_layout<double4>(out, k);
}

// out[i] = reversed float4 i of x: checks member order x, y, z, w and 16-byte accesses.
extern "C" __global__ void reverse_float4(const float* __restrict__ x, float* __restrict__ out, int n4) {
  const float4* in = reinterpret_cast<const float4*>(x);
  float4* dst = reinterpret_cast<float4*>(out);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += blockDim.x * gridDim.x) {
    const float4 v = in[i];
    dst[i] = make_float4(v.w, v.z, v.y, v.x);
  }
}

// out[i] = (x.y, x.x) of double2 i, through __ldg.
extern "C" __global__ void swap_double2(const double* __restrict__ x, double* __restrict__ out, int n2) {
  const double2* in = reinterpret_cast<const double2*>(x);
  double2* dst = reinterpret_cast<double2*>(out);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n2; i += blockDim.x * gridDim.x) {
    const double2 v = __ldg(in + i);
    dst[i] = make_double2(v.y, v.x);
  }
}

// Each make_<type> with distinct values; out holds the members in order.
extern "C" __global__ void make_vectors(long long* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int k = 0;
  const char4 c = make_char4(-1, 2, -3, 4);
  const uchar3 uc = make_uchar3(250, 251, 252);
  const short2 s = make_short2(-300, 301);
  const ushort4 us = make_ushort4(65535, 1, 2, 3);
  const int3 i3 = make_int3(-7, 8, -9);
  const uint2 u2 = make_uint2(4000000000u, 5);
  const long2 l2 = make_long2(-10000000000LL, 11);
  const ulong1 ul = make_ulong1(12);
  const longlong4 ll = make_longlong4(-13, 14, -15, 16);
  const ulonglong3 ull = make_ulonglong3(17, 18, 19);
  const float3 f = make_float3(0.5f, -1.5f, 2.5f);
  const double4 d = make_double4(3.0, -4.0, 5.0, -6.0);
  const int2 i2 = make_int2(20, 21);
  const int4 i4 = make_int4(22, 23, 24, 25);
  const float2 f2 = make_float2(26.0f, 27.0f);
  out[k++] = c.x, out[k++] = c.y, out[k++] = c.z, out[k++] = c.w;
  out[k++] = uc.x, out[k++] = uc.y, out[k++] = uc.z;
  out[k++] = s.x, out[k++] = s.y;
  out[k++] = us.x, out[k++] = us.y, out[k++] = us.z, out[k++] = us.w;
  out[k++] = i3.x, out[k++] = i3.y, out[k++] = i3.z;
  out[k++] = u2.x, out[k++] = u2.y;
  out[k++] = l2.x, out[k++] = l2.y;
  out[k++] = static_cast<long long>(ul.x);
  out[k++] = ll.x, out[k++] = ll.y, out[k++] = ll.z, out[k++] = ll.w;
  out[k++] = static_cast<long long>(ull.x), out[k++] = static_cast<long long>(ull.y);
  out[k++] = static_cast<long long>(ull.z);
  out[k++] = static_cast<long long>(f.x * 2), out[k++] = static_cast<long long>(f.y * 2);
  out[k++] = static_cast<long long>(f.z * 2);
  out[k++] = static_cast<long long>(d.x), out[k++] = static_cast<long long>(d.y);
  out[k++] = static_cast<long long>(d.z), out[k++] = static_cast<long long>(d.w);
  out[k++] = i2.x, out[k++] = i2.y;
  out[k++] = i4.x, out[k++] = i4.y, out[k++] = i4.z, out[k++] = i4.w;
  out[k++] = static_cast<long long>(f2.x), out[k++] = static_cast<long long>(f2.y);
}
