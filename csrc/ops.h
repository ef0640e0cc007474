// relprop's fused relevance ops: the device-independent drivers (ATen GEMMs) shared by the CPU
// (ops.cpp) and CUDA (cuda_ops.cpp) registrations, parametrised by the device's epilogues.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace relprop {

enum Rule { kRapConv = 0, kRapLinear = 1, kAlphaBeta = 2, kAlphaBetaRepo = 3 };

struct Epilogues {
  // S1 (and S2 when nz == 2) from the contiguous Z laid out [outer][nz][O][inner] and R.
  void (*split_scale)(const at::Tensor& z, int64_t nz, const at::Tensor& r, const std::optional<at::Tensor>& bias,
                      at::Tensor& s1, at::Tensor& s2, int64_t outer, int64_t O, int64_t inner, int rule,
                      double alpha, double beta, double eps);
  // C = x * g (may overwrite g), then with shift_to (B,) the uniform per-sample shift.
  at::Tensor (*mul_shift)(const at::Tensor& x, at::Tensor& g, const std::optional<at::Tensor>& shift_to);
  at::Tensor (*shift_nonzero)(const at::Tensor& c, const at::Tensor& excess);
  std::tuple<at::Tensor, at::Tensor> (*ae_masses)(const at::Tensor& r);
};

int parse_rule(std::string_view rule);

std::tuple<at::Tensor, at::Tensor> split_scale(const Epilogues& ep, const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& r, const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, std::string_view rule, double alpha,
                                               double beta, double eps);

at::Tensor split_backward(const Epilogues& ep, const at::Tensor& x, const at::Tensor& s1,
                          const std::optional<at::Tensor>& s2, const at::Tensor& weight, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, std::string_view split,
                          const std::optional<at::Tensor>& shift_to);

// An output buffer the kernels write in full: uninitialised, or filled with NaN when the
// environment variable RELPROP_POISON_OUTPUTS is set (non-empty, not "0"), so a test sees any
// element a kernel forgets to write (tests/test_primitives.py sets it).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// per-sample shapes: B = size(0), n = numel / B
void check_per_sample(const at::Tensor& t, const at::Tensor& per_sample, const char* what);

}  // namespace relprop
