// One decode step of GPT-Neo / GPT-NeoX: one new token of each sequence of a batch through every block, in
// one call.
//
// At 125M-1.4B sizes a step written as torch ops costs ~120 op dispatches per layer (2-5 ms per step on
// top of streaming the weights); here a step is one call, one OpenMP parallel region, and about eight
// barriers per layer. The matmuls are the bodies declared in gemv.h, one-row for one sequence and few-row for
// a batch (every weight read once for all its rows); LayerNorm, rotary, attention over the KV cache (each
// sequence its own position and padding), the activation and the residuals are done here. Built and driven
// by neolm/native/decode.py, which fills the structs below from the model's tensors (they must match its
// ctypes mirrors field for field).
//
// Numbers follow the torch path: activations are stored in the model's dtype (fp32 or bf16) wherever the
// torch path stores a tensor (after each LayerNorm, matmul, attention, activation and residual), and each
// op computes in fp32 in between.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gemv.h"

namespace {

using namespace neolm;

struct Lin {  // a linear layer in one of gemv.cpp's formats
  int32_t kind;  // 0 f32, 1 bf16, 2 int8, 3 int4; against int8 activations: 4 int8 (int8a8.cpp), 5 int4 (int4a8.cpp);
                 // 6 int8 in fp32 arithmetic (int8f.cpp's panels); 7 int4 in fp16 arithmetic (int4h.cpp's panels);
                 // 8 int8 against activations in 16 bits (int8a8.cpp's layout and kernel)
  int32_t bias_bf16;
  int64_t n, k, g;  // out-features, in-features, int4 group size
  const void* w;  // weights: fp32 / bf16 (n, k), int8 codes (n, k), int4 codes in int4.cpp's layout
  const void* s;  // int8: bf16 scales (n,); int4: bf16 scales and zeros (n / 64, k / g, 2, 64)
  const void* bias;  // (n,) or null
  int64_t lora_r;  // LoRA adapters held unmerged (neolm.multilora): rows of A and B^T, 0: none
  const void* lora_a;  // (lora_r, k) in the model's dtype: the adapters' A's rows, stacked
  const void* lora_bt;  // (lora_r, n) in the model's dtype: their B's columns (scale included) as rows
  const int64_t* lora_owner;  // (lora_r,) the adapter each of those rows belongs to
};

struct Layer {
  const void *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // (c,) in the model's dtype
  Lin qkv, proj, fc, out;  // qkv's output is laid out per head: [heads, 3, d]
  int64_t window;  // local attention over the last `window` keys; 0: global
};

struct Model {
  int64_t n_layer, c, heads, d, f, rot;  // rot: rotary dims per head (0: none)
  int32_t act_bf16;  // the model's dtype: 1 bf16, 0 fp32
  int32_t parallel;  // 1: x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX); 0: sequential (GPT-Neo)
  int32_t act;  // 0 gelu (erf), 1 gelu (tanh approximation), 2 relu
  float eps, scale;  // LayerNorm epsilon, attention score scale
  const Layer* layers;
  int64_t lora_r;  // the most LoRA rows of any layer (0: none)
};

#ifdef NEOLM_AVX512

inline __m512 round_to(int bf16, __m512 v) {  // v as stored in the model's dtype
  return bf16 ? widen(to_bf16(v)) : v;
}

inline __m512 activation(int kind, __m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  if (kind == 2) return _mm512_max_ps(x, _mm512_setzero_ps());
  if (kind == 1) {  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), tanh u = sign(u) (1 - e) / (1 + e), e = e^-2|u|
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(u)));
    __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    t = _mm512_or_ps(t, _mm512_and_ps(u, _mm512_set1_ps(-0.0f)));  // sign of u
    return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
  }
  // 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as ATen's vectorised erf
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f));
  const __m512 a = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
  __m512 r = _mm512_set1_ps(1.061405429f);
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.453152027f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
  __m512 erf = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))), one);
  erf = _mm512_or_ps(erf, _mm512_and_ps(z, _mm512_set1_ps(-0.0f)));
  return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, erf));
}

// y = LayerNorm(x) * w + b over n values (two passes: mean, then variance).
void layer_norm(const void* x, const void* w, const void* b, void* y, int64_t n, float eps, int bf16) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) s = _mm512_add_ps(s, load(x, bf16, i, first(n - i)));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / n);
  __m512 v = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, load(x, bf16, i, m), mean);
    v = _mm512_fmadd_ps(d, d, v);
  }
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(v) / n + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    const __m512 normed = _mm512_mul_ps(_mm512_sub_ps(load(x, bf16, i, m), mean), rstd);
    put(y, bf16, i, _mm512_fmadd_ps(normed, load(w, bf16, i, m), load(b, bf16, i, m)), m);
  }
}

// y = a + b (+ c), each sum rounded to the model's dtype, in the torch path's order.
void add(const void* a, const void* b, const void* c, void* y, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    __m512 s = round_to(bf16, _mm512_add_ps(load(a, bf16, i, m), load(b, bf16, i, m)));
    if (c) s = _mm512_add_ps(s, load(c, bf16, i, m));
    put(y, bf16, i, s, m);
  }
}

// The input a matmul reads: f32, int8f, int4h, int8a8 (both forms) and int4a8 take fp32 x, bf16, int8 and int4 take bf16 x; `in` holds x
// in the model's dtype.
inline int wants_bf16(const Lin& l) { return l.kind == 1 || l.kind == 2 || l.kind == 3; }

const void* input(const Lin& l, const void* in, int bf16, float* xf, uint16_t* xb) {
  if (wants_bf16(l) == bf16) return in;
  return wants_bf16(l) ? static_cast<const void*>(xb) : static_cast<const void*>(xf);
}

void convert(const Lin& l, const void* in, int bf16, float* xf, uint16_t* xb, int64_t i0, int64_t i1) {
  if (wants_bf16(l) == bf16) return;
  for (int64_t i = i0; i < i1; i += 16) put(wants_bf16(l) ? static_cast<void*>(xb) : xf, !bf16, i, load(in, bf16, i, first(i1 - i)), first(i1 - i));
}

// y (rows, n) = x (rows, k) @ W^T + bias, inside the parallel region: W's rows split over the threads. work:
// int8a8's quantized rows (work_bytes: its 16-bit form's two rows of bytes a row included), int4h's rows in fp16.
void linear(const Lin& l, const void* x, void* y, int bf16, int64_t rows, uint8_t* work) {
#ifdef __AVX512VNNI__  // (neolm_features offers int8a8 with VNNI, bf16 or not)
  if (l.kind == 4 || l.kind == 8) {
    (l.kind == 4 ? gemm_int8a8 : gemm_int8a16)(static_cast<const float*>(x), rows, static_cast<const uint8_t*>(l.w),
                                               static_cast<const uint16_t*>(l.s), l.bias, l.bias_bf16, y, bf16, l.n, l.k, work);
    return;
  }
  if (l.kind == 5) {
    gemm_int4a8(static_cast<const float*>(x), rows, static_cast<const uint8_t*>(l.w), static_cast<const uint16_t*>(l.s),
                l.bias, l.bias_bf16, y, bf16, l.n, l.k, l.g, work);
    return;
  }
#endif
  if (l.kind == 6) {
    gemm_int8f(static_cast<const float*>(x), rows, static_cast<const int8_t*>(l.w), static_cast<const uint16_t*>(l.s),
               l.bias, l.bias_bf16, y, bf16, l.n, l.k);
    return;
  }
#if defined(__AVX512FP16__) && defined(__AVX512VBMI__)  // (neolm_features offers int4h with both)
  if (l.kind == 7) {
    gemm_int4h(static_cast<const float*>(x), rows, static_cast<const uint8_t*>(l.w), l.bias, l.bias_bf16, y, bf16, l.n,
               l.k, l.g, work);
    return;
  }
#endif
  if (rows > 1) {
    switch (l.kind) {
      case 0: gemm_f32(static_cast<const float*>(x), rows, static_cast<const float*>(l.w), l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
#ifdef __AVX512BF16__
      case 2: gemm_int8(static_cast<const uint16_t*>(x), rows, static_cast<const int8_t*>(l.w), static_cast<const uint16_t*>(l.s),
                        l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
      case 1: gemm_bf16(static_cast<const uint16_t*>(x), rows, static_cast<const uint16_t*>(l.w), l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
      case 3: gemm_int4(static_cast<const uint16_t*>(x), rows, static_cast<const uint8_t*>(l.w), static_cast<const uint16_t*>(l.s),
                        l.bias, l.bias_bf16, y, bf16, l.n, l.k, l.g); break;
#endif
    }
    return;
  }
  switch (l.kind) {
    case 0: gemv_f32(static_cast<const float*>(x), static_cast<const float*>(l.w), l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
#ifdef __AVX512BF16__
    case 2: gemv_int8(static_cast<const uint16_t*>(x), static_cast<const int8_t*>(l.w), static_cast<const uint16_t*>(l.s),
                      l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
    case 1: gemv_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(l.w), l.bias, l.bias_bf16, y, bf16, l.n, l.k); break;
    case 3: gemv_int4(static_cast<const uint16_t*>(x), static_cast<const uint8_t*>(l.w), static_cast<const uint16_t*>(l.s),
                      l.bias, l.bias_bf16, y, bf16, l.n, l.k, l.g); break;
#endif
  }
}

// y (rows, n) += (t @ B^T), t = x (rows, k) @ A^T over the rows of A and B^T of each row's adapter (adapters:
// (rows,), 0 for none): a LoRA update beside the layer's output, rounded as the torch path (neolm.multilora)
// rounds it: t and the update in the model's dtype, then their sum. Inside the parallel region; t: rows x lora_r.
void lora(const Lin& l, const void* x, void* y, int bf16, int64_t rows, const int64_t* adapters, float* t) {
  if (!adapters || l.lora_r == 0) return;
  const int64_t r = l.lora_r, k = l.k, n = l.n, es = bf16 ? 2 : 4;
  const char* a = static_cast<const char*>(l.lora_a);
  const char* bt = static_cast<const char*>(l.lora_bt);
#pragma omp for schedule(static)
  for (int64_t j = 0; j < rows * r; j++) {
    const int64_t i = j / r, row = j % r;
    float v = 0.0f;
    if (l.lora_owner[row] == adapters[i]) {
      const void* xi = static_cast<const char*>(x) + i * k * es;
      __m512 s = _mm512_setzero_ps();
      for (int64_t e = 0; e < k; e += 16) {
        const __mmask16 m = first(k - e);
        s = _mm512_fmadd_ps(load(xi, bf16, e, m), load(a + row * k * es, bf16, e, m), s);
      }
      v = _mm512_reduce_add_ps(s);
      if (bf16) v = bf16_to_float(float_to_bf16(v));
    }
    t[j] = v;
  }
  const int64_t blocks = (n + 255) / 256;
#pragma omp for schedule(static)
  for (int64_t j = 0; j < rows * blocks; j++) {
    const int64_t i = j / blocks, o0 = j % blocks * 256, o1 = std::min<int64_t>(o0 + 256, n);
    void* yi = static_cast<char*>(y) + i * n * es;
    for (int64_t o = o0; o < o1; o += 16) {
      const __mmask16 m = first(o1 - o);
      __m512 u = _mm512_setzero_ps();
      for (int64_t row = 0; row < r; row++)
        if (l.lora_owner[row] == adapters[i])
          u = _mm512_fmadd_ps(_mm512_set1_ps(t[i * r + row]), load(bt + row * n * es, bf16, o, m), u);
      put(yi, bf16, o, _mm512_add_ps(load(yi, bf16, o, m), round_to(bf16, u)), m);
    }
  }
}

// The sums of 16 vectors' lanes as one vector (lane j: p_j's sum), by a transposing tree: 15 adds and 30
// shuffles for 16 sums where a horizontal sum alone takes ~8 instructions. Per 128-bit lane:
// pair_sums(a, b) = [a0+a2, b0+b2, a1+a3, b1+b3]; quad_sums of two pairs = the lane's sums of 4 vectors;
// half_sums(u, v) folds 128-bit lanes: [u01, u23, v01, v23].
inline __m512 pair_sums(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); }
inline __m512 quad_sums(__m512 s, __m512 t) {
  const __m512d a = _mm512_castps_pd(s), b = _mm512_castps_pd(t);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}
inline __m512 half_sums(__m512 u, __m512 v) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xdd));
}

// The KV cache's formats: a key or value row is d numbers in fp32, bf16, or int8 codes (with a scale per row,
// kept beside the cache: the row is codes x scale).
enum Kv { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 };
constexpr int64_t kv_bytes(int kind) { return kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1; }

// 16 numbers from dim i of a cached row (masked lanes 0); int8: the codes, unscaled.
template <int KIND>
inline __m512 load_kv(const char* row, int64_t i, __mmask16 m) {
  if constexpr (KIND == KV_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row + i)));
  else return load(row, KIND == KV_BF16, i, m);
}

// q . key j for the 16 keys from `keys` (rows of d in the cache's format; int8: unscaled), 0 past the first n.
template <int KIND>
inline __m512 dot16(const float* q, const char* keys, int64_t d, int64_t n) {
  const int64_t row = d * kv_bytes(KIND);
  const auto dot = [&](int64_t j) {
    __m512 acc = _mm512_setzero_ps();
    if (j < n)
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 mk = first(d - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + i), load_kv<KIND>(keys + j * row, i, mk), acc);
      }
    return acc;
  };
  const __m512 a = quad_sums(pair_sums(dot(0), dot(1)), pair_sums(dot(2), dot(3)));
  const __m512 b = quad_sums(pair_sums(dot(4), dot(5)), pair_sums(dot(6), dot(7)));
  const __m512 c = quad_sums(pair_sums(dot(8), dot(9)), pair_sums(dot(10), dot(11)));
  const __m512 e = quad_sums(pair_sums(dot(12), dot(13)), pair_sums(dot(14), dot(15)));
  return half_sums(half_sums(a, b), half_sums(c, e));
}

// out[0 .. 16 NV) = inv * sum_j p[j] v_j over `count` rows of values (in the cache's format; int8: p already
// holds each row's scale; stride d, from this block's first dim; the last vector masked to `tail` dims), stored
// as out_bf16 says. Two keys a pass, 2 NV accumulators.
template <int KIND, int NV>
void weighted_sum(const float* p, const char* values, int64_t d, int64_t count, __mmask16 tail, float inv, void* out,
                  int out_bf16) {
  const int64_t row = d * kv_bytes(KIND);
  __m512 a[NV], b[NV];
#pragma GCC unroll 8
  for (int r = 0; r < NV; r++) a[r] = b[r] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    const char *v0 = values + j * row, *v1 = v0 + row;
#pragma GCC unroll 8
    for (int r = 0; r < NV; r++) {
      const __mmask16 mk = r == NV - 1 ? tail : __mmask16(0xffff);
      a[r] = _mm512_fmadd_ps(p0, load_kv<KIND>(v0, 16 * r, mk), a[r]);
      b[r] = _mm512_fmadd_ps(p1, load_kv<KIND>(v1, 16 * r, mk), b[r]);
    }
  }
  if (j < count) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
#pragma GCC unroll 8
    for (int r = 0; r < NV; r++) a[r] = _mm512_fmadd_ps(p0, load_kv<KIND>(values + j * row, 16 * r, r == NV - 1 ? tail : __mmask16(0xffff)), a[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < NV; r++) put(out, out_bf16, 16 * r, _mm512_mul_ps(_mm512_add_ps(a[r], b[r]), _mm512_set1_ps(inv)), r == NV - 1 ? tail : __mmask16(0xffff));
}

// d numbers (fp32, in `x`) into the cache's row: as they are (fp32), rounded to bf16, or int8 codes and a scale:
// scale = max |x| / 127 (times the fp32 number nearest 1/127), codes = x / scale rounded to nearest even (0 where
// x is all 0), as neolm/model.py's quantize_kv.
template <int KIND>
void put_kv(const float* x, int64_t d, char* row, float* scale) {
  if constexpr (KIND == KV_INT8) {
    const float s = abs_max(x, d) * (1.0f / 127.0f);
    *scale = s;
    const __m512 by = _mm512_set1_ps(std::max(s, std::numeric_limits<float>::min()));
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mk = first(d - i);
      const __m512i codes = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + i), by));  // (nearest even)
      _mm_mask_storeu_epi8(row + i, mk, _mm512_cvtsepi32_epi8(codes));
    }
  } else {
    for (int64_t i = 0; i < d; i += 16) put(row, KIND == KV_BF16, i, _mm512_maskz_loadu_ps(first(d - i), x + i), first(d - i));
  }
}

// One head of one sequence: rotate q and k, append k and v to the cache at slot `pos`, attend over the cached
// keys that `valid` (max_len flags, or null: all) marks, and the token's own. qkv: this token's [heads, 3, d];
// kc, vc: the sequence's cache of this layer (heads, max_len, d) in the format KIND, whatever the model's dtype
// (k and v are rounded to it first, as the torch path's cache write rounds them); ks, vs: int8's scales of
// those rows (heads, max_len), else unused; att: (heads, d). q, k, v, scores: this thread's scratch.
template <int KIND>
void attend(const Model& m, const Layer& layer, int64_t h, const void* qkv, char* kc, char* vc, float* ks, float* vs,
            int64_t pos, int64_t max_len, const uint8_t* valid, const float* cos, const float* sin, void* att, float* q,
            float* k, float* v, float* scores) {
  const int bf16 = m.act_bf16;
  const int64_t d = m.d, half = m.rot / 2, es = kv_bytes(KIND);  // es: bytes of a cached number
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 mk = first(d - i);
    _mm512_mask_storeu_ps(q + i, mk, load(qkv, bf16, h * 3 * d + i, mk));
    _mm512_mask_storeu_ps(k + i, mk, load(qkv, bf16, h * 3 * d + d + i, mk));
    _mm512_mask_storeu_ps(v + i, mk, load(qkv, bf16, h * 3 * d + 2 * d + i, mk));
  }
  for (int64_t i = 0; i < half; i++) {  // rotate-half on the first `rot` dims
    const float q1 = q[i], q2 = q[i + half], k1 = k[i], k2 = k[i + half];
    q[i] = q1 * cos[i] - q2 * sin[i], q[i + half] = q2 * cos[i + half] + q1 * sin[i + half];
    k[i] = k1 * cos[i] - k2 * sin[i], k[i + half] = k2 * cos[i + half] + k1 * sin[i + half];
  }
  for (int64_t i = 0; i < d; i += 16) {  // q and k as the model's dtype stores them
    const __mmask16 mk = first(d - i);
    _mm512_mask_storeu_ps(q + i, mk, round_to(bf16, _mm512_maskz_loadu_ps(mk, q + i)));
    _mm512_mask_storeu_ps(k + i, mk, round_to(bf16, _mm512_maskz_loadu_ps(mk, k + i)));
  }
  const bool scaled = KIND == KV_INT8;
  put_kv<KIND>(k, d, kc + (h * max_len + pos) * d * es, scaled ? ks + h * max_len + pos : nullptr);
  put_kv<KIND>(v, d, vc + (h * max_len + pos) * d * es, scaled ? vs + h * max_len + pos : nullptr);

  const int64_t lo = layer.window && pos + 1 > layer.window ? pos + 1 - layer.window : 0, count = pos + 1 - lo;
  const char* keys = kc + (h * max_len + lo) * d * es;
  const char* values = vc + (h * max_len + lo) * d * es;
  const float* key_scales = scaled ? ks + h * max_len + lo : nullptr;
  const float* value_scales = scaled ? vs + h * max_len + lo : nullptr;
  __m512 top = _mm512_set1_ps(-INFINITY);
  const int64_t block = 16 * d * es;  // bytes of 16 keys (or values)
  for (int64_t j = 0; j < count; j += 16) {  // scores[j] = scale q . key j, -inf at padding slots
    // A head's keys and values are short streams (a few KiB): the next block of keys and this block of
    // values are asked for a block ahead of their use. bf16 caches, pythia-160m's shapes at 8 rows: steps
    // 7-15% faster at 96-288 tokens; int8 caches: 2-13% faster; fp32 caches: 0.96-1.06x, not taken
    for (int64_t b = 0; KIND != KV_F32 && b < std::min<int64_t>(block, (count - j) * d * es); b += 64) {
      prefetch(keys + j * d * es + b, block);
      prefetch(values + j * d * es + b, 0);
    }
    __mmask16 seen = first(count - j);
    if (valid) {
      const __m128i flags = _mm_maskz_loadu_epi8(seen, valid + lo + j);
      seen = _mm_test_epi8_mask(flags, flags);
      if (pos - lo - j < 16) seen |= static_cast<__mmask16>(1u << (pos - lo - j));  // the token's own slot
    }
    __m512 s = _mm512_mul_ps(dot16<KIND>(q, keys + j * d * es, d, count - j), _mm512_set1_ps(m.scale));
    if constexpr (KIND == KV_INT8) s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(first(count - j), key_scales + j));
    _mm512_storeu_ps(scores + j, _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen, s));
    top = _mm512_mask_max_ps(top, seen, top, s);
  }
  const __m512 highest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += 16) {  // scores[j] = e^(score - highest) (int8: times value j's scale)
    const __mmask16 mk = first(count - j);
    const __m512 score = _mm512_maskz_loadu_ps(mk, scores + j);
    const __mmask16 seen = _mm512_mask_cmp_ps_mask(mk, score, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(score, highest)));
    total = _mm512_add_ps(total, e);
    _mm512_mask_storeu_ps(scores + j, mk, KIND == KV_INT8 ? _mm512_mul_ps(e, _mm512_maskz_loadu_ps(mk, value_scales + j)) : e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(total);
  static void (*const weighted[])(const float*, const char*, int64_t, int64_t, __mmask16, float, void*, int) = {
      weighted_sum<KIND, 1>, weighted_sum<KIND, 2>, weighted_sum<KIND, 3>, weighted_sum<KIND, 4>,
      weighted_sum<KIND, 5>, weighted_sum<KIND, 6>, weighted_sum<KIND, 7>, weighted_sum<KIND, 8>};
  for (int64_t e0 = 0; e0 < d; e0 += 128) {  // 128 dims at a time: 16 accumulators
    const int64_t nv = std::min<int64_t>(8, (d - e0 + 15) / 16);
    weighted[nv - 1](scores, values + e0 * es, d, count, first(d - e0 - 16 * (nv - 1)), inv,
                     static_cast<char*>(att) + (h * d + e0) * (bf16 ? 2 : 4), bf16);
  }
}

#endif  // NEOLM_AVX512

}  // namespace

extern "C" {

// Bytes of scratch memory neolm_decode_step needs for this model and `rows` sequences.
int64_t neolm_decode_scratch_bytes(const Model* m, int64_t rows) {
  const int64_t es = m->act_bf16 ? 2 : 4, wide = m->f > m->c ? m->f : m->c;
  return rows * ((7 * m->c + m->f) * es + wide * 6 + m->lora_r * 4) + 64 + work_bytes(rows, wide) + 64;  // (64: alignment)
}

#ifdef NEOLM_AVX512
// x (rows, c) in the model's dtype: each sequence's new token's embedding in, the last block's output out.
// pos: the cache slot the tokens fill (the cache holds pos tokens before them); positions (rows,): their
// position ids, rows of the rotary tables cos, sin (n_positions, m.rot), fp32; unused without rotary.
// valid: (rows, valid_stride) flags, 0 at padding slots no token may attend to, or null (none).
// cache_k, cache_v: (n_layer, rows, heads, max_len, d) in the format kv_kind (enum Kv: fp32, bf16, int8);
// int8: scale_k, scale_v (n_layer, rows, heads, max_len) fp32, the rows' scales (else null).
// adapters: (rows,) the LoRA adapter each row uses (0: none), or null when none does.
void neolm_decode_step(const Model* m, int64_t rows, void* x, int64_t pos, const int64_t* positions, const float* cos,
                       const float* sin, const uint8_t* valid, int64_t valid_stride, void* cache_k, void* cache_v,
                       float* scale_k, float* scale_v, int kv_kind, int64_t max_len, const int64_t* adapters,
                       void* scratch) {
  const int bf16 = m->act_bf16;
  const int64_t c = m->c, f = m->f, es = bf16 ? 2 : 4, wide = f > c ? f : c;
  char* p = static_cast<char*>(scratch);  // each buffer holds `rows` rows
  void* h = p;            p += rows * c * es;      // LayerNorm output
  void* qkv = p;          p += rows * 3 * c * es;  // [heads, 3, d] per row
  void* att = p;          p += rows * c * es;      // attention output, [heads, d] per row
  void* a = p;            p += rows * c * es;      // attention block output
  void* ff = p;           p += rows * f * es;      // MLP hidden
  void* mo = p;           p += rows * c * es;      // MLP output
  float* xf = reinterpret_cast<float*>(p);  p += rows * wide * 4;  // a matmul's input in the other dtype
  uint16_t* xb = reinterpret_cast<uint16_t*>(p);  p += rows * wide * 2;
  float* lt = reinterpret_cast<float*>(p);  p += rows * m->lora_r * 4;  // LoRA's x @ A^T
  uint8_t* work = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));  // int8a8's
  const int64_t seq_bytes = m->heads * max_len * m->d * kv_bytes(kv_kind);  // one sequence's cache of one layer
  const auto row = [es](void* base, int64_t i, int64_t width) { return static_cast<char*>(base) + i * width * es; };
#pragma omp parallel
  {
    std::vector<float> q(m->d), k(m->d), v(m->d), scores(pos + 16);  // (scores: whole vectors)
    static void (*const attends[])(const Model&, const Layer&, int64_t, const void*, char*, char*, float*, float*, int64_t,
                                   int64_t, const uint8_t*, const float*, const float*, void*, float*, float*, float*,
                                   float*) = {attend<KV_F32>, attend<KV_BF16>, attend<KV_INT8>};
    for (int64_t l = 0; l < m->n_layer; l++) {
      const Layer& L = m->layers[l];
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; i++) {  // (each row converted for the matmul where it wants the other dtype
        layer_norm(row(x, i, c), L.ln1_w, L.ln1_b, row(h, i, c), c, m->eps, bf16);  // here, in the loop's barrier)
        convert(L.qkv, h, bf16, xf, xb, i * c, (i + 1) * c);
      }
      linear(L.qkv, input(L.qkv, h, bf16, xf, xb), qkv, bf16, rows, work);
      lora(L.qkv, h, qkv, bf16, rows, adapters, lt);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < rows * m->heads; t++) {
        const int64_t i = t / m->heads, head = t % m->heads;
        char* kc = static_cast<char*>(cache_k) + (l * rows + i) * seq_bytes;
        char* vc = static_cast<char*>(cache_v) + (l * rows + i) * seq_bytes;
        const int64_t scales = (l * rows + i) * m->heads * max_len;  // this sequence's rows' scales (int8)
        const float* cs = cos ? cos + positions[i] * m->rot : nullptr;
        const float* sn = sin ? sin + positions[i] * m->rot : nullptr;
        attends[kv_kind](*m, L, head, row(qkv, i, 3 * c), kc, vc, scale_k ? scale_k + scales : nullptr,
                         scale_v ? scale_v + scales : nullptr, pos, max_len, valid ? valid + i * valid_stride : nullptr, cs,
                         sn, row(att, i, c), q.data(), k.data(), v.data(), scores.data());
        convert(L.proj, att, bf16, xf, xb, i * c + head * m->d, i * c + (head + 1) * m->d);
      }
      linear(L.proj, input(L.proj, att, bf16, xf, xb), a, bf16, rows, work);
      lora(L.proj, att, a, bf16, rows, adapters, lt);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; i++) {
        if (!m->parallel) add(row(x, i, c), row(a, i, c), nullptr, row(x, i, c), c, bf16);  // GPT-Neo: x + attn, then the MLP on it
        layer_norm(row(x, i, c), L.ln2_w, L.ln2_b, row(h, i, c), c, m->eps, bf16);
        convert(L.fc, h, bf16, xf, xb, i * c, (i + 1) * c);
      }
      linear(L.fc, input(L.fc, h, bf16, xf, xb), ff, bf16, rows, work);
      lora(L.fc, h, ff, bf16, rows, adapters, lt);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows * f; i += 256) {
        const int64_t end = i + 256 < rows * f ? i + 256 : rows * f;
        for (int64_t j = i; j < end; j += 16) put(ff, bf16, j, activation(m->act, load(ff, bf16, j, first(end - j))), first(end - j));
        convert(L.out, ff, bf16, xf, xb, i, end);
      }
      linear(L.out, input(L.out, ff, bf16, xf, xb), mo, bf16, rows, work);
      lora(L.out, ff, mo, bf16, rows, adapters, lt);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; i++) {
        if (m->parallel)
          add(row(mo, i, c), row(a, i, c), row(x, i, c), row(x, i, c), c, bf16);  // GPT-NeoX: (mlp + attn) + x
        else
          add(row(x, i, c), row(mo, i, c), nullptr, row(x, i, c), c, bf16);
      }
    }
  }
}
#endif  // NEOLM_AVX512

}  // extern "C"
