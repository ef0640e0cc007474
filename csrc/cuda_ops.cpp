// CUDA registrations of torch.ops.relprop.*: the drivers of ops.h (ATen GEMMs on the current
// stream) with the epilogues of kernels.cu, launched through the torch-free launchers of
// kernels.h on the current CUDA stream.
#include "kernels.h"
#include "ops.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace relprop {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return RELPROP_F32;
    case at::kDouble: return RELPROP_F64;
    case at::kHalf: return RELPROP_F16;
    case at::kBFloat16: return RELPROP_BF16;
    default: TORCH_CHECK(false, "relprop: CUDA ops support float32, float64, float16 and bfloat16, got ", t);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "relprop: CUDA launch of ", what, " failed: ", cudaGetErrorString(e));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void cuda_split_scale(const at::Tensor& z, int64_t nz, const at::Tensor& r, const std::optional<at::Tensor>& bias,
                      at::Tensor& s1, at::Tensor& s2, int64_t outer, int64_t O, int64_t inner, int rule,
                      double alpha, double beta, double eps) {
  check(relprop_split_scale_epilogue(dtype_code(r.scalar_type()), rule, z.const_data_ptr(), int(nz),
                                     r.const_data_ptr(), bias.has_value() ? bias->const_data_ptr() : nullptr,
                                     s1.mutable_data_ptr(), nz == 2 ? s2.mutable_data_ptr() : nullptr, outer, O,
                                     inner, alpha, beta, eps, stream_of(r)),
        "split_scale epilogue");
}

at::Tensor cuda_mul_shift(const at::Tensor& x, at::Tensor& g, const std::optional<at::Tensor>& shift_to) {
  if (!shift_to.has_value()) return g.mul_(x);
  const int64_t B = x.size(0), n = B == 0 ? 0 : x.numel() / B;
  at::Tensor sum = at::zeros({B}, x.options().dtype(acc_type(x.scalar_type())));
  at::Tensor count = at::zeros({B}, x.options().dtype(at::kLong));
  const int code = dtype_code(x.scalar_type());
  const cudaStream_t s = stream_of(x);
  auto* cnt = reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>());
  check(relprop_mul_sum_count(code, x.const_data_ptr(), g.const_data_ptr(), g.mutable_data_ptr(),
                              sum.mutable_data_ptr(), cnt, B, n, s), "mul_sum_count");
  check(relprop_shift(code, g.const_data_ptr(), sum.const_data_ptr(), shift_to->const_data_ptr(), cnt,
                      g.mutable_data_ptr(), B, n, s), "shift");
  return g;
}

at::Tensor cuda_shift_nonzero(const at::Tensor& c_, const at::Tensor& excess_) {
  const at::Tensor c = c_.contiguous(), excess = excess_.contiguous();
  at::Tensor out = empty_output(c.sizes(), c.options());
  const int64_t B = c.size(0), n = B == 0 ? 0 : c.numel() / B;
  at::Tensor sum = at::zeros({B}, c.options().dtype(acc_type(c.scalar_type())));
  at::Tensor count = at::zeros({B}, c.options().dtype(at::kLong));
  const int code = dtype_code(c.scalar_type());
  const cudaStream_t s = stream_of(c);
  auto* cnt = reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>());
  check(relprop_mul_sum_count(code, nullptr, c.const_data_ptr(), nullptr, sum.mutable_data_ptr(), cnt, B, n, s),
        "sum_count");
  check(relprop_shift(code, c.const_data_ptr(), nullptr, excess.const_data_ptr(), cnt, out.mutable_data_ptr(), B, n,
                      s), "shift");
  return out;
}

std::tuple<at::Tensor, at::Tensor> cuda_ae_masses(const at::Tensor& r_) {
  const at::Tensor r = r_.contiguous();
  at::Tensor t = empty_output(r.sizes(), r.options()), o = empty_output(r.sizes(), r.options());
  const int64_t B = r.size(0), n = B == 0 ? 0 : r.numel() / B;
  at::Tensor scratch = at::empty({2, B}, r.options().dtype(acc_type(r.scalar_type())));
  check(relprop_ae_masses(dtype_code(r.scalar_type()), r.const_data_ptr(), t.mutable_data_ptr(),
                          o.mutable_data_ptr(), scratch[0].mutable_data_ptr(), scratch[1].mutable_data_ptr(), B, n,
                          stream_of(r)), "ae_masses");
  return {t, o};
}

const Epilogues kCuda{cuda_split_scale, cuda_mul_shift, cuda_shift_nonzero, cuda_ae_masses};

std::tuple<at::Tensor, at::Tensor> split_scale_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& r, const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, std::string_view rule, double alpha,
                                                    double beta, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return split_scale(kCuda, x, weight, r, bias, stride, padding, dilation, rule, alpha, beta, eps);
}

at::Tensor split_backward_cuda(const at::Tensor& x, const at::Tensor& s1, const std::optional<at::Tensor>& s2,
                               const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, std::string_view split,
                               const std::optional<at::Tensor>& shift_to) {
  const c10::cuda::CUDAGuard guard(x.device());
  return split_backward(kCuda, x, s1, s2, weight, stride, padding, dilation, split, shift_to);
}

at::Tensor shift_nonzero_cuda(const at::Tensor& c, const at::Tensor& excess) {
  const c10::cuda::CUDAGuard guard(c.device());
  check_per_sample(c, excess, "excess");
  return cuda_shift_nonzero(c, excess);
}

std::tuple<at::Tensor, at::Tensor> ae_masses_cuda(const at::Tensor& r) {
  const c10::cuda::CUDAGuard guard(r.device());
  TORCH_CHECK(r.dim() >= 1, "relprop: ae_masses expects a batched tensor");
  return cuda_ae_masses(r);
}

}  // namespace
}  // namespace relprop

TORCH_LIBRARY_IMPL(relprop, CUDA, m) {
  m.impl("split_scale", &relprop::split_scale_cuda);
  m.impl("split_backward", &relprop::split_backward_cuda);
  m.impl("shift_nonzero", &relprop::shift_nonzero_cuda);
  m.impl("ae_masses", &relprop::ae_masses_cuda);
}
