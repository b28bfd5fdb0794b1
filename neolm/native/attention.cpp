// Attention of a prompt's queries (prefill) over their keys, for CPU inference: what
// F.scaled_dot_product_attention computes, written for the shapes of these models (head dims 64-256, a few
// thousand keys at most). torch's fused CPU kernel for it runs at ~50 G multiply-adds/s on an AVX-512 EPYC, a
// quarter of what a plain fp32 matmul reaches there, and it took ~22% of a 512-token prefill of a 160M model
// (bench/PROFILE.md). Built and driven by neolm/native/attention.py.
//
// y[b, i, h] = sum_j p_ij v[b, h, j] with p_i = softmax_j(scale q[b, h, i] . k[b, h, j]) over the keys j that
// query i may see: mask[b, i, j] != 0, or, without a mask, j <= S - T + i (causal, the queries being the last
// T of the S slots). Per (sequence, head) and block of QB queries:
//   1. scores of the block against the keys its queries see (a range [lo, hi) found once per block from the
//      mask): keys transposed once per head (d-major), so that one FMA takes 16 keys of one query;
//   2. softmax of each row in fp32 (masked keys get 0);
//   3. the probabilities times the values: 4 queries x 64 dims a pass over 64 keys.
// Everything computes in fp32; bf16 q, k, v are widened (exact) and y is rounded to bf16 at the end.

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemv.h"

#ifdef NEOLM_AVX512

namespace {

using namespace neolm;

constexpr int QB = 8;   // queries per block: the score kernel's QB x 32 tile (16 accumulators)
constexpr int KV = 32;  // keys per step of the score kernel
constexpr int64_t KEYS = 64;  // keys per pass of the value kernel (their values, 32 KB at head dim 128, stay in L1
// for the 2 x 2 passes of a block's queries and dims)

struct Tensor4 {  // (B, H, N, D) with D contiguous: element strides of b, h and n
  const void* p;
  int64_t sb, sh, sn;
};

inline int64_t offset(const Tensor4& t, int64_t b, int64_t h, int64_t n) { return b * t.sb + h * t.sh + n * t.sn; }

// Does query i see key j?
struct Visible {
  const uint8_t* mask;  // (B or 1, T, S) rows of 0/1 bytes, or null: causal
  int64_t mb, mt, shift;  // mask strides of b and i; shift = S - T (causal: i sees j <= i + shift)
  const uint8_t* row(int64_t b, int64_t i) const { return mask + b * mb + i * mt; }
  // lanes of keys j0 .. j0 + 15 that query i sees (among the first `count`)
  __mmask16 lanes(int64_t b, int64_t i, int64_t j0, int64_t count) const {
    const __mmask16 m = first(count);
    if (!mask) {
      const int64_t last = i + shift - j0;  // lanes 0 .. last
      return last < 0 ? 0 : last >= 15 ? m : static_cast<__mmask16>(m & ((1u << (last + 1)) - 1u));
    }
    const __m128i bytes = _mm_maskz_loadu_epi8(m, row(b, i) + j0);
    return _mm_test_epi8_mask(bytes, bytes);
  }
};

// [lo, hi): the keys some query of rows [i0, i1) sees (hi <= lo: none).
void key_range(const Visible& vis, int64_t b, int64_t i0, int64_t i1, int64_t s, int64_t& lo, int64_t& hi) {
  if (!vis.mask) {
    lo = 0, hi = std::min(s, i1 - 1 + vis.shift + 1);
    return;
  }
  lo = s, hi = 0;
  for (int64_t i = i0; i < i1; i++) {
    const uint8_t* r = vis.row(b, i);
    int64_t a = 0, e = s;
    while (a < e && !r[a]) a++;
    while (e > a && !r[e - 1]) e--;
    if (a < e) lo = std::min(lo, a), hi = std::max(hi, e);
  }
}

// Scores of QB queries (qf: QB x d fp32, zero rows past the block) against keys [j0, j1), multiples of KV:
// sc[r * sp + j] = scale * qf[r] . key j, from the key table kt: blocks of KV keys, each d x KV (d-major).
void scores(const float* qf, const float* kt, int64_t d, int64_t sp, int64_t j0, int64_t j1, float scale, float* sc) {
  for (int64_t j = j0; j < j1; j += KV) {
    const float* block = kt + j * d;
    __m512 acc[QB][2];
#pragma GCC unroll 8
    for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; e++) {
      const __m512 k0 = _mm512_loadu_ps(block + e * KV), k1 = _mm512_loadu_ps(block + e * KV + 16);
#pragma GCC unroll 8
      for (int r = 0; r < QB; r++) {
        const __m512 q = _mm512_set1_ps(qf[r * d + e]);
        acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < QB; r++) {
      _mm512_storeu_ps(sc + r * sp + j, _mm512_mul_ps(acc[r][0], s));
      _mm512_storeu_ps(sc + r * sp + j + 16, _mm512_mul_ps(acc[r][1], s));
    }
  }
}

// Row `row` of sc over keys [lo, hi) -> e^(s - max) where visible, 0 elsewhere; returns 1 / their sum (0 when
// the query sees none of them).
float softmax_row(float* row, const Visible& vis, int64_t b, int64_t i, int64_t lo, int64_t hi) {
  float top = -INFINITY;
  for (int64_t j = lo; j < hi; j += 16) {
    const __mmask16 m = vis.lanes(b, i, j, hi - j);
    top = std::max(top, _mm512_mask_reduce_max_ps(m, _mm512_maskz_loadu_ps(m, row + j)));
  }
  if (top == -INFINITY) {
    for (int64_t j = lo; j < hi; j++) row[j] = 0.0f;
    return 0.0f;
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = lo; j < hi; j += 16) {
    const __mmask16 n = first(hi - j), m = vis.lanes(b, i, j, hi - j);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(n, row + j), _mm512_set1_ps(top))));
    _mm512_mask_storeu_ps(row + j, n, e);
    total = _mm512_add_ps(total, e);
  }
  return 1.0f / _mm512_reduce_add_ps(total);
}

// Rows [r0, r0 + count) of y (count <= QT, each ystep bytes after the last): sum_j p[r][j] v[j] over [lo, hi),
// NV vectors of 16 dims from dim e0 (the last one masked by `tail`), times inv[r]. QT x NV accumulators. A pass
// over some of the keys: the sums start from zero (`begin`) or from part's rows (pstep floats apart), and go to
// y (`end`) or back to part.
template <int QT, int NV>
void weigh(const float* sc, int64_t sp, int64_t r0, int64_t count, const float* vf, int64_t vs, int64_t lo, int64_t hi,
           int64_t e0, __mmask16 tail, const float* inv, char* y, int64_t ystep, int bf16, float* part, int64_t pstep,
           bool begin, bool end) {
  __m512 acc[QT][NV];
  const float* p[QT];
#pragma GCC unroll 4
  for (int r = 0; r < QT; r++) {
    p[r] = sc + (r0 + std::min<int64_t>(r, count - 1)) * sp;  // rows past count repeat the last, discarded
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++)
      acc[r][v] = begin ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (r0 + r) * pstep + e0 + 16 * v);
  }
  for (int64_t j = lo; j < hi; j++) {
    __m512 a[QT];
#pragma GCC unroll 4
    for (int r = 0; r < QT; r++) a[r] = _mm512_set1_ps(p[r][j]);
    const float* row = vf + j * vs + e0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++) {
      const __m512 x = _mm512_maskz_loadu_ps(v == NV - 1 ? tail : __mmask16(0xffff), row + 16 * v);
#pragma GCC unroll 4
      for (int r = 0; r < QT; r++) acc[r][v] = _mm512_fmadd_ps(a[r], x, acc[r][v]);
    }
  }
  if (!end) {
#pragma GCC unroll 4
    for (int r = 0; r < QT; r++)
#pragma GCC unroll 8
      for (int v = 0; v < NV; v++) _mm512_storeu_ps(part + (r0 + r) * pstep + e0 + 16 * v, acc[r][v]);
    return;
  }
#pragma GCC unroll 4
  for (int r = 0; r < QT; r++)  // (constant bounds keep acc in registers)
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++)
      if (r < count)
        put(y + r * ystep, bf16, e0 + 16 * v, _mm512_mul_ps(acc[r][v], _mm512_set1_ps(inv[r0 + r])),
            v == NV - 1 ? tail : __mmask16(0xffff));
}

using Weigh = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, __mmask16,
                       const float*, char*, int64_t, int, float*, int64_t, bool, bool);
constexpr int DIMS = 64;  // dims of a pass: 4 queries x 4 vectors of 16 (1.3x the speed of 2 queries x 8 vectors at
// head dim 128; with KEYS and the values copied, 1.47x)
constexpr Weigh WEIGH[4] = {weigh<4, 1>, weigh<4, 2>, weigh<4, 3>, weigh<4, 4>};  // by vectors in the pass

}  // namespace

extern "C" {

// q (B, H, T, D), k and v (B, H, S, D), strides in elements {b, h, n} (D contiguous), all fp32 or all bf16;
// y (B, T, H, D) contiguous, same dtype. mask: (B or 1, T, S) bytes (strides mb, mt; S contiguous), or null
// for causal attention of the last T slots.
void neolm_attention(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                     void* y, int bf16, int64_t batch, int64_t heads, int64_t t, int64_t s, int64_t d,
                     const uint8_t* mask, int64_t mb, int64_t mt, float scale) {
  const Tensor4 Q{q, qs[0], qs[1], qs[2]}, K{k, ks[0], ks[1], ks[2]}, V{v, vs[0], vs[1], vs[2]};
  const Visible vis{mask, mb, mt, s - t};
  const int64_t blocks = (t + QB - 1) / QB, sp = (s + KV - 1) / KV * KV, es = bf16 ? 2 : 4;
  std::vector<int64_t> range(2 * batch * blocks);  // [lo, hi) of each sequence's query blocks
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < batch * blocks; u++) {
    const int64_t b = u / blocks, i0 = u % blocks * QB;
    key_range(vis, b, i0, std::min(t, i0 + QB), s, range[2 * u], range[2 * u + 1]);
  }
  // the values in fp32, contiguous where read more than once per block of queries (a fused qkv's rows of one head
  // lie 3 x heads x d apart): 1.1x the speed at head dim 128, 0.96x at 64
  const bool copy = bf16 || d > DIMS;
  const int64_t pstep = (d + DIMS - 1) / DIMS * DIMS;
#pragma omp parallel
  {
    std::vector<float> kt(d * sp), vf(copy ? s * d : 0), qf(QB * d), part(QB * pstep), sc(QB * sp), inv(QB);
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
      const int64_t b = bh / heads, h = bh % heads;
      const char* kb = static_cast<const char*>(K.p) + offset(K, b, h, 0) * es;
      for (int64_t j = 0; j < sp; j++) {  // the key table (see scores); zero keys pad to sp
        float* column = kt.data() + j / KV * d * KV + j % KV;
        const char* key = kb + j * K.sn * es;
        for (int64_t e = 0; e < d; e++)
          column[e * KV] = j >= s ? 0.0f
                           : bf16 ? bf16_to_float(reinterpret_cast<const uint16_t*>(key)[e])
                                  : reinterpret_cast<const float*>(key)[e];
      }
      const float* values = copy ? vf.data() : static_cast<const float*>(V.p) + offset(V, b, h, 0);
      const int64_t vstride = copy ? d : V.sn;
      for (int64_t j = 0; j < (copy ? s : 0); j++)
        for (int64_t e = 0; e < d; e += 16)
          _mm512_mask_storeu_ps(vf.data() + j * d + e, first(d - e),
                                load(static_cast<const char*>(V.p) + (offset(V, b, h, j) * es), bf16, e, first(d - e)));
      for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t i0 = blk * QB, n = std::min<int64_t>(QB, t - i0);
        const int64_t lo = range[2 * (b * blocks + blk)], hi = range[2 * (b * blocks + blk) + 1];
        char* yb = static_cast<char*>(y) + ((b * t + i0) * heads + h) * d * es;  // y[b, i0, h]
        const int64_t ystep = heads * d * es;  // next query
        if (hi <= lo) {  // no query of the block sees a key: zeros
          for (int64_t r = 0; r < n; r++) std::memset(yb + r * ystep, 0, d * es);
          continue;
        }
        for (int64_t r = 0; r < QB; r++)
          for (int64_t e = 0; e < d; e += 16)
            _mm512_mask_storeu_ps(qf.data() + r * d + e, first(d - e),
                                  r < n ? load(static_cast<const char*>(Q.p) + offset(Q, b, h, i0 + r) * es, bf16, e, first(d - e))
                                        : _mm512_setzero_ps());
        for (int64_t r = i0 + QB; r < std::min(t, i0 + 2 * QB); r++)  // the next block's queries (strided rows)
          for (int64_t e = 0; e < d * es; e += 64) prefetch(static_cast<const char*>(Q.p) + offset(Q, b, h, r) * es + e, 0);
        const int64_t j0 = lo / KV * KV;
        scores(qf.data(), kt.data(), d, sp, j0, (hi + KV - 1) / KV * KV, scale, sc.data());
        for (int64_t r = 0; r < n; r++) inv[r] = softmax_row(sc.data() + r * sp, vis, b, i0 + r, lo, hi);
        const int64_t keys = copy ? KEYS : hi - lo;  // (one pass of the dims: all keys at once)
        for (int64_t j = lo; j < hi; j += keys)
          for (int64_t e0 = 0; e0 < d; e0 += DIMS) {
            const int64_t vecs = std::min<int64_t>(DIMS / 16, (d - e0 + 15) / 16);
            const __mmask16 tail = first(d - e0 - 16 * (vecs - 1));
            for (int64_t r = 0; r < n; r += 4)
              WEIGH[vecs - 1](sc.data(), sp, r, std::min<int64_t>(4, n - r), values, vstride, j, std::min(hi, j + keys), e0,
                              tail, inv.data(), yb + r * ystep, ystep, bf16, part.data(), pstep, j == lo, j + keys >= hi);
          }
      }
    }
  }
}

// The rotary embedding of q and k in place, for CPU inference (torch's elementwise ops on their strided
// rows took 2% of a 512-token prefill): x, n tensors (q, k: n = 2) of (B, H, T, D) rows, element strides
// xs {tensor, b, h, t}; row i of sequence b rotates its first `dims` dims by cos, sin (B, T, dims), x's dtype:
// a <- a c - b s, b <- b c + a s for the pairs (a, b) = (dim e, dim e + dims / 2). The same roundings as
// neolm.model.apply_rotary: each product rounded to x's dtype, then their sum.
void neolm_rotary(void* x, const int64_t* xs, int bf16, int64_t n, int64_t batch, int64_t heads, int64_t t, int64_t dims,
                  const void* cos, const void* sin) {
  const int64_t half = dims / 2, es = bf16 ? 2 : 4;
  const auto rounded = [bf16](__m512 v) { return bf16 ? widen(to_bf16(v)) : v; };
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t w = 0; w < n; w++)
    for (int64_t b = 0; b < batch; b++)
      for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < t; i++) {
          char* row = static_cast<char*>(x) + (w * xs[0] + b * xs[1] + h * xs[2] + i * xs[3]) * es;
          const int64_t at = (b * t + i) * dims * es;
          const char *c = static_cast<const char*>(cos) + at, *s = static_cast<const char*>(sin) + at;
          for (int64_t e = 0; e < half; e += 16) {
            const __mmask16 m = first(half - e);
            const __m512 lo = load(row, bf16, e, m), hi = load(row, bf16, e + half, m);
            const __m512 ce = load(c, bf16, e, m), se = load(s, bf16, e, m);
            put(row, bf16, e, _mm512_sub_ps(rounded(_mm512_mul_ps(lo, ce)), rounded(_mm512_mul_ps(hi, se))), m);
            put(row, bf16, e + half, _mm512_add_ps(rounded(_mm512_mul_ps(hi, ce)), rounded(_mm512_mul_ps(lo, se))), m);
          }
        }
}

}  // extern "C"

#endif  // NEOLM_AVX512
