// MeanSparse on the CPU, float32, one pass: out = act(where(|x - mu| <= thr, mu, x)), and optionally the band
// mask; its exact gradient from that mask; and the two as one autograd function. Built on first use by
// graphsparse/ops/cpu_kernel.py (torch.utils.cpp_extension) and registered as the operators
// graphsparse::mean_sparse_cpu, graphsparse::mean_sparse_cpu_grad and graphsparse::mean_sparse_cpu_autograd.
//
// The arithmetic is the eager formula's, in the same float32 precision and order (a subtraction, fabs, a
// compare, selects), so results are bit-equal to it, -0.0, NaN and inf included. Compile without
// -ffast-math. Rows are split across torch's intra-op threads (at::parallel_for: torch.set_num_threads
// applies), at least at::internal::GRAIN_SIZE elements per task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

enum Activation : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

// One element: MeanSparse, then the activation as eager PyTorch computes it (relu keeps -0.0 and NaN,
// leaky_relu is `v > 0 ? v : v * slope`).
template <Activation A>
inline float element(float v, float m, float t, float slope, bool& in_band) {
  in_band = std::fabs(v - m) <= t;
  float y = in_band ? m : v;
  if constexpr (A == kRelu) y = y < 0.0f ? 0.0f : y;
  if constexpr (A == kLeakyRelu) y = y > 0.0f ? y : y * slope;
  return y;
}

// A loop that writes the band mask is vectorised by whole vectors of one-byte flags, 64 elements at a time
// with AVX-512, so a row shorter than that ran as scalar code: the 49-element rows of a 32x64x7x7 map took
// 0.102 ms with the mask, 0.012 ms without. Short rows are vectorised 16 elements at a time instead (0.028 ms;
// rows of 196 and more are faster the default way). -fopenmp-simd enables the pragma.
constexpr int64_t kShortRow = 128;

#define GRAPHSPARSE_ROW_LOOP(N, BODY)               \
  if (Mask && (N) < kShortRow) {                    \
    _Pragma("omp simd simdlen(16)")                 \
    for (int64_t i = 0; i < (N); ++i) { BODY }      \
  } else {                                          \
    for (int64_t i = 0; i < (N); ++i) { BODY }      \
  }

// n elements of one channel (scalar mu, thr): the (N, C, L) layout, one row per (n, c).
template <Activation A, bool Mask>
void channel_row(const float* x, float* __restrict__ y, bool* __restrict__ in, int64_t n, float m, float t,
                 float slope) {
  GRAPHSPARSE_ROW_LOOP(n, {
    bool b;
    y[i] = element<A>(x[i], m, t, slope, b);
    if constexpr (Mask) in[i] = b;
  })
}

// In place: x and y are the same memory, which the restrict-qualified version above must not be told.
template <Activation A, bool Mask>
void channel_row_inplace(float* p, bool* __restrict__ in, int64_t n, float m, float t, float slope) {
  GRAPHSPARSE_ROW_LOOP(n, {
    bool b;
    p[i] = element<A>(p[i], m, t, slope, b);
    if constexpr (Mask) in[i] = b;
  })
}

// One position of every channel (vector mu, thr): the (M, C) layout, channels innermost.
template <Activation A, bool Mask>
void position_row(const float* x, float* y, bool* in, int64_t c, const float* __restrict__ m,
                  const float* __restrict__ t, float slope) {
  GRAPHSPARSE_ROW_LOOP(c, {
    bool b;
    y[i] = element<A>(x[i], m[i], t[i], slope, b);
    if constexpr (Mask) in[i] = b;
  })
}

// The residual sum, then MeanSparse (no activation), in one pass: y = where(|s - mu| <= thr, mu, s), s = a + b
// added in float32 as eager PyTorch adds (operands in that order). y may be a or b (the sum written into its
// fresh operand), so no pointer is restrict-qualified: each element is read from both before it is written.
template <bool Mask>
void add_channel_row(const float* a, const float* b, float* y, bool* in, int64_t n, float m, float t) {
  GRAPHSPARSE_ROW_LOOP(n, {
    bool band;
    y[i] = element<kNone>(a[i] + b[i], m, t, 0.0f, band);
    if constexpr (Mask) in[i] = band;
  })
}

template <bool Mask>
void add_position_row(const float* a, const float* b, float* y, bool* in, int64_t c, const float* m,
                      const float* t) {
  GRAPHSPARSE_ROW_LOOP(c, {
    bool band;
    y[i] = element<kNone>(a[i] + b[i], m[i], t[i], 0.0f, band);
    if constexpr (Mask) in[i] = band;
  })
}

template <Activation A, bool Mask>
void run(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& thr, const at::Tensor& out,
         const c10::optional<at::Tensor>& inside, double slope_) {
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  bool* ip = Mask ? inside->mutable_data_ptr<bool>() : nullptr;
  const float* mp = mu.const_data_ptr<float>();
  const float* tp = thr.const_data_ptr<float>();
  const float slope = static_cast<float>(slope_);
  const bool same = static_cast<const void*>(xp) == static_cast<void*>(yp);
  if (x.dim() == 3) {  // (N, C, L)
    const int64_t channels = x.size(1), length = x.size(2), rows = x.size(0) * channels;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, length));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % channels, offset = r * length;
        if (same) {
          channel_row_inplace<A, Mask>(yp + offset, Mask ? ip + offset : nullptr, length, mp[c], tp[c], slope);
        } else {
          channel_row<A, Mask>(xp + offset, yp + offset, Mask ? ip + offset : nullptr, length, mp[c], tp[c], slope);
        }
      }
    });
  } else {  // (M, C)
    const int64_t channels = x.size(1), rows = x.size(0);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, channels));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t offset = r * channels;
        position_row<A, Mask>(xp + offset, yp + offset, Mask ? ip + offset : nullptr, channels, mp, tp, slope);
      }
    });
  }
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
              "graphsparse::mean_sparse_cpu: ", name, " must be a contiguous CPU tensor of ", dtype);
  TORCH_CHECK(numel < 0 || t.numel() == numel, "graphsparse::mean_sparse_cpu: ", name, " has ", t.numel(),
              " elements, expected ", numel);
}

void mean_sparse_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& thr, const at::Tensor& out,
                     const c10::optional<at::Tensor>& inside, int64_t activation, double slope) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "graphsparse::mean_sparse_cpu: x must be (M, C) or (N, C, L)");
  check(x, "x", at::kFloat, -1);
  check(mu, "mu", at::kFloat, x.size(1));
  check(thr, "thr", at::kFloat, x.size(1));
  check(out, "out", at::kFloat, x.numel());
  if (inside.has_value()) check(*inside, "inside", at::kBool, x.numel());
  TORCH_CHECK(!inside.has_value() || activation == kNone,
              "graphsparse::mean_sparse_cpu: the band mask is only computed without an activation");
  const bool mask = inside.has_value();
  switch (activation) {
    case kNone:
      return mask ? run<kNone, true>(x, mu, thr, out, inside, slope) : run<kNone, false>(x, mu, thr, out, inside, slope);
    case kRelu:
      return run<kRelu, false>(x, mu, thr, out, inside, slope);
    case kLeakyRelu:
      return run<kLeakyRelu, false>(x, mu, thr, out, inside, slope);
    default:
      TORCH_CHECK(false, "graphsparse::mean_sparse_cpu: unknown activation code ", activation);
  }
}

template <bool Mask>
void run_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mu, const at::Tensor& thr,
             const at::Tensor& out, const c10::optional<at::Tensor>& inside) {
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  bool* ip = Mask ? inside->mutable_data_ptr<bool>() : nullptr;
  const float* mp = mu.const_data_ptr<float>();
  const float* tp = thr.const_data_ptr<float>();
  if (a.dim() == 3) {  // (N, C, L)
    const int64_t channels = a.size(1), length = a.size(2), rows = a.size(0) * channels;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, length));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * length;
        add_channel_row<Mask>(ap + o, bp + o, yp + o, Mask ? ip + o : nullptr, length, mp[r % channels],
                              tp[r % channels]);
      }
    });
  } else {  // (M, C)
    const int64_t channels = a.size(1), rows = a.size(0);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, channels));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * channels;
        add_position_row<Mask>(ap + o, bp + o, yp + o, Mask ? ip + o : nullptr, channels, mp, tp);
      }
    });
  }
}

// MeanSparse of a + b into out, and the band mask into inside when given: flat views of one layout.
void mean_sparse_cpu_add(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mu, const at::Tensor& thr,
                         const at::Tensor& out, const c10::optional<at::Tensor>& inside) {
  TORCH_CHECK(a.dim() == 2 || a.dim() == 3, "graphsparse::mean_sparse_cpu_add: a must be (M, C) or (N, C, L)");
  check(a, "a", at::kFloat, -1);
  TORCH_CHECK(b.sizes() == a.sizes(), "graphsparse::mean_sparse_cpu_add: a and b must have one shape");
  check(b, "b", at::kFloat, a.numel());
  check(mu, "mu", at::kFloat, a.size(1));
  check(thr, "thr", at::kFloat, a.size(1));
  check(out, "out", at::kFloat, a.numel());
  if (inside.has_value()) {
    check(*inside, "inside", at::kBool, a.numel());
    run_add<true>(a, b, mu, thr, out, inside);
  } else {
    run_add<false>(a, b, mu, thr, out, inside);
  }
}

// The exact gradient: out = inside ? +0.0 : grad, bit for bit what torch.where(inside, 0.0, grad) gives (-0.0,
// NaN and inf included), on the bits and without a branch so that it vectorises: a bool is 0 or 1, so in - 1 is
// all ones outside the band. ATen's CPU where with a bool condition is 9-23x slower on float32 maps (most of
// what an exact-gradient attack paid for MeanSparse; tools/bench_backward.py). The three tensors share one dense layout (contiguous or
// channels-last), so they are walked as flat arrays.
void mean_sparse_cpu_grad(const at::Tensor& grad, const at::Tensor& inside, const at::Tensor& out) {
  TORCH_CHECK(grad.device().is_cpu() && inside.device().is_cpu() && out.device().is_cpu() &&
                  grad.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  inside.scalar_type() == at::kBool,
              "graphsparse::mean_sparse_cpu_grad: float32 grad and out, bool inside, all on the CPU");
  TORCH_CHECK(grad.sizes() == inside.sizes() && grad.sizes() == out.sizes() && grad.strides() == inside.strides() &&
                  grad.strides() == out.strides() && grad.is_non_overlapping_and_dense(),
              "graphsparse::mean_sparse_cpu_grad: grad, inside and out must share one dense layout");
  const uint32_t* g = static_cast<const uint32_t*>(grad.const_data_ptr());
  const uint8_t* in = static_cast<const uint8_t*>(inside.const_data_ptr());
  uint32_t* o = static_cast<uint32_t*>(out.mutable_data_ptr());
  if (static_cast<const void*>(g) == static_cast<void*>(o)) {  // in place: a loop that knows it (vectorises)
    at::parallel_for(0, grad.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] &= static_cast<uint32_t>(in[i]) - 1u;
    });
    return;
  }
  at::parallel_for(0, grad.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = g[i] & (static_cast<uint32_t>(in[i]) - 1u);
  });
}

// x viewed as the kernel walks it: (N, C, L) for a contiguous x (L > 1), (M, C) with channels innermost for a
// contiguous x whose channel axis is the last non-trivial one, or for a channels-last 4-D x with axis 1 (the
// same rules as graphsparse.ops.fast.channels_view, which the caller checked).
at::Tensor channels_view(const at::Tensor& t, int64_t axis) {
  const int64_t channels = t.size(axis);
  if (t.is_contiguous()) {
    int64_t inner = 1;
    for (int64_t d = axis + 1; d < t.dim(); ++d) inner *= t.size(d);
    return inner == 1 ? t.view({-1, channels}) : t.view({-1, channels, inner});
  }
  TORCH_CHECK(axis == 1 && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "graphsparse::mean_sparse_cpu_autograd: x must be contiguous or channels-last with the channel axis 1");
  return t.permute({0, 2, 3, 1}).view({-1, channels});
}

// The gradient at MeanSparse's input from the one at its output (see MeanSparseFunction below).
at::Tensor band_gradient(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list& grads) {
  at::Tensor grad = grads[0];
  if (ctx->saved_data["straight_through"].toBool()) return grad;
  const at::Tensor inside = ctx->get_saved_variables()[0];
  if (!at::GradMode::is_enabled() && grad.scalar_type() == at::kFloat && grad.sizes() == inside.sizes() &&
      grad.strides() == inside.strides() && grad.is_non_overlapping_and_dense()) {
    grads[0].reset();  // the list's reference: `grad` is then the only one when nothing else holds it
    const bool owned = grad.use_count() == 1 && !grad.is_view() && grad.storage().use_count() == 1;
    at::Tensor grad_x = owned ? grad : at::empty_like(grad);
    mean_sparse_cpu_grad(grad, inside, grad_x);
    return grad_x;
  }
  return at::where(inside, at::Scalar(0.0), grad);
}

// MeanSparse with its autograd rule in C++: the kernel above (output and band mask in one pass), then the exact
// gradient by the loop above or the identity (straight-through, BPDA). `inplace` writes the output into x (the
// caller has checked that x is neither a leaf nor a view, and that nothing else reads it): autograd then knows
// x as modified, and its version check catches any backward that would still need the old values.
// The gradient is written into the incoming one when nothing else holds it (as autograd's AccumulateGrad
// steals a gradient nobody else references): on a map larger than the cache, a new tensor costs 3x the
// time of the in-place pass (write-allocate traffic). A double backward (grad mode on in backward) gets
// torch.where, which is differentiable, as does a gradient whose layout differs from the mask's.
struct MeanSparseFunction : public torch::autograd::Function<MeanSparseFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mu,
                            const at::Tensor& thr, int64_t axis, bool straight_through, bool inplace) {
    // a new output is shaped like x, not a view of a flat one: an in-place activation may follow it
    at::Tensor y = inplace ? x : at::empty_like(x);
    ctx->saved_data["straight_through"] = straight_through;
    if (straight_through) {
      mean_sparse_cpu(channels_view(x, axis), mu, thr, channels_view(y, axis), c10::nullopt, kNone, 0.0);
    } else {
      at::Tensor inside = at::empty_like(x, x.options().dtype(at::kBool));
      mean_sparse_cpu(channels_view(x, axis), mu, thr, channels_view(y, axis), channels_view(inside, axis), kNone,
                      0.0);
      ctx->save_for_backward({inside});
    }
    if (inplace) ctx->mark_dirty({x});
    return y;
  }

  // grads by reference: the engine hands over the only reference to each gradient, which a copy of the list
  // would double, and in-place use needs to see that nothing else holds it
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    return {band_gradient(ctx, grads), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor mean_sparse_cpu_autograd(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& thr, int64_t axis,
                                    bool straight_through, bool inplace) {
  return MeanSparseFunction::apply(x, mu, thr, axis, straight_through, inplace);
}

// The residual addition and MeanSparse as one function: y = MeanSparse(a + b), written into operand `into` when
// `inplace` (the caller has checked that operand as MeanSparseFunction's x is checked). The sum's gradient goes
// to both operands, as an addition's does: the same tensor twice, as autograd's AddBackward passes it.
struct MeanSparseAddFunction : public torch::autograd::Function<MeanSparseAddFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& mu, const at::Tensor& thr, int64_t axis, int64_t into,
                            bool straight_through, bool inplace) {
    const at::Tensor& fresh = into == 0 ? a : b;
    at::Tensor y = inplace ? fresh : at::empty_like(a);
    ctx->saved_data["straight_through"] = straight_through;
    if (straight_through) {
      mean_sparse_cpu_add(channels_view(a, axis), channels_view(b, axis), mu, thr, channels_view(y, axis),
                          c10::nullopt);
    } else {
      at::Tensor inside = at::empty_like(a, a.options().dtype(at::kBool));
      mean_sparse_cpu_add(channels_view(a, axis), channels_view(b, axis), mu, thr, channels_view(y, axis),
                          channels_view(inside, axis));
      ctx->save_for_backward({inside});
    }
    if (inplace) ctx->mark_dirty({fresh});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor grad = band_gradient(ctx, grads);
    return {grad, grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Without autograd recording (grad mode off, or neither operand requiring a gradient), the kernel alone: into
// the fresh operand when `inplace`, its version bumped as an in-place op bumps it.
at::Tensor mean_sparse_cpu_add_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mu,
                                        const at::Tensor& thr, int64_t axis, int64_t into, bool straight_through,
                                        bool inplace) {
  TORCH_CHECK(into == 0 || into == 1, "graphsparse::mean_sparse_cpu_add_autograd: into must be 0 or 1");
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides(),
              "graphsparse::mean_sparse_cpu_add_autograd: a and b must share one shape and layout");
  if (at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad())) {
    return MeanSparseAddFunction::apply(a, b, mu, thr, axis, into, straight_through, inplace);
  }
  const at::Tensor& fresh = into == 0 ? a : b;
  at::Tensor y = inplace ? fresh : at::empty_like(a);
  mean_sparse_cpu_add(channels_view(a, axis), channels_view(b, axis), mu, thr, channels_view(y, axis), c10::nullopt);
  if (inplace && !fresh.is_inference()) fresh.unsafeGetTensorImpl()->bump_version();
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(graphsparse, m) {
  m.def("mean_sparse_cpu(Tensor x, Tensor mu, Tensor thr, Tensor(a!) out, Tensor(b!)? inside, int activation, "
        "float slope) -> ()");
  m.def("mean_sparse_cpu_grad(Tensor grad, Tensor inside, Tensor(a!) out) -> ()");
  m.def("mean_sparse_cpu_autograd(Tensor(a!) x, Tensor mu, Tensor thr, int axis, bool straight_through, "
        "bool inplace) -> Tensor");
  m.def("mean_sparse_cpu_add_autograd(Tensor(a!) a, Tensor(b!) b, Tensor mu, Tensor thr, int axis, int into, "
        "bool straight_through, bool inplace) -> Tensor");
}

TORCH_LIBRARY_IMPL(graphsparse, CPU, m) {
  m.impl("mean_sparse_cpu", &mean_sparse_cpu);
  m.impl("mean_sparse_cpu_grad", &mean_sparse_cpu_grad);
}

// Above autograd, as a Python autograd.Function runs: the function records its own backward node.
TORCH_LIBRARY_IMPL(graphsparse, CompositeImplicitAutograd, m) {
  m.impl("mean_sparse_cpu_autograd", &mean_sparse_cpu_autograd);
  m.impl("mean_sparse_cpu_add_autograd", &mean_sparse_cpu_add_autograd);
}
