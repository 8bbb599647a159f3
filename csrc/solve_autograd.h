// The C++ autograd nodes of the differentiable solve ops, shared by the CPU library
// (solve_ops_cpu.cpp) and the CUDA one (solve_cuda_binding.cpp). C++ nodes rather than a
// torch.autograd.Function: a training step then pays no Python per call for autograd.
//
//   CausalSolveFunction<Ops>  — x = T⁻¹ y for a weight built by the caller (causal_solve);
//   MaskedSolveFunction<Ops>  — the same from the free parameters of a masked causal weight
//       (off-centre taps, strictly-lower centre entries, optional centre diagonal: what
//       layers.causal.assemble_weight takes), the weight assembled inside the op and its
//       gradient split back onto the parameters inside the backward op (masked_solve). One
//       operator call and one node per layer call instead of the assembly's half-dozen ATen ops
//       and their autograd nodes.
//
// Ops is a struct with
//   static at::Tensor solve(y, weight, orientation, unit_diagonal, isa);
//   static std::tuple<at::Tensor, at::Tensor> backward(grad, weight, x, orientation, unit_diagonal,
//                                                      need_weight_grad, isa);  // (λ, ∂L/∂W)
//   static at::Tensor masked_solve(y, off_centre, lower, diagonal, orientation, isa);
//   static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_backward(
//       grad, off_centre, lower, diagonal, x, orientation, need_weight_grad, isa);
//       // (λ, ∂L/∂off_centre, ∂L/∂lower, ∂L/∂diagonal)
// that call the backend's ops through the dispatcher, so that under torch.compile the fake
// kernels (registered from Python, layers/native.py) answer instead of the real ones.
//
// The masked weight's layout (docs/math.md §2): W[o][c] at raster tap t of k×k is
// off_centre[o][c][t] for taps before the centre tap, off_centre[o][c][t-1] after it; the centre
// block is lower[r(r-1)/2 + c] below the diagonal (torch.tril_indices order), diagonal[o] (or 1)
// on it and 0 above.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>

namespace invconv {

// The raster index of the centre tap (the one that reads the output pixel itself) for
// orientation code 0 TL, 1 TR, 2 BL, 3 BR (layers.causal.centre_tap).
inline int64_t centre_tap_index(int64_t k, int64_t orientation) {
  const int64_t a = (orientation & 2) ? 0 : k - 1, b = (orientation & 1) ? 0 : k - 1;
  return a * k + b;
}

// The kernel size of off_centre (C, C, k*k-1) after checking every argument of a masked solve
// against y (B, C, H, W); op names the operator in the messages.
inline int64_t check_masked_args(const char* op, const at::Tensor& y, const at::Tensor& off_centre,
                                 const at::Tensor& lower, const std::optional<at::Tensor>& diagonal,
                                 int64_t orientation) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be (B, C, H, W), got ", y.sizes());
  const int64_t C = y.size(1);
  TORCH_CHECK(off_centre.dim() == 3 && off_centre.size(0) == C && off_centre.size(1) == C, op,
              ": off_centre must be (C, C, k*k-1) with C = y.size(1) = ", C, ", got ", off_centre.sizes());
  const int64_t taps = off_centre.size(2) + 1;
  const auto k = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(taps))));
  TORCH_CHECK(k >= 1 && k * k == taps, op, ": off_centre's last dimension must be k*k-1 for a kernel size k >= 1, got ",
              off_centre.size(2));
  TORCH_CHECK(lower.dim() == 1 && lower.size(0) == C * (C - 1) / 2, op, ": lower must be (C*(C-1)/2,) = (",
              C * (C - 1) / 2, ",), got ", lower.sizes());
  if (diagonal.has_value())
    TORCH_CHECK(diagonal->dim() == 1 && diagonal->size(0) == C, op, ": diagonal must be (C,) = (", C, ",), got ",
                diagonal->sizes());
  const auto same = [&](const at::Tensor& t) {
    return t.scalar_type() == y.scalar_type() && t.device() == y.device();
  };
  TORCH_CHECK(same(off_centre) && same(lower) && (!diagonal.has_value() || same(*diagonal)), op,
              ": y, off_centre, lower and diagonal must share dtype and device");
  TORCH_CHECK(orientation >= 0 && orientation < 4, op, ": orientation code must be 0 (TL), 1 (TR), 2 (BL) or 3 (BR), got ",
              orientation);
  return k;
}

// The (C, C, k, k) weight of a masked causal convolution from its free parameters. On the CPU
// one loop over the C²k² entries (well under a microsecond at C = 12, k = 3); elsewhere (a
// CUDA device) a few ATen ops that stay on the device (no host synchronisation).
inline at::Tensor masked_weight(const at::Tensor& off_centre_, const at::Tensor& lower_,
                                const std::optional<at::Tensor>& diagonal, int64_t k, int64_t orientation) {
  const int64_t C = off_centre_.size(0), kk = k * k, pos = centre_tap_index(k, orientation);
  if (off_centre_.is_cpu()) {
    const at::Tensor off = off_centre_.contiguous(), lower = lower_.contiguous();
    const at::Tensor diag = diagonal.has_value() ? diagonal->contiguous() : at::Tensor();
    at::Tensor w = at::empty({C, C, k, k}, off.options());
    AT_DISPATCH_FLOATING_TYPES(off.scalar_type(), "invconv_masked_weight", [&] {
      const scalar_t* op = off.data_ptr<scalar_t>();
      const scalar_t* lp = lower.data_ptr<scalar_t>();
      const scalar_t* dp = diag.defined() ? diag.data_ptr<scalar_t>() : nullptr;
      scalar_t* wp = w.data_ptr<scalar_t>();
      for (int64_t o = 0; o < C; ++o)
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = op + (o * C + c) * (kk - 1);
          scalar_t* dst = wp + (o * C + c) * kk;
          for (int64_t t = 0; t < pos; ++t) dst[t] = src[t];
          dst[pos] = o > c ? lp[o * (o - 1) / 2 + c] : (o == c ? (dp ? dp[o] : scalar_t(1)) : scalar_t(0));
          for (int64_t t = pos + 1; t < kk; ++t) dst[t] = src[t - 1];
        }
    });
    return w;
  }
  at::Tensor centre = at::zeros({C, C}, off_centre_.options());
  if (C > 1) {
    const at::Tensor idx = at::tril_indices(C, C, -1, off_centre_.options().dtype(at::kLong));
    centre.index_put_({idx[0], idx[1]}, lower_);
  }
  if (diagonal.has_value())
    centre.diagonal().copy_(*diagonal);
  else
    centre.diagonal().fill_(1);
  return at::cat({off_centre_.narrow(2, 0, pos), centre.unsqueeze(-1), off_centre_.narrow(2, pos, kk - 1 - pos)}, 2)
      .view({C, C, k, k});
}

// ∂L/∂W (C, C, k, k) of the masked weight split onto its free parameters: (∂L/∂off_centre,
// ∂L/∂lower, ∂L/∂diagonal); the last is an empty tensor without a diagonal parameter (a unit
// diagonal is a constant). The centre block's upper triangle is not a parameter.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> split_masked_grad(const at::Tensor& grad_w_, int64_t k,
                                                                        int64_t orientation, bool has_diagonal) {
  const int64_t C = grad_w_.size(0), kk = k * k, pos = centre_tap_index(k, orientation);
  if (grad_w_.is_cpu()) {
    const at::Tensor g = grad_w_.contiguous();
    at::Tensor g_off = at::empty({C, C, kk - 1}, g.options());
    at::Tensor g_lower = at::empty({C * (C - 1) / 2}, g.options());
    at::Tensor g_diag = at::empty({has_diagonal ? C : 0}, g.options());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "invconv_split_masked_grad", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* op = g_off.data_ptr<scalar_t>();
      scalar_t* lp = g_lower.data_ptr<scalar_t>();
      scalar_t* dp = has_diagonal ? g_diag.data_ptr<scalar_t>() : nullptr;
      for (int64_t o = 0; o < C; ++o)
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = gp + (o * C + c) * kk;
          scalar_t* dst = op + (o * C + c) * (kk - 1);
          for (int64_t t = 0; t < pos; ++t) dst[t] = src[t];
          for (int64_t t = pos + 1; t < kk; ++t) dst[t - 1] = src[t];
          if (o > c) lp[o * (o - 1) / 2 + c] = src[pos];
          if (o == c && dp) dp[o] = src[pos];
        }
    });
    return {g_off, g_lower, g_diag};
  }
  const at::Tensor g = grad_w_.reshape({C, C, kk});
  at::Tensor g_off = at::cat({g.narrow(2, 0, pos), g.narrow(2, pos + 1, kk - 1 - pos)}, 2);
  const at::Tensor centre = g.select(2, pos);
  at::Tensor g_lower = at::empty({0}, g.options());
  if (C > 1) {
    const at::Tensor idx = at::tril_indices(C, C, -1, g.options().dtype(at::kLong));
    g_lower = centre.index({idx[0], idx[1]});
  }
  at::Tensor g_diag = has_diagonal ? centre.diagonal().clone() : at::empty({0}, g.options());
  return {g_off, g_lower, g_diag};
}

// The backward is not itself differentiable: refuse a double backward rather than return
// gradients that silently miss their own graph.
inline void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "invconv: the native solve's backward is not differentiable (create_graph / double backward); "
              "use INVCONV_SOLVER=torch for higher-order gradients");
}

// Whether an op call must record an autograd node: grad mode on and an input that requires
// grad. Otherwise the Autograd kernels call the device kernel directly — what Function::apply
// would end up doing, without building its context and variable lists (about a microsecond
// per call, paid on every sampling and no_grad call).
inline bool records_graph(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

template <class Ops>
class CausalSolveFunction : public torch::autograd::Function<CausalSolveFunction<Ops>> {
 public:
  // The Autograd kernel of causal_solve.
  static at::Tensor call(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                         int64_t isa) {
    if (!records_graph({&y, &weight})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Ops::solve(y, weight, orientation, unit_diagonal, isa);
    }
    return CausalSolveFunction::apply(y, weight, orientation, unit_diagonal, isa);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& weight,
                            int64_t orientation, bool unit_diagonal, int64_t isa) {
    at::AutoDispatchBelowADInplaceOrView below;  // to the device (or fake) kernel
    at::Tensor x = Ops::solve(y, weight, orientation, unit_diagonal, isa);
    ctx->save_for_backward({weight, x});  // the backward needs x, never y
    ctx->saved_data["orientation"] = orientation;
    ctx->saved_data["unit_diagonal"] = unit_diagonal;
    ctx->saved_data["isa"] = isa;
    return x;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const bool need_y = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    torch::autograd::variable_list out(5);
    if (!(need_y || need_w) || !grads[0].defined()) return out;
    refuse_double_backward();
    auto saved = ctx->get_saved_variables();
    auto [lam, grad_w] = Ops::backward(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["orientation"].toInt(),
                                       ctx->saved_data["unit_diagonal"].toBool(), need_w,
                                       ctx->saved_data["isa"].toInt());
    if (need_y) out[0] = lam;
    if (need_w) out[1] = grad_w;
    return out;
  }
};

template <class Ops>
class MaskedSolveFunction : public torch::autograd::Function<MaskedSolveFunction<Ops>> {
 public:
  // The Autograd kernel of masked_solve.
  static at::Tensor call(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                         const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t isa) {
    if (!records_graph({&y, &off_centre, &lower, diagonal.has_value() ? &*diagonal : nullptr})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Ops::masked_solve(y, off_centre, lower, diagonal, orientation, isa);
    }
    return MaskedSolveFunction::apply(y, off_centre, lower, diagonal, orientation, isa);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& off_centre,
                            const at::Tensor& lower, const std::optional<at::Tensor>& diagonal, int64_t orientation,
                            int64_t isa) {
    at::AutoDispatchBelowADInplaceOrView below;  // to the device (or fake) kernel
    at::Tensor x = Ops::masked_solve(y, off_centre, lower, diagonal, orientation, isa);
    // The parameters, not the assembled weight: the backward op reassembles it (a loop over
    // C²k² entries), and saving the parameters lets autograd's version check catch an in-place
    // update of them between this forward and its backward.
    const bool has_diagonal = diagonal.has_value() && diagonal->defined();
    if (has_diagonal)
      ctx->save_for_backward({off_centre, lower, x, *diagonal});
    else
      ctx->save_for_backward({off_centre, lower, x});
    ctx->saved_data["orientation"] = orientation;
    ctx->saved_data["isa"] = isa;
    return x;
  }

  // Edges are numbered over the tensor inputs that are present: y 0, off_centre 1, lower 2,
  // diagonal 3; the returned list has one entry per forward argument (6).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool has_diagonal = saved.size() == 4;
    const bool need_y = ctx->needs_input_grad(0), need_off = ctx->needs_input_grad(1),
               need_lower = ctx->needs_input_grad(2), need_diag = has_diagonal && ctx->needs_input_grad(3);
    const bool need_w = need_off || need_lower || need_diag;
    torch::autograd::variable_list out(6);
    if (!(need_y || need_w) || !grads[0].defined()) return out;
    refuse_double_backward();
    std::optional<at::Tensor> diagonal;
    if (has_diagonal) diagonal = saved[3];
    auto [lam, g_off, g_lower, g_diag] =
        Ops::masked_backward(grads[0].contiguous(), saved[0], saved[1], diagonal, saved[2],
                             ctx->saved_data["orientation"].toInt(), need_w, ctx->saved_data["isa"].toInt());
    if (need_y) out[0] = lam;
    if (need_off) out[1] = g_off;
    if (need_lower) out[2] = g_lower;
    if (need_diag) out[3] = g_diag;
    return out;
  }
};

}  // namespace invconv
