// Plain C interface of the CUDA solve (solve_cuda.cu), so that the kernels compile with nvcc
// alone (no torch headers) and the torch binding (solve_cuda_binding.cpp) stays thin.
#pragma once

#ifndef INVCONV_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// How one solve is laid out on the device; filled by invconv_cuda_plan.
typedef struct InvconvCudaPlan {
  int dtype;         // 0 float32, 1 float64 (accumulation in the same precision)
  int B, C, H, W, k;
  int rows;          // R: rows per strip (one block per strip and image)
  int strips;        // S = ceil(H / R); S > 1 uses progress flags between strips
  int ring_cols;     // Wr: columns of the shared-memory plane (W + k - 1 unless it is a ring)
  int ring;          // 1: the plane is a ring of columns loaded and evicted as the wavefront moves
  int pitch;         // elements per plane row (padded against shared-memory bank conflicts)
  int ob;            // output channels per thread
  int n_ob;          // output-channel blocks, n_ob * ob >= C
  int slices;        // NS: the (tap, channel) sum split over this many threads, then reduced
  int weights_in_smem;
  int threads;
  size_t smem_bytes;
  size_t workspace_bytes;  // folded weights + progress flags + ticket counter
} InvconvCudaPlan;

// Plans a solve on the current device. max_rows > 0 caps the strip height and force_ring uses
// the column ring even where the whole width fits (both for testing). Returns NULL or an error.
const char* invconv_cuda_plan(int dtype, int B, int C, int H, int W, int k, int max_rows, int force_ring,
                              InvconvCudaPlan* plan);

// x with causal_conv2d(x, weight, orientation) == y (adjoint = 0), or λ = T⁻ᵀ y (adjoint = 1);
// y, x: contiguous (B, C, H, W); weight: contiguous (C, C, k, k) with a lower-triangular centre
// block; orientation 0 TL, 1 TR, 2 BL, 3 BR. workspace: plan->workspace_bytes, 16-byte aligned.
// Enqueues a memset (only with strips > 1) and two kernels on `stream`: a constant number,
// independent of H and W. Returns NULL or an error.
const char* invconv_cuda_solve(const InvconvCudaPlan* plan, const void* y, const void* weight, void* x,
                               int orientation, int unit_diagonal, int adjoint, void* workspace,
                               cudaStream_t stream);

#ifdef __cplusplus
}
#endif
