// int4 weights in fp16 arithmetic: Y (m, n) = X (m, k) @ W^T + bias, w = (q - 8) s + z per group of g in-features,
// for CPUs with AVX512-FP16 whose bf16 instructions are slow.
//
// Why: int4.cpp widens the codes to bf16 and multiplies with vdpbf16ps. On a 5th-generation Xeon without AMX that
// instruction issues about once every 2.2 cycles (14 multiply-adds a cycle: int8f.cpp has the measurements);
// there a decode batch of 8 took 3x the time of one row. The fp16 FMA (vfmadd231ph, 32 lanes) issues twice a
// cycle: 64 multiply-adds. At pythia-1.4b's shapes these kernels ran 1.6x int4.cpp's speed at one row (bound by
// memory), 3.5x at 8 rows and at 512 (~245 G multiply-adds/s on 2 cores; bench/PROFILE.md, session 17).
//
// The arithmetic. Each row of X is scaled by a power of two 2^-e so that max |x| < 1 (exact), then rounded to
// fp16 (11 significant bits; int4.cpp rounds x to bf16, 8). Per block of b = min(g, 64) in-features,
//   A = sum (q - 8) x'      in fp16 (q - 8 in [-8, 7] is exact; |A| <= 8 b = 512, far from overflow)
//   X = sum x'              in fp32 (of the fp16 values), at the rows' scaling
// and the block adds s A + z X to an fp32 sum, which ends as 2^e sum + bias. The fp16 sums' rounding over at most
// 64 terms is smaller than int4.cpp's rounding of x to bf16: against a float64 reference, 1.3-1.7e-3 of the
// largest output where int4.cpp's is 1.7-2.1e-3 (random pythia-1.4b-shaped matrices).
//
// The codes. fp16(q - 8) has a zero low byte, so its high byte is one of 16 values: vpermb with a 16-entry table
// (repeated 4 times: vpermb reads 6 index bits) writes it into the high byte of every 16-bit lane, the low byte
// zeroed by the instruction's mask, from the nibble in the low half of that lane's high byte: 1 instruction for
// 32 codes, 2 with the shift that brings a nibble there. A 16-bit lane holds 4 in-features of one out-feature:
// low byte (in-feature 4 j, low nibble; 4 j + 1, high), high byte (4 j + 2, low; 4 j + 3, high).
//
// Layout (neolm.native.Int4Panels): panels of 64 out-features (n rounded up to 64 with zero scales and zeros);
// a panel is its k / g groups in turn, a group its scales (64 bf16), its zeros (64 bf16), then its g / 4 quads
// of in-features, a quad 2 vectors of 32 out-features' 16-bit words (64 bytes each). One stream a panel, read
// once per tile of up to 8 rows of X: 16 fp16 sums in registers, the fp32 sums in a 2 KiB buffer. Each output
// is one lane's sums in order: a row gets the same numbers alone as in any batch.

#include <algorithm>
#include <cmath>

#include "gemv.h"

namespace neolm {

constexpr int64_t H_PANEL = 64;  // out-features a panel; neolm/native/__init__.py H_PANEL
inline int64_t h_panels(int64_t n) { return (n + H_PANEL - 1) / H_PANEL; }
inline int64_t h_group_bytes(int64_t g) { return 4 * H_PANEL + 32 * g; }  // scales, zeros, g / 4 quads of 128 bytes

#if defined(NEOLM_AVX512) && defined(__AVX512FP16__) && defined(__AVX512VBMI__)

namespace {
constexpr int TILE = 8;          // rows of X a tile
constexpr int64_t AHEAD = 4096;  // prefetch distance in a panel's stream (bytes)

// Rows of x (fp32) to x' = x 2^-e (fp16, h_row_halves(k) a row), 2^e (scale), and X of every block of b.
void scale_rows(const float* x, int64_t m, int64_t k, int64_t b, uint16_t* xh, float* xs, float* scale) {
  const int64_t kp = h_row_halves(k), blocks = k / b;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float* row = x + i * k;
    const float amax = abs_max(row, k);
    int e = 0;
    if (amax > 0.0f && std::isfinite(amax)) std::frexp(amax, &e);  // amax < 2^e
    scale[i] = std::ldexp(1.0f, e);
    const __m512 down = _mm512_set1_ps(std::ldexp(1.0f, -e));
    uint16_t* out = xh + i * kp;
    for (int64_t t = 0; t < blocks; t++) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = t * b; j < (t + 1) * b; j += 16) {  // (b a multiple of 16)
        const __m256i h = _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(row + j), down), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), h);
        sum = _mm512_add_ps(sum, _mm512_cvtph_ps(h));
      }
      xs[i * blocks + t] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t j = k; j < kp; j++) out[j] = 0;
  }
}

// a += w0 x, b += w1 x, x the fp16 number at p in every lane: an FMA's embedded broadcast, which GCC 12 does not
// make of _mm512_set1_ph (a vpbroadcastw instead, a second instruction on the permutes' port).
__attribute__((always_inline)) inline void fma2(__m512h& a, __m512h& b, __m512h w0, __m512h w1, const uint16_t* x) {
  asm("vfmadd231ph %[x]%{1to32%}, %[w0], %[a]\n\tvfmadd231ph %[x]%{1to32%}, %[w1], %[b]"
      : [a] "+v"(a), [b] "+v"(b) : [w0] "v"(w0), [w1] "v"(w1), [x] "m"(*x));
}

// Y[t0 + r, col + f] for r < NB, f < 64: NB rows of x' (kp apart) against one panel.
template <int NB>
void tile(const uint16_t* xh, int64_t kp, const float* xs, const float* scale, int64_t k, int64_t g,
          const uint8_t* panel, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n, int64_t col) {
  const int64_t b = h_block(g), blocks = k / b, per_group = g / b;
  alignas(64) static const uint8_t high_bytes[64] = {  // fp16(q - 8) >> 8 for q = 0 .. 15, 4 times
#define ROW 0xc8, 0xc7, 0xc6, 0xc5, 0xc4, 0xc2, 0xc0, 0xbc, 0x00, 0x3c, 0x40, 0x42, 0x44, 0x45, 0x46, 0x47
      ROW, ROW, ROW, ROW
#undef ROW
  };
  const __m512i lut = _mm512_load_si512(high_bytes);
  const __mmask64 odd = 0xaaaaaaaaaaaaaaaaull;
  alignas(64) float sums[NB][H_PANEL];
  for (int r = 0; r < NB; r++)
    for (int f = 0; f < H_PANEL; f++) sums[r][f] = 0.0f;
  const uint8_t* p = panel;
  for (int64_t t = 0; t < k / g; t++) {
    const uint16_t* sz = reinterpret_cast<const uint16_t*>(p);  // 64 scales, 64 zeros
    p += 4 * H_PANEL;
    for (int64_t u = 0; u < per_group; u++) {
      const int64_t j0 = (t * per_group + u) * b;  // the block's first in-feature
#define NEOLM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define NEOLM_ZERO(r) __m512h a##r = _mm512_setzero_ph(), b##r = a##r;
      NEOLM_ROWS(NEOLM_ZERO)
      for (int64_t j = j0; j < j0 + b; j += 4, p += 128) {
        prefetch(p, AHEAD);
        prefetch(p + 64, AHEAD);
        const __m512i c0 = _mm512_loadu_si512(p), c1 = _mm512_loadu_si512(p + 64);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
          __m512i i0 = c0, i1 = c1;
          if (i == 0) i0 = _mm512_slli_epi16(c0, 8), i1 = _mm512_slli_epi16(c1, 8);
          if (i == 1) i0 = _mm512_slli_epi16(c0, 4), i1 = _mm512_slli_epi16(c1, 4);
          if (i == 3) i0 = _mm512_srli_epi16(c0, 4), i1 = _mm512_srli_epi16(c1, 4);
          const __m512h w0 = _mm512_castsi512_ph(_mm512_maskz_permutexvar_epi8(odd, i0, lut));
          const __m512h w1 = _mm512_castsi512_ph(_mm512_maskz_permutexvar_epi8(odd, i1, lut));
#define NEOLM_FMA(r) if constexpr (NB > r) fma2(a##r, b##r, w0, w1, xh + r * kp + j + i);
          NEOLM_ROWS(NEOLM_FMA)
#undef NEOLM_FMA
        }
      }
      __m512h acc[2][NB];  // (named variables above: GCC 12 kept an array of them in memory, at 0.6x the speed)
#define NEOLM_KEEP(r) if constexpr (NB > r) acc[0][r] = a##r, acc[1][r] = b##r;
      NEOLM_ROWS(NEOLM_KEEP)
#undef NEOLM_KEEP
#undef NEOLM_ZERO
#undef NEOLM_ROWS
      for (int r = 0; r < NB; r++) {
        const __m512 xsum = _mm512_set1_ps(xs[r * blocks + j0 / b]);
        for (int v = 0; v < 2; v++) {
          const __m512i a = _mm512_castph_si512(acc[v][r]);
          const __m512 half[2] = {_mm512_cvtph_ps(_mm512_castsi512_si256(a)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(a, 1))};
          for (int h = 0; h < 2; h++) {
            const int64_t f = 32 * v + 16 * h;
            const __m512 s = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + f)));
            const __m512 z = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + H_PANEL + f)));
            __m512 total = _mm512_fmadd_ps(half[h], s, _mm512_load_ps(sums[r] + f));
            _mm512_store_ps(sums[r] + f, _mm512_fmadd_ps(z, xsum, total));
          }
        }
      }
    }
  }
  for (int64_t f = 0; f < H_PANEL && col + f < n; f += 16) {
    const __mmask16 m = first(n - col - f);
    const __m512 add = bias ? load(bias, bias_bf16, col + f, m) : _mm512_setzero_ps();
    for (int r = 0; r < NB; r++)
      put(y, out_bf16, r * n + col + f, _mm512_fmadd_ps(_mm512_load_ps(sums[r] + f), _mm512_set1_ps(scale[r]), add), m);
  }
}
}  // namespace

// The panels split over the threads of the enclosing parallel region (orphaned `omp for`), after the rows of x
// are scaled and rounded into work (int4h_work_bytes).
void gemm_int4h(const float* x, int64_t m, const uint8_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
                int64_t n, int64_t k, int64_t g, uint8_t* work) {
  const int64_t kp = h_row_halves(k), b = h_block(g), blocks = k / b;
  uint16_t* xh = reinterpret_cast<uint16_t*>(work);
  float* xs = reinterpret_cast<float*>(work + m * kp * 2);
  float* scale = xs + m * blocks;
  scale_rows(x, m, k, b, xh, xs, scale);  // (ends in the loop's barrier)
  const int64_t panel_bytes = k / g * h_group_bytes(g);
#pragma omp for schedule(static)
  for (int64_t p = 0; p < h_panels(n); p++) {
    const uint8_t* panel = w + p * panel_bytes;
    for (int64_t t0 = 0; t0 < m; t0 += TILE) {
      const uint16_t* xt = xh + t0 * kp;
      const float *st = xs + t0 * blocks, *et = scale + t0;
      void* yt = static_cast<char*>(y) + t0 * n * (out_bf16 ? 2 : 4);
      with_rows<TILE>(m - t0, [&](auto rows) {
        tile<rows>(xt, kp, st, et, k, g, panel, bias, bias_bf16, yt, out_bf16, n, p * H_PANEL);
      });
    }
  }
}

#endif

// Canonical int4 codes (n, k / 2) bytes (in-feature 2 i in the high nibble of byte i) with scales and zeros
// (n, k / g) bf16 <-> the panels (to_panels 1 packs, 0 unpacks the codes only). A 16-bit word of the panels holds
// the nibble-swapped canonical bytes 2 j', 2 j' + 1 of its row (j' = in-features 4 j' .. 4 j' + 3).
void int4h_repack(uint8_t* canon, const uint16_t* scales, const uint16_t* zeros, uint8_t* panels, int64_t n, int64_t k,
                  int64_t g, int to_panels) {
  const int64_t groups = k / g, panel_bytes = groups * h_group_bytes(g);
  const auto swap = [](uint8_t v) { return static_cast<uint8_t>(v >> 4 | v << 4); };
#pragma omp for schedule(static)
  for (int64_t p = 0; p < h_panels(n); p++) {
    uint8_t* out = panels + p * panel_bytes;
    for (int64_t t = 0; t < groups; t++, out += h_group_bytes(g)) {
      if (to_panels) {
        uint16_t* sz = reinterpret_cast<uint16_t*>(out);
        for (int64_t f = 0; f < H_PANEL; f++) {
          const int64_t row = p * H_PANEL + f;
          sz[f] = row < n ? scales[row * groups + t] : 0;
          sz[H_PANEL + f] = row < n ? zeros[row * groups + t] : 0;
        }
      }
      uint8_t* quads = out + 4 * H_PANEL;
      for (int64_t f = 0; f < H_PANEL; f++) {
        const int64_t row = p * H_PANEL + f;
        if (row >= n) {
          if (to_panels)
            for (int64_t j = 0; j < g / 4; j++) quads[j * 128 + 2 * f] = quads[j * 128 + 2 * f + 1] = 0;
          continue;
        }
        uint8_t* line = canon + row * (k / 2) + t * g / 2;  // the group's g / 2 bytes of this row
        for (int64_t j = 0; j < g / 4; j++) {
          uint8_t* word = quads + j * 128 + 2 * f;
          if (to_panels) {
            word[0] = swap(line[2 * j]);
            word[1] = swap(line[2 * j + 1]);
          } else {
            line[2 * j] = swap(word[0]);
            line[2 * j + 1] = swap(word[1]);
          }
        }
      }
    }
  }
}

}  // namespace neolm

extern "C" {

int64_t neolm_int4h_panel_bytes(int64_t n, int64_t k, int64_t g) { return neolm::h_panels(n) * (k / g) * neolm::h_group_bytes(g); }

int64_t neolm_int4h_work_bytes(int64_t m, int64_t k, int64_t g) { return neolm::h_work_bytes(m, k, g); }

void neolm_int4h_repack(uint8_t* canon, const uint16_t* scales, const uint16_t* zeros, uint8_t* panels, int64_t n, int64_t k,
                        int64_t g, int to_panels) {
#pragma omp parallel
  neolm::int4h_repack(canon, scales, zeros, panels, n, k, g, to_panels);
}

#if defined(NEOLM_AVX512) && defined(__AVX512FP16__) && defined(__AVX512VBMI__)
void neolm_gemm_int4h(const float* x, int64_t m, const uint8_t* w, const void* bias, int bias_bf16, void* y, int out_bf16,
                      int64_t n, int64_t k, int64_t g, uint8_t* work) {
#pragma omp parallel
  neolm::gemm_int4h(x, m, w, bias, bias_bf16, y, out_bf16, n, k, g, work);
}
#endif

}  // extern "C"
