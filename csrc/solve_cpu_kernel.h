// The row-walking CPU solve, written once against a small SIMD interface `Ops` (see
// solve_cpu.cpp, which includes this file once per SIMD target: AVX-512, AVX2+FMA and the
// baseline ISA). No includes and no namespace here on purpose: the includer provides both.
//
// `Ops` offers up to three vector widths over one element type T: `F` (the full register), `H`
// (half of it) and `Q` (a quarter), each with N lanes and zero/load/store/bcast/fmadd/add. The
// output channels are padded only to the smallest width (16 bytes: 4 floats, 2 doubles), and a
// block of output channels is covered by full vectors plus at most one half and one quarter
// vector, so C = 12 is 8 + 4 lanes on AVX2 and on AVX-512 (not 16 with a quarter of the
// multiply-adds on padding), 24 is 16 + 8 on AVX-512, and so on. Where a width does not exist
// (the baseline has one; AVX2 has no quarter) `Ops` aliases it to a wider one and says so with
// kHasHalf / kHasQuarter. `Ops::kAccRegs` is how many accumulators the register file holds
// beside the operands (12 with 16 vector registers; 16 with 32, as GCC spilled at 24).
//
// Logical coordinates. Every orientation is solved as TL in mirrored coordinates: logical row i
// and column j map to physical (h, w) = (T ? i : H-1-i, L ? j : W-1-j), and the logical tap
// (da, db) reads logical pixel (i-da, j-db). The folded weight `wf[da][db][c][o]` (built by
// Fold::run below) already holds -L⁻¹·W at the off-centre taps and L⁻¹ at the
// centre, so that
//
//     x[i][j][o] = Σ_{da,db,c} wf[da][db][c][o] · plane[i-da][j-db][c]
//
// where `plane` holds the solved x everywhere except at (i, j) itself, which reads y (in place,
// from the NCHW input).
//
// Row i is computed in two phases:
//   A. every tap with da >= 1 plus the centre (y): independent across the row's pixels, so it is
//      register-blocked over P pixels × the vectors of an output block (the weight vectors are
//      loaded once per P pixels);
//   B. the in-row taps (da = 0, db >= 1): a recurrence along the row, pixel by pixel, with four
//      independent accumulators per vector so the dependency chain is C/4 multiply-adds long.
// Solved rows live channels-last in `ring` (k row slots, each with k-1 halo columns on the
// logical left: zeros left of the image, or the left neighbour's last columns when column strips
// of one image are solved by several threads; see solve_rows).
//
// Every pixel's sum is formed in the same order whatever the blocking, the strip split or the
// thread count, so results do not depend on them.

// An output block: NF full, NH half and NQ quarter vectors, starting at channel o0.
template <class Ops, int NF, int NH, int NQ>
struct OBlock {
  using F = typename Ops::F;
  using H = typename Ops::H;
  using Q = typename Ops::Q;
  static constexpr int kVecsF = NF, kVecsH = NH, kVecsQ = NQ;
  static constexpr int kVecs = NF + NH + NQ;
  static constexpr int kLanes = NF * F::N + NH * H::N + NQ * Q::N;
  static constexpr int kHOff = NF * F::N;            // first lane of the half vector
  static constexpr int kQOff = NF * F::N + NH * H::N;  // first lane of the quarter vector
};

// Calls f(OBlock<...>{}, o0) for consecutive output blocks covering [0, Cp): pairs of full
// vectors, then one block with the remaining full vector (if any) and the half/quarter tail.
template <class Ops, class Fn>
static INVCONV_INLINE void for_each_oblock(int Cp, Fn&& f) {
  constexpr int VF = Ops::F::N, VH = Ops::H::N, VQ = Ops::Q::N;
  int o0 = 0;
  for (; Cp - o0 >= 2 * VF; o0 += 2 * VF)
    f(OBlock<Ops, 2, 0, 0>{}, o0);
  const int rem = Cp - o0;
  const int nf = rem >= VF ? 1 : 0;
  int tail = rem - nf * VF;
  const int nh = (Ops::kHasHalf && tail >= VH) ? 1 : 0;
  tail -= nh * VH;
  const int nq = (Ops::kHasQuarter && tail >= VQ) ? 1 : 0;
  switch (nf * 4 + nh * 2 + nq) {
    case 0: break;
    case 1: f(OBlock<Ops, 0, 0, 1>{}, o0); break;
    case 2: f(OBlock<Ops, 0, 1, 0>{}, o0); break;
    case 3: f(OBlock<Ops, 0, 1, 1>{}, o0); break;
    case 4: f(OBlock<Ops, 1, 0, 0>{}, o0); break;
    case 5: f(OBlock<Ops, 1, 0, 1>{}, o0); break;
    case 6: f(OBlock<Ops, 1, 1, 0>{}, o0); break;
    default: f(OBlock<Ops, 1, 1, 1>{}, o0); break;
  }
}

// wf[da][db][c][o] (o padded to Cp with zeros): L⁻¹ at the centre, -L⁻¹·W_(a,b) elsewhere, for
// the logical tap (da, db) of orientation (flip_h, flip_w); the adjoint reads
// W'[o][c][a][b] = W[C-1-c][C-1-o][k-1-a][k-1-b] by index arithmetic (docs/math.md §4). Compiled
// per SIMD target like the rest, so that the innermost loops (over the Cp output lanes) are
// vectorised: it runs on the calling thread before every solve, so its cost is serial even when
// two threads share one image (hoisting the output-block structure out of the loops cut the fixed
// cost of a C = 12, k = 3 call from 6.7 to 5.2 µs on Zen 4; accumulating four rows at a time in
// registers instead of each through memory, and clearing only the centre tap, cut the fold itself
// from about 2.3 to 1.0 µs there, as a share of perf samples beside the row walk's).
template <class Ops>
struct Fold {
  using T = typename Ops::T;
  static void run(const T* w, int C, int k, bool flip_h, bool flip_w, bool adjoint, bool unit, T* wf, int Cp) {
    const int kk = k * k;
    auto weff = [&](int o, int c, int a, int b) -> T {
      if (adjoint) return w[((ptrdiff_t)(C - 1 - c) * C + (C - 1 - o)) * kk + (k - 1 - a) * k + (k - 1 - b)];
      return w[((ptrdiff_t)o * C + c) * kk + a * k + b];
    };
    auto tap_a = [&](int da) { return flip_h ? da : k - 1 - da; };
    auto tap_b = [&](int db) { return flip_w ? db : k - 1 - db; };
    const int a0 = tap_a(0), b0 = tap_b(0);
    // L⁻¹ by forward substitution row by row; its transpose goes straight into the centre tap,
    // wf[0][0][m][o] = L⁻¹[o][m] (zero for o < m and in the padded lanes).
    std::vector<T> linv((size_t)C * C, T(0));
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
    // The centre tap: L⁻¹ transposed; the rest of it (o < m, the padded lanes) zero.
    std::fill(wf, wf + (size_t)C * Cp, T(0));
    for (int m = 0; m < C; ++m)
      for (int o = m; o < C; ++o) wf[(size_t)m * Cp + o] = linv[(size_t)o * C + m];
    // The other taps: wf[t][c][o] = -Σ_m L⁻¹[o][m]·W[m][c], accumulated over m in increasing
    // order in registers, four rows c at a time so that their chains of multiply-adds overlap
    // (one chain alone waits on the latency of each step). The padded lanes of the centre rows
    // are zero, so those of every tap are too; every row is written, so no clearing.
    constexpr int kRows = 4;
    for (int da = 0; da < k; ++da)
      for (int db = 0; db < k; ++db) {
        if (da == 0 && db == 0) continue;
        T* t = wf + (size_t)(da * k + db) * C * Cp;
        const int a = tap_a(da), b = tap_b(db);
        for_each_oblock<Ops>(Cp, [&](auto blk, int o0) {
          using B = decltype(blk);
          using F = typename Ops::F;
          using H = typename Ops::H;
          using Q = typename Ops::Q;
          constexpr int NFx = B::kVecsF > 0 ? B::kVecsF : 1;
          // Rows [c0, c0 + R), R a compile-time count so that the accumulators stay in registers.
          auto rows = [&](auto count, int c0) {
            constexpr int R = decltype(count)::value;
            typename F::vec af[R][NFx];
            typename H::vec ah[R];
            typename Q::vec aq[R];
            for (int r = 0; r < R; ++r) {
              for (int v = 0; v < NFx; ++v) af[r][v] = F::zero();
              ah[r] = H::zero();
              aq[r] = Q::zero();
            }
            for (int m = 0; m < C; ++m) {
              const T* lm = wf + (size_t)m * Cp + o0;
              typename F::vec lf[NFx];
              for (int v = 0; v < B::kVecsF; ++v) lf[v] = F::load(lm + v * F::N);
              typename H::vec lh = H::zero();
              typename Q::vec lq = Q::zero();
              if constexpr (B::kVecsH > 0) lh = H::load(lm + B::kHOff);
              if constexpr (B::kVecsQ > 0) lq = Q::load(lm + B::kQOff);
              for (int r = 0; r < R; ++r) {
                const T nv = -weff(m, c0 + r, a, b);
                for (int v = 0; v < B::kVecsF; ++v) af[r][v] = F::fmadd(lf[v], F::bcast(&nv), af[r][v]);
                if constexpr (B::kVecsH > 0) ah[r] = H::fmadd(lh, H::bcast(&nv), ah[r]);
                if constexpr (B::kVecsQ > 0) aq[r] = Q::fmadd(lq, Q::bcast(&nv), aq[r]);
              }
            }
            for (int r = 0; r < R; ++r) {
              T* tc = t + (size_t)(c0 + r) * Cp + o0;
              for (int v = 0; v < B::kVecsF; ++v) F::store(tc + v * F::N, af[r][v]);
              if constexpr (B::kVecsH > 0) H::store(tc + B::kHOff, ah[r]);
              if constexpr (B::kVecsQ > 0) Q::store(tc + B::kQOff, aq[r]);
            }
          };
          int c0 = 0;
          for (; c0 + kRows <= C; c0 += kRows) rows(std::integral_constant<int, kRows>{}, c0);
          for (; c0 < C; ++c0) rows(std::integral_constant<int, 1>{}, c0);
        });
      }
  }
};

template <class Ops>
struct RowSolver {
  using T = typename Ops::T;
  using F = typename Ops::F;
  using H = typename Ops::H;
  using Q = typename Ops::Q;
  static constexpr int G = Ops::G;  // channel padding granularity (the smallest vector)

  struct Tap {
    const T* src;      // input of logical column 0 (channel 0) for this tap
    ptrdiff_t pstep;   // to the next pixel of the row
    ptrdiff_t cstep;   // to the next channel
    const T* w;        // wf[da][db][0][0]
  };

  // Pixels per phase-A register block for an output block of `vecs` vectors.
  static constexpr int pixels_for(int vecs) {
    return 8 * vecs <= Ops::kAccRegs || vecs == 1 ? 8 : (4 * vecs <= Ops::kAccRegs ? 4 : 2);
  }

  // acc[j][o0 .. o0+lanes) for pixels j0 .. j0+P-1: phase A for one block.
  template <int NF, int NH, int NQ, int P>
  static INVCONV_INLINE void phase_a_block(const Tap* taps, int ntaps, int C, int Cp, int o0, int j0, T* acc) {
    using B = OBlock<Ops, NF, NH, NQ>;
    typename F::vec af[P][NF > 0 ? NF : 1];
    typename H::vec ah[P];
    typename Q::vec aq[P];
    for (int p = 0; p < P; ++p) {
      for (int v = 0; v < NF; ++v) af[p][v] = F::zero();
      if constexpr (NH > 0) ah[p] = H::zero();
      if constexpr (NQ > 0) aq[p] = Q::zero();
    }
    for (int t = 0; t < ntaps; ++t) {
      const ptrdiff_t ps = taps[t].pstep, cs = taps[t].cstep;
      const T* s = taps[t].src + j0 * ps;
      const T* w = taps[t].w + o0;
      for (int c = 0; c < C; ++c, s += cs, w += Cp) {
        typename F::vec wv[NF > 0 ? NF : 1];
        typename H::vec wh;
        typename Q::vec wq;
        for (int v = 0; v < NF; ++v) wv[v] = F::load(w + v * F::N);
        if constexpr (NH > 0) wh = H::load(w + B::kHOff);
        if constexpr (NQ > 0) wq = Q::load(w + B::kQOff);
        for (int p = 0; p < P; ++p) {
          const T* sp = s + p * ps;
          if constexpr (NF > 0) {
            const typename F::vec b = F::bcast(sp);
            for (int v = 0; v < NF; ++v) af[p][v] = F::fmadd(wv[v], b, af[p][v]);
          }
          if constexpr (NH > 0) ah[p] = H::fmadd(wh, H::bcast(sp), ah[p]);
          if constexpr (NQ > 0) aq[p] = Q::fmadd(wq, Q::bcast(sp), aq[p]);
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      T* dst = acc + (ptrdiff_t)(j0 + p) * Cp + o0;
      for (int v = 0; v < NF; ++v) F::store(dst + v * F::N, af[p][v]);
      if constexpr (NH > 0) H::store(dst + B::kHOff, ah[p]);
      if constexpr (NQ > 0) Q::store(dst + B::kQOff, aq[p]);
    }
  }

  template <int NF, int NH, int NQ>
  static INVCONV_INLINE void phase_a_chunk(const Tap* taps, int ntaps, int C, int Cp, int o0, int jb, int je, T* acc) {
    constexpr int P = pixels_for(NF + NH + NQ);
    int j = jb;
    for (; j + P <= je; j += P) phase_a_block<NF, NH, NQ, P>(taps, ntaps, C, Cp, o0, j, acc);
    // The tail in halving blocks: one pixel at a time would load every weight vector per pixel.
    if constexpr (P > 4) {
      if (j + 4 <= je) {
        phase_a_block<NF, NH, NQ, 4>(taps, ntaps, C, Cp, o0, j, acc);
        j += 4;
      }
    }
    if constexpr (P > 2) {
      if (j + 2 <= je) {
        phase_a_block<NF, NH, NQ, 2>(taps, ntaps, C, Cp, o0, j, acc);
        j += 2;
      }
    }
    for (; j < je; ++j) phase_a_block<NF, NH, NQ, 1>(taps, ntaps, C, Cp, o0, j, acc);
  }

  // Phase B for pixel j, one output block: x = acc + Σ_{db>=1} wf[0][db]·x[j-db].
  template <int NF, int NH, int NQ>
  static INVCONV_INLINE void phase_b_pixel(const T* wf, T* cur, const T* acc, int k, int C, int Cp, int o0, int j) {
    using B = OBlock<Ops, NF, NH, NQ>;
    constexpr int NFx = NF > 0 ? NF : 1;
    typename F::vec f0[NFx], f1[NFx], f2[NFx], f3[NFx];
    typename H::vec h0, h1, h2, h3;
    typename Q::vec q0, q1, q2, q3;
    const T* a = acc + (ptrdiff_t)j * Cp + o0;
    for (int v = 0; v < NF; ++v) {
      f0[v] = F::load(a + v * F::N);
      f1[v] = f2[v] = f3[v] = F::zero();
    }
    if constexpr (NH > 0) {
      h0 = H::load(a + B::kHOff);
      h1 = h2 = h3 = H::zero();
    }
    if constexpr (NQ > 0) {
      q0 = Q::load(a + B::kQOff);
      q1 = q2 = q3 = Q::zero();
    }
    // Far taps first: they do not depend on the pixel just solved, so they overlap its latency.
    for (int db = k - 1; db >= 1; --db) {
      const T* s = cur + (ptrdiff_t)(k - 1 + j - db) * Cp;
      const T* w = wf + (ptrdiff_t)db * C * Cp + o0;
      int c = 0;
      for (; c + 4 <= C; c += 4) {
        const T* w0 = w + (ptrdiff_t)c * Cp;
        const T* w1 = w0 + Cp;
        const T* w2 = w1 + Cp;
        const T* w3 = w2 + Cp;
        if constexpr (NF > 0) {
          const typename F::vec b0 = F::bcast(s + c), b1 = F::bcast(s + c + 1);
          const typename F::vec b2 = F::bcast(s + c + 2), b3 = F::bcast(s + c + 3);
          for (int v = 0; v < NF; ++v) {
            f0[v] = F::fmadd(F::load(w0 + v * F::N), b0, f0[v]);
            f1[v] = F::fmadd(F::load(w1 + v * F::N), b1, f1[v]);
            f2[v] = F::fmadd(F::load(w2 + v * F::N), b2, f2[v]);
            f3[v] = F::fmadd(F::load(w3 + v * F::N), b3, f3[v]);
          }
        }
        if constexpr (NH > 0) {
          h0 = H::fmadd(H::load(w0 + B::kHOff), H::bcast(s + c), h0);
          h1 = H::fmadd(H::load(w1 + B::kHOff), H::bcast(s + c + 1), h1);
          h2 = H::fmadd(H::load(w2 + B::kHOff), H::bcast(s + c + 2), h2);
          h3 = H::fmadd(H::load(w3 + B::kHOff), H::bcast(s + c + 3), h3);
        }
        if constexpr (NQ > 0) {
          q0 = Q::fmadd(Q::load(w0 + B::kQOff), Q::bcast(s + c), q0);
          q1 = Q::fmadd(Q::load(w1 + B::kQOff), Q::bcast(s + c + 1), q1);
          q2 = Q::fmadd(Q::load(w2 + B::kQOff), Q::bcast(s + c + 2), q2);
          q3 = Q::fmadd(Q::load(w3 + B::kQOff), Q::bcast(s + c + 3), q3);
        }
      }
      for (; c < C; ++c) {
        const T* wc = w + (ptrdiff_t)c * Cp;
        if constexpr (NF > 0) {
          const typename F::vec b = F::bcast(s + c);
          for (int v = 0; v < NF; ++v) f0[v] = F::fmadd(F::load(wc + v * F::N), b, f0[v]);
        }
        if constexpr (NH > 0) h0 = H::fmadd(H::load(wc + B::kHOff), H::bcast(s + c), h0);
        if constexpr (NQ > 0) q0 = Q::fmadd(Q::load(wc + B::kQOff), Q::bcast(s + c), q0);
      }
    }
    T* out = cur + (ptrdiff_t)(k - 1 + j) * Cp + o0;
    for (int v = 0; v < NF; ++v) F::store(out + v * F::N, F::add(F::add(f0[v], f1[v]), F::add(f2[v], f3[v])));
    if constexpr (NH > 0) H::store(out + B::kHOff, H::add(H::add(h0, h1), H::add(h2, h3)));
    if constexpr (NQ > 0) Q::store(out + B::kQOff, Q::add(Q::add(q0, q1), Q::add(q2, q3)));
  }

  // Elements of one row slot of `ring` for a task of n columns: the row and its k-1 halo columns.
  static ptrdiff_t slot_size(int n, int k, int Cp) { return (ptrdiff_t)(n + k - 1) * Cp; }

  // Per-task scratch: `acc` holds W*Cp elements (64-byte aligned), `taps` k*k+1 entries.
  struct Work {
    T* acc;
    Tap* taps;
  };

  // Solve rows [0, H) of one image over logical columns [jb, je). `y` and `x` point at the image
  // (C, H, W) in NCHW; `chan` maps logical to physical channels (identity, or reversed for the
  // adjoint). `ring` holds this task's last k rows: k slots of slot_size(je-jb, k, Cp) elements,
  // logical column j at slot position k-1+j-jb, the k-1 positions before column jb being the
  // halo. `sync` fills the halo and is the strip split's hand-over: sync.before_a(i) before phase
  // A of row i, sync.before_b(i, cur) before phase B (it writes row i's halo into `cur`: zeros
  // left of the image, otherwise the left strip's last k-1 columns of row i), sync.after(i, cur)
  // once the row is solved and copied out (it posts this task's last k-1 columns for its right
  // neighbour).
  template <class Sync>
  static void solve_rows(const T* y, T* x, const T* wf, const int* chan, int C, int Cp, int Hh, int W, int k,
                         bool flip_h, bool flip_w, T* ring, int jb, int je, Work work, const Sync& sync) {
    const int n = je - jb;  // columns of this task; below, j is local (logical column jb + j)
    const ptrdiff_t slot = slot_size(n, k, Cp);
    const ptrdiff_t plane = (ptrdiff_t)Hh * W;
    T* acc = work.acc;
    Tap* taps = work.taps;
    for (int i = 0; i < Hh; ++i) {
      sync.before_a(i);
      const int h = flip_h ? Hh - 1 - i : i;
      T* cur = ring + (ptrdiff_t)(i % k) * slot;
      T* curx = cur + (ptrdiff_t)(k - 1) * Cp;  // local column 0 of the current row
      // Phase A taps: the centre, reading y in place (NCHW, through the orientation's and the
      // channel order's strides: no transposed copy), and every tap of the rows above that exist
      // (their halos were filled when those rows were solved, so phase A reads only this task's
      // buffer).
      int ntaps = 0;
      const T* y_row = y + chan[0] * plane + (ptrdiff_t)h * W + (flip_w ? W - 1 - jb : jb);
      const ptrdiff_t y_cstep = C > 1 ? (chan[1] - chan[0]) * plane : 0;
      taps[ntaps++] = Tap{y_row, flip_w ? -1 : 1, y_cstep, wf};
      for (int da = 1; da < k && da <= i; ++da) {
        const T* row = ring + (ptrdiff_t)((i - da) % k) * slot;
        for (int db = 0; db < k; ++db)
          taps[ntaps++] = Tap{row + (ptrdiff_t)(k - 1 - db) * Cp, Cp, 1, wf + (ptrdiff_t)(da * k + db) * C * Cp};
      }
      for_each_oblock<Ops>(Cp, [&](auto blk, int o0) {
        using B = decltype(blk);
        phase_a_chunk<B::kVecsF, B::kVecsH, B::kVecsQ>(taps, ntaps, C, Cp, o0, 0, n, acc);
      });
      // Phase B: along the row, after the halo (the k-1 columns left of jb) is in place.
      sync.before_b(i, cur);
      if (k > 1) {
        for (int j = 0; j < n; ++j)
          for_each_oblock<Ops>(Cp, [&](auto blk, int o0) {
            using B = decltype(blk);
            phase_b_pixel<B::kVecsF, B::kVecsH, B::kVecsQ>(wf, cur, acc, k, C, Cp, o0, j);
          });
      } else {
        std::memcpy(curx, acc, sizeof(T) * (size_t)n * Cp);
      }
      // The solved columns of the row out, NCHW.
      for (int c = 0; c < C; ++c) {
        T* xr = x + chan[c] * plane + (ptrdiff_t)h * W;
        if (flip_w) {
          T* xj = xr + (W - 1 - jb);
          for (int j = 0; j < n; ++j) xj[-j] = curx[(ptrdiff_t)j * Cp + c];
        } else {
          T* xj = xr + jb;
          for (int j = 0; j < n; ++j) xj[j] = curx[(ptrdiff_t)j * Cp + c];
        }
      }
      // Published after the copy-out, though the right neighbour reads only the row buffer:
      // publishing before it was slower (instrumented, B=1 C=12 32² k=3, 2 threads, Zen 4: the
      // right strip ended at 35 µs instead of 32.4, alternating builds).
      sync.after(i, cur);
    }
  }

  // One task walks the whole image: its halo is the k-1 zero columns left of the image.
  struct NoSync {
    int halo;  // (k-1)*Cp
    static void before_a(int) {}
    void before_b(int, T* cur) const { std::memset(cur, 0, sizeof(T) * (size_t)halo); }
    static void after(int, const T*) {}
  };

  // The whole image on the calling thread, with a ring of k rows.
  static void solve_image(const T* y, T* x, const T* wf, const int* chan, int C, int Cp, int Hh, int W, int k,
                          bool flip_h, bool flip_w, T* ring, Work work) {
    NoSync none{(k - 1) * Cp};
    solve_rows(y, x, wf, chan, C, Cp, Hh, W, k, flip_h, flip_w, ring, 0, W, work, none);
  }
};

// The 1×1 solve (k = 1): no neighbours, so every pixel is x = L⁻¹·y on its own, one small
// lower-triangular matrix product per pixel. It runs in place on NCHW, pixels along the vector
// lanes and output channels over the registers, without the row walk's channels-last staging.
// `m` is the folded centre tap (m[c*Cp + o] = L⁻¹[o][c], zero for c > o); logical channel c is
// physical channel chan[c]. Each output is the same chain of multiply-adds over c = 0, 1, ...
// as the row walk's phase A (the terms with c > o are zero and skipped), so the result does not
// depend on the blocking or the thread split.
template <class Ops>
struct Pointwise {
  using T = typename Ops::T;
  using F = typename Ops::F;
  static constexpr int P = 2;                    // pixel vectors per block
  static constexpr int NO = Ops::kAccRegs / P;  // output channels per block (accumulators NO × P)
  static constexpr int kBlock = P * F::N;       // pixels per block
  static_assert(NO >= 1 && NO <= 8, "Pointwise::pixels covers narrower tail blocks up to 7 channels");

  // Outputs [o0, o0+NOB) of the kBlock pixels at y / x, channel c's pixels at y + ych[c] * ys
  // (x likewise with xch, xs).
  template <int NOB>
  static INVCONV_INLINE void block(const T* y, const int* ych, ptrdiff_t ys, T* x, const int* xch, ptrdiff_t xs,
                                   const T* m, int C, int Cp, int o0) {
    typename F::vec acc[NOB][P];
    for (int o = 0; o < NOB; ++o)
      for (int p = 0; p < P; ++p) acc[o][p] = F::zero();
    const int cend = std::min(C, o0 + NOB);
    for (int c = 0; c < cend; ++c) {
      const T* yc = y + ych[c] * ys;
      typename F::vec v[P];
      for (int p = 0; p < P; ++p) v[p] = F::load(yc + p * F::N);
      const T* mc = m + (ptrdiff_t)c * Cp + o0;
      for (int o = 0; o < NOB; ++o) {
        const typename F::vec w = F::bcast(mc + o);
        for (int p = 0; p < P; ++p) acc[o][p] = F::fmadd(w, v[p], acc[o][p]);
      }
    }
    for (int o = 0; o < NOB; ++o) {
      T* xo = x + xch[o0 + o] * xs;
      for (int p = 0; p < P; ++p) F::store(xo + p * F::N, acc[o][p]);
    }
  }

  // Every output channel of the kBlock pixels at y / x.
  static INVCONV_INLINE void pixels(const T* y, const int* ych, ptrdiff_t ys, T* x, const int* xch, ptrdiff_t xs,
                                    const T* m, int C, int Cp) {
    int o0 = 0;
    for (; o0 + NO <= C; o0 += NO) block<NO>(y, ych, ys, x, xch, xs, m, C, Cp, o0);
    switch (C - o0) {  // the last, narrower block of output channels
      case 0: break;
#define INVCONV_PW_CASE(n) \
  case n:                  \
    if constexpr (n < NO) block<n>(y, ych, ys, x, xch, xs, m, C, Cp, o0); \
    break;
      INVCONV_PW_CASE(1) INVCONV_PW_CASE(2) INVCONV_PW_CASE(3) INVCONV_PW_CASE(4) INVCONV_PW_CASE(5)
      INVCONV_PW_CASE(6) INVCONV_PW_CASE(7)
#undef INVCONV_PW_CASE
      default: break;
    }
  }

  // Pixels [p0, p1) of one image (y, x: its channel 0; `plane` = H*W). `tmp` holds C*kBlock
  // elements for the last, partial block (staged through it, zero-padded), `ident` is 0..C-1.
  static void range(const T* y, T* x, const T* m, const int* chan, const int* ident, int C, int Cp, ptrdiff_t plane,
                    ptrdiff_t p0, ptrdiff_t p1, T* tmp, T* tmp_out) {
    ptrdiff_t p = p0;
    for (; p + kBlock <= p1; p += kBlock) pixels(y + p, chan, plane, x + p, chan, plane, m, C, Cp);
    if (p < p1) {
      const ptrdiff_t r = p1 - p;
      for (int c = 0; c < C; ++c) {
        T* t = tmp + (ptrdiff_t)c * kBlock;
        std::memcpy(t, y + chan[c] * plane + p, sizeof(T) * (size_t)r);
        std::memset(t + r, 0, sizeof(T) * (size_t)(kBlock - r));
      }
      pixels(tmp, ident, kBlock, tmp_out, ident, kBlock, m, C, Cp);
      for (int c = 0; c < C; ++c)
        std::memcpy(x + chan[c] * plane + p, tmp_out + (ptrdiff_t)c * kBlock, sizeof(T) * (size_t)r);
    }
  }
};

// Calls f(std::integral_constant<int, n>{}) for 1 <= n <= MAX (a run-time count to a template).
template <int MAX, class Fn>
static INVCONV_INLINE void with_count(int n, Fn&& f) {
  if constexpr (MAX >= 1) {
    if (n >= MAX)
      f(std::integral_constant<int, MAX>{});
    else
      with_count<MAX - 1>(n, f);
  }
}

// The weight gradient of the backward: g[t][c][o] += Σ_{h,w} lam[o][h][w] · x[c][h+a-pt][w+b-pl]
// for the physical tap t = (a, b) of an orientation with top/left padding (pt, pl), i.e. the
// convolution weight gradient of input x (zero outside the image) and output gradient lam, for
// one image; `g` is (k*k) × C × Cp.
//
// The pixels run along the vector lanes (every lane does useful work whatever C is): x is first
// copied with its zero border into `xpad` (C planes of (H+k-1) × (Wv+k-1), Wv = W rounded up to
// the vector width), so that the tap (a, b) of output row h reads the contiguous row h+a of xpad
// from column b; lam rows are read in place when W is a multiple of the vector width, else from
// a zero-padded copy `lamp` (C planes of H × Wv). Blocks of CB input × OB output channels keep
// CB·OB vector accumulators over one pass of the rows (CB + OB loads per CB·OB multiply-adds),
// summed across their lanes at the end.
template <class Ops>
struct WeightGrad {
  using T = typename Ops::T;
  using F = typename Ops::F;
  static constexpr int N = F::N;
  // OB lam vectors stay in registers beside the CB·OB accumulators and one x vector.
  static constexpr int OB = Ops::kAccRegs >= 16 ? 4 : 3;
  static constexpr int CB = Ops::kAccRegs >= 16 ? 6 : 4;

  struct Layout {
    int C, H, W, k, Wv, Wx;  // Wx = Wv + k - 1: a row of xpad
    bool pad_lam;
    ptrdiff_t xplane() const { return (ptrdiff_t)(H + k - 1) * Wx; }
    ptrdiff_t lplane() const { return (ptrdiff_t)H * Wv; }
    size_t scratch() const { return (size_t)C * xplane() + (pad_lam ? (size_t)C * lplane() : 0); }
  };
  static Layout layout(int C, int H, int W, int k) {
    const int Wv = (W + N - 1) / N * N;
    return Layout{C, H, W, k, Wv, Wv + k - 1, Wv != W};
  }

  // xpad (and lamp where needed) of one image into `buf` (layout.scratch() elements).
  static void prepare(const T* x, const T* lam, const Layout& L, int pt, int pl, T* buf) {
    const ptrdiff_t plane = (ptrdiff_t)L.H * L.W;
    std::memset(buf, 0, sizeof(T) * L.scratch());
    for (int c = 0; c < L.C; ++c)
      for (int h = 0; h < L.H; ++h)
        std::memcpy(buf + c * L.xplane() + (ptrdiff_t)(h + pt) * L.Wx + pl, x + c * plane + (ptrdiff_t)h * L.W,
                    sizeof(T) * (size_t)L.W);
    if (L.pad_lam) {
      T* lamp = buf + L.C * L.xplane();
      for (int o = 0; o < L.C; ++o)
        for (int h = 0; h < L.H; ++h)
          std::memcpy(lamp + o * L.lplane() + (ptrdiff_t)h * L.Wv, lam + o * plane + (ptrdiff_t)h * L.W,
                      sizeof(T) * (size_t)L.W);
    }
  }

  template <int NC, int NOB>
  static INVCONV_INLINE void block(const T* xs, const T* ls, ptrdiff_t lrow, const Layout& L, int a, int b, int c0,
                                   int o0, T* gt, int Cp) {
    typename F::vec acc[NC][NOB];
    for (int c = 0; c < NC; ++c)
      for (int o = 0; o < NOB; ++o) acc[c][o] = F::zero();
    const ptrdiff_t xplane = L.xplane(), lplane = (ptrdiff_t)L.H * lrow;
    for (int h = 0; h < L.H; ++h) {
      const T* xr = xs + c0 * xplane + (ptrdiff_t)(h + a) * L.Wx + b;
      const T* lr = ls + o0 * lplane + (ptrdiff_t)h * lrow;
      for (int v = 0; v < L.Wv; v += N) {
        typename F::vec lv[NOB];
        for (int o = 0; o < NOB; ++o) lv[o] = F::load(lr + o * lplane + v);
        for (int c = 0; c < NC; ++c) {
          const typename F::vec xv = F::load(xr + c * xplane + v);
          for (int o = 0; o < NOB; ++o) acc[c][o] = F::fmadd(xv, lv[o], acc[c][o]);
        }
      }
    }
    for (int c = 0; c < NC; ++c)
      for (int o = 0; o < NOB; ++o) gt[(ptrdiff_t)(c0 + c) * Cp + o0 + o] += F::hsum(acc[c][o]);
  }

  // Units of work that write disjoint parts of g: one tap × one block of OB output channels.
  static int units(const Layout& L) { return L.k * L.k * ((L.C + OB - 1) / OB); }

  // Units [u0, u1) of one image whose xpad (and lamp) `prepare` wrote into `buf`.
  static void run_units(const T* buf, const T* lam, const Layout& L, T* g, int Cp, int u0, int u1) {
    const T* ls = L.pad_lam ? buf + L.C * L.xplane() : lam;
    const ptrdiff_t lrow = L.pad_lam ? L.Wv : L.W;
    const int nob = (L.C + OB - 1) / OB;
    for (int u = u0; u < u1; ++u) {
      const int t = u / nob, o0 = (u % nob) * OB;
      const int a = t / L.k, b = t % L.k;
      T* gt = g + (ptrdiff_t)t * L.C * Cp;
      with_count<OB>(L.C - o0, [&](auto no) {
        for (int c0 = 0; c0 < L.C; c0 += CB)
          with_count<CB>(L.C - c0, [&](auto nc) {
            block<decltype(nc)::value, decltype(no)::value>(buf, ls, lrow, L, a, b, c0, o0, gt, Cp);
          });
      });
    }
  }

  static void image(const T* x, const T* lam, T* buf, T* g, int Cp, const Layout& L, int pt, int pl) {
    prepare(x, lam, L, pt, pl, buf);
    run_units(buf, lam, L, g, Cp, 0, units(L));
  }
};

// Multiply-add throughput of one thread at the full vector width, in FLOP/s: 12 independent
// chains (enough to cover the FMA latency on every core we know), best of `reps`
// short runs (a short run is more likely to go uninterrupted on a busy machine).
// `python -m bench kernels` uses it for the arithmetic floor it prints beside each time.
template <class Ops>
struct Peak {
  using T = typename Ops::T;
  using F = typename Ops::F;
  static double flops_per_second(int64_t iters, int reps) {
    constexpr int A = 12;  // 12 chains cover 4-cycle latency × 2 pipes; more made GCC keep them in memory
    const T mv = T(0.999999), av = T(1e-6);
    const typename F::vec m = F::bcast(&mv), a = F::bcast(&av);
    double best = 0;
    for (int r = 0; r < reps; ++r) {
      // Distinct starting values the compiler cannot see: identical chains would be merged into one.
      typename F::vec acc[A];
      for (int i = 0; i < A; ++i) {
        volatile T start = T(i) * T(1e-3);
        const T v = start;
        acc[i] = F::bcast(&v);
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < A; ++i) acc[i] = F::fmadd(acc[i], m, a);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      T sink[F::N];
      typename F::vec sum = acc[0];
      for (int i = 1; i < A; ++i) sum = F::add(sum, acc[i]);
      F::store(sink, sum);
      volatile T keep = sink[0];
      (void)keep;
      if (s > 0) best = std::max(best, 2.0 * F::N * A * (double)iters / s);
    }
    return best;
  }
};

// The kernels of this SIMD target for one element type, as one type the dispatcher passes on.
template <class Ops>
struct Kit {
  using O = Ops;
  using RS = RowSolver<Ops>;
  using WG = WeightGrad<Ops>;
  using PW = Pointwise<Ops>;
  using FW = Fold<Ops>;
  using PK = Peak<Ops>;
};
