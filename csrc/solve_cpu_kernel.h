// The row-walking CPU solve, written once against a small SIMD interface `Ops` (see
// solve_cpu.cpp, which includes this file twice: inside an AVX2+FMA target region and for the
// baseline ISA). No includes and no namespace here on purpose: the includer provides both.
//
// Logical coordinates. Every orientation is solved as TL in mirrored coordinates: logical row i
// and column j map to physical (h, w) = (T ? i : H-1-i, L ? j : W-1-j), and the logical tap
// (da, db) reads logical pixel (i-da, j-db). The folded weight `wf[da][db][c][o]` (built by
// fold_weights in solve_cpu.cpp) already holds -L⁻¹·W at the off-centre taps and L⁻¹ at the
// centre, so that
//
//     x[i][j][o] = Σ_{da,db,c} wf[da][db][c][o] · plane[i-da][j-db][c]
//
// where `plane` holds the solved x everywhere except at (i, j) itself, which reads y (in place,
// from the NCHW input).
//
// Row i is computed in two phases:
//   A. every tap with da >= 1 plus the centre (y): independent across the row's pixels, so it is
//      register-blocked over P pixels × NV vectors of output channels (the weight vectors are
//      loaded once per P pixels);
//   B. the in-row taps (da = 0, db >= 1): a recurrence along the row, pixel by pixel, with four
//      independent accumulators so the dependency chain is C/4 multiply-adds long, not C.
// The k most recent rows live in a channels-last ring of k slots (`ring`), each slot padded with
// k-1 zero columns on the logical left; it stays in L1/L2 for the image sizes of interest.

template <class Ops>
struct RowSolver {
  using T = typename Ops::T;
  using vec = typename Ops::vec;
  static constexpr int V = Ops::V;

  struct Tap {
    const T* src;      // input of logical column 0 (channel 0) for this tap
    ptrdiff_t pstep;   // to the next pixel of the row
    ptrdiff_t cstep;   // to the next channel
    const T* w;        // wf[da][db][0][0]
  };

  // acc[j][o0 .. o0+NV*V) for pixels j0 .. j0+P-1: phase A for one block.
  template <int NV, int P>
  static INVCONV_INLINE void phase_a_block(const Tap* taps, int ntaps, int C, int Cp, int o0, int j0, T* acc) {
    vec a[P][NV];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) a[p][v] = Ops::zero();
    for (int t = 0; t < ntaps; ++t) {
      const ptrdiff_t ps = taps[t].pstep, cs = taps[t].cstep;
      const T* s = taps[t].src + j0 * ps;
      const T* w = taps[t].w + o0;
      for (int c = 0; c < C; ++c, s += cs) {
        vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = Ops::load(w + (ptrdiff_t)c * Cp + v * V);
        for (int p = 0; p < P; ++p) {
          const vec b = Ops::bcast(s + p * ps);
          for (int v = 0; v < NV; ++v) a[p][v] = Ops::fmadd(wv[v], b, a[p][v]);
        }
      }
    }
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) Ops::store(acc + (ptrdiff_t)(j0 + p) * Cp + o0 + v * V, a[p][v]);
  }

  template <int NV, int P>
  static INVCONV_INLINE void phase_a_chunk(const Tap* taps, int ntaps, int C, int Cp, int o0, int width, T* acc) {
    int j = 0;
    for (; j + P <= width; j += P) phase_a_block<NV, P>(taps, ntaps, C, Cp, o0, j, acc);
    for (; j < width; ++j) phase_a_block<NV, 1>(taps, ntaps, C, Cp, o0, j, acc);
  }

  // Phase B for pixel j, output vectors [o0, o0 + NV*V): x = acc + Σ_{db>=1} wf[0][db]·x[j-db].
  template <int NV>
  static INVCONV_INLINE void phase_b_pixel(const T* wf, T* cur, const T* acc, int k, int C, int Cp, int o0, int j) {
    vec a0[NV], a1[NV], a2[NV], a3[NV];
    for (int v = 0; v < NV; ++v) {
      a0[v] = Ops::load(acc + (ptrdiff_t)j * Cp + o0 + v * V);
      a1[v] = Ops::zero();
      a2[v] = Ops::zero();
      a3[v] = Ops::zero();
    }
    // Far taps first: they do not depend on the pixel just solved, so they overlap its latency.
    for (int db = k - 1; db >= 1; --db) {
      const T* s = cur + (ptrdiff_t)(k - 1 + j - db) * Cp;
      const T* w = wf + (ptrdiff_t)db * C * Cp + o0;
      int c = 0;
      for (; c + 4 <= C; c += 4) {
        const vec b0 = Ops::bcast(s + c), b1 = Ops::bcast(s + c + 1);
        const vec b2 = Ops::bcast(s + c + 2), b3 = Ops::bcast(s + c + 3);
        for (int v = 0; v < NV; ++v) {
          a0[v] = Ops::fmadd(Ops::load(w + (ptrdiff_t)c * Cp + v * V), b0, a0[v]);
          a1[v] = Ops::fmadd(Ops::load(w + (ptrdiff_t)(c + 1) * Cp + v * V), b1, a1[v]);
          a2[v] = Ops::fmadd(Ops::load(w + (ptrdiff_t)(c + 2) * Cp + v * V), b2, a2[v]);
          a3[v] = Ops::fmadd(Ops::load(w + (ptrdiff_t)(c + 3) * Cp + v * V), b3, a3[v]);
        }
      }
      for (; c < C; ++c) {
        const vec b = Ops::bcast(s + c);
        for (int v = 0; v < NV; ++v) a0[v] = Ops::fmadd(Ops::load(w + (ptrdiff_t)c * Cp + v * V), b, a0[v]);
      }
    }
    for (int v = 0; v < NV; ++v)
      Ops::store(cur + (ptrdiff_t)(k - 1 + j) * Cp + o0 + v * V,
                 Ops::add(Ops::add(a0[v], a1[v]), Ops::add(a2[v], a3[v])));
  }

  // Solve one image. `y` and `x` point at the image (C, H, W) in NCHW; `chan` maps logical to
  // physical channels (identity, or reversed for the adjoint); `ring` holds k*(W+k-1)*Cp and
  // `acc` W*Cp elements, 32-byte aligned, with the ring's padding columns zero.
  static void solve_image(const T* y, T* x, const T* wf, const int* chan, int C, int Cp, int H, int W, int k,
                          bool flip_h, bool flip_w, T* ring, T* acc, Tap* taps) {
    const ptrdiff_t slot = (ptrdiff_t)(W + k - 1) * Cp;
    const ptrdiff_t plane = (ptrdiff_t)H * W;
    for (int i = 0; i < H; ++i) {
      const int h = flip_h ? H - 1 - i : i;
      T* cur = ring + (ptrdiff_t)(i % k) * slot;
      T* curx = cur + (ptrdiff_t)(k - 1) * Cp;  // logical column 0 of the current row
      // Phase A taps: the centre, reading y in place (NCHW, through the orientation's and the
      // channel order's strides: no transposed copy), and every tap of the rows above that exist.
      int ntaps = 0;
      const T* y_row = y + chan[0] * plane + (ptrdiff_t)h * W + (flip_w ? W - 1 : 0);
      const ptrdiff_t y_cstep = C > 1 ? (chan[1] - chan[0]) * plane : 0;
      taps[ntaps++] = Tap{y_row, flip_w ? -1 : 1, y_cstep, wf};
      for (int da = 1; da < k && da <= i; ++da) {
        const T* row = ring + (ptrdiff_t)((i - da) % k) * slot;
        for (int db = 0; db < k; ++db)
          taps[ntaps++] = Tap{row + (ptrdiff_t)(k - 1 - db) * Cp, Cp, 1, wf + (ptrdiff_t)(da * k + db) * C * Cp};
      }
      int o0 = 0;
      for (; o0 + 2 * V <= Cp; o0 += 2 * V) phase_a_chunk<2, 4>(taps, ntaps, C, Cp, o0, W, acc);
      for (; o0 < Cp; o0 += V) phase_a_chunk<1, 8>(taps, ntaps, C, Cp, o0, W, acc);
      // Phase B: along the row.
      if (k > 1) {
        for (int j = 0; j < W; ++j) {
          int o = 0;
          for (; o + 2 * V <= Cp; o += 2 * V) phase_b_pixel<2>(wf, cur, acc, k, C, Cp, o, j);
          for (; o < Cp; o += V) phase_b_pixel<1>(wf, cur, acc, k, C, Cp, o, j);
        }
      } else {
        for (int j = 0; j < W; ++j)
          for (int o = 0; o < Cp; o += V) Ops::store(curx + (ptrdiff_t)j * Cp + o, Ops::load(acc + (ptrdiff_t)j * Cp + o));
      }
      // The solved row out, NCHW.
      for (int c = 0; c < C; ++c) {
        T* xr = x + chan[c] * plane + (ptrdiff_t)h * W;
        if (flip_w)
          for (int j = 0; j < W; ++j) xr[W - 1 - j] = curx[(ptrdiff_t)j * Cp + c];
        else
          for (int j = 0; j < W; ++j) xr[j] = curx[(ptrdiff_t)j * Cp + c];
      }
    }
  }
};

// The weight gradient of the backward: g[t][c][o] += Σ_{h,w} lam[o][h][w] · x[c][h+a-pt][w+b-pl]
// for the physical tap t = (a, b) of an orientation with top/left padding (pt, pl), i.e. the
// convolution weight gradient of input x (zero outside the image) and output gradient lam, for
// one image. `lamT` is lam channels last ((H*W) × Cp, padded lanes zero), `g` is (k*k) × C × Cp.
// Register-blocked as NV output vectors × CB input channels; one pass over the pixels per block.
template <class Ops>
struct WeightGrad {
  using T = typename Ops::T;
  using vec = typename Ops::vec;
  static constexpr int V = Ops::V;

  template <int NV, int CB>
  static INVCONV_INLINE void block(const T* x, const T* lamT, T* g, int C, int Cp, int H, int W, int a, int b,
                                   int pt, int pl, int c0, int o0) {
    const int h0 = std::max(0, pt - a), h1 = std::min(H, H + pt - a);
    const int w0 = std::max(0, pl - b), w1 = std::min(W, W + pl - b);
    if (h0 >= h1 || w0 >= w1) return;
    const ptrdiff_t plane = (ptrdiff_t)H * W;
    vec acc[CB][NV];
    for (int cc = 0; cc < CB; ++cc)
      for (int v = 0; v < NV; ++v) acc[cc][v] = Ops::zero();
    for (int h = h0; h < h1; ++h) {
      const T* xr = x + (ptrdiff_t)c0 * plane + (ptrdiff_t)(h + a - pt) * W + (b - pl);
      const T* lr = lamT + (ptrdiff_t)h * W * Cp + o0;
      for (int w = w0; w < w1; ++w) {
        vec l[NV];
        for (int v = 0; v < NV; ++v) l[v] = Ops::load(lr + (ptrdiff_t)w * Cp + v * V);
        for (int cc = 0; cc < CB; ++cc) {
          const vec s = Ops::bcast(xr + cc * plane + w);
          for (int v = 0; v < NV; ++v) acc[cc][v] = Ops::fmadd(s, l[v], acc[cc][v]);
        }
      }
    }
    for (int cc = 0; cc < CB; ++cc)
      for (int v = 0; v < NV; ++v) {
        T* dst = g + (ptrdiff_t)(c0 + cc) * Cp + o0 + v * V;
        Ops::store(dst, Ops::add(Ops::load(dst), acc[cc][v]));
      }
  }

  static void image(const T* x, const T* lam, T* lamT, T* g, int C, int Cp, int H, int W, int k, int pt, int pl) {
    const ptrdiff_t plane = (ptrdiff_t)H * W;
    for (int o = 0; o < C; ++o)
      for (ptrdiff_t p = 0; p < plane; ++p) lamT[p * Cp + o] = lam[o * plane + p];
    for (int a = 0; a < k; ++a)
      for (int b = 0; b < k; ++b) {
        T* gt = g + (ptrdiff_t)(a * k + b) * C * Cp;
        int o0 = 0;
        for (; o0 + 2 * V <= Cp; o0 += 2 * V) {
          int c0 = 0;
          for (; c0 + 6 <= C; c0 += 6) block<2, 6>(x, lamT, gt, C, Cp, H, W, a, b, pt, pl, c0, o0);
          for (; c0 < C; ++c0) block<2, 1>(x, lamT, gt, C, Cp, H, W, a, b, pt, pl, c0, o0);
        }
        for (; o0 < Cp; o0 += V) {
          int c0 = 0;
          for (; c0 + 12 <= C; c0 += 12) block<1, 12>(x, lamT, gt, C, Cp, H, W, a, b, pt, pl, c0, o0);
          for (; c0 < C; ++c0) block<1, 1>(x, lamT, gt, C, Cp, H, W, a, b, pt, pl, c0, o0);
        }
      }
  }
};
