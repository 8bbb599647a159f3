// torch binding of the CUDA solve (solve_cuda.cu through its C interface solve_cuda.h). Built only
// where torch has CUDA and a GPU is visible. Operators:
//   invconv_cuda::solve(y, weight, orientation, unit_diagonal, adjoint, max_rows, force_ring)
//       the bare solve or adjoint solve, no autograd (max_rows / force_ring for tests);
//   invconv_cuda::causal_solve(y, weight, orientation, unit_diagonal) -> x
//       CUDA kernel + C++ autograd node (solve_autograd.h): the differentiable solve;
//   invconv_cuda::causal_solve_backward(grad, weight, x, orientation, unit_diagonal,
//                                       need_weight_grad) -> (λ, ∂L/∂W)
//       the adjoint solve, then cuDNN's convolution weight gradient of x and −λ (∂L/∂W is an
//       empty tensor when not needed);
//   invconv_cuda::masked_solve(y, off_centre, lower, diagonal?, orientation) -> x
//   invconv_cuda::masked_solve_backward(grad, off_centre, lower, diagonal?, x, orientation,
//                                       need_weight_grad) -> (λ, ∂L/∂off, ∂L/∂lower, ∂L/∂diag)
//       the solve from a masked weight's free parameters (weight assembled on the device, gradient
//       split back; solve_autograd.h, shared with the CPU ops) + the same C++ autograd node;
//   invconv_cuda::plan_error(device, dtype, C, H, W, k) -> str
//       "" when the solve can run that shape on that device, else why not (layers/native.py
//       falls back to the PyTorch reference under INVCONV_SOLVER=auto).
// The fake kernels for torch.compile are registered from Python (layers/native.py).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "solve_autograd.h"
#include "solve_cuda.h"

namespace {

// x with causal_conv2d(x, weight, orientation) == y (adjoint=false), or λ = T⁻ᵀ y (adjoint=true).
// max_rows and force_ring override the planner (for tests); 0 / false let it choose.
at::Tensor solve(const at::Tensor& y_, const at::Tensor& weight_, int64_t orientation, bool unit_diagonal, bool adjoint,
                 int64_t max_rows, bool force_ring) {
  TORCH_CHECK(y_.is_cuda() && weight_.is_cuda() && y_.device() == weight_.device(),
              "invconv_cuda.solve: y and weight must be on the same CUDA device");
  TORCH_CHECK(y_.dim() == 4, "invconv_cuda.solve: y must be (B, C, H, W), got ", y_.sizes());
  TORCH_CHECK(weight_.dim() == 4 && weight_.size(0) == y_.size(1) && weight_.size(1) == y_.size(1) &&
                  weight_.size(2) == weight_.size(3) && weight_.size(2) >= 1,
              "invconv_cuda.solve: weight must be (C, C, k, k) with C = y.size(1); got ", weight_.sizes(), " for y ",
              y_.sizes());
  TORCH_CHECK(y_.scalar_type() == weight_.scalar_type(), "invconv_cuda.solve: y and weight dtypes differ");
  TORCH_CHECK(y_.scalar_type() == at::kFloat || y_.scalar_type() == at::kDouble,
              "invconv_cuda.solve: float32 or float64 required, got ", y_.scalar_type());
  TORCH_CHECK(orientation >= 0 && orientation < 4, "invconv_cuda.solve: orientation code must be 0..3");
  TORCH_CHECK(y_.size(0) <= INT32_MAX && y_.size(0) * ((y_.size(2) + 31) / 32) <= INT32_MAX,
              "invconv_cuda.solve: batch too large");
  c10::cuda::CUDAGuard guard(y_.device());
  at::Tensor y = y_.contiguous(), w = weight_.contiguous();
  at::Tensor x = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return x;
  InvconvCudaPlan plan;
  const int dtype = y.scalar_type() == at::kFloat ? 0 : 1;
  const char* err = invconv_cuda_plan(dtype, (int)y.size(0), (int)y.size(1), (int)y.size(2), (int)y.size(3),
                                      (int)w.size(2), (int)max_rows, force_ring ? 1 : 0, &plan);
  TORCH_CHECK(err == nullptr, err, " (shape ", y.sizes(), ", k=", w.size(2), ")");
  at::Tensor workspace = at::empty({(int64_t)plan.workspace_bytes}, y.options().dtype(at::kByte));
  err = invconv_cuda_solve(&plan, y.data_ptr(), w.data_ptr(), x.data_ptr(), (int)orientation, unit_diagonal ? 1 : 0,
                           adjoint ? 1 : 0, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, err, " (shape ", y.sizes(), ", k=", w.size(2), ")");
  return x;
}

std::string plan_error(int64_t device, int64_t dtype, int64_t C, int64_t H, int64_t W, int64_t k) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  InvconvCudaPlan plan;
  const char* err = invconv_cuda_plan((int)dtype, 1, (int)C, (int)H, (int)W, (int)k, 0, 0, &plan);
  return err ? std::string(err) : std::string();
}

// ∂L/∂W of x = T⁻¹ y for λ = T⁻ᵀ g: −(the convolution weight gradient of input x, output grad λ),
// through cuDNN on the causally padded x (as layers.causal.conv_weight_grad).
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& weight, int64_t orientation) {
  const int64_t p = weight.size(2) - 1;
  const bool right = orientation & 1, bottom = orientation & 2;  // TL 0, TR 1, BL 2, BR 3
  const at::Tensor xp = p > 0 ? at::constant_pad_nd(x, {right ? 0 : p, right ? p : 0, bottom ? 0 : p, bottom ? p : 0}, 0)
                              : x;
  auto grads = at::convolution_backward(lam, xp, weight, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                        {false, true, false});
  return std::get<1>(grads).neg_();
}

at::Tensor kernel_causal_solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal) {
  return solve(y, weight, orientation, unit_diagonal, false, 0, false);
}

std::tuple<at::Tensor, at::Tensor> kernel_causal_solve_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                                const at::Tensor& x, int64_t orientation,
                                                                bool unit_diagonal, bool need_weight_grad) {
  at::Tensor lam = solve(grad, weight, orientation, unit_diagonal, true, 0, false);
  at::Tensor grad_w = need_weight_grad ? weight_grad(x, lam, weight, orientation) : at::empty({0}, weight.options());
  return {lam, grad_w};
}

at::Tensor kernel_masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                               const std::optional<at::Tensor>& diagonal, int64_t orientation) {
  const int64_t k = invconv::check_masked_args("invconv_cuda.masked_solve", y, off_centre, lower, diagonal, orientation);
  c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor weight = invconv::masked_weight(off_centre, lower, diagonal, k, orientation);
  return solve(y, weight, orientation, !diagonal.has_value(), false, 0, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_masked_solve_backward(
    const at::Tensor& grad, const at::Tensor& off_centre, const at::Tensor& lower,
    const std::optional<at::Tensor>& diagonal, const at::Tensor& x, int64_t orientation, bool need_weight_grad) {
  const int64_t k =
      invconv::check_masked_args("invconv_cuda.masked_solve_backward", x, off_centre, lower, diagonal, orientation);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor weight = invconv::masked_weight(off_centre, lower, diagonal, k, orientation);
  auto [lam, grad_w] =
      kernel_causal_solve_backward(grad, weight, x, orientation, !diagonal.has_value(), need_weight_grad);
  if (!need_weight_grad) {
    const auto none = [&] { return at::empty({0}, x.options()); };  // distinct outputs, never aliases
    return {lam, none(), none(), none()};
  }
  auto [g_off, g_lower, g_diag] = invconv::split_masked_grad(grad_w, k, orientation, diagonal.has_value());
  return {lam, g_off, g_lower, g_diag};
}

struct CudaOps {
  static at::Tensor solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation, bool unit_diagonal,
                          int64_t /*isa: CPU only*/) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("invconv_cuda::causal_solve", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
    return op.call(y, weight, orientation, unit_diagonal);
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& weight,
                                                     const at::Tensor& x, int64_t orientation, bool unit_diagonal,
                                                     bool need_weight_grad, int64_t /*isa*/) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("invconv_cuda::causal_solve_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, int64_t, bool, bool)>();
    return op.call(grad, weight, x, orientation, unit_diagonal, need_weight_grad);
  }
  static at::Tensor masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                                 const std::optional<at::Tensor>& diagonal, int64_t orientation, int64_t /*isa*/) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("invconv_cuda::masked_solve", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, int64_t)>();
    return op.call(y, off_centre, lower, diagonal, orientation);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_backward(
      const at::Tensor& grad, const at::Tensor& off_centre, const at::Tensor& lower,
      const std::optional<at::Tensor>& diagonal, const at::Tensor& x, int64_t orientation, bool need_weight_grad,
      int64_t /*isa*/) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("invconv_cuda::masked_solve_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, int64_t, bool)>();
    return op.call(grad, off_centre, lower, diagonal, x, orientation, need_weight_grad);
  }
};

at::Tensor autograd_causal_solve(const at::Tensor& y, const at::Tensor& weight, int64_t orientation,
                                 bool unit_diagonal) {
  return invconv::CausalSolveFunction<CudaOps>::call(y, weight, orientation, unit_diagonal, 0);
}

at::Tensor autograd_masked_solve(const at::Tensor& y, const at::Tensor& off_centre, const at::Tensor& lower,
                                 const std::optional<at::Tensor>& diagonal, int64_t orientation) {
  return invconv::MaskedSolveFunction<CudaOps>::call(y, off_centre, lower, diagonal, orientation, 0);
}

}  // namespace

TORCH_LIBRARY(invconv_cuda, m) {
  m.def(
      "solve(Tensor y, Tensor weight, int orientation, bool unit_diagonal, bool adjoint=False, int max_rows=0, "
      "bool force_ring=False) -> Tensor",
      &solve);
  m.def("plan_error(int device, int dtype, int C, int H, int W, int k) -> str", &plan_error);
  m.def("causal_solve(Tensor y, Tensor weight, int orientation, bool unit_diagonal) -> Tensor");
  m.def(
      "causal_solve_backward(Tensor grad, Tensor weight, Tensor x, int orientation, bool unit_diagonal, "
      "bool need_weight_grad) -> (Tensor, Tensor)");
  m.def("masked_solve(Tensor y, Tensor off_centre, Tensor lower, Tensor? diagonal, int orientation) -> Tensor");
  m.def(
      "masked_solve_backward(Tensor grad, Tensor off_centre, Tensor lower, Tensor? diagonal, Tensor x, "
      "int orientation, bool need_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(invconv_cuda, CUDA, m) {
  m.impl("causal_solve", &kernel_causal_solve);
  m.impl("causal_solve_backward", &kernel_causal_solve_backward);
  m.impl("masked_solve", &kernel_masked_solve);
  m.impl("masked_solve_backward", &kernel_masked_solve_backward);
}

TORCH_LIBRARY_IMPL(invconv_cuda, Autograd, m) {
  m.impl("causal_solve", &autograd_causal_solve);
  m.impl("masked_solve", &autograd_masked_solve);
}
