// The differentiable CPU solves as PyTorch operators with their own dispatch keys, so that
// torch.compile (fake tensors), the autograd engine and the dispatcher all see one op:
//
//   invconv_cpu::causal_solve(y, weight, orientation, unit_diagonal, isa) -> x
//       CPU kernel: the native solve (invconv_cpu::solve, solve_cpu.cpp);
//       Autograd kernel: a C++ autograd node whose backward is causal_solve_backward.
//   invconv_cpu::causal_solve_backward(grad, weight, x, orientation, unit_diagonal,
//                                      need_weight_grad, isa) -> (λ, ∂L/∂W)
//       CPU kernel: the fused adjoint solve + weight gradient (invconv_cpu::solve_backward);
//       ∂L/∂W is an empty tensor when not needed (a fixed output arity for torch.compile).
//   invconv_cpu::masked_solve(y, off_centre, lower, diagonal?, orientation, isa) -> x
//       the solve from a masked weight's free parameters (layers.causal.solve_masked): the CPU
//       kernel assembles the (C, C, k, k) weight in one loop and solves; the Autograd kernel is
//       one C++ node whose backward is masked_solve_backward.
//   invconv_cpu::masked_solve_backward(grad, off_centre, lower, diagonal?, x, orientation,
//                                      need_weight_grad, isa) -> (λ, ∂L/∂off, ∂L/∂lower, ∂L/∂diag)
//       reassembles the weight, runs solve_backward, splits ∂L/∂W onto the parameters (empty
//       tensors for what is not needed or absent).
//
// The fake (meta) kernels that torch.compile needs are registered from Python
// (layers/native.py, torch.library.register_fake); the autograd nodes, the weight assembly and
// the gradient split are solve_autograd.h (shared with the CUDA binding). The kernels of
// solve_cpu.cpp are reached through the dispatcher (their registered ops), which keeps that
// file untouched.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "solve_autograd.h"

namespace {

at::Tensor kernel_solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                        int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("invconv_cpu::solve", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool, int64_t)>();
  return op.call(y, weight, orientation, unit_diagonal, false, isa);
}

std::tuple<at::Tensor, at::Tensor> kernel_solve_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                         const at::Tensor& x, int64_t orientation, bool unit_diagonal,
                                                         bool need_weight_grad, int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("invconv_cpu::solve_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t, bool, bool, int64_t)>();
  auto [lam, grad_w] = op.call(grad, weight, x, orientation, unit_diagonal, need_weight_grad, isa);
  if (!grad_w.defined()) grad_w = at::empty({0}, weight.options());
  return {lam, grad_w};
}

at::Tensor call_solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                      int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("invconv_cpu::causal_solve", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t)>();
  return op.call(y, weight, orientation, unit_diagonal, isa);
}

std::tuple<at::Tensor, at::Tensor> call_solve_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                       const at::Tensor& x, int64_t orientation, bool unit_diagonal,
                                                       bool need_weight_grad, int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("invconv_cpu::causal_solve_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t, bool, bool, int64_t)>();
  return op.call(grad, weight, x, orientation, unit_diagonal, need_weight_grad, isa);
}

at::Tensor kernel_masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                               const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t isa) {
  const int64_t k = invconv::check_masked_args("invconv_cpu.masked_solve", y, off_centre, lower, diagonal, orientation);
  const at::Tensor weight = invconv::masked_weight(off_centre, lower, diagonal, k, orientation);
  return kernel_solve(y, weight, orientation, !diagonal.has_value(), isa);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_masked_solve_backward(
    const at::Tensor& grad, const at::Tensor& off_centre, const at::Tensor& lower,
    const std::optional<at::Tensor>& diagonal, const at::Tensor& x, int64_t orientation, bool need_weight_grad,
    int64_t isa) {
  const int64_t k =
      invconv::check_masked_args("invconv_cpu.masked_solve_backward", x, off_centre, lower, diagonal, orientation);
  const at::Tensor weight = invconv::masked_weight(off_centre, lower, diagonal, k, orientation);
  auto [lam, grad_w] = kernel_solve_backward(grad, weight, x, orientation, !diagonal.has_value(), need_weight_grad, isa);
  if (!need_weight_grad) {
    const auto none = [&] { return at::empty({0}, x.options()); };  // distinct outputs, never aliases
    return {lam, none(), none(), none()};
  }
  auto [g_off, g_lower, g_diag] = invconv::split_masked_grad(grad_w, k, orientation, diagonal.has_value());
  return {lam, g_off, g_lower, g_diag};
}

at::Tensor call_masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                             const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t isa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("invconv_cpu::masked_solve", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(y, off_centre, lower, diagonal, orientation, isa);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_masked_solve_backward(
    const at::Tensor& grad, const at::Tensor& off_centre, const at::Tensor& lower,
    const std::optional<at::Tensor>& diagonal, const at::Tensor& x, int64_t orientation, bool need_weight_grad,
    int64_t isa) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("invconv_cpu::masked_solve_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const at::Tensor&, int64_t, bool, int64_t)>();
  return op.call(grad, off_centre, lower, diagonal, x, orientation, need_weight_grad, isa);
}

struct CpuOps {
  static at::Tensor solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                          int64_t isa) {
    return call_solve(y, weight, orientation, unit_diagonal, isa);
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& weight,
                                                     const at::Tensor& x, int64_t orientation, bool unit_diagonal,
                                                     bool need_weight_grad, int64_t isa) {
    return call_solve_backward(grad, weight, x, orientation, unit_diagonal, need_weight_grad, isa);
  }
  static at::Tensor masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                                 const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t isa) {
    return call_masked_solve(y, off_centre, lower, diagonal, orientation, isa);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_backward(
      const at::Tensor& grad, const at::Tensor& off_centre, const at::Tensor& lower,
      const std::optional<at::Tensor>& diagonal, const at::Tensor& x, int64_t orientation, bool need_weight_grad,
      int64_t isa) {
    return call_masked_solve_backward(grad, off_centre, lower, diagonal, x, orientation, need_weight_grad, isa);
  }
};

at::Tensor autograd_solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                          int64_t isa) {
  return invconv::CausalSolveFunction<CpuOps>::call(y, weight, orientation, unit_diagonal, isa);
}

at::Tensor autograd_masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                                 const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t isa) {
  return invconv::MaskedSolveFunction<CpuOps>::call(y, off_centre, lower, diagonal, orientation, isa);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(invconv_cpu, m) {
  m.def("causal_solve(Tensor y, Tensor weight, int orientation, bool unit_diagonal, int isa=0) -> Tensor");
  m.def(
      "causal_solve_backward(Tensor grad, Tensor weight, Tensor x, int orientation, bool unit_diagonal, "
      "bool need_weight_grad, int isa=0) -> (Tensor, Tensor)");
  m.def("masked_solve(Tensor y, Tensor off_centre, Tensor lower, Tensor? diagonal, int orientation, int isa=0) -> Tensor");
  m.def(
      "masked_solve_backward(Tensor grad, Tensor off_centre, Tensor lower, Tensor? diagonal, Tensor x, "
      "int orientation, bool need_weight_grad, int isa=0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(invconv_cpu, CPU, m) {
  m.impl("causal_solve", &kernel_solve);
  m.impl("causal_solve_backward", &kernel_solve_backward);
  m.impl("masked_solve", &kernel_masked_solve);
  m.impl("masked_solve_backward", &kernel_masked_solve_backward);
}

TORCH_LIBRARY_IMPL(invconv_cpu, Autograd, m) {
  m.impl("causal_solve", &autograd_solve);
  m.impl("masked_solve", &autograd_masked_solve);
}
