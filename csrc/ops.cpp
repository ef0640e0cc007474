// relprop's op library: the schemas of torch.ops.relprop.*, the device-independent drivers
// (the GEMMs run through ATen over the concatenated sign-split weight [W+; V2]) and the CPU
// epilogues in plain C++ (the same arithmetic as csrc/kernels.cu and relprop/ops.py).
//
// Ops (semantics: relprop/ops.py; SD(a, b) = a / b where b != 0 else 0):
//   split_scale(x, weight, r, bias?, stride, padding, dilation, rule, alpha, beta, eps) -> (S1, S2)
//   split_backward(x, s1, s2?, weight, stride, padding, dilation, split, shift_to?) -> C
//   shift_nonzero(c, excess) -> c - [c != 0] * SD(excess, #nonzero(c))      (excess: (B,))
//   ae_masses(r) -> (SD(R+, sum R+), -SD(R-, sum R-))
// `weight` is either the layer weight W (O rows: the op builds the split itself) or the
// concatenated split [W+; V2] (2*O rows, e.g. relprop's cached LinearMap.split); a 4-D weight
// means Conv2d (groups = 1), a 2-D one Linear.  With the alpha-beta rules and beta == 0 only
// Z1 is computed and S2 is returned as an empty tensor (numel 0).
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace relprop {

int parse_rule(std::string_view rule) {
  if (rule == "rap-conv") return kRapConv;
  if (rule == "rap-linear") return kRapLinear;
  if (rule == "alphabeta") return kAlphaBeta;
  if (rule == "alphabeta-repo") return kAlphaBetaRepo;
  TORCH_CHECK(false, "relprop: unknown split rule '", std::string(rule),
              "' (expected rap-conv, rap-linear, alphabeta, alphabeta-repo)");
}

namespace {

bool split_is_pa(std::string_view split) {
  TORCH_CHECK(split == "pa" || split == "pn", "relprop: split must be 'pa' ([W+; |W-|]) or 'pn' ([W+; W-]), got '",
              std::string(split), "'");
  return split == "pa";
}

// [W+; V2] from W (O rows) or the given split (2*O rows); `first_only` -> W+ alone.
at::Tensor split_weight(const at::Tensor& w, int64_t O, bool pa, bool first_only) {
  if (w.size(0) == 2 * O) return first_only ? w.narrow(0, 0, O) : w;
  TORCH_CHECK(w.size(0) == O, "relprop: weight has ", w.size(0), " output rows; expected ", O, " (W) or ", 2 * O,
              " ([W+; V2])");
  at::Tensor pos = w.clamp_min(0);
  if (first_only) return pos;
  return at::cat({pos, pa ? w.neg().clamp_min(0) : w.clamp_max(0)}, 0);
}

void check_layer(const at::Tensor& x, const at::Tensor& w, const at::Tensor& t, const char* what) {
  TORCH_CHECK(w.dim() == 4 || w.dim() == 2, "relprop: weight must be 4-D (Conv2d) or 2-D (Linear), got ", w.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.scalar_type() == t.scalar_type(),
              "relprop: x, weight and ", what, " must share a dtype");
  TORCH_CHECK(x.device() == w.device() && x.device() == t.device(), "relprop: x, weight and ", what,
              " must be on one device");
  if (w.dim() == 4) {
    TORCH_CHECK(x.dim() == 4 && t.dim() == 4, "relprop: a Conv2d weight needs 4-D x and ", what);
    TORCH_CHECK(x.size(1) == w.size(1), "relprop: x has ", x.size(1), " channels, the weight expects ", w.size(1),
                " (grouped convs are not supported by the op; relprop.extension falls back to the reference)");
  } else {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "relprop: x's last dim must match the weight's");
  }
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const char* flag = std::getenv("RELPROP_POISON_OUTPUTS");
  if (flag && *flag && std::string_view(flag) != "0") return at::full(sizes, NAN, options);
  return at::empty(sizes, options);
}

void check_per_sample(const at::Tensor& t, const at::Tensor& per_sample, const char* what) {
  TORCH_CHECK(t.dim() >= 1, "relprop: expected a batched tensor");
  TORCH_CHECK(per_sample.dim() == 1 && per_sample.size(0) == t.size(0), "relprop: ", what, " must have shape (B,) = (",
              t.size(0), ",), got ", per_sample.sizes());
  TORCH_CHECK(per_sample.scalar_type() == t.scalar_type() && per_sample.device() == t.device(), "relprop: ", what,
              " must match the tensor's dtype and device");
}

std::tuple<at::Tensor, at::Tensor> split_scale(const Epilogues& ep, const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& r, const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, std::string_view rule, double alpha,
                                               double beta, double eps) {
  const int code = parse_rule(rule);
  check_layer(x, weight, r, "r");
  const bool conv = weight.dim() == 4;
  const int64_t O = conv ? r.size(1) : r.size(-1);
  const bool only_z1 = code >= kAlphaBeta && beta == 0.0;
  const at::Tensor w = split_weight(weight, O, code <= kRapLinear, only_z1);
  at::Tensor z = conv ? at::conv2d(x, w, {}, stride, padding, dilation, 1) : at::linear(x, w);
  z = z.contiguous();
  const int64_t nz = only_z1 ? 1 : 2;
  TORCH_CHECK(z.numel() == nz * r.numel(), "relprop: r has shape ", r.sizes(), " but the layer output has shape ",
              z.sizes(), " (", nz, " halves)");
  const int64_t inner = conv ? r.size(2) * r.size(3) : 1;
  const int64_t outer = r.numel() == 0 ? 0 : r.numel() / (O * inner);
  std::optional<at::Tensor> b;
  if (code == kAlphaBeta && bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == O, "relprop: bias must have ", O, " entries");
    b = bias->to(r.scalar_type()).contiguous();
  }
  const at::Tensor rc = r.contiguous();
  at::Tensor s1 = empty_output(r.sizes(), r.options());
  at::Tensor s2 = only_z1 ? at::empty({0}, r.options()) : empty_output(r.sizes(), r.options());
  if (r.numel() > 0) ep.split_scale(z, nz, rc, b, s1, s2, outer, O, inner, code, alpha, beta, eps);
  return {s1, s2};
}

at::Tensor split_backward(const Epilogues& ep, const at::Tensor& x, const at::Tensor& s1,
                          const std::optional<at::Tensor>& s2, const at::Tensor& weight, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, std::string_view split,
                          const std::optional<at::Tensor>& shift_to) {
  const bool pa = split_is_pa(split);
  check_layer(x, weight, s1, "s1");
  const bool conv = weight.dim() == 4;
  const int64_t O = conv ? s1.size(1) : s1.size(-1);
  const bool two = s2.has_value() && s2->defined() && s2->numel() > 0;
  if (two) TORCH_CHECK(s2->sizes() == s1.sizes() && s2->scalar_type() == s1.scalar_type(),
                       "relprop: s2 must match s1's shape and dtype");
  const at::Tensor w = split_weight(weight, O, pa, !two);
  const at::Tensor s = two ? at::cat({s1, *s2}, conv ? 1 : -1) : s1;
  at::Tensor g;
  if (conv) {
    TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                "relprop: stride, padding and dilation must have two entries");
    std::vector<int64_t> out_pad(2);
    for (int i = 0; i < 2; ++i)
      out_pad[i] = x.size(2 + i) - ((s.size(2 + i) - 1) * stride[i] - 2 * padding[i] +
                                    dilation[i] * (w.size(2 + i) - 1) + 1);
    g = at::conv_transpose2d(s, w, {}, stride, padding, out_pad, 1, dilation);
  } else {
    g = at::matmul(s, w);
  }
  TORCH_CHECK(g.sizes() == x.sizes(), "relprop: the transposed pass gives shape ", g.sizes(), ", x has ", x.sizes());
  g = g.contiguous();
  std::optional<at::Tensor> target;
  if (shift_to.has_value() && shift_to->defined()) {
    target = shift_to->reshape({-1}).contiguous();
    check_per_sample(x, *target, "shift_to");
  }
  return ep.mul_shift(x.contiguous(), g, target);
}

// ------------------------------------------------------------------ CPU epilogues
namespace {

template <class A> inline A sd(A a, A b) { return b == A(0) ? A(0) : a / b; }
template <class A> inline A stab(A z, A eps) { return z + (z >= A(0) ? eps : -eps); }

void cpu_split_scale(const at::Tensor& z, int64_t nz, const at::Tensor& r, const std::optional<at::Tensor>& bias,
                     at::Tensor& s1, at::Tensor& s2, int64_t outer, int64_t O, int64_t inner, int rule, double alpha,
                     double beta, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "relprop_split_scale_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* zp = z.const_data_ptr<T>();
    const T* rp = r.const_data_ptr<T>();
    const T* bp = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
    T* o1 = s1.mutable_data_ptr<T>();
    T* o2 = nz == 2 ? s2.mutable_data_ptr<T>() : nullptr;
    const A al(alpha), be(beta), ep(eps), zero(0);
    at::parallel_for(0, outer * O, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t b = q / O, o = q - b * O;
        const T* z1p = zp + (b * nz * O + o) * inner;
        const T* z2p = z1p + O * inner;
        const T* rq = rp + q * inner;
        T* p1 = o1 + q * inner;
        T* p2 = o2 ? o2 + q * inner : nullptr;
        const A bb = bp ? A(bp[o]) : zero;
        for (int64_t k = 0; k < inner; ++k) {
          const A rr(rq[k]);
          A z1(z1p[k]);
          if (rule == kRapConv) {
            const A z2(z2p[k]);
            p1[k] = T(sd(rr > zero ? rr : zero, z1));
            p2[k] = T(sd(rr, z1 + z2) + sd(rr < zero ? rr : zero, z2));
          } else if (rule == kRapLinear) {
            const A z2(z2p[k]);
            p1[k] = T(sd(rr, z1));
            p2[k] = T(sd(rr, z1 + z2));
          } else if (rule == kAlphaBeta) {
            if (bp) z1 = z1 + (bb > zero ? bb : zero);
            p1[k] = T(al * rr / stab(z1, ep));
            if (p2) {
              A z2(z2p[k]);
              if (bp) z2 = z2 + (bb < zero ? bb : zero);
              p2[k] = T(-be * rr / stab(z2, ep));
            }
          } else {
            p1[k] = T(al * sd(rr, z1));
            if (p2) p2[k] = T(-be * sd(rr, A(z2p[k])));
          }
        }
      }
    });
  });
}

// c = x ? x * g : g in place of g, with per-sample sum and non-zero count; then the shift
// c -= [c != 0] * SD(excess, count), excess = sum - target (with_sum) or target.
template <class T>
void mul_shift_typed(const T* x, T* c, const T* target, bool with_sum, int64_t B, int64_t n) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* cb = c + b * n;
      A sum(0);
      int64_t count = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (x) cb[j] = T(A(x[b * n + j]) * A(cb[j]));
        const A v(cb[j]);
        sum += v;
        count += v != A(0);
      }
      if (!target) continue;
      const A excess = with_sum ? A(T(sum)) - A(target[b]) : A(target[b]);
      const A delta(T(sd(excess, A(count))));
      for (int64_t j = 0; j < n; ++j)
        if (A(cb[j]) != A(0)) cb[j] = T(A(cb[j]) - delta);
    }
  });
}

at::Tensor cpu_mul_shift(const at::Tensor& x, at::Tensor& g, const std::optional<at::Tensor>& shift_to) {
  const int64_t B = x.size(0), n = B == 0 ? 0 : x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relprop_mul_shift_cpu", [&] {
    mul_shift_typed<scalar_t>(x.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(),
                              shift_to ? shift_to->const_data_ptr<scalar_t>() : nullptr, true, B, n);
  });
  return g;
}

at::Tensor cpu_shift_nonzero(const at::Tensor& c, const at::Tensor& excess) {
  at::Tensor out = c.contiguous().clone();
  const at::Tensor e = excess.contiguous();
  const int64_t B = c.size(0), n = B == 0 ? 0 : c.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "relprop_shift_nonzero_cpu", [&] {
    mul_shift_typed<scalar_t>(nullptr, out.mutable_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), false, B, n);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cpu_ae_masses(const at::Tensor& r_) {
  const at::Tensor r = r_.contiguous();
  at::Tensor t = empty_output(r.sizes(), r.options()), o = empty_output(r.sizes(), r.options());
  const int64_t B = r.size(0), n = B == 0 ? 0 : r.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "relprop_ae_masses_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* rp = r.const_data_ptr<T>();
    T* tp = t.mutable_data_ptr<T>();
    T* op = o.mutable_data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        A pos(0), neg(0);
        for (int64_t j = 0; j < n; ++j) {
          const A v(rp[b * n + j]);
          if (v > A(0)) pos += v; else if (v < A(0)) neg += v;
        }
        const A P = static_cast<A>(static_cast<T>(pos)), N = static_cast<A>(static_cast<T>(neg)), zero(0);
        for (int64_t j = 0; j < n; ++j) {
          const A v(rp[b * n + j]);
          tp[b * n + j] = T(sd(v > zero ? v : zero, P));
          op[b * n + j] = T(-sd(v < zero ? v : zero, N));
        }
      }
    });
  });
  return {t, o};
}

const Epilogues kCpu{cpu_split_scale, cpu_mul_shift, cpu_shift_nonzero, cpu_ae_masses};

std::tuple<at::Tensor, at::Tensor> split_scale_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                                   std::string_view rule, double alpha, double beta, double eps) {
  return split_scale(kCpu, x, weight, r, bias, stride, padding, dilation, rule, alpha, beta, eps);
}

at::Tensor split_backward_cpu(const at::Tensor& x, const at::Tensor& s1, const std::optional<at::Tensor>& s2,
                              const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, std::string_view split,
                              const std::optional<at::Tensor>& shift_to) {
  return split_backward(kCpu, x, s1, s2, weight, stride, padding, dilation, split, shift_to);
}

at::Tensor shift_nonzero_cpu(const at::Tensor& c, const at::Tensor& excess) {
  check_per_sample(c, excess, "excess");
  return cpu_shift_nonzero(c, excess);
}

std::tuple<at::Tensor, at::Tensor> ae_masses_cpu(const at::Tensor& r) {
  TORCH_CHECK(r.dim() >= 1, "relprop: ae_masses expects a batched tensor");
  return cpu_ae_masses(r);
}

// ------------------------------------------------------------------ Meta (shapes only)
std::tuple<at::Tensor, at::Tensor> split_scale_meta(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& r, const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                    std::string_view rule, double, double beta, double) {
  const bool only_z1 = parse_rule(rule) >= kAlphaBeta && beta == 0.0;
  at::Tensor s1 = at::empty_like(r, at::MemoryFormat::Contiguous);
  return {s1, only_z1 ? at::empty({0}, r.options()) : at::empty_like(r, at::MemoryFormat::Contiguous)};
}

at::Tensor split_backward_meta(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&,
                               const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                               std::string_view, const std::optional<at::Tensor>&) {
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

at::Tensor shift_nonzero_meta(const at::Tensor& c, const at::Tensor&) {
  return at::empty_like(c, at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> ae_masses_meta(const at::Tensor& r) {
  return {at::empty_like(r, at::MemoryFormat::Contiguous), at::empty_like(r, at::MemoryFormat::Contiguous)};
}

}  // namespace
}  // namespace relprop

TORCH_LIBRARY(relprop, m) {
  m.def("split_scale(Tensor x, Tensor weight, Tensor r, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, str rule, float alpha, float beta, float eps) -> (Tensor, Tensor)");
  m.def("split_backward(Tensor x, Tensor s1, Tensor? s2, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, str split, Tensor? shift_to) -> Tensor");
  m.def("shift_nonzero(Tensor c, Tensor excess) -> Tensor");
  m.def("ae_masses(Tensor r) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(relprop, CPU, m) {
  m.impl("split_scale", &relprop::split_scale_cpu);
  m.impl("split_backward", &relprop::split_backward_cpu);
  m.impl("shift_nonzero", &relprop::shift_nonzero_cpu);
  m.impl("ae_masses", &relprop::ae_masses_cpu);
}

TORCH_LIBRARY_IMPL(relprop, Meta, m) {
  m.impl("split_scale", &relprop::split_scale_meta);
  m.impl("split_backward", &relprop::split_backward_meta);
  m.impl("shift_nonzero", &relprop::shift_nonzero_meta);
  m.impl("ae_masses", &relprop::ae_masses_meta);
}
