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
#include <vector>

#include "gemv.h"

namespace neolm {

#ifdef NEOLM_AVX512

namespace {

// For every R rows of W (split over threads) and every TILE (4 or 8) rows of X: tile(r0, t0, Rows<nb>{}).
// R x TILE accumulators: R and TILE per kernel, as measured fastest on an AVX-512 EPYC (bench/PROFILE.md).
template <int R, int TILE, class Tile>
void for_tiles(int64_t m, int64_t n, const Tile& tile) {
#pragma omp for schedule(static)
  for (int64_t r0 = 0; r0 < n; r0 += R)
    for (int64_t t0 = 0; t0 < m; t0 += TILE) with_rows<TILE>(m - t0, [&](auto rows) { tile(r0, t0, rows); });
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
  static constexpr int64_t ONE_ROW_AHEAD = 4096;  // (one row of x: see gemv_f32)
};

// y (m, n) = x (m, k) @ W^T * scale(row) + bias for a dense format: R rows of W against TILE rows of x.
template <int R, int TILE, class Format, class Scale>
void gemm_dense(const typename Format::X* x, int64_t m, const typename Format::W* w, const void* bias, int bias_bf16,
                void* y, int out_bf16, int64_t n, int64_t k, const Scale& scale) {
  using Mask = typename Format::Mask;
  const int64_t kv = k & ~int64_t(Format::STEP - 1);
  const Mask tail = static_cast<Mask>((uint64_t(1) << (k - kv)) - 1u);
  const int64_t ahead = prefetch_ahead(m, Format::ONE_ROW_AHEAD);
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
  static constexpr int64_t ONE_ROW_AHEAD = AHEAD_ONE_ROW;
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
  static constexpr int64_t ONE_ROW_AHEAD = AHEAD_ONE_ROW;
};
#endif

}  // namespace

// R x TILE per format, as measured fastest (bench/PROFILE.md): f32 4 x 4, bf16 3 x 8, int8 3 x 8.
// One row (gemv_f32, gemv_bf16): one row of W at a time (R = 1), its stream prefetched Format::ONE_ROW_AHEAD
// bytes ahead (f32 4 KiB, bf16 512 bytes). On a Zen 4 EPYC (session 41, bench/PROFILE.md) that streamed a
// pythia-160m-shaped model's weights at 27.6-31.9 GB/s in fp32 and 24.6-27.5 in bf16, against 25.8-26.7 and
// 20.9-21.0 for 4 rows at a time 512 bytes ahead (as int8's one-row kernel below found in session 9); at
// pythia-1.4b's shapes 2-4% faster. Each output is one accumulator's sum over the in-features in order,
// whatever R and TILE: a row alone gets the numbers it gets in a batch (int8: one row has a kernel of its own,
// below).
void gemv_f32(const float* x, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
              int64_t k) {
  gemm_dense<1, 4, F32>(x, 1, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

void gemm_f32(const float* x, int64_t m, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
              int64_t k) {
  gemm_dense<4, 4, F32>(x, m, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

#ifdef __AVX512BF16__

void gemv_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
               int64_t n, int64_t k) {
  gemm_dense<1, 4, Bf16>(x, 1, w, bias, bias_bf16, y, out_bf16, n, k, one);
}

void gemm_int8(const uint16_t* x, int64_t m, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16,
               void* y, int out_bf16, int64_t n, int64_t k) {
  const auto row_scale = [scale](int64_t row) { return bf16_to_float(scale[row]); };
  gemm_dense<3, 8, Int8>(x, m, q, bias, bias_bf16, y, out_bf16, n, k, row_scale);
}

// One row of x against int8 codes, without converting the codes: each code c (sign bit s, low seven bits v,
// c = v - 128 s) becomes two bf16 numbers of a fixed exponent by bit operations alone, A = 128 + v (0x4300 | v)
// and T = 64 - 128 s (0x4280 with the sign bit s: +-64). A + T = 192 + c, so
//   sum c x = sum (A + T) x - 192 sum x,
// two vdpbf16ps per 32 codes where the exact conversion (Int8::convert: sign extension, int -> float -> bf16)
// costs one vdpbf16ps and seven instructions, most of them on the shuffle ports. 64 codes are 32 words (code
// 2i in the low byte of word i, 2i + 1 in the high one): the words give A of the even codes and T of the odd
// ones, the words with their bytes swapped T of the even codes and A of the odd ones; x is paired to match
// (dword lane t: in-features 4t and 4t + 2 for the even codes, 4t + 1 and 4t + 3 for the odd ones). From
// cache: 56 -> 140 G codes/s on 2 cores of an AVX-512 EPYC. One row of W at a time, prefetched 4 KiB ahead,
// streams the codes at fp32's speed from memory (~80 against 48 GB/s for 4 rows at a time 512 bytes ahead:
// bench/PROFILE.md, session 9). The sums round differently from gemm_int8's (exact conversion) by a few fp32
// ulps, so one row alone and the same row in a batch can differ there.
namespace {
constexpr int64_t INT8_ROW_AHEAD = 4096;

inline __m512i swap_bytes(__m512i w) {
#ifdef __AVX512VBMI2__
  return _mm512_shldi_epi16(w, w, 8);
#else
  return _mm512_or_si512(_mm512_slli_epi16(w, 8), _mm512_srli_epi16(w, 8));
#endif
}

inline __m512bh with_exponent(__m512i w, int16_t bits, int16_t number) {  // (w & bits) | number, per word
  return (__m512bh)_mm512_ternarylogic_epi32(w, _mm512_set1_epi16(bits), _mm512_set1_epi16(number), 0xEA);
}

float sum_x(const uint16_t* x, int64_t k) {  // sum of the bf16 numbers x in fp32, in the same order on every thread
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) acc = _mm512_add_ps(acc, load(x, 1, i, first(k - i)));
  return _mm512_reduce_add_ps(acc);
}
}  // namespace

void gemv_int8(const uint16_t* x, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k) {
  // x paired for the codes once per call, on each thread (no barrier): per 64 in-features, 32 numbers for the
  // even codes and 32 for the odd ones, zeros past k (their codes are read as zeros too). Pairing x in
  // registers for every row instead cost 7% of the speed from memory.
  const int64_t kp = (k + 63) & ~int64_t(63);
  thread_local std::vector<uint16_t> paired;
  if (int64_t(paired.size()) < kp) paired.resize(kp);
  alignas(64) uint16_t index[32];
  for (int i = 0; i < 32; i++) index[i] = uint16_t(2 * i);
  const __m512i even = _mm512_load_si512(index), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  for (int64_t j = 0; j < kp; j += 64) {
    const int64_t left = k - j;
    const __mmask32 lo_mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    const __mmask32 hi_mask = left >= 64 ? ~__mmask32(0) : left <= 32 ? 0 : (__mmask32(1) << (left - 32)) - 1;
    const __m512i lo = _mm512_maskz_loadu_epi16(lo_mask, x + j), hi = _mm512_maskz_loadu_epi16(hi_mask, x + j + 32);
    _mm512_storeu_si512(paired.data() + j, _mm512_permutex2var_epi16(lo, even, hi));
    _mm512_storeu_si512(paired.data() + j + 32, _mm512_permutex2var_epi16(lo, odd, hi));
  }
  const uint16_t* xp = paired.data();
  const float xsum = sum_x(x, k);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < n; r++) {
    const int8_t* row = q + r * k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < kp; j += 64) {
      const int64_t left = k - j;
      const __mmask64 codes = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      const __m512bh xe = (__m512bh)_mm512_loadu_si512(xp + j), xo = (__m512bh)_mm512_loadu_si512(xp + j + 32);
      prefetch(row + j, INT8_ROW_AHEAD);
      const __m512i w = _mm512_maskz_loadu_epi8(codes, row + j), swapped = swap_bytes(w);
      acc[0] = _mm512_dpbf16_ps(acc[0], with_exponent(w, 0x007F, 0x4300), xe);                 // A, even codes
      acc[1] = _mm512_dpbf16_ps(acc[1], with_exponent(swapped, 0x007F, 0x4300), xo);           // A, odd codes
      acc[2] = _mm512_dpbf16_ps(acc[2], with_exponent(swapped, int16_t(0x8000), 0x4280), xe);  // T, even codes
      acc[3] = _mm512_dpbf16_ps(acc[3], with_exponent(w, int16_t(0x8000), 0x4280), xo);        // T, odd codes
    }
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    store(y, r, (sum - 192.0f * xsum) * bf16_to_float(scale[r]) + bias_at(bias, bias_bf16, r), out_bf16);
  }
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
