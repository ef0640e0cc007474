// relprop's CUDA epilogue kernels (see kernels.h).  Only CUDA headers: compiles with plain nvcc.
//
// Arithmetic runs in the accumulator type A (float for fp32/fp16/bf16, double for fp64) in the
// same order as the PyTorch reference (relprop/ops.py), so fp32/fp64 results match it up to
// the summation order of the per-sample reductions.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "kernels.h"

namespace {

template <class T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_acc(typename acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// safe divide: a / b where b != 0, exactly 0 where b == 0
template <class A> __device__ __forceinline__ A sd(A a, A b) { return b == A(0) ? A(0) : a / b; }
// Zennit's stabiliser z + eps * sign(z) with sign(0) = +1
template <class A> __device__ __forceinline__ A stab(A z, A eps) { return z + (z >= A(0) ? eps : -eps); }

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t total) {
  int64_t b = (total + kThreads - 1) / kThreads;
  if (b > (1 << 20)) b = 1 << 20;   // grid-stride loops cover the rest
  return b < 1 ? 1u : unsigned(b);
}

// every index below total, plus one grid stride, fits in int32
inline bool fits32(int64_t total) { return total + int64_t(kThreads) * (1 << 20) < (int64_t(1) << 31); }

inline dim3 reduce_grid(int64_t B, int64_t n) {
  int64_t gx = (n + kThreads * 4 - 1) / (kThreads * 4);
  if (gx > 1024) gx = 1024;
  if (gx < 1) gx = 1;
  int64_t gy = B > 65535 ? 65535 : (B < 1 ? 1 : B);
  return dim3(unsigned(gx), unsigned(gy));
}

template <class V> __device__ __forceinline__ V warp_sum(V v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sum of two values; the result is valid in thread 0.
template <class U, class V> __device__ __forceinline__ void block_sum2(U& a, V& b) {
  __shared__ U sa[kThreads / 32];
  __shared__ V sb[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();   // a previous call's warp 0 may still be reading sa / sb
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : U(0);
    b = lane < kThreads / 32 ? sb[lane] : V(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// I: the index type, 32-bit whenever the tensor allows (divisions by runtime 32-bit values are
// several times cheaper than 64-bit ones).
template <class T, class I>
__global__ void __launch_bounds__(kThreads) k_split_scale(
    int rule, const T* __restrict__ z, int nz, const T* __restrict__ r, const T* __restrict__ bias,
    T* __restrict__ s1, T* __restrict__ s2, I total, I O, I inner,
    typename acc<T>::type alpha, typename acc<T>::type beta, typename acc<T>::type eps) {
  using A = typename acc<T>::type;
  const A zero(0);
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    const I q = i / inner, hw = i - q * inner;
    const I b = q / O, o = q - b * O;
    const T* zp = z + (int64_t(b) * nz * O + o) * inner + hw;
    const A rr = to_acc(r[i]);
    A z1 = to_acc(zp[0]);
    if (rule == RELPROP_RAP_CONV) {
      const A z2 = to_acc(zp[O * inner]);
      s1[i] = from_acc<T>(sd(rr > zero ? rr : zero, z1));
      s2[i] = from_acc<T>(sd(rr, z1 + z2) + sd(rr < zero ? rr : zero, z2));
    } else if (rule == RELPROP_RAP_LINEAR) {
      const A z2 = to_acc(zp[O * inner]);
      s1[i] = from_acc<T>(sd(rr, z1));
      s2[i] = from_acc<T>(sd(rr, z1 + z2));
    } else if (rule == RELPROP_ALPHABETA) {
      const A bb = bias ? to_acc(bias[o]) : zero;
      if (bias) z1 = z1 + (bb > zero ? bb : zero);
      s1[i] = from_acc<T>(alpha * rr / stab(z1, eps));
      if (nz == 2) {
        A z2 = to_acc(zp[O * inner]);
        if (bias) z2 = z2 + (bb < zero ? bb : zero);
        s2[i] = from_acc<T>(-beta * rr / stab(z2, eps));
      }
    } else {   // RELPROP_ALPHABETA_REPO
      s1[i] = from_acc<T>(alpha * sd(rr, z1));
      if (nz == 2) s2[i] = from_acc<T>(-beta * sd(rr, to_acc(zp[O * inner])));
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) k_mul_sum_count(
    const T* __restrict__ x, const T* g, T* c, typename acc<T>::type* __restrict__ sum,
    unsigned long long* __restrict__ count, int64_t B, int64_t n) {
  using A = typename acc<T>::type;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    A s(0);
    unsigned long long k = 0;
    const int64_t base = b * n;
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
      T v = g[base + j];
      if (x) v = from_acc<T>(to_acc(x[base + j]) * to_acc(v));
      if (c) c[base + j] = v;
      const A a = to_acc(v);
      s += a;
      k += a != A(0);
    }
    block_sum2(s, k);
    if (threadIdx.x == 0) {
      atomicAdd(sum + b, s);
      atomicAdd(count + b, k);
    }
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) k_shift(
    const T* c, const typename acc<T>::type* __restrict__ sum, const T* __restrict__ target,
    const unsigned long long* __restrict__ count, T* out, I total, I n) {
  using A = typename acc<T>::type;
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    const I b = i / n;
    const A v = to_acc(c[i]);
    if (v != A(0)) {
      const A excess = sum ? to_acc(from_acc<T>(sum[b])) - to_acc(target[b]) : to_acc(target[b]);
      const A delta = to_acc(from_acc<T>(sd(excess, A(count[b]))));
      out[i] = from_acc<T>(v - delta);
    } else {
      out[i] = c[i];
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) k_sign_sums(
    const T* __restrict__ r, typename acc<T>::type* __restrict__ pos, typename acc<T>::type* __restrict__ neg,
    int64_t B, int64_t n) {
  using A = typename acc<T>::type;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    A p(0), q(0);
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
      const A v = to_acc(r[b * n + j]);
      if (v > A(0)) p += v; else if (v < A(0)) q += v;
    }
    block_sum2(p, q);
    if (threadIdx.x == 0) {
      atomicAdd(pos + b, p);
      atomicAdd(neg + b, q);
    }
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) k_ae(
    const T* __restrict__ r, const typename acc<T>::type* __restrict__ pos,
    const typename acc<T>::type* __restrict__ neg, T* __restrict__ t, T* __restrict__ o, I total, I n) {
  using A = typename acc<T>::type;
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    const I b = i / n;
    const A v = to_acc(r[i]);
    const A P = to_acc(from_acc<T>(pos[b])), N = to_acc(from_acc<T>(neg[b]));
    t[i] = from_acc<T>(sd(v > A(0) ? v : A(0), P));
    o[i] = from_acc<T>(-sd(v < A(0) ? v : A(0), N));
  }
}

// ---- typed launchers
template <class T>
void launch_split_scale(int rule, const void* z, int nz, const void* r, const void* bias, void* s1, void* s2,
                        int64_t outer, int64_t O, int64_t inner, double alpha, double beta, double eps,
                        cudaStream_t stream) {
  using A = typename acc<T>::type;
  const int64_t total = outer * O * inner;
  if (total == 0) return;
  // 32-bit indices when every index (Z has nz * total elements) fits, with room for the grid stride
  if (nz * total + int64_t(kThreads) * (1 << 20) < (int64_t(1) << 31))
    k_split_scale<T, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
        rule, static_cast<const T*>(z), nz, static_cast<const T*>(r), static_cast<const T*>(bias),
        static_cast<T*>(s1), static_cast<T*>(s2), int32_t(total), int32_t(O), int32_t(inner), A(alpha), A(beta),
        A(eps));
  else
    k_split_scale<T, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
        rule, static_cast<const T*>(z), nz, static_cast<const T*>(r), static_cast<const T*>(bias),
        static_cast<T*>(s1), static_cast<T*>(s2), total, O, inner, A(alpha), A(beta), A(eps));
}

template <class T>
void launch_mul_sum_count(const void* x, const void* g, void* c, void* sum, unsigned long long* count,
                          int64_t B, int64_t n, cudaStream_t stream) {
  using A = typename acc<T>::type;
  if (B * n == 0) return;
  k_mul_sum_count<T><<<reduce_grid(B, n), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(g), static_cast<T*>(c), static_cast<A*>(sum), count, B, n);
}

template <class T>
void launch_shift(const void* c, const void* sum, const void* target, const unsigned long long* count, void* out,
                  int64_t B, int64_t n, cudaStream_t stream) {
  using A = typename acc<T>::type;
  if (B * n == 0) return;
  if (fits32(B * n))
    k_shift<T, int32_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        static_cast<const T*>(c), static_cast<const A*>(sum), static_cast<const T*>(target), count,
        static_cast<T*>(out), int32_t(B * n), int32_t(n));
  else
    k_shift<T, int64_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        static_cast<const T*>(c), static_cast<const A*>(sum), static_cast<const T*>(target), count,
        static_cast<T*>(out), B * n, n);
}

template <class T>
void launch_ae(const void* r, void* t, void* o, void* pos, void* neg, int64_t B, int64_t n, cudaStream_t stream) {
  using A = typename acc<T>::type;
  if (B * n == 0) return;
  cudaMemsetAsync(pos, 0, sizeof(A) * B, stream);
  cudaMemsetAsync(neg, 0, sizeof(A) * B, stream);
  k_sign_sums<T><<<reduce_grid(B, n), kThreads, 0, stream>>>(static_cast<const T*>(r), static_cast<A*>(pos),
                                                             static_cast<A*>(neg), B, n);
  if (fits32(B * n))
    k_ae<T, int32_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        static_cast<const T*>(r), static_cast<const A*>(pos), static_cast<const A*>(neg), static_cast<T*>(t),
        static_cast<T*>(o), int32_t(B * n), int32_t(n));
  else
    k_ae<T, int64_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        static_cast<const T*>(r), static_cast<const A*>(pos), static_cast<const A*>(neg), static_cast<T*>(t),
        static_cast<T*>(o), B * n, n);
}

#define RELPROP_DISPATCH(dtype, fn, ...)                                  \
  switch (dtype) {                                                        \
    case RELPROP_F32: fn<float>(__VA_ARGS__); break;                      \
    case RELPROP_F64: fn<double>(__VA_ARGS__); break;                     \
    case RELPROP_F16: fn<__half>(__VA_ARGS__); break;                     \
    case RELPROP_BF16: fn<__nv_bfloat16>(__VA_ARGS__); break;             \
    default: return cudaErrorInvalidValue;                                \
  }                                                                       \
  return cudaGetLastError();

}  // namespace

extern "C" cudaError_t relprop_split_scale_epilogue(int dtype, int rule, const void* z, int nz, const void* r,
                                                    const void* bias, void* s1, void* s2, int64_t outer, int64_t O,
                                                    int64_t inner, double alpha, double beta, double eps,
                                                    cudaStream_t stream) {
  if (rule < RELPROP_RAP_CONV || rule > RELPROP_ALPHABETA_REPO || (nz != 1 && nz != 2) || inner <= 0 || O <= 0)
    return cudaErrorInvalidValue;
  if (nz == 1 && rule < RELPROP_ALPHABETA) return cudaErrorInvalidValue;
  RELPROP_DISPATCH(dtype, launch_split_scale, rule, z, nz, r, bias, s1, s2, outer, O, inner, alpha, beta, eps, stream)
}

extern "C" cudaError_t relprop_mul_sum_count(int dtype, const void* x, const void* g, void* c, void* sum,
                                             unsigned long long* count, int64_t B, int64_t n, cudaStream_t stream) {
  RELPROP_DISPATCH(dtype, launch_mul_sum_count, x, g, c, sum, count, B, n, stream)
}

extern "C" cudaError_t relprop_shift(int dtype, const void* c, const void* sum, const void* target,
                                     const unsigned long long* count, void* out, int64_t B, int64_t n,
                                     cudaStream_t stream) {
  RELPROP_DISPATCH(dtype, launch_shift, c, sum, target, count, out, B, n, stream)
}

extern "C" cudaError_t relprop_ae_masses(int dtype, const void* r, void* t, void* o, void* pos, void* neg,
                                         int64_t B, int64_t n, cudaStream_t stream) {
  RELPROP_DISPATCH(dtype, launch_ae, r, t, o, pos, neg, B, n, stream)
}
