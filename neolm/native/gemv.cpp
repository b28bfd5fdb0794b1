// One-row matmuls (GEMV) for CPU decoding: y (N) = W (N, K) @ x (K) [+ bias], AVX-512.
//
// Built by neolm/native/__init__.py with the machine's C++ compiler (-O3 -march=native -fopenmp) on first
// use and called through ctypes. OpenMP here is the runtime torch already loaded (same soname), so these
// loops share torch's thread pool. Each thread takes a contiguous range of rows, ROWS rows at a time,
// sharing every load of x among them; the weights stream once from memory. The bodies (namespace neolm,
// declared in gemv.h) split rows with an orphaned `omp for`, so that decode.cpp runs them inside its own
// parallel region; the exported neolm_gemv_* open a region around them.
//
// Kernels, by weight format (x, y and bias pointers are contiguous; `out_bf16` selects bf16 or fp32 y):
//   f32   W fp32,                x fp32, fp32 FMA.
//   bf16  W bf16,                x bf16, vdpbf16ps (bf16 pairs, fp32 accumulation).
//   int8  W int8 (N, K), scale bf16 (N,): y = scale * (W @ x); x bf16, the codes converted to bf16 (exact)
//         and vdpbf16ps.
//   The bodies of these three are gemm.cpp's few-row kernels with one row (R x TILE = 4 x 4): as fast at one
//   row as bodies of their own, and a row gets the same numbers alone or in a batch.
//   int4  codes q in [0, 15], w = (q - 8) * s + z per group of G in-features (G a multiple of 64, K of
//         128), laid out by pack_int4_gemv (below). x bf16. The 16-bit word 0x43 << 8 | q is the bf16
//         number 128 + q exactly, so vdpbf16ps gives A = sum (128 + q) x per 64 in-features; then
//         sum w x = s A + (z - 136 s) X with X = sum x over the group (c = z - 136 s, computed at packing).
// neolm_features() says which kernels this build has (bit 0 f32, 1 bf16, 2 int8, 3 int4): none without
// AVX-512 (the Python side then keeps torch's kernels).

#include <vector>

#include "gemv.h"


namespace neolm {

#ifdef NEOLM_AVX512

#ifdef __AVX512BF16__

// int4, from the layout of pack_int4_gemv: rows in blocks of 4 (zero rows pad the last),
// each block one contiguous stream of 4 x 64 bytes per 128 in-features (short per-row streams read from
// memory far below bandwidth). Within a row's 64 bytes, byte p = 16 L + i holds in-feature
// f = 8 L + i (i < 8) or 32 + 8 L + i - 8 (i >= 8) in its low nibble and f + 64 in its high nibble, so that
// interleaving the nibbles with 0x43 bytes (unpacklo/hi) yields the bf16 numbers 128 + q of in-features
// 0-31, 32-63, 64-95, 96-127 in order. s, c: (N padded to 4, K/G).
void gemv_int4(const uint16_t* x, const uint8_t* q, const float* s, const float* c, const void* bias,
                     int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, int64_t g) {
  const int64_t groups = k / g, blocks = k / 128;
  std::vector<float> xsum(groups);
  for (int64_t t = 0; t < groups; t++) {
    float sum = 0.0f;
    for (int64_t j = t * g; j < (t + 1) * g; j++) sum += bf16_to_float(x[j]);
    xsum[t] = sum;
  }
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i magic = _mm512_set1_epi8(0x43);
#pragma omp for schedule(static)
  for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
    const uint8_t* qb = q + r0 * (k / 2);  // this block of rows: blocks x ROWS x 64 bytes
    __m512 total[ROWS];
    for (int i = 0; i < ROWS; i++) total[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
      const uint16_t* xb = x + 128 * b;
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb), x1 = (__m512bh)_mm512_loadu_si512(xb + 32);
      const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xb + 64), x3 = (__m512bh)_mm512_loadu_si512(xb + 96);
      const int64_t g0 = 128 * b / g, g1 = (128 * b + 64) / g;
      for (int i = 0; i < ROWS; i++) {
        const uint8_t* p = qb + (b * ROWS + i) * 64;
        prefetch(p);
        const __m512i bytes = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(bytes, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpacklo_epi8(lo, magic), x0);
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_unpackhi_epi8(lo, magic), x1);
        __m512 h = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpacklo_epi8(hi, magic), x2);
        h = _mm512_dpbf16_ps(h, (__m512bh)_mm512_unpackhi_epi8(hi, magic), x3);
        total[i] = _mm512_fmadd_ps(a, _mm512_set1_ps(s[(r0 + i) * groups + g0]), total[i]);
        total[i] = _mm512_fmadd_ps(h, _mm512_set1_ps(s[(r0 + i) * groups + g1]), total[i]);
      }
    }
    for (int i = 0; i < ROWS && r0 + i < n; i++) {
      const float v = _mm512_reduce_add_ps(add_offsets(total[i], c + (r0 + i) * groups, xsum.data(), groups));
      store(y, r0 + i, v + bias_at(bias, bias_bf16, r0 + i), out_bf16);
    }
  }
}


// int4 codes in the layout above -> bf16 weights w = s (128 + q) + c = (q - 8) s + z, rows [r0, r1) of the
// matrix (r0 a multiple of ROWS) into out (r1 - r0, k) row-major: for many-row products (prefill), which
// multiply the result with oneDNN's bf16 GEMM.
void int4_to_bf16(const uint8_t* q, const float* s, const float* c, uint16_t* out, int64_t r0, int64_t r1,
                        int64_t k, int64_t g) {
  const int64_t groups = k / g, blocks = k / 128;
  const __m512i low = _mm512_set1_epi8(0x0f), magic = _mm512_set1_epi8(0x43);
#pragma omp for schedule(static)
  for (int64_t rb = r0; rb < r1; rb += ROWS) {
    const uint8_t* qb = q + rb * (k / 2);
    for (int64_t i = 0; i < ROWS && rb + i < r1; i++) {
      const float* sr = s + (rb + i) * groups;
      const float* cr = c + (rb + i) * groups;
      uint16_t* row = out + (rb + i - r0) * k;
      for (int64_t b = 0; b < blocks; b++) {
        const __m512i bytes = _mm512_loadu_si512(qb + (b * ROWS + i) * 64);
        const __m512i nibbles[2] = {_mm512_and_si512(bytes, low), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low)};
        for (int half = 0; half < 2; half++) {  // in-features 128 b + 64 half + [0, 64)
          const int64_t t = (128 * b + 64 * half) / g;
          const __m512 scale = _mm512_set1_ps(sr[t]), offset = _mm512_set1_ps(cr[t]);
          const __m512i words[2] = {_mm512_unpacklo_epi8(nibbles[half], magic), _mm512_unpackhi_epi8(nibbles[half], magic)};
          for (int w = 0; w < 2; w++) {  // 32 bf16 numbers 128 + q -> 32 weights, rounded to bf16 (vcvtne2ps2bf16)
            const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words[w])), 16));
            const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words[w], 1)), 16));
            const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(v1, scale, offset), _mm512_fmadd_ps(v0, scale, offset));
            _mm512_storeu_si512(row + 128 * b + 64 * half + 32 * w, (__m512i)both);
          }
        }
      }
    }
  }
}

#endif  // __AVX512BF16__
#endif  // NEOLM_AVX512

// int4 codes in the canonical (saved) packing, (n, k/2) bytes with column 2j in the high nibble of byte j and
// 2j + 1 in the low one, into the layout above (rows padded to ROWS with zero codes): what pack_int4_gemv
// computes from the codes, in one pass (loading an int4 model repacks every matrix).
void int4_pack(const uint8_t* canon, uint8_t* out, int64_t n, int64_t k) {
  const int64_t blocks = k / 128, rows = (n + ROWS - 1) / ROWS * ROWS;
  const auto code = [](const uint8_t* row, int64_t f) { return (row[f / 2] >> (f % 2 ? 0 : 4)) & 15; };
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const uint8_t* src = canon + r * (k / 2);
    for (int64_t b = 0; b < blocks; b++) {
      uint8_t* dst = out + ((r / ROWS * blocks + b) * ROWS + r % ROWS) * 64;
      for (int p = 0; p < 64; p++) {
        const int lane = p / 16, i = p % 16;
        const int64_t f = 128 * b + (i < 8 ? 8 * lane + i : 32 + 8 * lane + i - 8);
        dst[p] = r < n ? static_cast<uint8_t>(code(src, f) | code(src, f + 64) << 4) : 0;
      }
    }
  }
}

}  // namespace neolm

// The exported kernels: one parallel region around a body.
extern "C" {

void neolm_int4_pack(const uint8_t* canon, uint8_t* out, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::int4_pack(canon, out, n, k);
}

int neolm_features() {
  int f = 0;
#ifdef NEOLM_AVX512
  f |= 1;
#ifdef __AVX512BF16__
  f |= 2 | 4 | 8;
#endif
#endif
  return f;
}

#ifdef NEOLM_AVX512
void neolm_gemv_f32(const float* x, const float* w, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n,
                    int64_t k) {
#pragma omp parallel
  neolm::gemv_f32(x, w, bias, bias_bf16, y, out_bf16, n, k);
}

#ifdef __AVX512BF16__
void neolm_gemv_int8(const uint16_t* x, const int8_t* q, const uint16_t* scale, const void* bias, int bias_bf16,
                     void* y, int out_bf16, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemv_int8(x, q, scale, bias, bias_bf16, y, out_bf16, n, k);
}

void neolm_gemv_bf16(const uint16_t* x, const uint16_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
                     int64_t n, int64_t k) {
#pragma omp parallel
  neolm::gemv_bf16(x, w, bias, bias_bf16, y, out_bf16, n, k);
}

void neolm_gemv_int4(const uint16_t* x, const uint8_t* q, const float* s, const float* c, const void* bias,
                     int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, int64_t g) {
#pragma omp parallel
  neolm::gemv_int4(x, q, s, c, bias, bias_bf16, y, out_bf16, n, k, g);
}

void neolm_int4_to_bf16(const uint8_t* q, const float* s, const float* c, uint16_t* out, int64_t r0, int64_t r1,
                        int64_t k, int64_t g) {
#pragma omp parallel
  neolm::int4_to_bf16(q, s, c, out, r0, r1, k, g);
}
#endif  // __AVX512BF16__
#endif  // NEOLM_AVX512

}  // extern "C"
