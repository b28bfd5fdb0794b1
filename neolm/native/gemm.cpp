// Few-row matmuls for batched decoding: Y (m, n) = X (m, k) @ W (n, k)^T [+ bias], m a handful of rows (one
// per sequence of a batch), in the weight formats of gemv.cpp.
//
// A decode step of a batch is still a pass over every weight; what changes from one row is the arithmetic:
// m multiply-adds per weight instead of one. Calling the one-row kernel m times would stream the weights m
// times. Here each thread takes R rows of W at a time and runs them against up to TILE rows of X held in
// registers (R x TILE accumulators): every weight is loaded (and, for int8/int4, converted) once per TILE
// rows of X. Past TILE rows, the next tile of X meets the same R rows of W again, by then in cache.
// The weight formats are gemv.cpp's (int4: int4.cpp, which has its own); as there, the bodies split the
// rows of W over the threads of the enclosing parallel region (orphaned `omp for`) and the exported
// neolm_gemm_* open a region around them. X and Y are row-major and contiguous.

#include <algorithm>
#include <type_traits>

#include "gemv.h"

namespace neolm {

#ifdef NEOLM_AVX512

namespace {

template <int NB>
using Rows = std::integral_constant<int, NB>;

// For every R rows of W (split over threads) and every TILE (4 or 8) rows of X: tile(r0, t0, Rows<nb>{}).
// R x TILE accumulators: R and TILE per kernel, as measured fastest on an AVX-512 EPYC (bench/PROFILE.md).
template <int R, int TILE, class Tile>
void for_tiles(int64_t m, int64_t n, const Tile& tile) {
  static_assert(TILE == 4 || TILE == 8, "tiles of 4 or 8 rows");
#pragma omp for schedule(static)
  for (int64_t r0 = 0; r0 < n; r0 += R)
    for (int64_t t0 = 0; t0 < m; t0 += TILE) {
      switch (std::min<int64_t>(TILE, m - t0)) {
        case 1: tile(r0, t0, Rows<1>{}); break;
        case 2: tile(r0, t0, Rows<2>{}); break;
        case 3: tile(r0, t0, Rows<3>{}); break;
        case 4: tile(r0, t0, Rows<4>{}); break;
        case 5: tile(r0, t0, Rows<TILE == 8 ? 5 : 4>{}); break;  // (unreachable for TILE 4)
        case 6: tile(r0, t0, Rows<TILE == 8 ? 6 : 4>{}); break;
        case 7: tile(r0, t0, Rows<TILE == 8 ? 7 : 4>{}); break;
        default: tile(r0, t0, Rows<TILE>{}); break;
      }
    }
}

// Y[t0 + b, r0 + r] = sum(acc[r][b]) * scale(r) + extra(r, b) + bias, for the rows of W that exist.
template <int R, int NB, class Scale, class Extra>
inline void finish(__m512 (&acc)[R][NB], int64_t r0, int64_t t0, int64_t n, const void* bias, int bias_bf16, void* y,
                   int out_bf16, const Scale& scale, const Extra& extra) {
  for (int r = 0; r < R && r0 + r < n; r++)
    for (int b = 0; b < NB; b++) {
      const float v = _mm512_reduce_add_ps(acc[r][b]) * scale(r0 + r) + extra(r0 + r, b);
      store(y, (t0 + b) * n + r0 + r, v + bias_at(bias, bias_bf16, r0 + r), out_bf16);
    }
}

inline float one(int64_t) { return 1.0f; }
inline float none(int64_t, int) { return 0.0f; }

template <int R, int NB>
inline void zero(__m512 (&acc)[R][NB]) {
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
}

// The dense formats, as policies of one kernel: STEP in-features per vector, how a vector of weights is
// loaded (and converted) and multiplied into an accumulator, and how often a row's stream is prefetched.
struct F32 {  // fp32 weights and x, FMA
  using W = float;
  using X = float;
  using Mask = __mmask16;
  static constexpr int STEP = 16;
  static __m512 weights(const W* p) { return _mm512_loadu_ps(p); }
  static __m512 weights(const W* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 input(const X* p) { return _mm512_loadu_ps(p); }
  static __m512 input(const X* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 madd(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
  static bool prefetch_at(int64_t) { return true; }
};

// y (m, n) = x (m, k) @ W^T * scale(row) + bias for a dense format: R rows of W against TILE rows of x.
template <int R, int TILE, class Format, class Scale>
void gemm_dense(const typename Format::X* x, int64_t m, const typename Format::W* w, const void* bias, int bias_bf16,
                void* y, int out_bf16, int64_t n, int64_t k, const Scale& scale) {
  using Mask = typename Format::Mask;
  const int64_t kv = k & ~int64_t(Format::STEP - 1);
  const Mask tail = static_cast<Mask>((uint64_t(1) << (k - kv)) - 1u);
  const int64_t ahead = prefetch_ahead(m);
  for_tiles<R, TILE>(m, n, [&](int64_t r0, int64_t t0, auto rows) {
    constexpr int NB = decltype(rows)::value;
    const typename Format::W* wr[R];
    for (int r = 0; r < R; r++) wr[r] = w + (r0 + r < n ? r0 + r : r0) * k;  // past the last row: row r0 again, discarded
    const typename Format::X* xt = x + t0 * k;
    __m512 acc[R][NB];
    zero(acc);
    for (int64_t j = 0; j < kv; j += Format::STEP) {
      decltype(Format::weights(w)) wv[R];
      for (int r = 0; r < R; r++) {
        if (Format::prefetch_at(j)) prefetch(wr[r] + j, ahead);
        wv[r] = Format::weights(wr[r] + j);
      }
      for (int b = 0; b < NB; b++) {
        const auto xv = Format::input(xt + b * k + j);
        for (int r = 0; r < R; r++) acc[r][b] = Format::madd(acc[r][b], wv[r], xv);
      }
    }
    if (tail)
      for (int b = 0; b < NB; b++) {
        const auto xv = Format::input(xt + b * k + kv, tail);
        for (int r = 0; r < R; r++) acc[r][b] = Format::madd(acc[r][b], Format::weights(wr[r] + kv, tail), xv);
      }
    finish(acc, r0, t0, n, bias, bias_bf16, y, out_bf16, scale, none);
  });
}

#ifdef __AVX512BF16__
struct Bf16 {  // bf16 weights and x, vdpbf16ps (pairs, fp32 accumulation)
  using W = uint16_t;
  using X = uint16_t;
  using Mask = __mmask32;
  static constexpr int STEP = 32;
  static __m512bh weights(const W* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh weights(const W* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512bh input(const X* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh input(const X* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 madd(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
  static bool prefetch_at(int64_t) { return true; }
};

struct Int8 {  // int8 codes converted to bf16 (exact: 8 significant bits), bf16 x, vdpbf16ps; row scale at the end
  using W = int8_t;
  using X = uint16_t;
  using Mask = __mmask32;
  static constexpr int STEP = 32;
  static __m512bh convert(__m256i b) {  // 32 codes -> 32 bf16 numbers, in order
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
  }
  static __m512bh weights(const W* p) { return convert(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512bh weights(const W* p, Mask m) { return convert(_mm256_maskz_loadu_epi8(m, p)); }
  static __m512bh input(const X* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh input(const X* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 madd(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
  static bool prefetch_at(int64_t j) { return (j & 63) == 0; }  // once per 64-byte line
};
#endif

}  // namespace

// R x TILE per format, as measured fastest (bench/PROFILE.md): f32 4 x 4, bf16 3 x 8, int8 3 x 8;
// one row (gemv_*): 4 x 4. Each output is one accumulator's sum over the in-features in order, whatever R and
// TILE: a row alone gets the numbers it gets in a batch.
void gemv_f32(const float* x, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
              int64_t k) {
  gemm_dense<4, 4, F32>(x, 1, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

void gemm_f32(const float* x, int64_t m, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
              int64_t k) {
  gemm_dense<4, 4, F32>(x, m, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

#ifdef __AVX512BF16__

void gemv_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
               int64_t n, int64_t k) {
  gemm_dense<4, 4, Bf16>(x, 1, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

void gemm_int8(const uint16_t* x, int64_t m, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16,
               void* y, int out_bf16, int64_t n, int64_t k) {
  const auto row_scale = [scale](int64_t row) { return bf16_to_float(scale[row]); };
  gemm_dense<3, 8, Int8>(x, m, q, bias, bias_bf16, y, out_bf16, n, k, row_scale);
}

void gemv_int8(const uint16_t* x, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k) {
  const auto row_scale = [scale](int64_t row) { return bf16_to_float(scale[row]); };
  gemm_dense<4, 4, Int8>(x, 1, q, bias, bias_bf16, y, out_bf16, n, k, row_scale);
}

// count int8 codes to bf16 numbers (exact), for many-row products that multiply them with oneDNN's bf16 GEMM.
void int8_to_bf16(const int8_t* q, uint16_t* out, int64_t count) {
  const int64_t chunks = count / 32;
#pragma omp for schedule(static)
  for (int64_t c = 0; c < chunks; c++) _mm512_storeu_si512(out + 32 * c, (__m512i)Int8::weights(q + 32 * c));
#pragma omp single
  for (int64_t i = 32 * chunks; i < count; i++) out[i] = float_to_bf16(static_cast<float>(q[i]));
}

void gemm_bf16(const uint16_t* x, int64_t m, const uint16_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
               int64_t n, int64_t k) {
  gemm_dense<3, 8, Bf16>(x, m, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

#endif  // __AVX512BF16__
#endif  // NEOLM_AVX512

}  // namespace neolm

extern "C" {

#ifdef NEOLM_AVX512
void neolm_gemm_f32(const float* x, int64_t m, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16,
                    int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemm_f32(x, m, w, bias, bias_bf16, y, out_bf16, n, k);
}

#ifdef __AVX512BF16__
void neolm_int8_to_bf16(const int8_t* q, uint16_t* out, int64_t count) {
#pragma omp parallel
  neolm::int8_to_bf16(q, out, count);
}

void neolm_gemm_int8(const uint16_t* x, int64_t m, const int8_t* q, const uint16_t* scale, const void* bias,
                     int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemm_int8(x, m, q, scale, bias, bias_bf16, y, out_bf16, n, k);
}

void neolm_gemm_bf16(const uint16_t* x, int64_t m, const uint16_t* w, const void* bias, int bias_bf16, void* y,
                     int out_bf16, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemm_bf16(x, m, w, bias, bias_bf16, y, out_bf16, n, k);
}

#endif  // __AVX512BF16__
#endif  // NEOLM_AVX512

}  // extern "C"
