// Shared by gemv.cpp (one-row matmuls), gemm.cpp (few-row matmuls), int4.cpp (int4 matmuls), decode.cpp (a
// whole decode step) and attention.cpp:
// AVX-512 helpers and the matmul bodies. A body splits its rows over the threads of the enclosing OpenMP
// parallel region with an orphaned `omp for` (ending in a barrier); called outside any region, one thread
// does all rows.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NEOLM_AVX512 1
#endif

namespace neolm {

// Software prefetch, `ahead` bytes past p in a row's stream. One row: 512 bytes by default (some one-row
// kernels stream farther ahead, as measured fastest: fp32 and int8 4 KiB, int4 1 KiB); without it, the kernels
// that compute more per byte (int8, int4) stream from memory at half the speed they reach from cache. Few rows
// (gemm.cpp): 32 KiB, several rows of W ahead. There each byte of W meets m rows of x, so a loop iteration
// takes m times longer and a prefetch 512 bytes ahead still misses when the load comes: the core then
// computes and waits for memory in turn (8 rows cost the one-row time *plus* their arithmetic). 32 KiB ahead,
// pythia-1.4b's blocks at 8 rows took 11-18% less time (int8, int4, fp32, bf16; bench/PROFILE.md), one
// row is slower that far ahead.
constexpr int64_t AHEAD_ONE_ROW = 512, AHEAD_FEW_ROWS = 32768;
inline void prefetch(const void* p, int64_t ahead = AHEAD_ONE_ROW) {
  _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0);
}
// The distance for a kernel's call with `rows` rows of x: AHEAD_FEW_ROWS for several, else the kernel's own one-row
// distance (one_row: AHEAD_ONE_ROW, or farther where a kernel measured that faster).
inline int64_t prefetch_ahead(int64_t rows, int64_t one_row = AHEAD_ONE_ROW) {
  return rows > 1 ? AHEAD_FEW_ROWS : one_row;
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void store(void* y, int64_t i, float v, int out_bf16) {
  if (out_bf16)
    static_cast<uint16_t*>(y)[i] = float_to_bf16(v);
  else
    static_cast<float*>(y)[i] = v;
}

inline float bias_at(const void* bias, int bias_bf16, int64_t i) {
  if (!bias) return 0.0f;
  return bias_bf16 ? bf16_to_float(static_cast<const uint16_t*>(bias)[i]) : static_cast<const float*>(bias)[i];
}

// The int8-activation kernels (int8a8.cpp, int4a8.cpp): bytes of a row of X quantized (k codes, 64-byte
// padded), and of their work memory for m rows: the rows quantized, their scales, and their sums (one a row
// in int8a8.cpp, one a group of at least 8 in-features in int4a8.cpp).
inline int64_t a8_row_bytes(int64_t k) { return (k + 63) & ~int64_t(63); }
inline int64_t a8_work_bytes(int64_t m, int64_t k) { return m * a8_row_bytes(k) + m * (2 + k / 8) * int64_t(4); }

// int4h.cpp's work memory for m rows of x against groups of g in-features: the rows scaled and rounded to fp16
// (h_row_halves(k) numbers a row), their sums over each block of h_block(g) in-features, and their scales.
inline int64_t h_row_halves(int64_t k) { return (k + 31) & ~int64_t(31); }  // a row of x' (fp16), 64-byte multiple
inline int64_t h_block(int64_t g) { return g < 64 ? g : 64; }
inline int64_t h_work_bytes(int64_t m, int64_t k, int64_t g) { return m * h_row_halves(k) * 2 + m * (k / h_block(g) + 1) * 4; }
// int8a8.cpp's 16-bit form quantizes each row of X into two rows of bytes: a8_work_bytes(2 m, k) holds them.
inline int64_t a16_work_bytes(int64_t m, int64_t k) { return a8_work_bytes(2 * m, k); }
// What any of them needs (int4h.cpp's groups are at least 32 in-features): decode.cpp's scratch.
inline int64_t work_bytes(int64_t m, int64_t k) {
  const int64_t a = a16_work_bytes(m, k), h = h_work_bytes(m, k, 32);
  return a > h ? a : h;
}

// int4.cpp's layout (described there), shared by int4a8.cpp: where block b's chunk j starts (bytes from the
// codes), and where its 16 scales of group t start in the bf16 table sz (numbers from sz; its 16 zeros follow
// SZ_ZEROS numbers later).
constexpr int64_t INT4_ROWS = 16, INT4_BAND = 4;  // neolm/native/__init__.py INT4_ROWS, INT4_BAND
constexpr int64_t SZ_ZEROS = INT4_BAND * INT4_ROWS;
inline int64_t chunk_at(int64_t b, int64_t j, int64_t k) {
  return ((b / INT4_BAND * (k / 8) + j) * INT4_BAND + b % INT4_BAND) * 64;
}
inline int64_t sz_at(int64_t b, int64_t t, int64_t groups) {
  return (b / INT4_BAND * groups + t) * 2 * SZ_ZEROS + b % INT4_BAND * INT4_ROWS;
}

#ifdef NEOLM_AVX512
inline __m256i to_bf16(__m512 v) {  // 16 floats to bf16, round to nearest even, NaN kept (as float_to_bf16)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 widen(__m256i h) {  // 16 bf16 numbers to fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// int4.cpp's scales s and offsets c = z - 136 s of block b's 16 rows in group t, from the bf16 table sz: s exact,
// c rounded once (136 s is exact in fp32: s has 8 significant bits).
inline void int4_scales(const uint16_t* sz, int64_t b, int64_t t, int64_t groups, __m512& s, __m512& c) {
  const uint16_t* at = sz + sz_at(b, t, groups);
  s = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
  const __m512 z = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + SZ_ZEROS)));
  c = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), s, z);
}

// Elementwise helpers of decode.cpp, attention.cpp and int4.cpp: `bf16` says whether p holds bf16 or fp32
// values.
inline __mmask16 first(int64_t count) { return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u); }

inline __m512 load(const void* p, int bf16, int64_t i, __mmask16 m = 0xffff) {
  if (bf16) {
    return widen(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
}

inline void put(void* p, int bf16, int64_t i, __m512 v, __mmask16 m = 0xffff) {
  if (bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, to_bf16(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
}

inline float abs_max(const float* x, int64_t k) {  // max |x_j| over k numbers
  __m512 top = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(k - j), x + j)));
  return _mm512_reduce_max_ps(top);
}

// A kernel's tile of NB rows of X as a type, and tile(Rows<nb>{}) for a tile of nb = min(count, MAX) rows
// (MAX 4 or 8; count >= 1): each kernel instantiated for 1 .. MAX rows.
template <int NB>
using Rows = std::integral_constant<int, NB>;
template <int MAX, class Tile>
void with_rows(int64_t count, const Tile& tile) {
  static_assert(MAX == 4 || MAX == 8, "tiles of 4 or 8 rows");
  constexpr int a = MAX == 8 ? 5 : 4, b = MAX == 8 ? 6 : 4, c = MAX == 8 ? 7 : 4;  // (unreachable with MAX 4)
  switch (count < MAX ? count : MAX) {
    case 1: tile(Rows<1>{}); break;
    case 2: tile(Rows<2>{}); break;
    case 3: tile(Rows<3>{}); break;
    case 4: tile(Rows<4>{}); break;
    case 5: tile(Rows<a>{}); break;
    case 6: tile(Rows<b>{}); break;
    case 7: tile(Rows<c>{}); break;
    default: tile(Rows<MAX>{}); break;
  }
}

inline __m512 exp16(__m512 x) {  // e^x, Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2 / 2
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// y (n) = W (n, k) @ x (k) + bias, formats as described in gemv.cpp (f32, bf16 and int8 defined in gemm.cpp,
// int4 in int4.cpp: their few-row kernels with one row, but int8's, which is a kernel of its own).
void gemv_f32(const float* x, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
              int64_t k);
#ifdef __AVX512BF16__
void gemv_int8(const uint16_t* x, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k);
void gemv_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
               int64_t n, int64_t k);
void gemv_int4(const uint16_t* x, const uint8_t* q, const uint16_t* sz, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k, int64_t g);
#endif

// Y (m, n) = X (m, k) @ W (n, k)^T + bias for a few rows of X (gemm.cpp; int4: int4.cpp), same formats.
void gemm_f32(const float* x, int64_t m, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16,
              int64_t n, int64_t k);
#ifdef __AVX512BF16__
void gemm_int8(const uint16_t* x, int64_t m, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16,
               void* y, int out_bf16, int64_t n, int64_t k);
void gemm_bf16(const uint16_t* x, int64_t m, const uint16_t* w, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k);
void gemm_int4(const uint16_t* x, int64_t m, const uint8_t* q, const uint16_t* sz, const void* bias, int bias_bf16,
               void* y, int out_bf16, int64_t n, int64_t k, int64_t g);
#endif
// int8 codes in int8f.cpp's panels, scale bf16 (n,), x fp32, fp32 FMAs (no bf16 instructions); any m.
void gemm_int8f(const float* x, int64_t m, const int8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                void* y, int out_bf16, int64_t n, int64_t k);
#if defined(__AVX512FP16__) && defined(__AVX512VBMI__)
// int4 codes with their scales and zeros in int4h.cpp's panels, x fp32 rounded to fp16 after a power-of-two
// scaling, fp16 FMAs; any m; `work`: h_work_bytes(m, k, g).
void gemm_int4h(const float* x, int64_t m, const uint8_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
                int64_t n, int64_t k, int64_t g, uint8_t* work);
#endif
#ifdef __AVX512VNNI__
// int8 codes (int8a8.cpp's layout) against rows of X quantized to int8 on the fly; `work`: a8_work_bytes(m, k).
void gemm_int8a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                 void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work);
// The same codes against rows of X quantized to 16 bits on the fly (int8a8.cpp); `work`: a16_work_bytes(m, k).
void gemm_int8a16(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                  void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work);
// int4 codes (int4.cpp's layout) against rows of X quantized to int8 on the fly (int4a8.cpp); `work` as above.
void gemm_int4a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* sz, const void* bias, int bias_bf16,
                 void* y, int out_bf16, int64_t n, int64_t k, int64_t g, uint8_t* work);
#endif
#endif

}  // namespace neolm
