// The C++ autograd node of the differentiable solve ops (invconv_cpu::causal_solve in
// solve_ops_cpu.cpp, invconv_cuda::causal_solve in solve_cuda_binding.cpp). A C++ node rather
// than a torch.autograd.Function: a training step then pays no Python per call for autograd.
//
// Ops is a struct with
//   static at::Tensor solve(y, weight, orientation, unit_diagonal, isa);
//   static std::tuple<at::Tensor, at::Tensor> backward(grad, weight, x, orientation, unit_diagonal,
//                                                      need_weight_grad, isa);  // (λ, ∂L/∂W)
// that call the backend's ops through the dispatcher, so that under torch.compile the fake
// kernels (registered from Python, layers/native.py) answer instead of the real ones.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace invconv {

template <class Ops>
class CausalSolveFunction : public torch::autograd::Function<CausalSolveFunction<Ops>> {
 public:
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
    // The backward is not itself differentiable: refuse a double backward rather than return
    // gradients that silently miss their own graph.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "invconv: the native solve's backward is not differentiable (create_graph / double backward); "
                "use INVCONV_SOLVER=torch for higher-order gradients");
    auto saved = ctx->get_saved_variables();
    auto [lam, grad_w] = Ops::backward(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["orientation"].toInt(),
                                       ctx->saved_data["unit_diagonal"].toBool(), need_w,
                                       ctx->saved_data["isa"].toInt());
    if (need_y) out[0] = lam;
    if (need_w) out[1] = grad_w;
    return out;
  }
};

}  // namespace invconv
