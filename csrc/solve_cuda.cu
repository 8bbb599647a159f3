// CUDA solve of a causal convolution (docs/math.md §3) and its adjoint (§4). No torch headers: this
// file compiles with nvcc alone (tests/test_native.py does so wherever nvcc exists), and
// solve_cuda_binding.cpp wraps the C interface of solve_cuda.h for torch.
//
// One solve = (a memset of the progress flags, only when an image is split into strips) + a
// fold kernel + ONE solve kernel, whatever H and W: no launch per anti-diagonal, no host sync.
//
// fold_kernel: every block inverts the C×C centre block L (forward substitution, one column per
//   thread) and writes its share of the folded weight wf[da][db][c][o] = -L⁻¹·W at the
//   off-centre taps and L⁻¹ at the centre, in logical (TL) tap coordinates; orientation and, for
//   the adjoint, the channel-transposed spatially flipped kernel W'[o][c][a][b] =
//   W[C-1-c][C-1-o][k-1-a][k-1-b] are index arithmetic. Then
//       x[i][j][o] = Σ_{da,db,c} wf[da][db][c][o] · plane[i-da][j-db][c]
//   where plane holds solved x except at (i, j) itself, which still holds y.
//
// solve_kernel: one block per (image, strip of R rows). The strip's rows (plus k-1 halo rows
//   above) live in shared memory as a plane in logical coordinates, channels last, initialised
//   with y; the block steps the strip's anti-diagonals e = r + j with two __syncthreads() each:
//     1. partial sums: a thread owns one pixel of the diagonal (lanes = consecutive pixels, so
//        weight reads are warp-uniform broadcasts), OB output channels, and a slice of the
//        (tap, input channel) sum;
//     2. reduce the slices, write x into the plane (over y), load what the next step needs.
//   When the image fits (32×32×12 does, docs/math.md §3) there is one strip per image: a persistent
//   block that reads y and writes x coalesced once. Taller images are cut into strips owned by
//   separate blocks: strip s publishes, after every step, how many columns of its last k-1
//   rows are final (store-release of a flag, after the rows went to global memory), and strip
//   s+1 loads its halo column by column after an acquire-load of that flag. Blocks take strips
//   from an atomic ticket in dependency order (all images' strip 0 first, then strip 1, ...),
//   so a block only ever waits for a block that is already running: no deadlock whatever the
//   residency. Wide images keep only a ring of Wr = R + max(k - 1, 1) columns in shared memory,
//   loading y and evicting x one column per step.

#include "solve_cuda.h"

#ifndef INVCONV_CUDA_EMULATION
#include <cuda/atomic>
#include <cuda_runtime.h>
// tests/cuda_emulation/ compiles this file as host C++ (one std::thread per CUDA thread, a
// barrier for __syncthreads) to check the indexing, strip and ring logic without a GPU.
#define INVCONV_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define INVCONV_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <type_traits>

namespace {

#ifndef INVCONV_CUDA_THREADS
#define INVCONV_CUDA_THREADS 256
#endif
constexpr int kThreads = INVCONV_CUDA_THREADS;
constexpr int kMaxRows = 32;     // strip height cap: pixels per diagonal ≈ lanes of a warp
constexpr int kMaxSlices = 32;
constexpr int kPrefetch = 8;     // column items a thread keeps in registers between fetch and commit

struct Geometry {
  int B, C, H, W, k;
  int flip_h, flip_w, rev;  // effective orientation (after the adjoint's transpose) and channel reversal
  int R, S, Wr, ring, pitch, ob, n_ob, Cop, NS, SL, RD, w_in_smem;
};

// Physical NCHW offset of logical (image b, channel c, row i, column j).
__device__ __forceinline__ int64_t gidx(const Geometry& g, int b, int c, int i, int j) {
  const int cc = g.rev ? g.C - 1 - c : c;
  const int h = g.flip_h ? g.H - 1 - i : i;
  const int w = g.flip_w ? g.W - 1 - j : j;
  return ((static_cast<int64_t>(b) * g.C + cc) * g.H + h) * g.W + w;
}

// Effective weight W_eff[o][c][a][b] (the adjoint's kernel by index arithmetic).
template <typename T>
__device__ __forceinline__ T weff(const T* w, int C, int k, int adjoint, int o, int c, int a, int b) {
  if (adjoint) return w[((static_cast<int64_t>(C - 1 - c) * C + (C - 1 - o)) * k + (k - 1 - a)) * k + (k - 1 - b)];
  return w[((static_cast<int64_t>(o) * C + c) * k + a) * k + b];
}

// wf[(da*k + db)][c][o], o padded to Cop with zeros. Dynamic shared memory: C*C Acc (L⁻¹).
template <typename T, typename Acc>
__global__ void fold_kernel(const T* __restrict__ w, Acc* __restrict__ wf, int C, int k, int Cop, int flip_h,
                            int flip_w, int adjoint, int unit) {
  INVCONV_DYNAMIC_SHARED(fold_smem);
  Acc* linv = reinterpret_cast<Acc*>(fold_smem);  // linv[o*C + c]
  const int a0 = flip_h ? 0 : k - 1, b0 = flip_w ? 0 : k - 1;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {  // column c of L⁻¹, top to bottom
    for (int o = 0; o < C; ++o) {
      Acc v = (o == c) ? Acc(1) : Acc(0);
      for (int m = c; m < o; ++m) v -= static_cast<Acc>(weff(w, C, k, adjoint, o, m, a0, b0)) * linv[m * C + c];
      if (!unit) v /= static_cast<Acc>(weff(w, C, k, adjoint, o, o, a0, b0));
      linv[o * C + c] = (o < c) ? Acc(0) : v;
    }
  }
  __syncthreads();
  const int64_t total = static_cast<int64_t>(k) * k * C * Cop;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int o = static_cast<int>(idx % Cop);
    const int c = static_cast<int>((idx / Cop) % C);
    const int t = static_cast<int>(idx / (static_cast<int64_t>(Cop) * C));
    Acc v = Acc(0);
    if (o < C) {
      if (t == 0) {
        v = linv[o * C + c];
      } else {
        const int da = t / k, db = t % k;
        const int a = flip_h ? da : k - 1 - da, b = flip_w ? db : k - 1 - db;
        for (int m = 0; m <= o; ++m) v -= linv[o * C + m] * static_cast<Acc>(weff(w, C, k, adjoint, m, c, a, b));
      }
    }
    wf[idx] = v;
  }
}

// OB consecutive folded weights: 16-byte loads where OB allows (the weights are 16-byte aligned:
// Cop is a multiple of OB and OB·sizeof(Acc) of 16 in those cases), which cuts the shared-memory
// instructions of the inner loop by up to four.
template <typename Acc, int OB>
__device__ __forceinline__ void load_weights(const Acc* wp, Acc (&w)[OB]) {
  if constexpr (std::is_same<Acc, float>::value && OB % 4 == 0) {
#pragma unroll
    for (int i = 0; i < OB / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(wp)[i];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (std::is_same<Acc, double>::value && OB % 2 == 0) {
#pragma unroll
    for (int i = 0; i < OB / 2; ++i) {
      const double2 v = reinterpret_cast<const double2*>(wp)[i];
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int o = 0; o < OB; ++o) w[o] = wp[o];
  }
}

__device__ __forceinline__ int flag_load_acquire(int* p) {
  cuda::atomic_ref<int, cuda::thread_scope_device> ref(*p);
  return ref.load(cuda::memory_order_acquire);
}

__device__ __forceinline__ void flag_store_release(int* p, int v) {
  cuda::atomic_ref<int, cuda::thread_scope_device> ref(*p);
  ref.store(v, cuda::memory_order_release);
}

template <typename T, typename Acc, int OB>
__global__ void __launch_bounds__(kThreads) solve_kernel(Geometry g, const T* __restrict__ y, T* x,
                                                          const Acc* __restrict__ wf_global, int* flags,
                                                          int* ticket) {
  INVCONV_DYNAMIC_SHARED(smem_raw);
  __shared__ int s_unit;
  __shared__ int s_have;  // halo columns [0, s_have) of the producer strip are final

  const int tid = threadIdx.x;
  const int k = g.k, C = g.C, W = g.W, R = g.R;

  // Which (image, strip): in dependency order from the ticket when strips wait on each other.
  if (g.S > 1) {
    if (tid == 0) s_unit = atomicAdd(ticket, 1);
    __syncthreads();
  }
  const int unit = g.S > 1 ? s_unit : blockIdx.x;
  const int b = unit % g.B, s = unit / g.B;
  const int row0 = s * R;                              // first logical row of the strip
  const int Rs = min(R, g.H - row0);                   // rows in this strip
  const bool has_producer = s > 0;
  const bool has_consumer = s + 1 < g.S;
  const int publish_from = Rs - (k - 1);               // rows >= this go to global at once (consumer's halo)
  int* my_flag = flags ? flags + static_cast<int64_t>(b) * g.S + s : nullptr;
  int* producer_flag = has_producer ? flags + static_cast<int64_t>(b) * g.S + s - 1 : nullptr;

  Acc* wsm = reinterpret_cast<Acc*>(smem_raw);
  const int64_t wf_size = static_cast<int64_t>(k) * k * C * g.Cop;
  Acc* plane = wsm + (g.w_in_smem ? wf_size : 0);     // (R + k - 1) rows × pitch
  Acc* part = plane + static_cast<int64_t>(R + k - 1) * g.pitch;  // [n_ob][NS][OB][R]
  const Acc* wf = g.w_in_smem ? wsm : wf_global;

  auto slot = [&](int j) {  // plane column of logical column j (j >= -(k-1))
    const int col = j + k - 1;
    return g.ring ? col % g.Wr : col;
  };
  auto at = [&](int r, int j) -> Acc* {  // plane element (strip row r in [-(k-1), R), column j), channel 0
    return plane + static_cast<int64_t>(r + k - 1) * g.pitch + slot(j) * C;
  };

  // ---- prologue: weights, zero plane, y (whole strip, coalesced) or the first column
  if (g.w_in_smem)
    for (int64_t i = tid; i < wf_size; i += blockDim.x) wsm[i] = wf_global[i];
  for (int64_t i = tid; i < static_cast<int64_t>(R + k - 1) * g.pitch; i += blockDim.x) plane[i] = Acc(0);
  __syncthreads();
  if (!g.ring) {
    const int64_t n = static_cast<int64_t>(C) * Rs * W;
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const int wp = static_cast<int>(i % W);  // physical column fastest: coalesced reads
      const int r = static_cast<int>((i / W) % Rs);
      const int c = static_cast<int>(i / (static_cast<int64_t>(W) * Rs));
      const int j = g.flip_w ? W - 1 - wp : wp;
      at(r, j)[c] = static_cast<Acc>(y[gidx(g, b, c, row0 + r, j)]);
    }
  }

  // Columns enter the plane one step ahead of use, software-pipelined: at step e the block
  // commits column e+1 (fetched into registers during step e-1) and fetches column e+2, so the
  // global-memory latency of those loads overlaps a step of arithmetic instead of adding to it.
  // A column is its k-1 halo rows (from the producer strip, already waited for; zeros for the
  // first strip) and, in ring mode, y of the strip's rows; committing into a ring slot first
  // evicts the solved column that held it. Items past kPrefetch per thread are loaded at commit.
  const bool moving_columns = has_producer || g.ring;
  const int column_items = ((k - 1) + Rs) * C;
  Acc pf[kPrefetch];
  auto fetch_item = [&](int i, int j) -> Acc {
    const int r = i / C - (k - 1), c = i % C;
    if (r < 0) return has_producer ? static_cast<Acc>(__ldcg(x + gidx(g, b, c, row0 + r, j))) : Acc(0);
    return g.ring ? static_cast<Acc>(y[gidx(g, b, c, row0 + r, j)]) : Acc(0);
  };
  auto fetch_column = [&](int j) {
#pragma unroll
    for (int m = 0; m < kPrefetch; ++m) {
      const int i = tid + m * static_cast<int>(blockDim.x);
      if (i < column_items) pf[m] = fetch_item(i, j);
    }
  };
  auto commit_column = [&](int j) {
    for (int i = tid, m = 0; i < column_items; i += blockDim.x, ++m) {
      const int r = i / C - (k - 1), c = i % C;
      if (r < 0 && !has_producer) continue;
      if (r >= 0 && !g.ring) continue;
      Acc* dst = at(r, j) + c;
      const int old = j - g.Wr;  // the column this ring slot held
      if (r >= 0 && old >= 0 && !(has_consumer && r >= publish_from))
        x[gidx(g, b, c, row0 + r, old)] = static_cast<T>(*dst);
      Acc v = Acc(0);
      if (m < kPrefetch) {
#pragma unroll
        for (int q = 0; q < kPrefetch; ++q)  // constant register indices
          if (q == m) v = pf[q];
      } else {
        v = fetch_item(i, j);
      }
      *dst = v;
    }
  };
  auto wait_for_producer = [&](int columns) {  // thread 0 only
    if (s_have >= columns) return;
    int v;
    while ((v = flag_load_acquire(producer_flag)) < columns) __nanosleep(64);
    s_have = v;
  };

  if (tid == 0) {
    s_have = 0;
    if (has_producer) wait_for_producer(min(W, 2));
  }
  __syncthreads();
  if (moving_columns) {
    fetch_column(0);
    commit_column(0);
    if (W > 1) fetch_column(1);
  }
  __syncthreads();

  // ---- the anti-diagonals of the strip
  const int steps = Rs + W - 1;
  for (int e = 0; e < steps; ++e) {
    const int r_lo = max(0, e - (W - 1)), r_hi = min(Rs - 1, e);
    const int n_e = r_hi - r_lo + 1;
    if (tid == 0 && has_producer && e + 2 < W) wait_for_producer(e + 3);  // column e+2, fetched below

    // 1. partial sums over slices of the (tap, input channel) sum
    for (int job = tid; job < R * g.NS * g.n_ob; job += blockDim.x) {
      const int pix = job % R;
      if (pix >= n_e) continue;
      const int rest = job / R;
      const int sl = rest % g.NS, ob = rest / g.NS;
      const int r = r_lo + pix, j = e - r;
      Acc acc[OB];
#pragma unroll
      for (int o = 0; o < OB; ++o) acc[o] = Acc(0);
      const int q0 = sl * g.SL, q1 = min(g.RD, q0 + g.SL);
      if (q0 < q1) {
        int t = q0 / C, c = q0 - t * C;
        int da = t / k, db = t - da * k;
        const Acc* src = at(r - da, j - db);
        const Acc* wp = wf + static_cast<int64_t>(q0) * g.Cop + ob * OB;
        for (int q = q0; q < q1; ++q) {
          const Acc xv = src[c];
          Acc wv[OB];
          load_weights<Acc, OB>(wp, wv);
#pragma unroll
          for (int o = 0; o < OB; ++o) acc[o] = fma(wv[o], xv, acc[o]);
          wp += g.Cop;
          if (++c == C) {
            c = 0;
            if (++db == k) {
              db = 0;
              ++da;
            }
            if (da < k) src = at(r - da, j - db);
          }
        }
      }
      Acc* out = part + (static_cast<int64_t>(ob * g.NS + sl) * OB) * R + pix;
#pragma unroll
      for (int o = 0; o < OB; ++o) out[static_cast<int64_t>(o) * R] = acc[o];
    }
    __syncthreads();

    // 2. reduce, write x over y; publish rows for the next strip; fetch the next column
    bool published = false;
    for (int it = tid; it < n_e * C; it += blockDim.x) {
      const int pix = it % n_e, o = it / n_e;
      const int ob = o / OB, oo = o - ob * OB;
      const Acc* p = part + (static_cast<int64_t>(ob * g.NS) * OB + oo) * R + pix;
      Acc sum = Acc(0);
      for (int sl = 0; sl < g.NS; ++sl) sum += p[static_cast<int64_t>(sl) * OB * R];
      const int r = r_lo + pix, j = e - r;
      at(r, j)[o] = sum;
      if (has_consumer && r >= publish_from) {
        x[gidx(g, b, o, row0 + r, j)] = static_cast<T>(sum);
        published = true;
      }
    }
    if (moving_columns && e + 1 < W) {
      commit_column(e + 1);
      if (e + 2 < W) fetch_column(e + 2);
    }
    if (published) __threadfence();
    __syncthreads();
    if (tid == 0 && has_consumer && e >= Rs - 1) flag_store_release(my_flag, min(W, e - Rs + 2));
  }

  // ---- epilogue: the strip's x (the rows not published already) to global memory
  const int rows_out = has_consumer ? publish_from : Rs;
  if (!g.ring) {
    const int64_t n = static_cast<int64_t>(C) * rows_out * W;
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const int wp = static_cast<int>(i % W);
      const int r = static_cast<int>((i / W) % rows_out);
      const int c = static_cast<int>(i / (static_cast<int64_t>(W) * rows_out));
      const int j = g.flip_w ? W - 1 - wp : wp;
      x[gidx(g, b, c, row0 + r, j)] = static_cast<T>(at(r, j)[c]);
    }
  } else {
    const int first = max(0, W - g.Wr);  // columns below were evicted by commit_column(Wr .. W-1)
    const int64_t n = static_cast<int64_t>(C) * rows_out * (W - first);
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const int j = first + static_cast<int>(i % (W - first));
      const int r = static_cast<int>((i / (W - first)) % rows_out);
      const int c = static_cast<int>(i / (static_cast<int64_t>(W - first) * rows_out));
      x[gidx(g, b, c, row0 + r, j)] = static_cast<T>(at(r, j)[c]);
    }
  }
}

// Dynamic shared memory a block may use on the current device (the opt-in limit, less room for
// the kernel's static __shared__ variables), cached per device.
constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // leave no error state behind; device 0's limit is a safe guess
    dev = 0;
  }
  return dev;
}

int device_smem_limit() {
  static std::atomic<int> cached[kMaxDevices] = {};
  const int dev = current_device();
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable) {
    const int v = cached[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || optin <= 0) {
    cudaGetLastError();
    optin = 48 * 1024;
  }
  optin -= 256;
  if (cacheable) cached[dev].store(optin, std::memory_order_relaxed);
  return optin;
}

// "invconv_cuda: WHAT: cudaErrorX: CUDA's own text", after clearing the (non-sticky) error state so
// that the next CUDA call in this thread does not report it again. Valid until the next error
// in the same thread.
const char* cuda_error(const char* what, cudaError_t err) {
  cudaGetLastError();
  thread_local std::string message;
  message = std::string("invconv_cuda: ") + what + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  return message.c_str();
}

// Lets `Kernel` use the device's whole opt-in dynamic shared memory: once per device and kernel
// instantiation (std::call_once, so two host threads never interleave it with a launch), not on
// every call. Every plan stays within that limit, so one setting serves all of them.
template <auto Kernel>
cudaError_t allow_max_dynamic_smem() {
  static std::once_flag once[kMaxDevices];
  static cudaError_t result[kMaxDevices];
  const int dev = current_device();
  if (dev < 0 || dev >= kMaxDevices)
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device_smem_limit());
  std::call_once(once[dev], [dev] {
    result[dev] = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, device_smem_limit());
  });
  return result[dev];
}

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

template <typename T, typename Acc, int OB>
const char* launch(const InvconvCudaPlan* p, const Geometry& g, const void* y, const void* w, void* x,
                   int adjoint, int unit, void* workspace, cudaStream_t stream) {
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  Acc* wf = reinterpret_cast<Acc*>(ws);
  const size_t wf_bytes = align16(static_cast<size_t>(g.k) * g.k * g.C * g.Cop * sizeof(Acc));
  int* flags = nullptr;
  int* ticket = nullptr;
  if (g.S > 1) {
    flags = reinterpret_cast<int*>(ws + wf_bytes);
    ticket = flags + static_cast<size_t>(g.B) * g.S;
    const cudaError_t err = cudaMemsetAsync(flags, 0, (static_cast<size_t>(g.B) * g.S + 1) * sizeof(int), stream);
    if (err != cudaSuccess) return cuda_error("cudaMemsetAsync of the progress flags failed", err);
  }
  const int64_t fold_items = static_cast<int64_t>(g.k) * g.k * g.C * g.Cop;
  const int fold_blocks = static_cast<int>(std::min<int64_t>(64, (fold_items + kThreads - 1) / kThreads));
  const size_t fold_smem = static_cast<size_t>(g.C) * g.C * sizeof(Acc);
  constexpr auto fold = fold_kernel<T, Acc>;
  cudaError_t err = fold_smem > 48 * 1024 ? allow_max_dynamic_smem<fold>() : cudaSuccess;
  if (err != cudaSuccess) return cuda_error("cannot reserve the fold kernel's shared memory", err);
  INVCONV_LAUNCH(fold, fold_blocks, kThreads, fold_smem, stream, static_cast<const T*>(w), wf, g.C, g.k, g.Cop,
                 g.flip_h, g.flip_w, adjoint, unit);
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_error("fold kernel launch failed", err);
  constexpr auto kernel = solve_kernel<T, Acc, OB>;
  if ((err = allow_max_dynamic_smem<kernel>()) != cudaSuccess)
    return cuda_error("cannot reserve the planned shared memory", err);
  const unsigned blocks = static_cast<unsigned>(g.B) * static_cast<unsigned>(g.S);
  INVCONV_LAUNCH(kernel, blocks, kThreads, p->smem_bytes, stream, g, static_cast<const T*>(y), static_cast<T*>(x), wf,
                 flags, ticket);
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_error("solve kernel launch failed", err);
  return nullptr;
}

template <typename T, typename Acc>
const char* dispatch_ob(const InvconvCudaPlan* p, const Geometry& g, const void* y, const void* w, void* x,
                        int adjoint, int unit, void* ws, cudaStream_t stream) {
  switch (g.ob) {
    case 1: return launch<T, Acc, 1>(p, g, y, w, x, adjoint, unit, ws, stream);
    case 2: return launch<T, Acc, 2>(p, g, y, w, x, adjoint, unit, ws, stream);
    case 4: return launch<T, Acc, 4>(p, g, y, w, x, adjoint, unit, ws, stream);
    case 8: return launch<T, Acc, 8>(p, g, y, w, x, adjoint, unit, ws, stream);
    case 12: return launch<T, Acc, 12>(p, g, y, w, x, adjoint, unit, ws, stream);
    case 16: return launch<T, Acc, 16>(p, g, y, w, x, adjoint, unit, ws, stream);
    default: return "invconv_cuda: internal error (output block)";
  }
}

}  // namespace

extern "C" const char* invconv_cuda_plan(int dtype, int B, int C, int H, int W, int k, int max_rows, int force_ring,
                                         InvconvCudaPlan* plan) {
  if (dtype != 0 && dtype != 1) return "invconv_cuda: float32 or float64 required";
  if (B < 1 || C < 1 || H < 1 || W < 1 || k < 1) return "invconv_cuda: empty or invalid shape";
  const size_t acc = dtype == 0 ? sizeof(float) : sizeof(double);
  const int limit = device_smem_limit();
  static const int kOutputBlocks[] = {1, 2, 4, 8, 12, 16};  // instantiated in dispatch_ob
  int ob = 16;
  for (int cand : kOutputBlocks)
    if (cand >= (C < 16 ? C : 16)) {
      ob = cand;
      break;
    }
  const int n_ob = (C + ob - 1) / ob, Cop = n_ob * ob;
  if (static_cast<size_t>(C) * C * acc > static_cast<size_t>(limit))  // the fold kernel's L⁻¹
    return "invconv_cuda: this shape does not fit in shared memory (too many channels for the centre block's inverse)";
  const size_t wf_elems = static_cast<size_t>(k) * k * C * Cop;
  const bool w_in_smem = wf_elems * acc <= static_cast<size_t>(limit) / 3;
  const int RD = k * k * C;
  int r_cap = H < kMaxRows ? H : kMaxRows;
  if (max_rows > 0 && max_rows < r_cap) r_cap = max_rows;
  for (int cand = r_cap; cand >= 1; --cand) {
    const int S = (H + cand - 1) / cand;
    const int R = (H + S - 1) / S;  // balanced strips
    if (S > 1 && R < k - 1) break;  // a strip's halo must come from the strip just above
    for (int ring = force_ring ? 1 : 0; ring <= 1; ++ring) {
      // The ring must hold the k-1 columns a diagonal reads to its left and, besides the columns
      // it writes, the column committed during the same step: R + k - 1 slots, and at least R + 1.
      // With k = 1 and R slots, the slot committed at step e (column e+1, evicting e+1-R) is the
      // one the diagonal's bottom pixel writes (column e+1-R) in the same barrier window.
      int Wr = W + k - 1;
      const int ring_cols = R + (k > 1 ? k - 1 : 1);
      if (ring && ring_cols < Wr) Wr = ring_cols;
      int pitch = Wr * C;
      if (((pitch - C) & 1) == 0) pitch += 1;  // odd stride between the pixels of a diagonal
      int NS = kThreads / (R * n_ob);
      NS = NS < 1 ? 1 : (NS > kMaxSlices ? kMaxSlices : NS);
      if (NS > RD) NS = RD;
      const int SL = (RD + NS - 1) / NS;
      NS = (RD + SL - 1) / SL;
      const size_t smem = (w_in_smem ? wf_elems : 0) * acc + static_cast<size_t>(R + k - 1) * pitch * acc +
                          static_cast<size_t>(NS) * n_ob * ob * R * acc;
      if (smem > static_cast<size_t>(limit)) continue;
      plan->dtype = dtype;
      plan->B = B, plan->C = C, plan->H = H, plan->W = W, plan->k = k;
      plan->rows = R, plan->strips = S, plan->ring_cols = Wr, plan->ring = ring, plan->pitch = pitch;
      plan->ob = ob, plan->n_ob = n_ob, plan->slices = NS, plan->weights_in_smem = w_in_smem;
      plan->threads = kThreads;
      plan->smem_bytes = smem;
      plan->workspace_bytes = align16(wf_elems * acc) + (static_cast<size_t>(B) * S + 1) * sizeof(int);
      return nullptr;
    }
  }
  return "invconv_cuda: this shape does not fit in shared memory (too many channels or too large a kernel)";
}

extern "C" const char* invconv_cuda_solve(const InvconvCudaPlan* p, const void* y, const void* weight, void* x,
                                          int orientation, int unit_diagonal, int adjoint, void* workspace,
                                          cudaStream_t stream) {
  if (orientation < 0 || orientation > 3) return "invconv_cuda: orientation code must be 0..3";
  const int eff = adjoint ? (orientation ^ 3) : orientation;  // the transpose reads the opposite quadrant
  Geometry g;
  g.B = p->B, g.C = p->C, g.H = p->H, g.W = p->W, g.k = p->k;
  g.flip_h = (eff & 2) ? 1 : 0, g.flip_w = (eff & 1) ? 1 : 0, g.rev = adjoint ? 1 : 0;
  g.R = p->rows, g.S = p->strips, g.Wr = p->ring_cols, g.ring = p->ring, g.pitch = p->pitch;
  g.ob = p->ob, g.n_ob = p->n_ob, g.Cop = p->ob * p->n_ob, g.NS = p->slices;
  g.RD = p->k * p->k * p->C;
  g.SL = (g.RD + g.NS - 1) / g.NS;
  g.w_in_smem = p->weights_in_smem;
  if (p->dtype == 0) return dispatch_ob<float, float>(p, g, y, weight, x, adjoint, unit_diagonal, workspace, stream);
  return dispatch_ob<double, double>(p, g, y, weight, x, adjoint, unit_diagonal, workspace, stream);
}
