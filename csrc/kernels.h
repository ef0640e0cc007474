// relprop's CUDA epilogue kernels: torch-free launchers (raw pointers, sizes, a stream).
//
// The .cu files include only CUDA headers, so every kernel compiles with plain nvcc
// (tests/test_extension.py checks that) and C++ users can link them without torch.  The ATen
// binding (cuda_ops.cpp) allocates the tensors, runs the GEMMs through ATen and calls these.
//
// Layouts (all buffers contiguous, element type given by `dtype`):
//   split-scale: Z is [outer][nz][O][inner] (nz = 2: the output of ONE conv/linear over the
//   concatenated weight [W+; V2]; nz = 1: Z1 only), R, S1, S2 are [outer][O][inner];
//   conv2d: outer = B, inner = H'W'; linear: outer = prod(leading dims), inner = 1.
//   per-sample reductions: tensors are [B][n] (n = numel / B); `acc` buffers hold one
//   accumulator per sample: float for fp32/fp16/bf16, double for fp64.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum relprop_dtype { RELPROP_F32 = 0, RELPROP_F64 = 1, RELPROP_F16 = 2, RELPROP_BF16 = 3 };
enum relprop_rule { RELPROP_RAP_CONV = 0, RELPROP_RAP_LINEAR = 1, RELPROP_ALPHABETA = 2, RELPROP_ALPHABETA_REPO = 3 };

// S1 (and S2 when nz == 2) from Z and R per `rule` (see relprop/ops.py split_scale).
// bias (length O, may be NULL) is used by RELPROP_ALPHABETA only: Z1 += b+, Z2 += b-.
cudaError_t relprop_split_scale_epilogue(int dtype, int rule, const void* z, int nz, const void* r,
                                         const void* bias, void* s1, void* s2, int64_t outer, int64_t O,
                                         int64_t inner, double alpha, double beta, double eps,
                                         cudaStream_t stream);

// c = x ? x * g : g (written to c when c != NULL; c may alias g), and per sample
// sum[b] += sum(c), count[b] += #{c != 0}.  sum / count must be zeroed by the caller.
cudaError_t relprop_mul_sum_count(int dtype, const void* x, const void* g, void* c, void* sum,
                                  unsigned long long* count, int64_t B, int64_t n, cudaStream_t stream);

// out = c - [c != 0] * SD(excess[b], count[b]) with excess[b] = (sum ? T(sum[b]) : 0) - target[b]
// when `sum` is given (the split-backward shift, target = shift_to), else excess[b] = target[b]
// (shift_nonzero).  out may alias c.
cudaError_t relprop_shift(int dtype, const void* c, const void* sum, const void* target,
                          const unsigned long long* count, void* out, int64_t B, int64_t n,
                          cudaStream_t stream);

// AE masses: t = SD(R+, sum R+), o = -SD(R-, sum R-) per sample.  pos / neg are B-long
// accumulator scratch buffers the launcher zeroes.
cudaError_t relprop_ae_masses(int dtype, const void* r, void* t, void* o, void* pos, void* neg,
                              int64_t B, int64_t n, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
