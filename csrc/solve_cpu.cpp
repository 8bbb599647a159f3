// CPU solve of a causal convolution (docs/math.md §3) and its adjoint (§4), registered as the
// TorchScript-free operator library `invconv_cpu` (torch.ops.invconv_cpu.solve).
//
// Vectorisation does not depend on build flags: the kernel body (solve_cpu_kernel.h) is compiled
// twice in this file, once inside a `#pragma GCC target("avx2,fma")` region with AVX2/FMA
// intrinsics and once for the baseline x86-64 ISA with GCC vector extensions (SSE2), and the
// path is chosen at run time with __builtin_cpu_supports. We do not use at::vec::Vectorized: in
// an extension it is compiled for whatever -m flags the extension gets (the baseline, unless one
// passes -march=native, which would make the cached build unportable), so it would silently be
// the scalar fallback. Compilers other than GCC/Clang on x86-64 get the baseline path only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define INVCONV_X86_DISPATCH 1
#include <immintrin.h>
#else
#define INVCONV_X86_DISPATCH 0
#endif

#define INVCONV_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// Baseline ISA: GCC vector extensions of 16 bytes, the native width of SSE2 (x86-64) and NEON
// (arm64); wider generic vectors are lowered through memory and run many times slower.
namespace invconv_generic {
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));

template <class TT, class VV, int LANES>
struct OpsVX {
  using T = TT;
  using vec = VV;
  static constexpr int V = LANES;
  static INVCONV_INLINE vec zero() { return vec{}; }
  static INVCONV_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static INVCONV_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof v); }
  static INVCONV_INLINE vec bcast(const T* p) { return vec{} + *p; }
  static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return a * b + c; }
  static INVCONV_INLINE vec add(vec a, vec b) { return a + b; }
};
using OpsF32 = OpsVX<float, vf4, 4>;
using OpsF64 = OpsVX<double, vd2, 2>;

#include "solve_cpu_kernel.h"
}  // namespace invconv_generic

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA, compiled for that target whatever the build flags, used only where the CPU has it.
#if INVCONV_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace invconv_avx2 {
struct OpsF32 {
  using T = float;
  using vec = __m256;
  static constexpr int V = 8;
  static INVCONV_INLINE vec zero() { return _mm256_setzero_ps(); }
  static INVCONV_INLINE vec load(const T* p) { return _mm256_loadu_ps(p); }
  static INVCONV_INLINE void store(T* p, vec v) { _mm256_storeu_ps(p, v); }
  static INVCONV_INLINE vec bcast(const T* p) { return _mm256_broadcast_ss(p); }
  static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static INVCONV_INLINE vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
};
struct OpsF64 {
  using T = double;
  using vec = __m256d;
  static constexpr int V = 4;
  static INVCONV_INLINE vec zero() { return _mm256_setzero_pd(); }
  static INVCONV_INLINE vec load(const T* p) { return _mm256_loadu_pd(p); }
  static INVCONV_INLINE void store(T* p, vec v) { _mm256_storeu_pd(p, v); }
  static INVCONV_INLINE vec bcast(const T* p) { return _mm256_broadcast_sd(p); }
  static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_pd(a, b, c); }
  static INVCONV_INLINE vec add(vec a, vec b) { return _mm256_add_pd(a, b); }
};

#include "solve_cpu_kernel.h"
}  // namespace invconv_avx2
#pragma GCC pop_options
#endif

namespace {

enum Isa : int64_t { kIsaAuto = 0, kIsaGeneric = 1, kIsaAvx2 = 2 };

bool cpu_has_avx2_fma() {
#if INVCONV_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Aligned scratch that is zero on allocation.
template <class T>
struct Scratch {
  std::unique_ptr<T[]> raw;
  T* ptr = nullptr;
  explicit Scratch(size_t n) : raw(new T[n + 64 / sizeof(T)]()) {
    auto addr = reinterpret_cast<uintptr_t>(raw.get());
    ptr = raw.get() + ((64 - addr % 64) % 64) / sizeof(T);
  }
};

// wf[da][db][c][o] (o padded to Cp with zeros): L⁻¹ at the centre, -L⁻¹·W_(a,b) elsewhere, for
// the logical tap (da, db) of orientation (flip_h, flip_w); the adjoint reads
// W'[o][c][a][b] = W[C-1-c][C-1-o][k-1-a][k-1-b] by index arithmetic (docs/math.md §4).
template <class T>
void fold_weights(const T* w, int C, int k, bool flip_h, bool flip_w, bool adjoint, bool unit, T* wf, int Cp) {
  const int kk = k * k;
  auto weff = [&](int o, int c, int a, int b) -> T {
    if (adjoint) return w[((ptrdiff_t)(C - 1 - c) * C + (C - 1 - o)) * kk + (k - 1 - a) * k + (k - 1 - b)];
    return w[((ptrdiff_t)o * C + c) * kk + a * k + b];
  };
  auto tap_a = [&](int da) { return flip_h ? da : k - 1 - da; };
  auto tap_b = [&](int db) { return flip_w ? db : k - 1 - db; };
  const int a0 = tap_a(0), b0 = tap_b(0);
  // linvT[m][o] = L⁻¹[o][m], by forward substitution row by row of L⁻¹.
  std::vector<T> linv((size_t)C * C, T(0)), linvT((size_t)C * C, T(0));
  for (int o = 0; o < C; ++o) {
    T* row = &linv[(size_t)o * C];
    row[o] = T(1);
    for (int m = 0; m < o; ++m) {
      const T l = weff(o, m, a0, b0);
      if (l != T(0))
        for (int c = 0; c <= m; ++c) row[c] -= l * linv[(size_t)m * C + c];
    }
    if (!unit) {
      const T d = weff(o, o, a0, b0);
      for (int c = 0; c <= o; ++c) row[c] /= d;
    }
  }
  for (int o = 0; o < C; ++o)
    for (int m = 0; m < C; ++m) linvT[(size_t)m * C + o] = linv[(size_t)o * C + m];
  std::fill(wf, wf + (size_t)kk * C * Cp, T(0));
  for (int c = 0; c < C; ++c)
    for (int o = 0; o < C; ++o) wf[(size_t)c * Cp + o] = linv[(size_t)o * C + c];
  for (int da = 0; da < k; ++da)
    for (int db = 0; db < k; ++db) {
      if (da == 0 && db == 0) continue;
      T* t = wf + (size_t)(da * k + db) * C * Cp;
      const int a = tap_a(da), b = tap_b(db);
      for (int m = 0; m < C; ++m) {
        const T* lm = &linvT[(size_t)m * C];
        for (int c = 0; c < C; ++c) {
          const T v = weff(m, c, a, b);
          if (v == T(0)) continue;
          T* tc = t + (size_t)c * Cp;
          for (int o = m; o < C; ++o) tc[o] -= lm[o] * v;
        }
      }
    }
}

// Vector multiply-adds below which a parallel task is not worth waking another thread for
// (about 10 µs of work): tiny solves (tests, small layers) then run on the calling thread, which
// also keeps them clear of OpenMP barrier stalls on a loaded machine.
constexpr int64_t kParallelGrainOps = 32768;

int64_t grain_images(int C, int Cp, int H, int W, int k, int V) {
  const int64_t per_image = std::max<int64_t>(1, (int64_t)H * W * k * k * C * (Cp / V));
  return std::max<int64_t>(1, (kParallelGrainOps + per_image - 1) / per_image);
}

template <class Solver>
void run_images(const at::Tensor& y, const at::Tensor& w, at::Tensor& x, int orientation, bool unit, bool adjoint) {
  using T = typename Solver::T;
  const int64_t B = y.size(0);
  const int C = (int)y.size(1), H = (int)y.size(2), W = (int)y.size(3), k = (int)w.size(2);
  const int Cp = (C + Solver::V - 1) / Solver::V * Solver::V;  // output channels padded to whole vectors
  const int eff = adjoint ? (orientation ^ 3) : orientation;   // the transpose reads the opposite quadrant
  const bool flip_h = eff & 2, flip_w = eff & 1;
  Scratch<T> wf((size_t)k * k * C * Cp);
  fold_weights<T>(w.data_ptr<T>(), C, k, flip_h, flip_w, adjoint, unit, wf.ptr, Cp);
  std::vector<int> chan(C);
  for (int c = 0; c < C; ++c) chan[c] = adjoint ? C - 1 - c : c;
  const T* yp = y.data_ptr<T>();
  T* xp = x.data_ptr<T>();
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  // Images are independent (the solve couples all channels of one image), so tasks are images;
  // small problems stay on the calling thread (see kParallelGrainOps).
  at::parallel_for(0, B, grain_images(C, Cp, H, W, k, Solver::V), [&](int64_t b0, int64_t b1) {
    Scratch<T> ring((size_t)k * (W + k - 1) * Cp);
    Scratch<T> acc((size_t)W * Cp);
    std::vector<typename Solver::Tap> taps((size_t)k * k + 1);
    for (int64_t b = b0; b < b1; ++b)
      Solver::solve_image(yp + b * image, xp + b * image, wf.ptr, chan.data(), C, Cp, H, W, k, flip_h, flip_w,
                          ring.ptr, acc.ptr, taps.data());
  });
}

template <class T>
void solve_typed(const at::Tensor& y, const at::Tensor& w, at::Tensor& x, int orientation, bool unit, bool adjoint,
                 bool use_avx2) {
  constexpr bool f32 = std::is_same_v<T, float>;
#if INVCONV_X86_DISPATCH
  if (use_avx2) {
    using Ops = std::conditional_t<f32, invconv_avx2::OpsF32, invconv_avx2::OpsF64>;
    run_images<invconv_avx2::RowSolver<Ops>>(y, w, x, orientation, unit, adjoint);
    return;
  }
#endif
  using Ops = std::conditional_t<f32, invconv_generic::OpsF32, invconv_generic::OpsF64>;
  run_images<invconv_generic::RowSolver<Ops>>(y, w, x, orientation, unit, adjoint);
}

bool resolve_isa(int64_t isa) {
  TORCH_CHECK(isa == kIsaAuto || isa == kIsaGeneric || isa == kIsaAvx2,
              "invconv_cpu.solve: isa must be 0 (auto), 1 (generic) or 2 (avx2), got ", isa);
  if (isa == kIsaAvx2)
    TORCH_CHECK(cpu_has_avx2_fma(), "invconv_cpu.solve: isa=avx2 requested but this CPU (or build) has no AVX2+FMA");
  return isa == kIsaAvx2 || (isa == kIsaAuto && cpu_has_avx2_fma());
}

// x with causal_conv2d(x, weight, orientation) == y (adjoint=false), or λ = T⁻ᵀ y (adjoint=true).
// orientation: 0 TL, 1 TR, 2 BL, 3 BR. The weight's centre block must be lower triangular (the
// upper entries are ignored); with unit_diagonal its diagonal is taken as ones.
at::Tensor solve(const at::Tensor& y_, const at::Tensor& weight_, int64_t orientation, bool unit_diagonal,
                 bool adjoint, int64_t isa) {
  TORCH_CHECK(y_.device().is_cpu() && weight_.device().is_cpu(), "invconv_cpu.solve: CPU tensors required");
  TORCH_CHECK(y_.dim() == 4, "invconv_cpu.solve: y must be (B, C, H, W), got ", y_.sizes());
  TORCH_CHECK(weight_.dim() == 4 && weight_.size(0) == y_.size(1) && weight_.size(1) == y_.size(1) &&
                  weight_.size(2) == weight_.size(3) && weight_.size(2) >= 1,
              "invconv_cpu.solve: weight must be (C, C, k, k) with C = y.size(1); got ", weight_.sizes(), " for y ",
              y_.sizes());
  TORCH_CHECK(y_.scalar_type() == weight_.scalar_type(), "invconv_cpu.solve: y and weight dtypes differ");
  TORCH_CHECK(y_.scalar_type() == at::kFloat || y_.scalar_type() == at::kDouble,
              "invconv_cpu.solve: float32 or float64 required, got ", y_.scalar_type());
  TORCH_CHECK(orientation >= 0 && orientation < 4, "invconv_cpu.solve: orientation code must be 0..3");
  const bool use_avx2 = resolve_isa(isa);
  at::Tensor y = y_.contiguous(), w = weight_.contiguous();
  at::Tensor x = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return x;
  if (y.scalar_type() == at::kFloat)
    solve_typed<float>(y, w, x, (int)orientation, unit_diagonal, adjoint, use_avx2);
  else
    solve_typed<double>(y, w, x, (int)orientation, unit_diagonal, adjoint, use_avx2);
  return x;
}

template <class WG>
void weight_grad_run(const at::Tensor& x, const at::Tensor& lam, at::Tensor& out, int k, int orientation) {
  using T = typename WG::T;
  const int64_t B = x.size(0);
  const int C = (int)x.size(1), H = (int)x.size(2), W = (int)x.size(3);
  const int Cp = (C + WG::V - 1) / WG::V * WG::V;
  const int pt = (orientation & 2) ? 0 : k - 1, pl = (orientation & 1) ? 0 : k - 1;  // top/left padding
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  const size_t gsize = (size_t)k * k * C * Cp;
  const T* xp = x.data_ptr<T>();
  const T* lp = lam.data_ptr<T>();
  const int64_t grain = grain_images(C, Cp, H, W, k, WG::V);
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(1, B / grain), std::max(1, at::get_num_threads()));
  std::vector<Scratch<T>> partial;
  partial.reserve(tasks);
  for (int64_t t = 0; t < tasks; ++t) partial.emplace_back(gsize);
  // A partial gradient per task (images split evenly), summed at the end in task order: the
  // result does not depend on the thread schedule.
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> lamT((size_t)H * W * Cp);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = B * t / tasks; b < B * (t + 1) / tasks; ++b)
        WG::image(xp + b * image, lp + b * image, lamT.ptr, partial[t].ptr, C, Cp, H, W, k, pt, pl);
  });
  T* dst = out.data_ptr<T>();  // (C_out, C_in, k, k)
  for (int o = 0; o < C; ++o)
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < k * k; ++t) {
        T s = T(0);
        for (int64_t p = 0; p < tasks; ++p) s += partial[p].ptr[((size_t)t * C + c) * Cp + o];
        dst[((size_t)o * C + c) * k * k + t] = s;
      }
}

// The whole backward of the solve in one pass over the images: λ = T⁻ᵀ g by the adjoint solve,
// then (need_w) the weight gradient of x and λ while the image's λ is still in cache, negated
// (x = T⁻¹ y  ⇒  ∂L/∂W = −λ ⋆ x). One parallel region instead of two, no second pass over λ.
template <class Solver, class WG>
void backward_run(const at::Tensor& g, const at::Tensor& w, const at::Tensor& x, at::Tensor& lam, at::Tensor* gw,
                  int orientation, bool unit) {
  using T = typename Solver::T;
  static_assert(Solver::V == WG::V, "one padded layout");
  const int64_t B = g.size(0);
  const int C = (int)g.size(1), H = (int)g.size(2), W = (int)g.size(3), k = (int)w.size(2);
  const int Cp = (C + Solver::V - 1) / Solver::V * Solver::V;
  const int eff = orientation ^ 3;  // the adjoint solve reads the opposite quadrant
  const bool flip_h = eff & 2, flip_w = eff & 1;
  const int pt = (orientation & 2) ? 0 : k - 1, pl = (orientation & 1) ? 0 : k - 1;  // forward padding
  Scratch<T> wf((size_t)k * k * C * Cp);
  fold_weights<T>(w.data_ptr<T>(), C, k, flip_h, flip_w, /*adjoint=*/true, unit, wf.ptr, Cp);
  std::vector<int> chan(C);
  for (int c = 0; c < C; ++c) chan[c] = C - 1 - c;
  const T* gp = g.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* lp = lam.data_ptr<T>();
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  const size_t gsize = (size_t)k * k * C * Cp;
  const int64_t grain = grain_images(C, Cp, H, W, k, Solver::V);
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(1, B / grain), std::max(1, at::get_num_threads()));
  std::vector<Scratch<T>> partial;
  if (gw) {
    partial.reserve(tasks);
    for (int64_t t = 0; t < tasks; ++t) partial.emplace_back(gsize);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> ring((size_t)k * (W + k - 1) * Cp), acc((size_t)W * Cp);
    std::unique_ptr<Scratch<T>> lamT(gw ? new Scratch<T>((size_t)H * W * Cp) : nullptr);
    std::vector<typename Solver::Tap> taps((size_t)k * k + 1);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = B * t / tasks; b < B * (t + 1) / tasks; ++b) {
        Solver::solve_image(gp + b * image, lp + b * image, wf.ptr, chan.data(), C, Cp, H, W, k, flip_h, flip_w,
                            ring.ptr, acc.ptr, taps.data());
        if (gw) WG::image(xp + b * image, lp + b * image, lamT->ptr, partial[t].ptr, C, Cp, H, W, k, pt, pl);
      }
  });
  if (!gw) return;
  T* dst = gw->data_ptr<T>();  // (C_out, C_in, k, k)
  for (int o = 0; o < C; ++o)
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < k * k; ++t) {
        T s = T(0);
        for (int64_t p = 0; p < tasks; ++p) s += partial[p].ptr[((size_t)t * C + c) * Cp + o];
        dst[((size_t)o * C + c) * k * k + t] = -s;
      }
}

// The backward of solve(y, weight, orientation) at its output x for the output gradient grad:
// (∂L/∂y, ∂L/∂weight), the second undefined (None) unless need_weight_grad.
std::tuple<at::Tensor, at::Tensor> solve_backward(const at::Tensor& grad_, const at::Tensor& weight_,
                                                  const at::Tensor& x_, int64_t orientation, bool unit_diagonal,
                                                  bool need_weight_grad, int64_t isa) {
  TORCH_CHECK(grad_.device().is_cpu() && weight_.device().is_cpu() && x_.device().is_cpu(),
              "invconv_cpu.solve_backward: CPU tensors required");
  TORCH_CHECK(grad_.dim() == 4 && grad_.sizes() == x_.sizes(), "invconv_cpu.solve_backward: grad and x must be "
              "(B, C, H, W) of one shape; got ", grad_.sizes(), " and ", x_.sizes());
  TORCH_CHECK(weight_.dim() == 4 && weight_.size(0) == grad_.size(1) && weight_.size(1) == grad_.size(1) &&
                  weight_.size(2) == weight_.size(3) && weight_.size(2) >= 1,
              "invconv_cpu.solve_backward: weight must be (C, C, k, k); got ", weight_.sizes());
  TORCH_CHECK(grad_.scalar_type() == weight_.scalar_type() && grad_.scalar_type() == x_.scalar_type() &&
                  (grad_.scalar_type() == at::kFloat || grad_.scalar_type() == at::kDouble),
              "invconv_cpu.solve_backward: float32 or float64 tensors of one dtype required");
  TORCH_CHECK(orientation >= 0 && orientation < 4, "invconv_cpu.solve_backward: orientation code must be 0..3");
  const bool use_avx2 = resolve_isa(isa);
  at::Tensor g = grad_.contiguous(), w = weight_.contiguous(), x = x_.contiguous();
  at::Tensor lam = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor gw;
  if (need_weight_grad) gw = at::zeros(w.sizes(), w.options());
  if (g.numel() == 0) return {lam, gw};
  at::Tensor* gwp = need_weight_grad ? &gw : nullptr;
  const bool f32 = g.scalar_type() == at::kFloat;
  const int o = (int)orientation;
#if INVCONV_X86_DISPATCH
  if (use_avx2) {
    if (f32)
      backward_run<invconv_avx2::RowSolver<invconv_avx2::OpsF32>, invconv_avx2::WeightGrad<invconv_avx2::OpsF32>>(
          g, w, x, lam, gwp, o, unit_diagonal);
    else
      backward_run<invconv_avx2::RowSolver<invconv_avx2::OpsF64>, invconv_avx2::WeightGrad<invconv_avx2::OpsF64>>(
          g, w, x, lam, gwp, o, unit_diagonal);
    return {lam, gw};
  }
#endif
  if (f32)
    backward_run<invconv_generic::RowSolver<invconv_generic::OpsF32>,
                 invconv_generic::WeightGrad<invconv_generic::OpsF32>>(g, w, x, lam, gwp, o, unit_diagonal);
  else
    backward_run<invconv_generic::RowSolver<invconv_generic::OpsF64>,
                 invconv_generic::WeightGrad<invconv_generic::OpsF64>>(g, w, x, lam, gwp, o, unit_diagonal);
  return {lam, gw};
}

// ∂/∂W of Σ lam · causal_conv2d(x, W, orientation): the convolution weight gradient of input x
// and output gradient lam, shape (C, C, k, k).
at::Tensor weight_grad(const at::Tensor& x_, const at::Tensor& lam_, int64_t k, int64_t orientation, int64_t isa) {
  TORCH_CHECK(x_.device().is_cpu() && lam_.device().is_cpu(), "invconv_cpu.weight_grad: CPU tensors required");
  TORCH_CHECK(x_.dim() == 4 && x_.sizes() == lam_.sizes(), "invconv_cpu.weight_grad: x and lam must be (B, C, H, W) "
              "of the same shape; got ", x_.sizes(), " and ", lam_.sizes());
  TORCH_CHECK(x_.scalar_type() == lam_.scalar_type() &&
                  (x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble),
              "invconv_cpu.weight_grad: float32 or float64 tensors of one dtype required");
  TORCH_CHECK(k >= 1 && orientation >= 0 && orientation < 4, "invconv_cpu.weight_grad: bad k or orientation");
  const bool use_avx2 = resolve_isa(isa);
  at::Tensor x = x_.contiguous(), lam = lam_.contiguous();
  const int64_t C = x.size(1);
  at::Tensor out = at::zeros({C, C, k, k}, x.options());
  if (x.numel() == 0) return out;
  const bool f32 = x.scalar_type() == at::kFloat;
#if INVCONV_X86_DISPATCH
  if (use_avx2) {
    if (f32)
      weight_grad_run<invconv_avx2::WeightGrad<invconv_avx2::OpsF32>>(x, lam, out, (int)k, (int)orientation);
    else
      weight_grad_run<invconv_avx2::WeightGrad<invconv_avx2::OpsF64>>(x, lam, out, (int)k, (int)orientation);
    return out;
  }
#endif
  if (f32)
    weight_grad_run<invconv_generic::WeightGrad<invconv_generic::OpsF32>>(x, lam, out, (int)k, (int)orientation);
  else
    weight_grad_run<invconv_generic::WeightGrad<invconv_generic::OpsF64>>(x, lam, out, (int)k, (int)orientation);
  return out;
}

std::string best_isa() { return cpu_has_avx2_fma() ? "avx2+fma" : "generic"; }

}  // namespace

TORCH_LIBRARY(invconv_cpu, m) {
  m.def("solve(Tensor y, Tensor weight, int orientation, bool unit_diagonal, bool adjoint=False, int isa=0) -> Tensor",
        &solve);
  m.def("weight_grad(Tensor x, Tensor lam, int k, int orientation, int isa=0) -> Tensor", &weight_grad);
  m.def(
      "solve_backward(Tensor grad, Tensor weight, Tensor x, int orientation, bool unit_diagonal, "
      "bool need_weight_grad, int isa=0) -> (Tensor, Tensor)",
      &solve_backward);
  m.def("isa() -> str", &best_isa);
}
