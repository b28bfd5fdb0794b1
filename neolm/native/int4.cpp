// int4 weights on CPU: the layout the kernels read, packing into it, the matmul of one to a few rows of x
// (decoding: every weight read once for all the rows), and the conversion to bf16 weights (prefill, which
// multiplies them with oneDNN's bf16 GEMM). Built with gemv.cpp (see there and neolm/native/__init__.py).
//
// Codes q in [0, 15], w = (q - 8) s + z per group of G in-features (G a multiple of 8 dividing K). The 16-bit
// word 0x43 << 8 | q is the bf16 number 128 + q exactly, so vdpbf16ps sums (128 + q) x exactly in pairs
// (x bf16); over a group, sum w x = s A + (z - 136 s) X with A = sum (128 + q) x and X = sum x
// (c = z - 136 s, computed from s and z as a group's sums are added up).
//
// Layout: the out-features in blocks of INT4_ROWS = 16, each block K/8 chunks of 64 bytes, chunk j holding
// in-features 8j .. 8j + 7 of the block's 16 rows; the blocks in bands of INT4_BAND = 4 (64 rows; zero codes
// pad the last band), whose chunks j lie side by side (4 x 64 bytes), so that the one-row kernel, which reads
// the 4 blocks of a band at once, reads one stream (4 streams, one a block, ran at ~80% of fp32's speed from
// memory: bench/PROFILE.md, session 9).
// Byte 16 L + i of a chunk (128-bit lane L, i < 16) holds row 4 L + (i % 8) / 2 of the block and in-feature
// f = 8 j + 2 (i / 8) + i % 2 in its low nibble, f + 4 in its high one. Interleaving the low nibbles with 0x43
// bytes (unpacklo/hi_epi8) gives the words of in-features (8j, 8j+1) and (8j+2, 8j+3) for the 16 rows, row o
// in 32-bit lane o; the high nibbles give (8j+4, 8j+5) and (8j+6, 8j+7). So vdpbf16ps against that pair of x,
// broadcast to every lane, adds to all 16 rows' sums at once ("lanes over out-features"): a group's scale
// costs one FMA per 16 rows and G/2 products. With lanes over in-features (sessions <= 7) it cost one per two
// products, and the few-row kernel ran at half the bf16 peak.
// sz: the scales s and zeros z as stored (bf16), (N/64, K/G, 2, 64): group by group, a band's 64 scales side by
// side, then its 64 zeros; one stream beside the codes', 0.5 bits a weight at G = 64. (Until session 45 they were
// fp32, the offsets c stored in place of z: 1 bit a weight in two streams. The one-row kernel reads at the speed
// of a plain read of its bytes, so its time follows them: pythia-1.4b int4 decoding ran 1.03-1.13x faster with
// the bf16 table, alternated run by run with the old code; bench/README.md.)

#include <algorithm>
#include <vector>

#include "gemv.h"

namespace neolm {

// Rows of x per tile. 8 rows x 1 block (24 accumulators) ran at 277 G multiply-adds/s on 8 rows of pythia-1.4b's
// matrices, 4 rows x 2 blocks (the next 4 rows meet the blocks' codes again, from L2) at 365 (bench/PROFILE.md).
constexpr int TILE = 4;
// Software prefetch distances in bytes. One row: the codes 1 KiB ahead (gemv.h's 512 for the other formats),
// the scales and zeros 2 KiB ahead; without the latter, one row ran 15% slower than with the old layout,
// whose 4 rows shared one stream of codes and read their scales as scalars (bench/PROFILE.md, session 8).
constexpr int64_t Q_AHEAD_ONE_ROW = 1024, SC_AHEAD = 2048;

#if defined(NEOLM_AVX512) && defined(__AVX512BF16__)

namespace {

inline __m512bh pair(const uint16_t* x) {  // x[0], x[1] (bf16) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

struct Chunk {  // one chunk's 128 codes as the bf16 numbers 128 + q: 4 vectors, in-feature pairs 0-1 .. 6-7
  __m512bh w[4];
  explicit Chunk(const uint8_t* p) {
    const __m512i low = _mm512_set1_epi8(0x0f), magic = _mm512_set1_epi8(0x43);
    const __m512i bytes = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_and_si512(bytes, low), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
    w[0] = (__m512bh)_mm512_unpacklo_epi8(lo, magic);
    w[1] = (__m512bh)_mm512_unpackhi_epi8(lo, magic);
    w[2] = (__m512bh)_mm512_unpacklo_epi8(hi, magic);
    w[3] = (__m512bh)_mm512_unpackhi_epi8(hi, magic);
  }
};

// Y rows [t0, t0 + NB) x blocks [ob, ob + R) of out-features. Each row's sum in two accumulators (pairs 0-1
// and 4-5 of a chunk; 2-3 and 6-7), so that R x NB x 2 chains of vdpbf16ps hide its latency; every output gets
// the same operations in the same order whatever R and NB: a row gets the numbers alone it gets in a batch.
template <int R, int NB>
void tile(const uint16_t* x, int64_t k, int64_t t0, const uint8_t* q, const uint16_t* sz, const float* xsum, int64_t g,
          int64_t ob, int64_t n, const void* bias, int bias_bf16, void* y, int out_bf16, int64_t ahead) {
  const int64_t groups = k / g, per_group = g / 8;
  __m512 total[R][NB];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) total[r][b] = _mm512_setzero_ps();
  for (int64_t t = 0; t < groups; t++) {
    __m512 even[R][NB], odd[R][NB];
    for (int r = 0; r < R; r++) {
      for (int b = 0; b < NB; b++) even[r][b] = odd[r][b] = _mm512_setzero_ps();
      prefetch(sz + sz_at(ob + r, t, groups), SC_AHEAD);  // their own stream, beside the codes'
      prefetch(sz + sz_at(ob + r, t, groups) + SZ_ZEROS, SC_AHEAD);
    }
    for (int64_t j = t * per_group; j < (t + 1) * per_group; j++) {
      for (int r = 0; r < R; r++) {
        const uint8_t* p = q + chunk_at(ob + r, j, k);
        prefetch(p, ahead);
        const Chunk w(p);
        for (int b = 0; b < NB; b++) {
          const uint16_t* xb = x + (t0 + b) * k + 8 * j;
          even[r][b] = _mm512_dpbf16_ps(even[r][b], w.w[0], pair(xb));
          odd[r][b] = _mm512_dpbf16_ps(odd[r][b], w.w[1], pair(xb + 2));
          even[r][b] = _mm512_dpbf16_ps(even[r][b], w.w[2], pair(xb + 4));
          odd[r][b] = _mm512_dpbf16_ps(odd[r][b], w.w[3], pair(xb + 6));
        }
      }
    }
    for (int r = 0; r < R; r++) {
      __m512 sv, cv;
      int4_scales(sz, ob + r, t, groups, sv, cv);
      for (int b = 0; b < NB; b++) {
        total[r][b] = _mm512_fmadd_ps(_mm512_add_ps(even[r][b], odd[r][b]), sv, total[r][b]);
        total[r][b] = _mm512_fmadd_ps(cv, _mm512_set1_ps(xsum[(t0 + b) * groups + t]), total[r][b]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const int64_t o = (ob + r) * INT4_ROWS;
    if (o >= n) break;
    const __mmask16 m = first(n - o);
    const __m512 bv = bias ? load(bias, bias_bf16, o, m) : _mm512_setzero_ps();
    for (int b = 0; b < NB; b++) {
      char* row = static_cast<char*>(y) + (t0 + b) * n * (out_bf16 ? 2 : 4);
      put(row, out_bf16, o, _mm512_add_ps(total[r][b], bv), m);
    }
  }
}

template <int R>
void tile_rows(const uint16_t* x, int64_t m, int64_t k, int64_t t0, const uint8_t* q, const uint16_t* sz,
               const float* xsum, int64_t g, int64_t ob, int64_t n, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t ahead) {
  with_rows<TILE>(m - t0, [&](auto rows) {
    tile<R, rows>(x, k, t0, q, sz, xsum, g, ob, n, bias, bias_bf16, y, out_bf16, ahead);
  });
}

// Every R blocks of out-features (split over the threads), against every tile of up to TILE rows of x; a last
// group of fewer than R blocks one block at a time.
template <int R>
void int4_blocks(const uint16_t* x, int64_t m, const uint8_t* q, const uint16_t* sz, const float* xsum,
                 const void* bias, int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, int64_t g) {
  const int64_t blocks = (n + INT4_ROWS - 1) / INT4_ROWS, ahead = prefetch_ahead(m, Q_AHEAD_ONE_ROW);
#pragma omp for schedule(static)
  for (int64_t ob = 0; ob < blocks; ob += R)
    for (int64_t t0 = 0; t0 < m; t0 += TILE) {
      if (ob + R <= blocks)
        tile_rows<R>(x, m, k, t0, q, sz, xsum, g, ob, n, bias, bias_bf16, y, out_bf16, ahead);
      else
        for (int64_t b = ob; b < blocks; b++)
          tile_rows<1>(x, m, k, t0, q, sz, xsum, g, b, n, bias, bias_bf16, y, out_bf16, ahead);
    }
}

}  // namespace

// Y (m, n) = X (m, k) @ W^T + bias, W in the layout above: R blocks of 16 rows at a time so that a step has
// at least 8 independent sums (2 or more rows of x: 2 blocks, one row: 4).
void gemm_int4(const uint16_t* x, int64_t m, const uint8_t* q, const uint16_t* sz, const void* bias,
               int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, int64_t g) {
  const int64_t groups = k / g;
  std::vector<float> xsum(m * groups);  // X of every row of x and group
  for (int64_t i = 0; i < m; i++)
    for (int64_t t = 0; t < groups; t++) {
      float sum = 0.0f;
      for (int64_t j = t * g; j < (t + 1) * g; j++) sum += bf16_to_float(x[i * k + j]);
      xsum[i * groups + t] = sum;
    }
  if (m >= 2)
    int4_blocks<2>(x, m, q, sz, xsum.data(), bias, bias_bf16, y, out_bf16, n, k, g);
  else
    int4_blocks<4>(x, m, q, sz, xsum.data(), bias, bias_bf16, y, out_bf16, n, k, g);
}

void gemv_int4(const uint16_t* x, const uint8_t* q, const uint16_t* sz, const void* bias, int bias_bf16, void* y,
               int out_bf16, int64_t n, int64_t k, int64_t g) {
  gemm_int4(x, 1, q, sz, bias, bias_bf16, y, out_bf16, n, k, g);
}

// The weights w = s (128 + q) + c = (q - 8) s + z of rows [r0, r1) (r0 a multiple of 16), rounded to bf16, into
// out (r1 - r0, k) row-major. Per chunk: the 4 vectors of 128 + q to fp32, scaled (each row's s and c repeated
// for its two lanes), rounded (vcvtne2ps2bf16), then a 4 x 4 transpose of 32-bit pairs within each 128-bit
// lane turns "16 rows x 2 in-features" vectors into 8 in-features of one row. Those go to a 16 x 64 tile in
// L1 first, which goes out in whole 64-byte lines. 16-byte stores straight into 16 rows of out, which lie
// k * 2 bytes apart (4 KiB at k = 2048: one cache set), made a 32-token prompt of pythia-1.4b take 348 ms
// instead of 198.
void int4_to_bf16(const uint8_t* q, const uint16_t* sz, uint16_t* out, int64_t r0, int64_t r1, int64_t k,
                  int64_t g) {
  const int64_t groups = k / g, chunks = k / 8;
  const __m512i lower = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i upper = _mm512_add_epi32(lower, _mm512_set1_epi32(8));
#pragma omp for schedule(static)
  for (int64_t ob = r0 / INT4_ROWS; ob < (r1 + INT4_ROWS - 1) / INT4_ROWS; ob++) {
    const int64_t rows = std::min<int64_t>(INT4_ROWS, r1 - ob * INT4_ROWS);
    uint16_t* dst = out + (ob * INT4_ROWS - r0) * k;
    alignas(64) uint16_t tile[INT4_ROWS][64];  // 16 rows x 8 chunks
    __m512 s_lo, s_hi, c_lo, c_hi;
    int64_t group = -1;
    for (int64_t j0 = 0; j0 < chunks; j0 += 8) {
      const int64_t count = std::min<int64_t>(8, chunks - j0);
      for (int64_t jj = 0; jj < count; jj++) {
        const int64_t j = j0 + jj;
        if (8 * j / g != group) {
          group = 8 * j / g;
          __m512 sv, cv;
          int4_scales(sz, ob, group, groups, sv, cv);
          s_lo = _mm512_permutexvar_ps(lower, sv), s_hi = _mm512_permutexvar_ps(upper, sv);
          c_lo = _mm512_permutexvar_ps(lower, cv), c_hi = _mm512_permutexvar_ps(upper, cv);
        }
        const Chunk w(q + chunk_at(ob, j, k));
        __m512i v[4];
        for (int i = 0; i < 4; i++) {  // rows 0-7 in the lower 16 words, 8-15 in the upper
          const __m512i words = (__m512i)w.w[i];
          const __m512 lo = widen(_mm512_castsi512_si256(words)), hi = widen(_mm512_extracti64x4_epi64(words, 1));
          v[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s_hi, c_hi), _mm512_fmadd_ps(lo, s_lo, c_lo));
        }
        const __m512i t0 = _mm512_unpacklo_epi32(v[0], v[1]), t1 = _mm512_unpackhi_epi32(v[0], v[1]);
        const __m512i t2 = _mm512_unpacklo_epi32(v[2], v[3]), t3 = _mm512_unpackhi_epi32(v[2], v[3]);
        const __m512i u[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                              _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};  // row 4 L + i in lane L
        for (int i = 0; i < 4; i++) {
          _mm_store_si128(reinterpret_cast<__m128i*>(&tile[i][8 * jj]), _mm512_extracti32x4_epi32(u[i], 0));
          _mm_store_si128(reinterpret_cast<__m128i*>(&tile[4 + i][8 * jj]), _mm512_extracti32x4_epi32(u[i], 1));
          _mm_store_si128(reinterpret_cast<__m128i*>(&tile[8 + i][8 * jj]), _mm512_extracti32x4_epi32(u[i], 2));
          _mm_store_si128(reinterpret_cast<__m128i*>(&tile[12 + i][8 * jj]), _mm512_extracti32x4_epi32(u[i], 3));
        }
      }
      for (int64_t r = 0; r < rows; r++) {
        uint16_t* to = dst + r * k + 8 * j0;
        if (count == 8) {
          _mm512_storeu_si512(to, _mm512_load_si512(tile[r]));
          _mm512_storeu_si512(to + 32, _mm512_load_si512(tile[r] + 32));
        } else {
          std::memcpy(to, tile[r], 16 * count);
        }
      }
    }
  }
}

#endif  // NEOLM_AVX512 && __AVX512BF16__

// int4 codes in the canonical (saved) packing, (n, k/2) bytes with column 2j in the high nibble of byte j and
// 2j + 1 in the low one, into the layout above: what pack_int4_gemv computes from the codes, in one pass
// (loading an int4 model repacks every matrix). Each output byte takes two input nibbles of one row.
void int4_pack(const uint8_t* canon, uint8_t* out, int64_t n, int64_t k) {
  const int64_t bands = (n + INT4_BAND * INT4_ROWS - 1) / (INT4_BAND * INT4_ROWS), chunks = k / 8;
#pragma omp for schedule(static)
  for (int64_t ob = 0; ob < bands * INT4_BAND; ob++)  // the padding blocks of the last band too (zeros)
    for (int64_t j = 0; j < chunks; j++) {
      uint8_t* dst = out + chunk_at(ob, j, k);
      for (int p = 0; p < 64; p++) {
        const int lane = p / 16, i = p % 16;
        const int64_t row = ob * INT4_ROWS + 4 * lane + (i % 8) / 2;
        if (row >= n) {
          dst[p] = 0;
          continue;
        }
        // in-feature f = 8 j + 2 (i / 8) + i % 2 (low nibble) and f + 4 (high): bytes 4 j + i / 8 and 4 j + i / 8 + 2
        // of the canonical row, whose high nibble is the even in-feature
        const uint8_t a = canon[row * (k / 2) + 4 * j + i / 8], b = canon[row * (k / 2) + 4 * j + i / 8 + 2];
        dst[p] = i % 2 ? static_cast<uint8_t>((a & 15) | (b & 15) << 4) : static_cast<uint8_t>((a >> 4) | (b & 0xf0));
      }
    }
}

}  // namespace neolm

extern "C" {

void neolm_int4_pack(const uint8_t* canon, uint8_t* out, int64_t n, int64_t k) {
#pragma omp parallel
  neolm::int4_pack(canon, out, n, k);
}

#if defined(NEOLM_AVX512) && defined(__AVX512BF16__)
void neolm_gemv_int4(const uint16_t* x, const uint8_t* q, const uint16_t* sz, const void* bias, int bias_bf16, void* y,
                     int out_bf16, int64_t n, int64_t k, int64_t g) {
#pragma omp parallel
  neolm::gemv_int4(x, q, sz, bias, bias_bf16, y, out_bf16, n, k, g);
}

void neolm_gemm_int4(const uint16_t* x, int64_t m, const uint8_t* q, const uint16_t* sz, const void* bias,
                     int bias_bf16, void* y, int out_bf16, int64_t n, int64_t k, int64_t g) {
#pragma omp parallel
  neolm::gemm_int4(x, m, q, sz, bias, bias_bf16, y, out_bf16, n, k, g);
}

void neolm_int4_to_bf16(const uint8_t* q, const uint16_t* sz, uint16_t* out, int64_t r0, int64_t r1, int64_t k,
                        int64_t g) {
#pragma omp parallel
  neolm::int4_to_bf16(q, sz, out, r0, r1, k, g);
}
#endif

}  // extern "C"
