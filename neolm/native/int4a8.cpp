// int4 weights against int8 activations (W4A8): Y (m, n) = X (m, k) @ W (n, k)^T + bias for any m, W's codes in
// int4.cpp's layout (the same copy the bf16 kernels read), X's rows quantized on the fly to int8 with a scale
// per row (s_x = max |x| / 127), as int8a8.cpp does for int8 codes and as llama.cpp's Q4_0 x Q8_0 does.
//
// Why: int4.cpp widens every code to bf16 and multiplies with vdpbf16ps (32 multiply-adds an instruction);
// a batch of 8 or a prompt is then bound by arithmetic (~365 G/s of ~575 on 2 Zen 5 cores: bench/PROFILE.md,
// session 8). Here the codes stay bytes: vpdpbusd multiplies 4 unsigned codes q in [0, 15] by 4 signed int8
// activations per 32-bit lane, 64 multiply-adds an instruction, exactly.
//
// Per group of G in-features, with w = (q - 8) s + z:
//   sum w x = s_x (s A + (z - 8 s) X),  A = sum q x_q (int32, exact),  X = sum x_q,
// z - 8 s = c + 128 s with int4.cpp's offsets c = z - 136 s (gemv.h's int4_scales). A group's A goes to fp32 at
// its end (2 FMAs per 16 out-features and row), the rows' sums X with their quantization.
//
// A chunk of int4.cpp's layout holds in 128-bit lane L, byte i, row 4 L + (i % 8) / 2 and in-features
// 8 j + 2 (i / 8) + i % 2 (low nibble) and + 4 (high nibble). One vpshufb per nibble half gathers each row's 4
// in-features 8 j .. 8 j + 3 (low) or 8 j + 4 .. 8 j + 7 (high) into its 32-bit lane (row 4 L + r in lane r of
// L), against 4 bytes of a row of X broadcast to every lane. A tile is up to 4 rows of X x one band (4 blocks,
// 64 out-features): 16 int32 accumulators, ~700 G multiply-adds/s on 2 Zen 5 cores at 8 and 512 rows (61% of
// vpdpbusd's peak: the nibbles' unpacking and the broadcasts share its ports; the shuffles cost ~5%). Tried
// and slower: 8 rows x one block a pass (16 broadcasts per 16 products: 450 G/s).

#include <algorithm>

#include "gemv.h"

namespace neolm {

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)

namespace {

constexpr int X_ROWS = 4;
constexpr int64_t AHEAD = 2048, SCALES_AHEAD = 2048;

// Rows [0, m) of x (fp32) to q = round(x / s) (int8, a8_row_bytes(k) a row), s, and X of every group of g
// (float, exact: |X| <= 127 g).
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t g, int8_t* q, float* s, float* xg) {
  const int64_t kp = a8_row_bytes(k), groups = k / g;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float* row = x + i * k;
    int8_t* out = q + i * kp;
    const float amax = abs_max(row, k);
    s[i] = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    for (int64_t j = 0; j < kp; j += 16) {
      const __mmask16 m16 = j < k ? first(k - j) : 0;
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m16, row + j), inv));  // nearest even
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(v));
    }
    for (int64_t t = 0; t < groups; t++) {
      int32_t sum = 0;
      for (int64_t j = t * g; j < (t + 1) * g; j++) sum += out[j];
      xg[i * groups + t] = float(sum);
    }
  }
}

// One group's sums: TB <= 4 rows of q (kp bytes apart, from the group's first in-feature) x the band's chunks
// from p (per_group of them, 256 bytes apart): sums[16 (4 i + z) + o] = A of X row i and out-feature 16 z + o.
// The sums are named variables (GCC 12 keeps arrays of them in memory); not inlined, so that the group's
// bookkeeping around it does not crowd them out of the registers (it did: half of them spilled).
template <int TB>
__attribute__((noinline)) void group_sums(const int8_t* q, int64_t kp, const uint8_t* p, int64_t per_group,
                                          int32_t* sums) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i gather = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
  const __m512i zero = _mm512_setzero_si512();
#define R(r) __m512i r##0 = zero, r##1 = zero, r##2 = zero, r##3 = zero;
  R(a) R(b) R(c) R(d)
#undef R
  for (int64_t j = 0; j < per_group; j++, p += 4 * 64) {
    __m512i lo4[X_ROWS], hi4[X_ROWS];  // the rows' in-features 8 j .. 8 j + 3 and 8 j + 4 .. 8 j + 7, broadcast
    for (int i = 0; i < TB; i++) {
      int32_t v[2];
      std::memcpy(v, q + i * kp + 8 * j, 8);
      lo4[i] = _mm512_set1_epi32(v[0]);
      hi4[i] = _mm512_set1_epi32(v[1]);
    }
#define ROW(r, acc)                                                                                         \
  if constexpr (TB > r) acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, lo4[r]), hi, hi4[r]);
#define BLOCK(z)                                                                                            \
  {                                                                                                         \
    prefetch(p + 64 * z, AHEAD);                                                                            \
    const __m512i bytes = _mm512_loadu_si512(p + 64 * z);                                                   \
    const __m512i lo = _mm512_shuffle_epi8(_mm512_and_si512(bytes, low), gather);                          \
    const __m512i hi = _mm512_shuffle_epi8(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), low), gather);    \
    ROW(0, a##z) ROW(1, b##z) ROW(2, c##z) ROW(3, d##z)                                                     \
  }
    BLOCK(0) BLOCK(1) BLOCK(2) BLOCK(3)
#undef BLOCK
#undef ROW
  }
#define R(r, i)                                                                                                \
  if constexpr (TB > i) {                                                                                      \
    _mm512_store_si512(sums + 64 * i, r##0);                                                                   \
    _mm512_store_si512(sums + 64 * i + 16, r##1);                                                              \
    _mm512_store_si512(sums + 64 * i + 32, r##2);                                                              \
    _mm512_store_si512(sums + 64 * i + 48, r##3);                                                              \
  }
  R(a, 0) R(b, 1) R(c, 2) R(d, 3)
#undef R
}

// TB <= 8 rows of q x band `band`: out[64 i + f] (fp32, X row i, feature f of the band) = the sum over groups of
// s A + (c + 128 s) X. Above 4 rows (a decode batch), each group's sums of rows 4.. are taken right after those of
// rows 0-3, while the group's codes are in L1: as two tiles of 4 rows, the second read the band's codes again
// from L2 with nothing coming from memory meanwhile (batch-8 decoding steps of gpt-neo-125M W4A8 ~1.06x faster
// this way). Prompts take tiles of 4 rows (in tiles of 8 they ran at 0.85x: bench/PROFILE.md, session 15).
template <int TB>
void tile(const int8_t* q, int64_t kp, const float* xg, const uint8_t* w, const uint16_t* sz, int64_t band, int64_t k,
          int64_t g, float* out) {
  const int64_t groups = k / g, per_group = g / 8;
  const __m512 k128 = _mm512_set1_ps(128.0f);
  for (int i = 0; i < TB * 64; i += 16) _mm512_store_ps(out + i, _mm512_setzero_ps());
  for (int64_t t = 0; t < groups; t++) {
    for (int64_t line = 0; line < 2 * SZ_ZEROS; line += 32)  // the band's 64 scales of group t, and zeros: 4 lines
      prefetch(sz + sz_at(band * INT4_BAND, t, groups) + line, SCALES_AHEAD);
    alignas(64) int32_t sums[TB * 64];
    const uint8_t* chunks = w + chunk_at(band * INT4_BAND, t * per_group, k);
    group_sums<std::min(TB, X_ROWS)>(q + t * g, kp, chunks, per_group, sums);
    if constexpr (TB > X_ROWS)
      group_sums<TB - X_ROWS>(q + X_ROWS * kp + t * g, kp, chunks, per_group, sums + X_ROWS * 64);
    for (int z = 0; z < 4; z++) {
      __m512 sv, cv;
      int4_scales(sz, band * INT4_BAND + z, t, groups, sv, cv);
      cv = _mm512_fmadd_ps(k128, sv, cv);
      for (int i = 0; i < TB; i++) {
        float* o = out + 64 * i + 16 * z;
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + 64 * i + 16 * z)), sv, _mm512_load_ps(o));
        _mm512_store_ps(o, _mm512_fmadd_ps(cv, _mm512_set1_ps(xg[i * groups + t]), v));
      }
    }
  }
}

using TileFn = void (*)(const int8_t*, int64_t, const float*, const uint8_t*, const uint16_t*, int64_t, int64_t, int64_t,
                        float*);
constexpr int BATCH_ROWS = 2 * X_ROWS;  // at most this many rows: one tile
constexpr TileFn TILES[BATCH_ROWS + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                          tile<5>, tile<6>, tile<7>, tile<8>};

}  // namespace

void gemm_int4a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* sz, const void* bias, int bias_bf16,
                 void* y, int out_bf16, int64_t n, int64_t k, int64_t g, uint8_t* work) {
  const int64_t kp = a8_row_bytes(k), groups = k / g, bands = (n + 64 - 1) / 64;
  int8_t* q = reinterpret_cast<int8_t*>(work);
  float* xs = reinterpret_cast<float*>(work + m * kp);
  float* xg = xs + m;
  quantize_rows(x, m, k, g, q, xs, xg);  // (ends in the omp for's barrier)
#pragma omp for schedule(static)
  for (int64_t band = 0; band < bands; band++) {
    const int64_t f0 = band * 64;
    const int64_t rows = m <= BATCH_ROWS ? m : X_ROWS;  // rows a tile
    for (int64_t t0 = 0; t0 < m; t0 += rows) {
      const int tb = int(std::min(rows, m - t0));
      alignas(64) float out[BATCH_ROWS * 64];
      TILES[tb](q + t0 * kp, kp, xg + t0 * groups, w, sz, band, k, g, out);
      for (int i = 0; i < tb; i++) {
        const __m512 sx = _mm512_set1_ps(xs[t0 + i]);
        for (int64_t f = f0; f < std::min(n, f0 + 64); f += 16) {
          const __mmask16 lanes = first(n - f);
          const __m512 b = bias ? load(bias, bias_bf16, f, lanes) : _mm512_setzero_ps();
          put(y, out_bf16, (t0 + i) * n + f, _mm512_fmadd_ps(_mm512_load_ps(out + i * 64 + (f - f0)), sx, b), lanes);
        }
      }
    }
  }
}

#endif

}  // namespace neolm

extern "C" {

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)
void neolm_gemm_int4a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* sz, const void* bias, int bias_bf16,
                       void* y, int out_bf16, int64_t n, int64_t k, int64_t g, uint8_t* work) {
#pragma omp parallel
  neolm::gemm_int4a8(x, m, w, sz, bias, bias_bf16, y, out_bf16, n, k, g, work);
}
#endif

}  // extern "C"
