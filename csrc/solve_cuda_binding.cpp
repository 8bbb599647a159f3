// torch binding of the CUDA solve (solve_cuda.cu through its C interface solve_cuda.h), registered
// as torch.ops.invconv_cuda.solve. Built only where torch has CUDA and a GPU is visible.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
  TORCH_CHECK(err == nullptr, err);
  return x;
}

}  // namespace

TORCH_LIBRARY(invconv_cuda, m) {
  m.def(
      "solve(Tensor y, Tensor weight, int orientation, bool unit_diagonal, bool adjoint=False, int max_rows=0, "
      "bool force_ring=False) -> Tensor",
      &solve);
}
