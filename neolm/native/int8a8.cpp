// int8 weights against activations quantized on the fly: Y (m, n) = X (m, k) @ W (n, k)^T + bias for any m,
// each row of X quantized with a scale of its own (per row, symmetric), to 8 bits (W8A8, gemm_int8a8: s = max |x|
// / 127) or to 16 (gemm_int8a16: s = max |x| / 32639, as two rows of bytes).
//
// Why 8 bits: the weight-only int8 kernels (gemm.cpp) convert the codes to bf16 and multiply with vdpbf16ps, 32
// multiply-adds per instruction; prompts go through oneDNN's bf16 GEMM. With both operands in int8, one
// vpdpbusd (AVX-512 VNNI) does 64, at the same rate on an AVX-512 EPYC (2 per cycle per core), and the codes
// are read as they are. What it costs is the activations' precision: 8 bits per row instead of bf16's 8
// significant bits per number, which is why it is an option (neolm.load(quantize_activations=True)), as in
// CTranslate2's and llama.cpp's int8 types.
//
// Why 16 bits: it is weight-only int8 where bf16 is slow (a Xeon without AMX: vdpbf16ps at 14 multiply-adds a
// cycle against vpdpbusd's ~110). Each row of X becomes v = 256 h + l in [-32639, 32639] with h and l bytes, and
// the codes meet h and l in two vpdpbusd passes: 32 multiply-adds an instruction, 2.4x int8f.cpp's fp32 FMAs
// on 512-row prompts at pythia-1.4b's shapes and 1.2x at one row and at 8 (bench/PROFILE.md, session 18). Each
// number of X is within max |x| / 65278 of its row's largest, 256 times closer than at 8 bits; sums are exact.
//
// The codes' layout (made by neolm.native.int8a8_pack): panels of 32 out-features; in a panel, for each group
// of 4 in-features ("quad"), the 32 features' 4 codes side by side (128 bytes), quads one after the other:
//   panel p, quad j, feature f, byte b  <-  W[32 p + f, 4 j + b] + 128   (u8; padding: 128, i.e. a zero code)
// One 64-byte load is then 16 features x 4 in-features, as vpdpbusd multiplies them: against 4 bytes of a row
// of X broadcast to every lane, it adds 4 products into each of 16 per-feature sums. A tile of up to 12 rows of
// X (of bytes: 6 rows of X at 16 bits) x one panel keeps 24 such sums in registers for the whole of k and needs
// no horizontal reduction at the end (the earlier row-major kernel, 8 rows of W x 3 of X, reduced 24 vectors
// per tile and ran at 60% of the instruction rate; a panel-major one at ~90%: bench/PROFILE.md, session 11).
//
// Why 32 features a panel and 12 rows a tile, not 64 and 6 (sessions 11-14): a decode batch of 8 sequences then
// meets each panel in one pass while it streams from memory. With 6-row tiles the last 2 rows took a second
// pass over every panel from L2, during which no weight came from memory; gpt-neo-125M's W8A8 linears and head
// at 8 rows cost 1.33x one row's time, now 1.16x, and whole batch-8 decoding steps are ~1.2x faster (one row
// 1.04x, prompts of 512 rows equal; bench/PROFILE.md, session 15). (A batch of 8 at 16 bits, 16 rows of bytes,
// takes a tile of 12 and one of 4. Two tiles of 16 rows x one half of a panel each, 16 sums, which stream the
// panel once between them, measured no faster at gpt-neo-125M's shapes and 1.25x slower at pythia-1.4b's.)
//
// vpdpbusd multiplies unsigned bytes by signed ones: the codes go in as u = w + 128 and X's bytes as they are
// (q in [-127, 127]; 16 bits: h and l in [-128, 127]), so
//   sum_k q w = sum_k q u - 128 sum_k q,
// the rows' sums of q (`xsum`) made with their quantization. Sums are exact in int32 (|q u| <= 128 * 255, k
// below 2^16); y = (sum - 128 xsum) * s_x * s_w + bias in fp32 (16 bits: sum = 256 sum_h + sum_l, each part
// exact in int32 and rounded once to fp32), the same numbers for a row alone or in any batch.

#include <algorithm>

#include "gemv.h"

namespace neolm {

constexpr int PANEL = 32;  // out-features a panel (neolm/native/__init__.py A8_PANEL)
constexpr int64_t QUAD_BYTES = 4 * PANEL;

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)

namespace {

constexpr int X_ROWS = 12;
// Prefetch distance in a panel's stream (one tile at a time reads it from memory): 32 quads. At 8 rows a quad
// takes ~8 cycles, so 2 KiB ahead (session 11's distance) asks for a line ~50 ns before its use, less than the
// memory's latency: 4 KiB measured 1.05-1.07x faster at 6-8 rows, equal at 1.
constexpr int64_t AHEAD = 4096;

// Rows [0, m) of x (fp32) to q = round(x / s) (int8, kp bytes a row, zeros past k), s and the sums of q (omp
// for over rows).
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* s, int32_t* xsum) {
  const int64_t kp = a8_row_bytes(k);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float* row = x + i * k;
    const float amax = abs_max(row, k);
    s[i] = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t j = 0; j < kp; j += 16) {
      const __mmask16 m16 = j < k ? first(k - j) : 0;
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m16, row + j), inv));  // nearest even
      sum = _mm512_add_epi32(sum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kp + j), _mm512_cvtepi32_epi8(v));
    }
    xsum[i] = _mm512_reduce_add_epi32(sum);
  }
}

// The 16-bit form (gemm_int8a16): row i of x to v = round(x / s) in [-A16_TOP, A16_TOP], s = max |x| / A16_TOP,
// written as two rows of bytes, v = 256 h + l with h and l in [-128, 127] (l = v mod 256 shifted into
// [-128, 127], h = (v - l) / 256: A16_TOP = 127 * 256 + 127 keeps h within a byte): row 2 i of q holds h,
// row 2 i + 1 holds l, and xsum[2 i], xsum[2 i + 1] their sums.
constexpr int32_t A16_TOP = 127 * 256 + 127;

void quantize_rows16(const float* x, int64_t m, int64_t k, int8_t* q, float* s, int32_t* xsum) {
  const int64_t kp = a8_row_bytes(k);
  const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float* row = x + i * k;
    const float amax = abs_max(row, k);
    s[i] = amax / float(A16_TOP);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? float(A16_TOP) / amax : 0.0f);
    __m512i hsum = _mm512_setzero_si512(), lsum = _mm512_setzero_si512();
    int8_t *hi = q + 2 * i * kp, *lo = hi + kp;
    for (int64_t j = 0; j < kp; j += 16) {
      const __mmask16 m16 = j < k ? first(k - j) : 0;
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m16, row + j), inv));  // nearest even
      const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
      const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(v, l), 8);
      hsum = _mm512_add_epi32(hsum, h);
      lsum = _mm512_add_epi32(lsum, l);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + j), _mm512_cvtepi32_epi8(h));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + j), _mm512_cvtepi32_epi8(l));
    }
    xsum[2 * i] = _mm512_reduce_add_epi32(hsum);
    xsum[2 * i + 1] = _mm512_reduce_add_epi32(lsum);
  }
}

// TB <= 12 rows of q (kp bytes apart) against one panel w (quads of its codes); out[32 i + f]: X row i, feature
// f. The sums are named variables (R below): GCC 12 keeps arrays of __m512i in memory, at half the speed; not
// inlined, for the same reason.
template <int TB>
__attribute__((noinline)) void tile(const int8_t* q, int64_t kp, const uint8_t* w, int64_t quads, int32_t* out) {
  const __m512i zero = _mm512_setzero_si512();
#define R(r) __m512i r##0 = zero, r##1 = zero;
  R(a) R(b) R(c) R(d) R(e) R(f) R(g) R(h) R(i) R(j) R(k) R(l)
#undef R
  for (int64_t jq = 0; jq < quads; jq++) {
    const uint8_t* p = w + jq * QUAD_BYTES;
    prefetch(p, AHEAD);
    prefetch(p + 64, AHEAD);
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
#define R(r, i)                                    \
  if constexpr (TB > i) {                          \
    int32_t four;                                  \
    std::memcpy(&four, q + i * kp + 4 * jq, 4);    \
    const __m512i x = _mm512_set1_epi32(four);     \
    r##0 = _mm512_dpbusd_epi32(r##0, w0, x);       \
    r##1 = _mm512_dpbusd_epi32(r##1, w1, x);       \
  }
    R(a, 0) R(b, 1) R(c, 2) R(d, 3) R(e, 4) R(f, 5) R(g, 6) R(h, 7) R(i, 8) R(j, 9) R(k, 10) R(l, 11)
#undef R
  }
#define R(r, i)                                     \
  if constexpr (TB > i) {                           \
    _mm512_store_si512(out + i * PANEL, r##0);      \
    _mm512_store_si512(out + i * PANEL + 16, r##1); \
  }
  R(a, 0) R(b, 1) R(c, 2) R(d, 3) R(e, 4) R(f, 5) R(g, 6) R(h, 7) R(i, 8) R(j, 9) R(k, 10) R(l, 11)
#undef R
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*);
constexpr TileFn TILES[X_ROWS + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,  tile<5>,  tile<6>,
                                      tile<7>, tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};

// Both forms: BITS 8 (a row of x, one row of q) or 16 (two rows of q a row of x, added as 256 hi + lo).
template <int BITS>
void gemm_a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
             void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
  constexpr int PARTS = BITS / 8;  // rows of q a row of x
  const int64_t kp = a8_row_bytes(k), quads = (k + 3) / 4, panels = (n + PANEL - 1) / PANEL, qm = PARTS * m;
  int8_t* q = reinterpret_cast<int8_t*>(work);
  float* xs = reinterpret_cast<float*>(work + qm * kp);
  int32_t* xsum = reinterpret_cast<int32_t*>(xs + m);
  if constexpr (BITS == 8)
    quantize_rows(x, m, k, q, xs, xsum);  // (ends in the omp for's barrier)
  else
    quantize_rows16(x, m, k, q, xs, xsum);
  // Each thread takes whole panels; a panel (k x 32 bytes, 64 KiB at k = 2048) meets every row of q from L2,
  // 12 rows at a time (6 rows of x in the 16-bit form), streamed from memory by the first tile.
#pragma omp for schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    const int64_t f0 = p * PANEL;
    __m512 ws[PANEL / 16], bs[PANEL / 16];
    for (int z = 0; z < PANEL / 16; z++) {
      const int64_t c = f0 + 16 * z;
      const __mmask16 lanes = c < n ? first(n - c) : 0;
      ws[z] = widen(_mm256_maskz_loadu_epi16(lanes, scale + c));
      bs[z] = bias ? load(bias, bias_bf16, c, lanes) : _mm512_setzero_ps();
    }
    for (int64_t t0 = 0; t0 < qm; t0 += X_ROWS) {  // (X_ROWS even: a tile holds whole rows of x)
      const int tb = int(std::min<int64_t>(X_ROWS, qm - t0));
      alignas(64) int32_t out[X_ROWS * PANEL];
      TILES[tb](q + t0 * kp, kp, w + p * quads * QUAD_BYTES, quads, out);
      for (int i = 0; i < tb; i += PARTS) {
        const int64_t r = (t0 + i) / PARTS;  // the row of x
        const __m512 sx = _mm512_set1_ps(xs[r]);
        for (int z = 0; z < PANEL / 16 && f0 + 16 * z < n; z++) {
          const int64_t c = f0 + 16 * z;
          const auto part = [&](int row) {  // a row of q's sums for these 16 features: sum - 128 xsum, exact
            const __m512i at = _mm512_load_si512(out + row * PANEL + 16 * z);
            return _mm512_cvtepi32_ps(_mm512_sub_epi32(at, _mm512_set1_epi32(128 * xsum[t0 + row])));
          };
          __m512 sum = part(i);
          if constexpr (BITS == 16) sum = _mm512_fmadd_ps(sum, _mm512_set1_ps(256.0f), part(i + 1));  // (256 hi + lo
          // would not fit in int32: each part rounded once to fp32)
          put(y, out_bf16, r * n + c, _mm512_fmadd_ps(sum, _mm512_mul_ps(sx, ws[z]), bs[z]), first(n - c));
        }
      }
    }
  }
}

}  // namespace

void gemm_int8a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                 void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
  gemm_a8<8>(x, m, w, scale, bias, bias_bf16, y, out_bf16, n, k, work);
}

void gemm_int8a16(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias, int bias_bf16,
                  void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
  gemm_a8<16>(x, m, w, scale, bias, bias_bf16, y, out_bf16, n, k, work);
}

#endif

// Codes (n, k) int8 row-major <-> the layout above (`to_panels` 1 packs, with padding 128; 0 unpacks), a panel
// at a time split over the threads, 16 quads at a time so that both sides' lines stay in L1, 4 bytes (one
// feature's quad) a move: torch's strided byte copies took ~1.7 s of a pythia-1.4b's load.
void int8a8_repack(int8_t* rows, uint8_t* panels, int64_t n, int64_t k, int to_panels) {
  constexpr uint32_t FLIP = 0x80808080u;  // code + 128, byte by byte
  const int64_t quads = (k + 3) / 4, count = (n + PANEL - 1) / PANEL, whole = k / 4;
#pragma omp for schedule(static)
  for (int64_t p = 0; p < count; p++) {
    uint8_t* panel = panels + p * quads * QUAD_BYTES;
    for (int64_t j0 = 0; j0 < quads; j0 += 16) {
      const int64_t j1 = std::min(quads, j0 + 16);
      for (int64_t f = 0; f < PANEL; f++) {
        const int64_t row = p * PANEL + f;
        int8_t* src = rows + row * k;
        for (int64_t j = j0; j < j1; j++) {
          uint8_t* at = panel + j * QUAD_BYTES + 4 * f;
          if (row < n && j < whole) {
            uint32_t v;
            if (to_panels) {
              std::memcpy(&v, src + 4 * j, 4);
              v ^= FLIP;
              std::memcpy(at, &v, 4);
            } else {
              std::memcpy(&v, at, 4);
              v ^= FLIP;
              std::memcpy(src + 4 * j, &v, 4);
            }
            continue;
          }
          for (int64_t b = 0; b < 4; b++) {  // past n or k: padding; a last quad of k: byte by byte
            const int64_t c = 4 * j + b;
            const bool real = row < n && c < k;
            if (to_panels)
              at[b] = real ? uint8_t(src[c]) ^ 0x80u : 0x80u;
            else if (real)
              src[c] = int8_t(at[b] ^ 0x80u);
          }
        }
      }
    }
  }
}

}  // namespace neolm

extern "C" {

void neolm_int8a8_repack(int8_t* rows, uint8_t* panels, int64_t n, int64_t k, int to_panels) {
#pragma omp parallel
  neolm::int8a8_repack(rows, panels, n, k, to_panels);
}

#if defined(NEOLM_AVX512) && defined(__AVX512VNNI__)
int64_t neolm_a8_work_bytes(int64_t m, int64_t k) { return neolm::a8_work_bytes(m, k); }  // (int4a8.cpp's too)
int64_t neolm_a16_work_bytes(int64_t m, int64_t k) { return neolm::a16_work_bytes(m, k); }

void neolm_gemm_int8a8(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias,
                       int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
#pragma omp parallel
  neolm::gemm_int8a8(x, m, w, scale, bias, bias_bf16, y, out_bf16, n, k, work);
}

void neolm_gemm_int8a16(const float* x, int64_t m, const uint8_t* w, const uint16_t* scale, const void* bias,
                        int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, uint8_t* work) {
#pragma omp parallel
  neolm::gemm_int8a16(x, m, w, scale, bias, bias_bf16, y, out_bf16, n, k, work);
}
#endif

}  // extern "C"
