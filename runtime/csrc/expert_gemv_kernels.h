// The matrix-vector kernels, written once over a vector ISA. expert_gemv.cpp includes this
// file inside one namespace per ISA (each under its own `#pragma GCC target`), after
// defining there: V (a vector of W floats), W, R (64-byte streams read at once), zero,
// fma, add, mul, div, vmin, vmax, loadx, bcast, store, hsum, load_line<T>, round_near
// (to nearest, ties to even) and pow2 (2^n for a whole n in [-126, 127]).
//
// Every loop step reads one 64-byte line per stream (kStep<T> weights): one line per row
// of an [out, in] matrix, or R lines side by side of one row of an [in, out] matrix.
// load_line returns a line as kVecs<T> float vectors; for bf16 each 32-bit lane holds a
// pair, so the even elements come out shifted and the odd ones masked (both exact), and x
// is put in the same order once per call instead of shuffling every weight.

template <class T> constexpr int kStep = 64 / int(sizeof(T));
template <class T> constexpr int kVecs = kStep<T> / W;
template <class T> constexpr bool kPairs = std::is_same_v<T, c10::BFloat16>;

// x [in] in the order load_line yields weights; the tail past the last whole line stays as is.
template <class T>
void arrange_x(const float* x, float* xp, int64_t in) {
  const int64_t main = in / kStep<T> * kStep<T>;
  int64_t j = 0;
  if constexpr (kPairs<T>) {
    for (; j < main; j += 2 * W)
      for (int k = 0; k < W; ++k) {
        xp[j + k] = x[j + 2 * k];
        xp[j + W + k] = x[j + 2 * k + 1];
      }
  }
  for (; j < in; ++j) xp[j] = x[j];
}

// out[s] = w_s . x for S consecutive rows of an [out, in] matrix (rows in apart).
template <int S, class T>
inline void dot_rows(const T* w, int64_t in, const float* xp, float* out) {
  constexpr int E = kStep<T>, K = kVecs<T>;
  V acc[S][K];
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < K; ++k) acc[s][k] = zero();
  const int64_t main = in / E * E;
  // The next S rows follow these in memory: fetch them while these are summed, so each
  // thread keeps a whole row group of reads in flight (a prefetch never faults, even past the end).
  const T* next = w + S * in;
  for (int64_t j = 0; j < main; j += E) {
    V xv[K];
    for (int k = 0; k < K; ++k) xv[k] = loadx(xp + j + k * W);
    for (int s = 0; s < S; ++s) {
      __builtin_prefetch(next + s * in + j, 0, SPECMOE_PREFETCH_LOCALITY);
      V wv[K];
      load_line(w + s * in + j, wv);
      for (int k = 0; k < K; ++k) acc[s][k] = fma(wv[k], xv[k], acc[s][k]);
    }
  }
  for (int s = 0; s < S; ++s) {
    V t = acc[s][0];
    for (int k = 1; k < K; ++k) t = add(t, acc[s][k]);
    float sum = hsum(t);
    for (int64_t j = main; j < in; ++j) sum += to_float(w[s * in + j]) * xp[j];
    out[s] = sum;
  }
}

// out[c] = sum_j x[j] w[j, c] for S lines of columns (S * kStep<T>) of an [in, ld] matrix.
template <int S, class T>
inline void axpy_cols(const T* w, int64_t in, int64_t ld, const float* x, float* out) {
  constexpr int E = kStep<T>, K = kVecs<T>, kAhead = 8;  // rows prefetched ahead
  V acc[S][K];
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < K; ++k) acc[s][k] = zero();
  for (int64_t j = 0; j < in; ++j) {
    const V xj = bcast(x[j]);
    const T* row = w + j * ld;
    for (int s = 0; s < S; ++s) {
      __builtin_prefetch(row + kAhead * ld + s * E, 0, SPECMOE_PREFETCH_LOCALITY);
      V wv[K];
      load_line(row + s * E, wv);
      for (int k = 0; k < K; ++k) acc[s][k] = fma(wv[k], xj, acc[s][k]);
    }
  }
  for (int s = 0; s < S; ++s) {
    float line[E];
    for (int k = 0; k < K; ++k) store(line + k * W, acc[s][k]);
    float* o = out + s * E;
    if constexpr (kPairs<T>) {  // vectors 2q, 2q+1: even, odd elements of the same 2W
      for (int q = 0; q < K / 2; ++q)
        for (int l = 0; l < W; ++l) {
          o[2 * q * W + 2 * l] = line[2 * q * W + l];
          o[2 * q * W + 2 * l + 1] = line[(2 * q + 1) * W + l];
        }
    } else {
      for (int e = 0; e < E; ++e) o[e] = line[e];
    }
  }
}

// Units of work: R rows of an [out, in] matrix, or R lines of columns of an [in, out] one.
template <class T, bool InOut>
constexpr int64_t unit_span() { return InOut ? int64_t(R) * kStep<T> : R; }

template <class T, bool InOut>
void run_units(const Job& job, int64_t u0, int64_t u1) {
  constexpr int64_t span = unit_span<T, InOut>();
  const int64_t in = job.in, outd = job.outd;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t i = u / job.units, first = (u % job.units) * span;
    const T* w = reinterpret_cast<const T*>(job.ptrs[i]);
    const float* x = job.x + i * job.x_stride;
    float* out = job.out + i * outd;
    if constexpr (!InOut) {
      if (first + span <= outd) {
        dot_rows<R>(w + first * in, in, x, out + first);
      } else {
        for (int64_t r = first; r < outd; ++r) dot_rows<1>(w + r * in, in, x, out + r);
      }
    } else {
      constexpr int64_t E = kStep<T>;
      int64_t c = first;
      if (c + span <= outd) {
        axpy_cols<R>(w + c, in, outd, x, out + c);
        continue;
      }
      for (; c + E <= outd; c += E) axpy_cols<1>(w + c, in, outd, x, out + c);
      if (c == outd) continue;
      float tail[E] = {};
      for (int64_t j = 0; j < in; ++j)
        for (int64_t t = c; t < outd; ++t) tail[t - c] += to_float(w[j * outd + t]) * x[j];
      for (int64_t t = c; t < outd; ++t) out[t] = tail[t - c];
    }
  }
}

template <class T>
Plan plan(bool in_out) {
  if (in_out) return {&run_units<T, true>, nullptr, unit_span<T, true>()};
  return {&run_units<T, false>, &arrange_x<T>, unit_span<T, false>()};
}

// e^x within a few ulp for x in [-87.3, 88.3] (clamped there, so no infinities or
// denormals): Cody-Waite reduction by ln 2 and the Cephes expf polynomial. A libm call per
// element would cost more than the rest of the glu; every ISA runs the same steps.
inline V exp_approx(V x) {
  x = vmin(vmax(x, bcast(-87.3f)), bcast(88.3f));
  const V n = round_near(mul(x, bcast(1.44269504088896341f)));
  V r = fma(n, bcast(-0.693359375f), x);  // ln 2 in two parts: n * 0.693359375 is exact
  r = fma(n, bcast(2.12194440e-4f), r);
  V p = bcast(1.9875691500e-4f);
  p = fma(p, r, bcast(1.3981999507e-3f));
  p = fma(p, r, bcast(8.3334519073e-3f));
  p = fma(p, r, bcast(4.1665795894e-2f));
  p = fma(p, r, bcast(1.6666665459e-1f));
  p = fma(p, r, bcast(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, bcast(1.f)));
  return mul(p, pow2(n));
}

inline V silu_times(V g, V u) { return mul(div(g, add(bcast(1.f), exp_approx(mul(g, bcast(-1.f))))), u); }

// a[i] = silu(gate_up[i, :I]) * gate_up[i, I:] for n rows of gate_up [n, 2I].
void swiglu_rows(const float* gate_up, float* a, int64_t n, int64_t inter) {
  for (int64_t i = 0; i < n; ++i) {
    const float* g = gate_up + i * 2 * inter;
    const float* u = g + inter;
    float* o = a + i * inter;
    int64_t j = 0;
    for (; j + W <= inter; j += W) store(o + j, silu_times(loadx(g + j), loadx(u + j)));
    if (j < inter) {  // through a full vector, so the tail rounds as the body does
      float gt[W] = {}, ut[W] = {}, ot[W];
      std::copy(g + j, g + inter, gt);
      std::copy(u + j, u + inter, ut);
      store(ot, silu_times(loadx(gt), loadx(ut)));
      std::copy(ot, ot + (inter - j), o + j);
    }
  }
}

// GPT-OSS: gate and up interleaved (even / odd columns of gate_up [n, 2I]), gate clamped
// from above and up from both sides at limit, then (up + 1) * gate * sigmoid(alpha gate),
// rounded step by step in the order torch computes _gpt_oss_glu. The pairs are split W at a
// time through small arrays: the glu is a few thousand elements, next to the products' millions.
inline V gpt_oss_glu(V g, V u, V alpha, V limit) {
  const V one = bcast(1.f);
  g = vmin(limit, g);  // vmin / vmax return their second operand when one is NaN: a NaN stays
  u = vmin(limit, vmax(mul(limit, bcast(-1.f)), u));
  const V sig = div(one, add(one, exp_approx(mul(mul(g, alpha), bcast(-1.f)))));
  return mul(add(u, one), mul(g, sig));
}

void gpt_oss_glu_rows(const float* gate_up, float* a, int64_t n, int64_t inter, float alpha, float limit) {
  const V va = bcast(alpha), vl = bcast(limit);
  for (int64_t i = 0; i < n; ++i) {
    const float* gu = gate_up + i * 2 * inter;
    float* o = a + i * inter;
    for (int64_t j = 0; j < inter; j += W) {
      const int64_t m = std::min<int64_t>(W, inter - j);
      float gt[W] = {}, ut[W] = {}, ot[W];
      for (int64_t k = 0; k < m; ++k) {
        gt[k] = gu[2 * (j + k)];
        ut[k] = gu[2 * (j + k) + 1];
      }
      store(ot, gpt_oss_glu(loadx(gt), loadx(ut), va, vl));
      std::copy(ot, ot + m, o + j);
    }
  }
}

// out[h] = sum_i w[i] y[i, h], summed over i = 0, 1, ... in that order for every h.
void weighted_rows(const float* y, const float* w, int64_t n, int64_t h, float* out) {
  int64_t j = 0;
  for (; j + W <= h; j += W) {
    V acc = zero();
    for (int64_t i = 0; i < n; ++i) acc = fma(bcast(w[i]), loadx(y + i * h + j), acc);
    store(out + j, acc);
  }
  for (; j < h; ++j) {
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc = std::fma(w[i], y[i * h + j], acc);
    out[j] = acc;
  }
}
