// CPU solve of a causal convolution (docs/math.md §3) and its adjoint (§4), registered as the
// TorchScript-free operator library `invconv_cpu` (torch.ops.invconv_cpu.solve).
//
// Vectorisation does not depend on build flags: the kernel body (solve_cpu_kernel.h) is compiled
// three times in this file, inside `#pragma GCC target("avx512f,avx512vl,...")` and
// `#pragma GCC target("avx2,fma")` regions with intrinsics and once for the baseline ISA with GCC
// vector extensions (SSE2 on x86-64), and the path is chosen at run time with
// __builtin_cpu_supports. We do not use at::vec::Vectorized: in an extension it is compiled for
// whatever -m flags the extension gets (the baseline, unless one passes -march=native, which
// would make the cached build unportable), so it would silently be the scalar fallback.
// Compilers other than GCC/Clang on x86-64 get the baseline path only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
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
// (arm64); wider generic vectors are lowered through memory and run many times slower. One
// width only, so the half and quarter widths alias it (and are never used, see kHasHalf).
namespace invconv_generic {
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));

template <class TT, class VV, int LANES>
struct VX {
  using T = TT;
  using vec = VV;
  static constexpr int N = LANES;
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
  static INVCONV_INLINE T hsum(vec v) {
    T a[LANES];
    std::memcpy(a, &v, sizeof v);
    T s = a[0];
    for (int i = 1; i < LANES; ++i) s += a[i];
    return s;
  }
};
template <class TT, class VV, int LANES>
struct OpsVX {
  using T = TT;
  using F = VX<TT, VV, LANES>;
  using H = F;
  using Q = F;
  static constexpr bool kHasHalf = false, kHasQuarter = false;
  static constexpr int G = LANES;       // padding granularity: 16 bytes
  static constexpr int kAccRegs = 12;   // 16 vector registers
};
using OpsF32 = OpsVX<float, vf4, 4>;
using OpsF64 = OpsVX<double, vd2, 2>;

#include "solve_cpu_kernel.h"
}  // namespace invconv_generic

#if INVCONV_X86_DISPATCH
// 256- and 128-bit lanes, shared by the AVX2 and AVX-512 regions (compiled in each for its
// target: VEX there, EVEX with 32 registers here).
#define INVCONV_AVX_LANES                                                                           \
  struct F32x8 {                                                                                    \
    using T = float;                                                                                \
    using vec = __m256;                                                                             \
    static constexpr int N = 8;                                                                     \
    static INVCONV_INLINE vec zero() { return _mm256_setzero_ps(); }                                \
    static INVCONV_INLINE vec load(const T* p) { return _mm256_loadu_ps(p); }                       \
    static INVCONV_INLINE void store(T* p, vec v) { _mm256_storeu_ps(p, v); }                       \
    static INVCONV_INLINE vec bcast(const T* p) { return _mm256_broadcast_ss(p); }                  \
    static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }       \
    static INVCONV_INLINE vec add(vec a, vec b) { return _mm256_add_ps(a, b); }                     \
    static INVCONV_INLINE T hsum(vec v) {                                                           \
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                \
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                       \
      return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));                                 \
    }                                                                                               \
  };                                                                                                \
  struct F32x4 {                                                                                    \
    using T = float;                                                                                \
    using vec = __m128;                                                                             \
    static constexpr int N = 4;                                                                     \
    static INVCONV_INLINE vec zero() { return _mm_setzero_ps(); }                                   \
    static INVCONV_INLINE vec load(const T* p) { return _mm_loadu_ps(p); }                          \
    static INVCONV_INLINE void store(T* p, vec v) { _mm_storeu_ps(p, v); }                          \
    static INVCONV_INLINE vec bcast(const T* p) { return _mm_broadcast_ss(p); }                     \
    static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm_fmadd_ps(a, b, c); }          \
    static INVCONV_INLINE vec add(vec a, vec b) { return _mm_add_ps(a, b); }                        \
    static INVCONV_INLINE T hsum(vec v) {                                                           \
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));                                                       \
      return _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)));                                 \
    }                                                                                               \
  };                                                                                                \
  struct F64x4 {                                                                                    \
    using T = double;                                                                               \
    using vec = __m256d;                                                                            \
    static constexpr int N = 4;                                                                     \
    static INVCONV_INLINE vec zero() { return _mm256_setzero_pd(); }                                \
    static INVCONV_INLINE vec load(const T* p) { return _mm256_loadu_pd(p); }                       \
    static INVCONV_INLINE void store(T* p, vec v) { _mm256_storeu_pd(p, v); }                       \
    static INVCONV_INLINE vec bcast(const T* p) { return _mm256_broadcast_sd(p); }                  \
    static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_pd(a, b, c); }       \
    static INVCONV_INLINE vec add(vec a, vec b) { return _mm256_add_pd(a, b); }                     \
    static INVCONV_INLINE T hsum(vec v) {                                                           \
      const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));         \
      return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));                                   \
    }                                                                                               \
  };                                                                                                \
  struct F64x2 {                                                                                    \
    using T = double;                                                                               \
    using vec = __m128d;                                                                            \
    static constexpr int N = 2;                                                                     \
    static INVCONV_INLINE vec zero() { return _mm_setzero_pd(); }                                   \
    static INVCONV_INLINE vec load(const T* p) { return _mm_loadu_pd(p); }                          \
    static INVCONV_INLINE void store(T* p, vec v) { _mm_storeu_pd(p, v); }                          \
    static INVCONV_INLINE vec bcast(const T* p) { return _mm_loaddup_pd(p); }                       \
    static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm_fmadd_pd(a, b, c); }          \
    static INVCONV_INLINE vec add(vec a, vec b) { return _mm_add_pd(a, b); }                        \
    static INVCONV_INLINE T hsum(vec v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }\
  };

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA, compiled for that target whatever the build flags, used only where the CPU has it.
// 8 + 4 lanes (float) and 4 + 2 (double): no quarter width, 16 registers.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace invconv_avx2 {
INVCONV_AVX_LANES
struct OpsF32 {
  using T = float;
  using F = F32x8;
  using H = F32x4;
  using Q = F32x4;
  static constexpr bool kHasHalf = true, kHasQuarter = false;
  static constexpr int G = 4, kAccRegs = 12;
};
struct OpsF64 {
  using T = double;
  using F = F64x4;
  using H = F64x2;
  using Q = F64x2;
  static constexpr bool kHasHalf = true, kHasQuarter = false;
  static constexpr int G = 2, kAccRegs = 12;
};

#include "solve_cpu_kernel.h"
}  // namespace invconv_avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX-512 (F + VL: 512-bit vectors, and EVEX-encoded 256/128-bit ones with 32 registers), used
// only where the CPU has it: 16 + 8 + 4 lanes (float), 8 + 4 + 2 (double), 32 registers.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace invconv_avx512 {
INVCONV_AVX_LANES
struct F32x16 {
  using T = float;
  using vec = __m512;
  static constexpr int N = 16;
  static INVCONV_INLINE vec zero() { return _mm512_setzero_ps(); }
  static INVCONV_INLINE vec load(const T* p) { return _mm512_loadu_ps(p); }
  static INVCONV_INLINE void store(T* p, vec v) { _mm512_storeu_ps(p, v); }
  static INVCONV_INLINE vec bcast(const T* p) { return _mm512_set1_ps(*p); }
  static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static INVCONV_INLINE vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static INVCONV_INLINE T hsum(vec v) { return _mm512_reduce_add_ps(v); }
};
struct F64x8 {
  using T = double;
  using vec = __m512d;
  static constexpr int N = 8;
  static INVCONV_INLINE vec zero() { return _mm512_setzero_pd(); }
  static INVCONV_INLINE vec load(const T* p) { return _mm512_loadu_pd(p); }
  static INVCONV_INLINE void store(T* p, vec v) { _mm512_storeu_pd(p, v); }
  static INVCONV_INLINE vec bcast(const T* p) { return _mm512_set1_pd(*p); }
  static INVCONV_INLINE vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_pd(a, b, c); }
  static INVCONV_INLINE vec add(vec a, vec b) { return _mm512_add_pd(a, b); }
  static INVCONV_INLINE T hsum(vec v) { return _mm512_reduce_add_pd(v); }
};
struct OpsF32 {
  using T = float;
  using F = F32x16;
  using H = F32x8;
  using Q = F32x4;
  static constexpr bool kHasHalf = true, kHasQuarter = true;
  static constexpr int G = 4, kAccRegs = 16;
};
struct OpsF64 {
  using T = double;
  using F = F64x8;
  using H = F64x4;
  using Q = F64x2;
  static constexpr bool kHasHalf = true, kHasQuarter = true;
  static constexpr int G = 2, kAccRegs = 16;
};

#include "solve_cpu_kernel.h"
}  // namespace invconv_avx512
#pragma GCC pop_options
#endif

namespace {

enum Isa : int64_t { kIsaAuto = 0, kIsaGeneric = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

bool cpu_has_avx2_fma() {
#if INVCONV_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The 512-bit path needs F (the 512-bit operations) and VL (its 256/128-bit operations on 32
// registers); BW and DQ are asked for too so that the target region's flags all hold.
bool cpu_has_avx512() {
#if INVCONV_X86_DISPATCH
  static const bool has = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Aligned scratch, zero on allocation unless asked not to be.
template <class T>
struct Scratch {
  std::unique_ptr<T[]> raw;
  T* ptr = nullptr;
  explicit Scratch(size_t n, bool zero = true) : raw(zero ? new T[n + 64 / sizeof(T)]() : new T[n + 64 / sizeof(T)]) {
    auto addr = reinterpret_cast<uintptr_t>(raw.get());
    ptr = raw.get() + ((64 - addr % 64) % 64) / sizeof(T);
  }
};

// Vector multiply-adds below which a parallel task is not worth waking another thread for
// (about 10 µs of work): tiny solves (tests, small layers) then run on the calling thread, which
// also keeps them clear of OpenMP barrier stalls on a loaded machine.
constexpr int64_t kParallelGrainOps = 32768;
// The narrowest column strip of the split inside an image (below it the per-row hand-over
// between strips costs more than the strip's work).
constexpr int kMinStripColumns = 8;
// The largest mailbox (every row's halo at every strip boundary, see StripSync) the strip split
// may allocate.
constexpr size_t kMaxMailboxBytes = size_t(32) << 20;

// Multiply-adds of one image in units of 16-byte vectors (the padding granularity).
int64_t image_ops(int C, int Cp, int H, int W, int k, int G) {
  return std::max<int64_t>(1, (int64_t)H * W * k * k * C * (Cp / G));
}

int64_t grain_images(int C, int Cp, int H, int W, int k, int G) {
  const int64_t per_image = image_ops(C, Cp, H, W, k, G);
  return std::max<int64_t>(1, (kParallelGrainOps + per_image - 1) / per_image);
}

// One 64-byte line of a strip boundary's mailbox: part of the left strip's last k-1 columns of
// one row, and the row's number + 1 once they are there. Data and flag share the line, so the
// right strip gets both in one cross-core transfer (a separate progress flag cost a second,
// serial one per row: the flag, then the data it announces).
template <class T>
struct alignas(64) MailLine {
  static constexpr int kElems = (64 - (int)sizeof(uint64_t)) / (int)sizeof(T);
  T data[kElems];
  std::atomic<uint64_t> seq;
};
static_assert(sizeof(MailLine<float>) == 64 && sizeof(MailLine<double>) == 64, "one cache line");

// Lines per row of a mailbox carrying `halo` elements, rounded up to an even count so that rows
// never share a 128-byte pair of lines (the adjacent-line prefetcher moves pairs).
template <class T>
int mail_lines(int halo) {
  const int lines = (halo + MailLine<T>::kElems - 1) / MailLine<T>::kElems;
  return (lines + 1) / 2 * 2;
}

// Column strips per image: 1 (one task per image) unless there are fewer images than threads
// and each strip still gets a worthwhile amount of work; then the images' strips are solved
// concurrently, strip s one row behind strip s-1 (the solve of pixel (i, j) reads only rows <= i
// and columns <= j in logical coordinates, so a strip waits only for its left neighbour).
template <class T>
int strips_per_image(int64_t B, int C, int Cp, int H, int W, int k, int G) {
  const int threads = std::max(1, at::get_num_threads());
  if (at::in_parallel_region() || B >= threads || H < 2) return 1;
  int S = (int)(threads / B);
  S = std::min(S, W / std::max(kMinStripColumns, k - 1));  // a strip's halo lies in its left neighbour
  S = (int)std::min<int64_t>(S, image_ops(C, Cp, H, W, k, G) / kParallelGrainOps);
  if (S <= 1 || (size_t)B * (S - 1) * H * mail_lines<T>((k - 1) * Cp) * sizeof(MailLine<T>) > kMaxMailboxBytes)
    return 1;
  return S;
}

INVCONV_INLINE void spin_pause() {
#if INVCONV_X86_DISPATCH
  _mm_pause();
#endif
}

// Waits until done() holds: spins, then yields — a loaded machine (or more threads than free
// CPUs) may have descheduled the thread we wait for, and a pure spin would hold the CPU it
// needs until the scheduler's next tick.
template <class Done>
INVCONV_INLINE void spin_until(Done&& done) {
  for (int spins = 0; !done();)
    if (++spins < 1024)
      spin_pause();
    else
      std::this_thread::yield();
}

// The strip split's hand-over. A strip's rows live in its own buffer, so a right neighbour never
// writes a cache line the left one reads; after solving row i a strip posts its last k-1 columns
// of the row (the right neighbour's halo) to the mailbox between them, and before phase B of row
// i the right neighbour copies them into its own row (phase A of later rows then reads the copy).
template <class T>
struct StripSync {
  const MailLine<T>* in;  // from the left neighbour (null for the leftmost strip)
  MailLine<T>* out;       // to the right neighbour (null for the rightmost strip)
  int lines;              // mailbox lines per row
  int halo;               // (k-1)*Cp elements
  ptrdiff_t last;         // where this strip's last k-1 columns start in its row slot
  static INVCONV_INLINE void before_a(int) {}
  INVCONV_INLINE void before_b(int i, T* cur) const {
    if (!in) {
      std::memset(cur, 0, sizeof(T) * (size_t)halo);
      return;
    }
    const MailLine<T>* row = in + (ptrdiff_t)i * lines;
    // Every line's transfer is started before the first wait.
    for (int l = 0; l < lines; ++l) __builtin_prefetch(&row[l], 0, 3);
    for (int l = 0, e = 0; e < halo; ++l, e += MailLine<T>::kElems) {
      spin_until([&] { return row[l].seq.load(std::memory_order_acquire) == (uint64_t)i + 1; });
      std::memcpy(cur + e, row[l].data, sizeof(T) * (size_t)std::min(MailLine<T>::kElems, halo - e));
    }
  }
  INVCONV_INLINE void after(int i, const T* cur) const {
    if (!out) return;
    MailLine<T>* row = out + (ptrdiff_t)i * lines;
    for (int l = 0, e = 0; e < halo; ++l, e += MailLine<T>::kElems) {
      std::memcpy(row[l].data, cur + last + e, sizeof(T) * (size_t)std::min(MailLine<T>::kElems, halo - e));
      row[l].seq.store((uint64_t)i + 1, std::memory_order_release);
    }
  }
};


// The 1×1 solve of B images (see Pointwise): tasks are runs of pixels, of whole images or
// within one, sized so that each is worth a thread (kParallelGrainOps).
template <class K>
void pointwise_images(const typename K::O::T* yp, typename K::O::T* xp, int64_t B, const typename K::O::T* m,
                      const int* chan, int C, int Cp, ptrdiff_t plane) {
  using T = typename K::O::T;
  using PW = typename K::PW;
  const ptrdiff_t image = (ptrdiff_t)C * plane;
  // In 16-byte vectors (the unit of kParallelGrainOps), about half of C × C per pixel: the
  // matrix is triangular.
  const int64_t per_block = std::max<int64_t>(1, (int64_t)C * (C + 1) / 2 * PW::kBlock * (int64_t)sizeof(T) / 16);
  const ptrdiff_t blocks = (plane + PW::kBlock - 1) / PW::kBlock;  // per image
  const ptrdiff_t grain_blocks = std::max<int64_t>(1, kParallelGrainOps / per_block);
  // Chunks of an image: a whole image when it is worth at least one task, else fewer.
  const ptrdiff_t chunk = std::min<ptrdiff_t>(blocks, grain_blocks);
  const ptrdiff_t chunks = (blocks + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, (grain_blocks + chunk - 1) / chunk);
  std::vector<int> ident(C);
  for (int c = 0; c < C; ++c) ident[c] = c;
  at::parallel_for(0, B * chunks, grain, [&](int64_t t0, int64_t t1) {
    Scratch<T> tmp((size_t)2 * C * PW::kBlock, /*zero=*/false);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks;
      const ptrdiff_t q = t % chunks;
      const ptrdiff_t p0 = q * chunk * PW::kBlock, p1 = std::min<ptrdiff_t>(plane, (q + 1) * chunk * PW::kBlock);
      PW::range(yp + b * image, xp + b * image, m, chan, ident.data(), C, Cp, plane, p0, p1, tmp.ptr,
                tmp.ptr + (ptrdiff_t)C * PW::kBlock);
    }
  });
}

// What Fold::run needs to fold one weight: kept unfolded until solve_images knows where the
// folded copies go (one shared copy, or one per strip task when an image is split: the fold is
// then done by every strip at once instead of on the calling thread before the split starts).
template <class K>
struct FoldSpec {
  using T = typename K::O::T;
  const T* w;
  int C, k, Cp;
  bool flip_h, flip_w, adjoint, unit;
  size_t size() const { return (size_t)k * k * C * Cp; }
  void into(T* wf) const { K::FW::run(w, C, k, flip_h, flip_w, adjoint, unit, wf, Cp); }
};

// Solves B images of y into x with the pre-folded weights, in parallel over images or (fewer
// images than threads) over column strips of each image.
template <class K>
void solve_images(const typename K::O::T* yp, typename K::O::T* xp, int64_t B, const FoldSpec<K>& fold,
                  const int* chan, int C, int Cp, int H, int W, int k, bool flip_h, bool flip_w) {
  using Ops = typename K::O;
  using T = typename Ops::T;
  using RS = typename K::RS;
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  const int S = k == 1 ? 1 : strips_per_image<T>(B, C, Cp, H, W, k, Ops::G);
  Scratch<T> shared(S <= 1 ? fold.size() : 0, /*zero=*/false);  // Fold::run writes every entry
  if (S <= 1) fold.into(shared.ptr);
  const T* wf = shared.ptr;
  if (k == 1) {
    pointwise_images<K>(yp, xp, B, wf, chan, C, Cp, (ptrdiff_t)H * W);
    return;
  }
  if (S <= 1) {
    // Images are independent (the solve couples all channels of one image), so tasks are
    // images; small problems stay on the calling thread (see kParallelGrainOps).
    at::parallel_for(0, B, grain_images(C, Cp, H, W, k, Ops::G), [&](int64_t b0, int64_t b1) {
      Scratch<T> ring((size_t)k * RS::slot_size(W, k, Cp)), acc((size_t)W * Cp);
      std::vector<typename RS::Tap> taps((size_t)k * k + 1);
      for (int64_t b = b0; b < b1; ++b)
        RS::solve_image(yp + b * image, xp + b * image, wf, chan, C, Cp, H, W, k, flip_h, flip_w, ring.ptr,
                        typename RS::Work{acc.ptr, taps.data()});
    });
    return;
  }
  // Strip split: each strip walks its columns with a ring of k rows, like a whole image, and
  // posts each row's last k-1 columns to the mailbox of its right boundary (all H rows, so a
  // strip that runs ahead never overwrites what its neighbour has yet to read; cleared, so that
  // no row number is there before it is posted). Whatever the OpenMP schedule, a thread runs its
  // tasks in increasing order and a task waits only for lower ones, so nothing deadlocks.
  const int halo = (k - 1) * Cp, lines = mail_lines<T>(halo);
  const ptrdiff_t per_boundary = (ptrdiff_t)H * lines;  // mailbox lines
  const size_t mail_bytes = sizeof(MailLine<T>) * (size_t)B * (S - 1) * per_boundary;  // a multiple of 128
  std::unique_ptr<MailLine<T>[], decltype(&std::free)> mail(
      static_cast<MailLine<T>*>(std::aligned_alloc(128, mail_bytes)), &std::free);  // rows on whole pairs of lines
  TORCH_CHECK(mail, "invconv_cpu: out of memory for the strip split's mailbox (", mail_bytes, " bytes)");
  std::memset(static_cast<void*>(mail.get()), 0, mail_bytes);
  at::parallel_for(0, B * S, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> ring((size_t)k * RS::slot_size((W + S - 1) / S, k, Cp)), acc((size_t)W * Cp);
    Scratch<T> own(fold.size(), /*zero=*/false);
    fold.into(own.ptr);
    const T* wf = own.ptr;
    std::vector<typename RS::Tap> taps((size_t)k * k + 1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / S;
      const int s = (int)(t % S);
      const int jb = (int)((int64_t)W * s / S), je = (int)((int64_t)W * (s + 1) / S);
      MailLine<T>* boundaries = mail.get() + b * (S - 1) * per_boundary;  // boundary s-1 | s is number s-1
      const StripSync<T> sync{s == 0 ? nullptr : boundaries + (s - 1) * per_boundary,
                              s == S - 1 ? nullptr : boundaries + s * per_boundary, lines, halo,
                              (ptrdiff_t)(je - jb) * Cp};
      RS::solve_rows(yp + b * image, xp + b * image, wf, chan, C, Cp, H, W, k, flip_h, flip_w, ring.ptr, jb, je,
                     typename RS::Work{acc.ptr, taps.data()}, sync);
    }
  });
}

// The weight gradient Σ_images lam ⋆ x into g ((k*k) × C × Cp), sign applied on the way out.
// With at least as many images as threads: a partial per task over whole images, summed in task
// order. With fewer: each image's padded copies made once, then tasks over (tap, output-channel
// block) units (disjoint parts of g). Either way the result does not depend on the thread schedule.
template <class K>
void weight_grad_images(const typename K::O::T* xp, const typename K::O::T* lp, int64_t B, int C, int Cp, int H, int W,
                        int k, int orientation, typename K::O::T sign, typename K::O::T* dst) {
  using Ops = typename K::O;
  using T = typename Ops::T;
  using WG = typename K::WG;
  const int pt = (orientation & 2) ? 0 : k - 1, pl = (orientation & 1) ? 0 : k - 1;  // top/left padding
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  const size_t gsize = (size_t)k * k * C * Cp;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t grain = grain_images(C, Cp, H, W, k, Ops::G);
  const auto L = WG::layout(C, H, W, k);
  std::vector<Scratch<T>> partial;
  if (B < threads && image_ops(C, Cp, H, W, k, Ops::G) * B >= 2 * kParallelGrainOps && !at::in_parallel_region()) {
    Scratch<T> buf((size_t)B * L.scratch(), /*zero=*/false);
    for (int64_t b = 0; b < B; ++b) WG::prepare(xp + b * image, lp + b * image, L, pt, pl, buf.ptr + b * L.scratch());
    partial.emplace_back(gsize);
    T* g = partial[0].ptr;
    at::parallel_for(0, WG::units(L), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t b = 0; b < B; ++b)
        WG::run_units(buf.ptr + b * L.scratch(), lp + b * image, L, g, Cp, (int)u0, (int)u1);
    });
  } else {
    const int64_t tasks = std::min<int64_t>(std::max<int64_t>(1, B / grain), threads);
    partial.reserve(tasks);
    for (int64_t t = 0; t < tasks; ++t) partial.emplace_back(gsize);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      Scratch<T> buf(L.scratch(), /*zero=*/false);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t b = B * t / tasks; b < B * (t + 1) / tasks; ++b)
          WG::image(xp + b * image, lp + b * image, buf.ptr, partial[t].ptr, Cp, L, pt, pl);
    });
  }
  for (int o = 0; o < C; ++o)  // (C_out, C_in, k, k)
    for (int c = 0; c < C; ++c)
      for (int t = 0; t < k * k; ++t) {
        T s = T(0);
        for (const auto& p : partial) s += p.ptr[((size_t)t * C + c) * Cp + o];
        dst[((size_t)o * C + c) * k * k + t] = sign * s;
      }
}

template <class K>
void run_solve(const at::Tensor& y, const at::Tensor& w, at::Tensor& x, int orientation, bool unit, bool adjoint) {
  using Ops = typename K::O;
  using T = typename Ops::T;
  const int64_t B = y.size(0);
  const int C = (int)y.size(1), H = (int)y.size(2), W = (int)y.size(3), k = (int)w.size(2);
  const int Cp = (C + Ops::G - 1) / Ops::G * Ops::G;  // output channels padded to 16 bytes
  const int eff = adjoint ? (orientation ^ 3) : orientation;  // the transpose reads the opposite quadrant
  const bool flip_h = eff & 2, flip_w = eff & 1;
  const FoldSpec<K> fold{w.data_ptr<T>(), C, k, Cp, flip_h, flip_w, adjoint, unit};
  std::vector<int> chan(C);
  for (int c = 0; c < C; ++c) chan[c] = adjoint ? C - 1 - c : c;
  solve_images<K>(y.data_ptr<T>(), x.data_ptr<T>(), B, fold, chan.data(), C, Cp, H, W, k, flip_h, flip_w);
}

template <class K>
void run_weight_grad(const at::Tensor& x, const at::Tensor& lam, at::Tensor& out, int k, int orientation) {
  using Ops = typename K::O;
  using T = typename Ops::T;
  const int C = (int)x.size(1);
  const int Cp = (C + Ops::G - 1) / Ops::G * Ops::G;
  weight_grad_images<K>(x.data_ptr<T>(), lam.data_ptr<T>(), x.size(0), C, Cp, (int)x.size(2), (int)x.size(3), k,
                          orientation, T(1), out.data_ptr<T>());
}

// The whole backward of the solve: λ = T⁻ᵀ g by the adjoint solve, then (need_w) the weight
// gradient of x and λ, negated (x = T⁻¹ y  ⇒  ∂L/∂W = −λ ⋆ x). With at least as many images as
// threads both happen in one pass per image, while the image's λ is still in cache; with fewer,
// the adjoint solve is split inside the images and the weight gradient over taps.
template <class K>
void run_backward(const at::Tensor& g, const at::Tensor& w, const at::Tensor& x, at::Tensor& lam, at::Tensor* gw,
                  int orientation, bool unit) {
  using Ops = typename K::O;
  using T = typename Ops::T;
  using RS = typename K::RS;
  using WG = typename K::WG;
  const int64_t B = g.size(0);
  const int C = (int)g.size(1), H = (int)g.size(2), W = (int)g.size(3), k = (int)w.size(2);
  const int Cp = (C + Ops::G - 1) / Ops::G * Ops::G;
  const int eff = orientation ^ 3;  // the adjoint solve reads the opposite quadrant
  const bool flip_h = eff & 2, flip_w = eff & 1;
  const int pt = (orientation & 2) ? 0 : k - 1, pl = (orientation & 1) ? 0 : k - 1;  // forward padding
  const FoldSpec<K> fold{w.data_ptr<T>(), C, k, Cp, flip_h, flip_w, /*adjoint=*/true, unit};
  std::vector<int> chan(C);
  for (int c = 0; c < C; ++c) chan[c] = C - 1 - c;
  const T* gp = g.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* lp = lam.data_ptr<T>();
  const int threads = std::max(1, at::get_num_threads());
  // k = 1 too: its solve is the pointwise product (no row walk to fuse the weight gradient into).
  if ((B < threads && !at::in_parallel_region()) || k == 1) {
    solve_images<K>(gp, lp, B, fold, chan.data(), C, Cp, H, W, k, flip_h, flip_w);
    if (gw) weight_grad_images<K>(xp, lp, B, C, Cp, H, W, k, orientation, T(-1), gw->data_ptr<T>());
    return;
  }
  Scratch<T> wf(fold.size(), /*zero=*/false);  // Fold::run writes every entry
  fold.into(wf.ptr);
  const ptrdiff_t image = (ptrdiff_t)C * H * W;
  const size_t gsize = (size_t)k * k * C * Cp;
  const int64_t grain = grain_images(C, Cp, H, W, k, Ops::G);
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(1, B / grain), threads);
  std::vector<Scratch<T>> partial;
  if (gw) {
    partial.reserve(tasks);
    for (int64_t t = 0; t < tasks; ++t) partial.emplace_back(gsize);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> ring((size_t)k * RS::slot_size(W, k, Cp)), acc((size_t)W * Cp);
    const auto L = WG::layout(C, H, W, k);
    std::unique_ptr<Scratch<T>> wgbuf(gw ? new Scratch<T>(L.scratch(), /*zero=*/false) : nullptr);
    std::vector<typename RS::Tap> taps((size_t)k * k + 1);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = B * t / tasks; b < B * (t + 1) / tasks; ++b) {
        RS::solve_image(gp + b * image, lp + b * image, wf.ptr, chan.data(), C, Cp, H, W, k, flip_h, flip_w, ring.ptr,
                        typename RS::Work{acc.ptr, taps.data()});
        if (gw) WG::image(xp + b * image, lp + b * image, wgbuf->ptr, partial[t].ptr, Cp, L, pt, pl);
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

// Runs f(OpsTag<Kit>{}) with the kernels of the resolved ISA for element type T.
template <class O>
struct OpsTag {
  using type = O;
};

template <class T, class Fn>
void with_ops(int64_t isa, Fn&& f) {
  constexpr bool f32 = std::is_same_v<T, float>;
#if INVCONV_X86_DISPATCH
  if (isa == kIsaAvx512) {
    f(OpsTag<invconv_avx512::Kit<std::conditional_t<f32, invconv_avx512::OpsF32, invconv_avx512::OpsF64>>>{});
    return;
  }
  if (isa == kIsaAvx2) {
    f(OpsTag<invconv_avx2::Kit<std::conditional_t<f32, invconv_avx2::OpsF32, invconv_avx2::OpsF64>>>{});
    return;
  }
#endif
  f(OpsTag<invconv_generic::Kit<std::conditional_t<f32, invconv_generic::OpsF32, invconv_generic::OpsF64>>>{});
}

// The ISA code a request resolves to: auto takes the widest the CPU has; a forced one must exist.
int64_t resolve_isa(int64_t isa, const char* op) {
  TORCH_CHECK(isa == kIsaAuto || isa == kIsaGeneric || isa == kIsaAvx2 || isa == kIsaAvx512, "invconv_cpu.", op,
              ": isa must be 0 (auto), 1 (generic), 2 (avx2) or 3 (avx512), got ", isa);
  if (isa == kIsaAvx2)
    TORCH_CHECK(cpu_has_avx2_fma(), "invconv_cpu.", op, ": isa=avx2 requested but this CPU (or build) has no AVX2+FMA");
  if (isa == kIsaAvx512)
    TORCH_CHECK(cpu_has_avx512(), "invconv_cpu.", op,
                ": isa=avx512 requested but this CPU (or build) has no AVX-512 F/VL/BW/DQ");
  if (isa != kIsaAuto) return isa;
  return cpu_has_avx512() ? kIsaAvx512 : (cpu_has_avx2_fma() ? kIsaAvx2 : kIsaGeneric);
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
  const int64_t code = resolve_isa(isa, "solve");
  at::Tensor y = y_.contiguous(), w = weight_.contiguous();
  at::Tensor x = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return x;
  auto run = [&](auto tag) { run_solve<typename decltype(tag)::type>(y, w, x, (int)orientation, unit_diagonal, adjoint); };
  if (y.scalar_type() == at::kFloat)
    with_ops<float>(code, run);
  else
    with_ops<double>(code, run);
  return x;
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
  const int64_t code = resolve_isa(isa, "solve_backward");
  at::Tensor g = grad_.contiguous(), w = weight_.contiguous(), x = x_.contiguous();
  at::Tensor lam = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor gw;
  if (need_weight_grad) gw = at::zeros(w.sizes(), w.options());
  if (g.numel() == 0) return {lam, gw};
  at::Tensor* gwp = need_weight_grad ? &gw : nullptr;
  auto run = [&](auto tag) {
    run_backward<typename decltype(tag)::type>(g, w, x, lam, gwp, (int)orientation, unit_diagonal);
  };
  if (g.scalar_type() == at::kFloat)
    with_ops<float>(code, run);
  else
    with_ops<double>(code, run);
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
  const int64_t code = resolve_isa(isa, "weight_grad");
  at::Tensor x = x_.contiguous(), lam = lam_.contiguous();
  const int64_t C = x.size(1);
  at::Tensor out = at::zeros({C, C, k, k}, x.options());
  if (x.numel() == 0) return out;
  auto run = [&](auto tag) { run_weight_grad<typename decltype(tag)::type>(x, lam, out, (int)k, (int)orientation); };
  if (x.scalar_type() == at::kFloat)
    with_ops<float>(code, run);
  else
    with_ops<double>(code, run);
  return out;
}

std::string isa_name(int64_t code) {
  return code == kIsaAvx512 ? "avx512" : (code == kIsaAvx2 ? "avx2+fma" : "generic");
}

std::string best_isa() { return isa_name(resolve_isa(kIsaAuto, "isa")); }

// Every SIMD path this CPU can run, narrowest first (the tests force each in turn).
std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"generic"};
  if (cpu_has_avx2_fma()) out.push_back("avx2+fma");
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

// The clock of the calling core in GHz, measured: a chain of dependent integer additions runs
// at one per cycle on every x86-64 core, so additions ÷ seconds is the clock (best of `reps`
// short runs, as a descheduled thread only makes it look slower). 0 where it cannot be measured.
double measure_clock_ghz(int64_t reps) {
#if INVCONV_X86_DISPATCH && defined(__x86_64__)
  constexpr int64_t kIters = 250000;  // 2 M cycles: about a millisecond per run
  double best = 0;
  for (int64_t r = 0; r < std::max<int64_t>(1, reps); ++r) {
    uint64_t v = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < kIters; ++i)
      asm volatile(
          "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
          "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0"
          : "+r"(v));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0) best = std::max(best, (double)v / s / 1e9);
  }
  return best;
#else
  (void)reps;
  return 0.0;
#endif
}

// The one-way hand-over latency between the first two threads of the intra-op pool, in ns: the
// median over `batches` batches of 200 round trips of a flag on its own cache line (what the
// strip split pays per row, and every pool barrier). On a VM it is a property of where the host
// put the virtual CPUs at that moment, and it can change while a process runs. 0 when the pool
// has one thread (or one thread got both tasks).
double measure_handover_ns(int64_t batches) {
  if (at::get_num_threads() < 2 || at::in_parallel_region()) return 0.0;
  // Each thread's flag alone on its 128-byte pair of lines (the adjacent-line prefetcher moves
  // pairs), so that the only traffic is the hand-over itself.
  struct alignas(128) Progress {
    std::atomic<int> rows;
  };
  constexpr int kTrips = 200;
  const int64_t n = std::max<int64_t>(1, batches);
  Progress flag[2];
  flag[0].rows.store(0);
  flag[1].rows.store(0);
  std::atomic<bool> alone{false};
  std::vector<double> ns;
  at::parallel_for(0, 2, 1, [&](int64_t t0, int64_t t1) {
    if (t1 - t0 != 1) {
      alone = true;
      return;
    }
    // Both threads wait for each other first; give up (alone) if the partner never comes.
    flag[t0].rows.store(-1, std::memory_order_release);
    const auto start = std::chrono::steady_clock::now();
    while (flag[1 - t0].rows.load(std::memory_order_acquire) == 0 && !alone.load()) {
      if (std::chrono::steady_clock::now() - start > std::chrono::milliseconds(200)) {
        alone = true;
        return;
      }
      spin_pause();
    }
    auto wait_for = [](const std::atomic<int>& f, int v) {
      spin_until([&] { return f.load(std::memory_order_acquire) == v; });
    };
    int v = 0;
    for (int64_t b = 0; b < n && !alone.load(); ++b) {
      const auto tb = std::chrono::steady_clock::now();
      for (int r = 0; r < kTrips; ++r) {
        ++v;
        if (t0 == 0) {  // ping: publish v, wait for the echo
          flag[0].rows.store(v, std::memory_order_release);
          wait_for(flag[1].rows, v);
        } else {  // pong: wait for v, echo it
          wait_for(flag[0].rows, v);
          flag[1].rows.store(v, std::memory_order_release);
        }
      }
      if (t0 == 0)
        ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - tb).count() /
                     (2.0 * kTrips));
    }
  });
  if (alone || ns.empty()) return 0.0;
  std::nth_element(ns.begin(), ns.begin() + ns.size() / 2, ns.end());
  return ns[ns.size() / 2];
}

// FLOP/s of one thread at the widest vector of `isa` (0 = auto) for float32 or float64.
double measure_peak_flops(int64_t isa, bool double_precision, int64_t reps) {
  const int64_t code = resolve_isa(isa, "peak_flops");
  double out = 0;
  auto run = [&](auto tag) { out = decltype(tag)::type::PK::flops_per_second(50000, (int)std::max<int64_t>(1, reps)); };
  if (double_precision)
    with_ops<double>(code, run);
  else
    with_ops<float>(code, run);
  return out;
}

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
  m.def("supported_isas() -> str[]", &supported_isas);
  m.def("clock_ghz(int reps=50) -> float", &measure_clock_ghz);
  m.def("peak_flops(int isa=0, bool double_precision=False, int reps=50) -> float", &measure_peak_flops);
  m.def("handover_ns(int batches=50) -> float", &measure_handover_ns);
}
