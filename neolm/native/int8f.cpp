// Weight-only int8 in fp32 arithmetic: Y (m, n) = X (m, k) @ (W * scale)^T + bias, W int8 codes, X fp32 as it
// is, fp32 FMAs; for CPUs whose bf16 instructions are slow.
//
// Why: gemm.cpp's int8 kernels convert the codes to bf16 and multiply with vdpbf16ps against X rounded to bf16.
// That suits an AVX-512 EPYC (Zen 5), where vdpbf16ps runs at 2 per cycle per core. On a 5th-generation Xeon
// without AMX it issues about once every 2.2 cycles: 14 multiply-adds a cycle, under half of fp32's 2 FMAs of 16
// (a register-only loop, 12 accumulators: 1.3 against 5.5 G instructions/s per core; bench/PROFILE.md, session
// 16). There, weight-only int8 decoding was bound by arithmetic even at one row (about half the W8A8 kernel's
// speed over the same bytes) and 8 rows cost 3x one row. neolm.quant.linear.Int8Linear takes these kernels where
// oneDNN's fp32 GEMM outruns its bf16 one (neolm.ops.gemm_dtype: the same cause, timed once per process).
// Products are exact (codes and x in fp32); sums in fp32.
//
// The codes' layout (neolm.native.int8f_pack): panels of 48 out-features (the last one 16 or 32 wide where n
// needs it, n rounded up to 16 with zero codes); in a panel, in-feature by in-feature, its features' codes
// side by side:
//   panel p (48 k bytes after panel p - 1), in-feature j, feature f  <-  W[48 p + f, j]
// One 16-byte load is 16 features' codes of one in-feature; against that in-feature of a row of X broadcast to
// every lane, one FMA adds a product to each of 16 per-feature sums. A tile of up to 8 rows of X x one panel
// keeps 3 x 8 such sums in registers for the whole of k: every code is converted once per 8 rows, no
// horizontal sums at the end, and a decode batch of 8 meets each panel once while it streams (the row-major
// layout of gemm.cpp, 3 rows of W x 8 of X, ran at 0.7x: 8 rows of X reloaded per 3 vectors of codes, and 24
// horizontal sums a tile). Each output is one lane's sum over the in-features in order: a row gets the same
// numbers alone as in a batch of any size.

#include <algorithm>

#include "gemv.h"

namespace neolm {

constexpr int64_t PANEL = 48;  // neolm/native/__init__.py F8_PANEL
// Panels of a matrix of n out-features (n rounded up to 16), and panel p's width (48, the last one 16-48).
inline int64_t panel_count(int64_t n) { return (((n + 15) & ~int64_t(15)) + PANEL - 1) / PANEL; }
inline int64_t panel_width(int64_t n, int64_t p) { return std::min(PANEL, ((n + 15) & ~int64_t(15)) - p * PANEL); }

#ifdef NEOLM_AVX512

namespace {
constexpr int64_t AHEAD = 4096;  // prefetch distance in a panel's stream (bytes)
constexpr int TILE = 8;          // rows of X a tile

inline __m512 codes(const int8_t* p) {  // 16 codes to fp32 (exact)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Y[t0 + b, col + 16 v + lane] for b < NB, v < P: X's NB rows from x (stride k) against one panel of 16 P features.
template <int P, int NB>
void tile(const float* x, int64_t k, const int8_t* panel, const uint16_t* scale, const void* bias, int bias_bf16,
          void* y, int out_bf16, int64_t n, int64_t col) {
  constexpr int64_t WIDTH = 16 * P;
  __m512 acc[P][NB];
  for (int v = 0; v < P; v++)
    for (int b = 0; b < NB; b++) acc[v][b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j++) {
    const int8_t* wj = panel + j * WIDTH;
    if ((j * WIDTH) % 64 < WIDTH) prefetch(wj, AHEAD);  // (at least) once per 64-byte line
    __m512 w[P];
    for (int v = 0; v < P; v++) w[v] = codes(wj + 16 * v);
    for (int b = 0; b < NB; b++) {
      const __m512 xb = _mm512_set1_ps(x[b * k + j]);
      for (int v = 0; v < P; v++) acc[v][b] = _mm512_fmadd_ps(w[v], xb, acc[v][b]);
    }
  }
  for (int v = 0; v < P && col + 16 * v < n; v++) {
    const int64_t c = col + 16 * v;
    const __mmask16 m = first(n - c);
    const __m512 s = load(scale, 1, c, m);
    const __m512 add = bias ? load(bias, bias_bf16, c, m) : _mm512_setzero_ps();
    for (int b = 0; b < NB; b++) put(y, out_bf16, b * n + c, _mm512_fmadd_ps(acc[v][b], s, add), m);
  }
}

template <int P>
void panel_rows(const float* x, int64_t m, int64_t k, const int8_t* panel, const uint16_t* scale, const void* bias,
                int bias_bf16, void* y, int out_bf16, int64_t n, int64_t col) {
  for (int64_t t0 = 0; t0 < m; t0 += TILE) {
    const float* xt = x + t0 * k;
    void* yt = static_cast<char*>(y) + t0 * n * (out_bf16 ? 2 : 4);
    with_rows<TILE>(m - t0, [&](auto rows) { tile<P, rows>(xt, k, panel, scale, bias, bias_bf16, yt, out_bf16, n, col); });
  }
}
}  // namespace

// The panels split over the threads of the enclosing parallel region (orphaned `omp for`), as gemv.h's bodies.
void gemm_int8f(const float* x, int64_t m, const int8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                void* y, int out_bf16, int64_t n, int64_t k) {
  const int64_t panels = panel_count(n);
#pragma omp for schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    const int64_t col = p * PANEL;
    const int8_t* panel = w + col * k;
    switch (panel_width(n, p) / 16) {
      case 1: panel_rows<1>(x, m, k, panel, scale, bias, bias_bf16, y, out_bf16, n, col); break;
      case 2: panel_rows<2>(x, m, k, panel, scale, bias, bias_bf16, y, out_bf16, n, col); break;
      default: panel_rows<3>(x, m, k, panel, scale, bias, bias_bf16, y, out_bf16, n, col); break;
    }
  }
}

#endif  // NEOLM_AVX512

// Codes (n, k) row-major <-> the panels (both directions: `to_panels` 1 packs, 0 unpacks), a panel at a time
// (split over the threads), 64 in-features at a time so that both sides' lines stay in L1: ~2.6 GB/s on 2
// cores; torch's strided byte copies made a gpt-neo-1.3B's load take twice as long.
void int8f_repack(int8_t* rows, int8_t* panels, int64_t n, int64_t k, int to_panels) {
#pragma omp for schedule(static)
  for (int64_t p = 0; p < panel_count(n); p++) {
    const int64_t col = p * PANEL, width = panel_width(n, p), real = std::min(width, n - col);  // past n: zero codes
    int8_t* panel = panels + col * k;
    for (int64_t j0 = 0; j0 < k; j0 += 64) {
      const int64_t j1 = std::min(k, j0 + 64);
      if (to_panels) {
        for (int64_t j = j0; j < j1; j++) {
          int8_t* out = panel + j * width;
          for (int64_t f = 0; f < real; f++) out[f] = rows[(col + f) * k + j];
          for (int64_t f = real; f < width; f++) out[f] = 0;
        }
      } else {
        for (int64_t f = 0; f < real; f++)
          for (int64_t j = j0; j < j1; j++) rows[(col + f) * k + j] = panel[j * width + f];
      }
    }
  }
}

}  // namespace neolm

extern "C" {

void neolm_int8f_repack(int8_t* rows, int8_t* panels, int64_t n, int64_t k, int to_panels) {
#pragma omp parallel
  neolm::int8f_repack(rows, panels, n, k, to_panels);
}

#ifdef NEOLM_AVX512
void neolm_gemm_int8f(const float* x, int64_t m, const int8_t* w, const uint16_t* scale, const void* bias,
                      int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemm_int8f(x, m, w, scale, bias, bias_bf16, y, out_bf16, n, k);
}
#endif

}  // extern "C"
