// int8 weights against int8 activations (W8A8): Y (m, n) = X (m, k) @ W (n, k)^T + bias for any m, with X's
// rows quantized on the fly, each to int8 with a scale of its own (per row, symmetric: s = max |x| / 127).
//
// Why: the weight-only int8 kernels (gemm.cpp) convert the codes to bf16 and multiply with vdpbf16ps, 32
// multiply-adds per instruction; prompts go through oneDNN's bf16 GEMM. With both operands in int8, one
// vpdpbusd (AVX-512 VNNI) does 64, at the same rate on an AVX-512 EPYC (2 per cycle per core), and the codes
// are read as they are. What it costs is the activations' precision: 8 bits per row instead of bf16's 8
// significant bits per number, which is why it is an option (neolm.load(quantize_activations=True)), as in
// CTranslate2's and llama.cpp's int8 types.
//
// vpdpbusd multiplies unsigned bytes by signed ones, so X goes in as u = q + 128 (q in [-127, 127]) and
//   sum_k q_x w = sum_k u w - 128 sum_k w,
// the row sums of W (`wsum`, int32) being made once per layer. Sums are exact in int32 (|u w| <= 255 * 127,
// k < 2^16); y = (sum - 128 wsum) * s_x * s_w + bias, in fp32.
//
// Tiles: 8 rows of W against TB <= 3 rows of X (24 accumulators), every code loaded once per 3 rows of X.
// The accumulators are named variables (ROW below): GCC 12 keeps arrays of __m512i accumulators in memory,
// at half the speed. Many rows of X go in chunks of about 1 MiB (in L2), each chunk meeting every tile of W.

#include <algorithm>
#include <cmath>

#include "gemv.h"

namespace neolm {

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)

namespace {

constexpr int W_ROWS = 8, X_ROWS = 3;
constexpr int64_t CHUNK_BYTES = 1 << 20, ROW_AHEAD = 4096, FEW = 16;
#ifndef FEW_AHEAD
#define FEW_AHEAD 32768
#endif

inline int64_t padded(int64_t k) { return (k + 63) & ~int64_t(63); }

// Rows [0, m) of x (fp32) to u = round(x / s) + 128 (kp bytes a row, 128 past k) and s (omp for over rows).
void quantize_rows(const float* x, int64_t m, int64_t k, uint8_t* u, float* s) {
  const int64_t kp = padded(k);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float* row = x + i * k;
    __m512 top = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(k - j), row + j)));
    const float amax = _mm512_reduce_max_ps(top);
    s[i] = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    for (int64_t j = 0; j < kp; j += 16) {
      const __mmask16 m16 = j < k ? first(k - j) : 0;
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m16, row + j), inv));  // nearest even
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i * kp + j), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128))));
    }
  }
}

// One output: the same arithmetic on every path (a row gets the same numbers alone and in any batch).
inline float output(int32_t sum, int32_t wsum, float xs, float ws, float bias) {
  return std::fma(float(sum - 128 * wsum), xs * ws, bias);
}

// One tile: W rows w[0..7] (k codes each) against TB rows of u (kp bytes apart); sums[8 b + r]: W row r, X row
// b. (Not inlined: inside gemm_int8a8 GCC 12 spills the accumulators; so it does with a transposing tree of
// the 24 sums at the end in place of the reductions one by one, which would cost less.)
template <int TB>
__attribute__((noinline)) void tile(const uint8_t* u, int64_t kp, const int8_t* const* w, int64_t k, int32_t* sums) {
  const __m512i zero = _mm512_setzero_si512();
#define ROW(r) __m512i r##0 = zero, r##1 = zero, r##2 = zero;
  ROW(a) ROW(b) ROW(c) ROW(d) ROW(e) ROW(f) ROW(g) ROW(h)
#undef ROW
  for (int64_t j = 0; j < kp; j += 64) {
    const int64_t left = k - j;
    const __mmask64 codes = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    const __m512i x0 = _mm512_loadu_si512(u + j);
    const __m512i x1 = TB > 1 ? _mm512_loadu_si512(u + kp + j) : zero;
    const __m512i x2 = TB > 2 ? _mm512_loadu_si512(u + 2 * kp + j) : zero;
#define ROW(r, i)                                                                \
  {                                                                              \
    prefetch(w[i] + j, ROW_AHEAD);                                                  \
    const __m512i v = _mm512_maskz_loadu_epi8(codes, w[i] + j);                  \
    r##0 = _mm512_dpbusd_epi32(r##0, x0, v);                                     \
    if constexpr (TB > 1) r##1 = _mm512_dpbusd_epi32(r##1, x1, v);               \
    if constexpr (TB > 2) r##2 = _mm512_dpbusd_epi32(r##2, x2, v);               \
  }
    ROW(a, 0) ROW(b, 1) ROW(c, 2) ROW(d, 3) ROW(e, 4) ROW(f, 5) ROW(g, 6) ROW(h, 7)
#undef ROW
  }
#define ROW(r, i)                                                          \
  sums[i] = _mm512_reduce_add_epi32(r##0);                                 \
  if constexpr (TB > 1) sums[8 + i] = _mm512_reduce_add_epi32(r##1);      \
  if constexpr (TB > 2) sums[16 + i] = _mm512_reduce_add_epi32(r##2);
  ROW(a, 0) ROW(b, 1) ROW(c, 2) ROW(d, 3) ROW(e, 4) ROW(f, 5) ROW(g, 6) ROW(h, 7)
#undef ROW
}

// Few rows of X (decode steps): 3 rows of W (w[0..2], streamed once) against TB <= 8 rows of u; sums[r * 8 + b].
// Against tile<> (8 rows of W, fewer streams of codes per pass are what the memory serves fastest); one row
// of W at a time re-reads all of X from L2 for every row: both ~20% slower from memory at 8 rows.
template <int TB>
inline void few(const uint8_t* u, int64_t kp, const int8_t* const* w, int64_t k, int32_t* sums) {
  const __m512i zero = _mm512_setzero_si512();
#define ROW(r) __m512i r##0 = zero, r##1 = zero, r##2 = zero, r##3 = zero, r##4 = zero, r##5 = zero, r##6 = zero, r##7 = zero;
  ROW(a) ROW(b) ROW(c)
#undef ROW
  for (int64_t j = 0; j < kp; j += 64) {
    const int64_t left = k - j;
    const __mmask64 codes = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    for (int r = 0; r < 3; r++) prefetch(w[r] + j, FEW_AHEAD);
    const __m512i va = _mm512_maskz_loadu_epi8(codes, w[0] + j), vb = _mm512_maskz_loadu_epi8(codes, w[1] + j),
                  vc = _mm512_maskz_loadu_epi8(codes, w[2] + j);
#define X(i)                                             \
  if constexpr (TB > i) {                                \
    const __m512i x = _mm512_loadu_si512(u + i * kp + j); \
    a##i = _mm512_dpbusd_epi32(a##i, x, va);             \
    b##i = _mm512_dpbusd_epi32(b##i, x, vb);             \
    c##i = _mm512_dpbusd_epi32(c##i, x, vc);             \
  }
    X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#undef X
  }
#define X(i)                                      \
  if constexpr (TB > i) {                         \
    sums[i] = _mm512_reduce_add_epi32(a##i);      \
    sums[8 + i] = _mm512_reduce_add_epi32(b##i);  \
    sums[16 + i] = _mm512_reduce_add_epi32(c##i); \
  }
  X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#undef X
}

// One row of X: one row of W at a time, 4 KiB ahead, as gemv_int8 streams (3 rows of W at once: 44 against
// 56 tok/s at pythia-1.4b's shape in the bench); two accumulators for the latency of vpdpbusd.
inline int32_t one_row(const uint8_t* u, const int8_t* w, int64_t k) {
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 128 <= k; j += 128) {
    prefetch(w + j, ROW_AHEAD);
    prefetch(w + j + 64, ROW_AHEAD);
    s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(u + j), _mm512_loadu_si512(w + j));
    s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(u + j + 64), _mm512_loadu_si512(w + j + 64));
  }
  for (; j < k; j += 64) {
    const int64_t left = k - j;
    const __mmask64 codes = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(u + j), _mm512_maskz_loadu_epi8(codes, w + j));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
}

using FewFn = void (*)(const uint8_t*, int64_t, const int8_t* const*, int64_t, int32_t*);
constexpr FewFn FEWS[9] = {nullptr, few<1>, few<2>, few<3>, few<4>, few<5>, few<6>, few<7>, few<8>};

}  // namespace

void gemm_int8a8(const float* x, int64_t m, const int8_t* q, const uint16_t* scale, const int32_t* wsum,
                 const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
  const int64_t kp = padded(k);
  uint8_t* u = work;
  float* xs = reinterpret_cast<float*>(work + m * kp);
  quantize_rows(x, m, k, u, xs);  // (ends in the omp for's barrier)
  const auto finish = [&](int64_t row, int64_t t0, int tb, const int32_t* sums) {  // sums[i]: x row t0 + i
    const float ws = bf16_to_float(scale[row]), b = bias_at(bias, bias_bf16, row);
    for (int i = 0; i < tb; i++) store(y, (t0 + i) * n + row, output(sums[i], wsum[row], xs[t0 + i], ws, b), out_bf16);
  };
  if (m == 1) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
      const int32_t sum = one_row(u, q + r * k, k);
      finish(r, 0, 1, &sum);
    }
    return;
  }
  if (m <= FEW) {  // 3 rows of W at a time against all of X, 8 rows of it at a time
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += 3) {
      const int8_t* w[3];
      for (int r = 0; r < 3; r++) w[r] = q + std::min(r0 + r, n - 1) * k;
      for (int64_t t0 = 0; t0 < m; t0 += 8) {
        const int tb = int(std::min<int64_t>(8, m - t0));
        int32_t sums[24];
        FEWS[tb](u + t0 * kp, kp, w, k, sums);
        for (int r = 0; r < 3 && r0 + r < n; r++) finish(r0 + r, t0, tb, sums + 8 * r);
      }
    }
    return;
  }
  const int64_t chunk = std::max<int64_t>(X_ROWS, CHUNK_BYTES / kp / X_ROWS * X_ROWS);
  for (int64_t c0 = 0; c0 < m; c0 += chunk) {
    const int64_t c1 = std::min(m, c0 + chunk);
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += W_ROWS) {
      const int8_t* w[W_ROWS];
      for (int r = 0; r < W_ROWS; r++) w[r] = q + std::min(r0 + r, n - 1) * k;  // past the last row: the last, discarded
      for (int64_t t0 = c0; t0 < c1; t0 += X_ROWS) {
        const int tb = int(std::min<int64_t>(X_ROWS, c1 - t0));
        int32_t sums[8 * X_ROWS];
        if (tb == 3)
          tile<3>(u + t0 * kp, kp, w, k, sums);
        else if (tb == 2)
          tile<2>(u + t0 * kp, kp, w, k, sums);
        else
          tile<1>(u + t0 * kp, kp, w, k, sums);
        for (int i = 0; i < tb; i++)
          for (int r = 0; r < W_ROWS && r0 + r < n; r++) finish(r0 + r, t0 + i, 1, sums + 8 * i + r);
      }
    }
  }
}

#endif

}  // namespace neolm

extern "C" {

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)
int64_t neolm_int8a8_work_bytes(int64_t m, int64_t k) { return neolm::int8a8_work_bytes(m, k); }

void neolm_gemm_int8a8(const float* x, int64_t m, const int8_t* q, const uint16_t* scale, const int32_t* wsum,
                       const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
#pragma omp parallel
  neolm::gemm_int8a8(x, m, q, scale, wsum, bias, bias_bf16, y, out_bf16, n, k, work);
}
#endif

}  // extern "C"
