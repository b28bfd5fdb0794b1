// One-row matmuls (GEMV) for CPU decoding: y (N) = W (N, K) @ x (K) [+ bias], AVX-512.
//
// Built by neolm/native/__init__.py with the machine's C++ compiler (-O3 -march=native -fopenmp) on first
// use and called through ctypes. OpenMP here is the runtime torch already loaded (same soname), so these
// loops share torch's thread pool. Each thread takes a contiguous range of rows, a few rows at a time,
// sharing every load of x among them; the weights stream once from memory. The bodies (namespace neolm,
// declared in gemv.h) split rows with an orphaned `omp for`, so that decode.cpp runs them inside its own
// parallel region; the exported neolm_gemv_* open a region around them.
//
// Kernels, by weight format (x, y and bias pointers are contiguous; `out_bf16` selects bf16 or fp32 y):
//   f32   W fp32,                x fp32, fp32 FMA.
//   bf16  W bf16,                x bf16, vdpbf16ps (bf16 pairs, fp32 accumulation).
//   int8  W int8 (N, K), scale bf16 (N,): y = scale * (W @ x); x bf16, each code split into two bf16
//         numbers by bit operations (exact products), vdpbf16ps; gemm.cpp's gemv_int8 has the arithmetic.
//   The bodies of f32 and bf16 are gemm.cpp's few-row kernels with one row (R x TILE = 4 x 4): as fast at one
//   row as bodies of their own, and a row gets the same numbers alone or in a batch. int8's one-row kernel is
//   its own (twice the speed of the few-row kernel's conversion at one row); its sums round differently.
//   int4  codes q in [0, 15] with per-group scales and offsets, in a layout of their own: int4.cpp (its
//         one-row kernel is its few-row kernel with one row, too).
// neolm_features() says which kernels this build has (bit 0 f32, 1 bf16, 2 int8, 3 int4, 4 int8a8, 5 int4a8 and
// 8 int8a16: int8a8.cpp's int8 x int8 and int8 x 16 bits, int4a8.cpp's int4 x int8, AVX-512 VNNI; 6 int8f:
// int8f.cpp's int8 in fp32; 7 int4h: int4h.cpp's int4 in fp16, AVX512-FP16 and VBMI): none without AVX-512 (the
// Python side then keeps torch's kernels).

#include <cmath>

#include "gemv.h"

// The exported kernels: one parallel region around a body.
extern "C" {

int neolm_features() {
  int f = 0;
#ifdef NEOLM_AVX512
  f |= 1 | 64;
#ifdef __AVX512BF16__
  f |= 2 | 4 | 8;
#endif
#ifdef __AVX512VNNI__
  f |= 16 | 32 | 256;
#endif
#if defined(__AVX512FP16__) && defined(__AVX512VBMI__)
  f |= 128;
#endif
#endif
  return f;
}

#ifdef NEOLM_AVX512
// out[r] = the index of row r's largest number (rows x n fp32), as torch.argmax: the first one of equal maxima,
// the first NaN where there is one. Greedy decoding's pick from the logits (torch's argmax: ~90 us a 50k row).
void neolm_argmax(const float* x, int64_t rows, int64_t n, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float* row = x + r * n;
    __m512 best = _mm512_set1_ps(-INFINITY);  // per lane: its largest number and where it first came
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), lane = at;
    int64_t nan = -1;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = neolm::first(n - j);
      const __m512 v = _mm512_maskz_loadu_ps(m, row + j);
      const __mmask16 unordered = _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
      if (unordered) {
        nan = j + __builtin_ctz(unordered);
        break;
      }
      const __mmask16 higher = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, higher, v);
      at = _mm512_mask_mov_epi32(at, higher, _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j))));
    }
    if (nan >= 0) {
      out[r] = nan;
      continue;
    }
    const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
    out[r] = _mm512_mask_reduce_min_epi32(top, at);
  }
}

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

#endif  // __AVX512BF16__
#endif  // NEOLM_AVX512

}  // extern "C"
