// 4-bit and 8-bit weight x few-row activation products for x86 CPUs with AVX-512 VNNI
// (qwenlm.quant.cpu_kernel): int4_gemv, int8_gemv; and batch- and prompt-sized products in int8, through an own
// loop for a few rows and PyTorch's int8 matrix product for more (int8_matmul, with int4 weights rounded to int8
// rows by int4_to_int8; at the end); and the rounding of fp32 weights to 4-bit codes while loading (fit_groups,
// last).
//
// int4 weights: Int4Linear's own layout, (N, K/2) bytes, weight 2i of a row in the low nibble of byte i, 2i+1 in
// the high one; per group of 32 weights a bf16 scale s and zero z, w = (q - 8) * s + z, passed as (N, G, 2).
// Activations are split per block of 32 into two int8 parts, x = d (xq + xr / 256) with d = max|x| / 127
// (xq as llama.cpp's Q8 blocks, xr the rounding residual: ~15 bits in all, so the activations lose about
// what bf16 loses), and a group's sum  sum_j x_j (q_j s + z - 8 s)  becomes
// s d / 256 (256 q.xq + q.xr)  +  (z - 8 s) sum_j x_j : the dot products are 64 byte products per VNNI
// instruction, the second term uses the exact block sum of x.
// Four groups (128 weights, one 64-byte cache line of codes) go through two 512-bit registers per step:
//   lo = the low nibbles of the 64 bytes (even positions), hi = the high nibbles (odd positions)
// so that dpbusd's 4-byte lane l of either belongs to group l / 4 of the four; the activations are stored
// once per call in the matching order (per four groups: their even positions, 16 each, then the odd ones).
// A last step with fewer than four groups loads its codes and scales masked (zeros beyond the row) and
// meets zero activations there.
// 5-bit weights (Int5Linear: GGUF Q5_0 / Q5_1 codes kept as they are) add a fifth bit per weight, in the
// kernel's own layout (N, steps, 16) bytes: per step two 64-bit masks, the fifth bits of the 64 even and of
// the 64 odd positions (bit b: position 2b, resp. 2b + 1), added as 16 to the nibbles before the dot
// products; w = (q - 16) * s + z, so the offset term becomes -16 sum_g.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels_common.h"

namespace {

// 16 activations of a block as the block's two int8 parts: x / d = xq + xr / 256 (round to nearest, the
// default mode; saturated to int8), about 15 bits; inv = 1 / d
inline void split(__m512 v, __m512 inv, int8_t* xq, int8_t* xr) {
  const __m512 f = _mm512_mul_ps(v, inv);
  const __m512i q = _mm512_cvtps_epi32(f);
  const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(f, _mm512_cvtepi32_ps(q)), _mm512_set1_ps(256.f)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtsepi32_epi8(q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xr), _mm512_cvtsepi32_epi8(r));
}

// a block's largest magnitude, and 1 / d = 127 / that (0 for an all-zero block)
inline float block_max(__m512 v0, __m512 v1, __m512* inv) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  *inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  return amax;
}

struct Activations {
  int64_t steps;             // ceil(groups / 4)
  std::vector<int8_t> xq;    // (M, steps, 128) int8, in the register order above
  std::vector<int8_t> xr;    // the same for the rounding residual, in steps of 1/256 of xq's
  std::vector<float> dx;     // (M, steps, 16): per lane, the int8 scale of the lane's group
  std::vector<float> xs;     // (M, steps, 16): [-offset sum_g, sum_g] per group against [s_g, z_g]; 8 zeros
};

// offset: 8 for 4-bit codes, 16 for 5-bit ones (w = (q - offset) * s + z)
Activations prepare(const float* x, int64_t m_rows, int64_t k, float offset) {
  const int64_t groups = k / kGroup;
  Activations a;
  a.steps = (groups + kStep - 1) / kStep;
  a.xq.resize(m_rows * a.steps * 128);  // zeros: the groups past the row's end of a last short step
  a.xr.resize(m_rows * a.steps * 128);
  a.dx.resize(m_rows * a.steps * 16);
  a.xs.resize(m_rows * a.steps * 16);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at_ = m * a.steps + g / kStep, h = g % kStep;
      int8_t* q = a.xq.data() + at_ * 128;
      int8_t* r = a.xr.data() + at_ * 128;
      const float* xg = x + m * k + g * kGroup;
      const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
      __m512 inv;
      const float amax = block_max(v0, v1, &inv);
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      split(_mm512_permutex2var_ps(v0, evens, v1), inv, q + h * 16, r + h * 16);
      split(_mm512_permutex2var_ps(v0, odds, v1), inv, q + 64 + h * 16, r + 64 + h * 16);
      const float scale = amax / 127.f / 256.f;  // the combined sum below is in steps of d / 256
      float* d = a.dx.data() + at_ * 16;
      for (int64_t l = 0; l < 4; ++l) d[h * 4 + l] = scale;
      float* s = a.xs.data() + at_ * 16;
      s[2 * h] = -offset * sum;
      s[2 * h + 1] = sum;
    }
  }
  return a;
}

// Where one block of R weight rows starts, and the strides between its rows (bytes of codes, bf16 scales,
// bytes of fifth bits); lead: how many rows ahead of each row to prefetch (kept inside the matrix).
struct RowBlock {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint8_t* high;  // 5-bit weights only
  int64_t code_stride, scale_stride, high_stride, lead;
};

// One step (four groups) of the block's R rows against M activation rows, accumulated into acc; t: the step;
// Masked: the rows' last groups, fewer than four (codes and scales past them read as zeros). Five: 5-bit
// weights (the fifth bits added as 16 to the nibbles).
template <int M, int R, bool Five, bool Masked>
inline void step(const RowBlock& b, const Activations& act, int64_t t, __mmask64 code_mask, __mmask8 scale_mask,
                 __m512 (&acc)[R][M]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // [s_g, z_g, ...] of four groups: lanes 4h..4h+3 take s of group h
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const uint8_t* codes = b.codes + t * 64;
  const uint16_t* scales = b.scales + t * 8;
  const uint8_t* high = Five ? b.high + t * kHighBytes : nullptr;
  for (int r = 0; r < R; ++r) {
    // the rows a few blocks ahead: more loads in flight than the hardware prefetcher starts by itself
    _mm_prefetch(reinterpret_cast<const char*>(codes + (r + b.lead) * b.code_stride), _MM_HINT_T1);
    if ((t & 3) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(scales + (r + b.lead) * b.scale_stride), _MM_HINT_T1);
      if (Five) _mm_prefetch(reinterpret_cast<const char*>(high + (r + b.lead) * b.high_stride), _MM_HINT_T1);
    }
    const uint8_t* wp = codes + r * b.code_stride;
    const __m512i v = Masked ? _mm512_maskz_loadu_epi8(code_mask, wp) : _mm512_loadu_si512(wp);
    __m512i lo = _mm512_and_si512(v, low4);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if (Five) {
      const uint8_t* hp = high + r * b.high_stride;
      uint64_t even, odd;
      std::memcpy(&even, hp, 8);
      std::memcpy(&odd, hp + 8, 8);
      const __m512i sixteen = _mm512_set1_epi8(16);
      lo = _mm512_mask_add_epi8(lo, even, lo, sixteen);
      hi = _mm512_mask_add_epi8(hi, odd, hi, sixteen);
    }
    const uint16_t* sp = scales + r * b.scale_stride;
    const __m128i raw = Masked ? _mm_maskz_loadu_epi16(scale_mask, sp) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(sp));
    const __m512 sz = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_zextsi256_si512(_mm256_cvtepu16_epi32(raw)), 16));
    const __m512 sv = _mm512_permutexvar_ps(spread, sz);
    for (int m = 0; m < M; ++m) {  // the activations of step t come from L1 (few KB per call)
      const int64_t at_ = m * act.steps + t;
      const int8_t* xq = act.xq.data() + at_ * 128;
      const int8_t* xr = act.xr.data() + at_ * 128;
      // 256 * (q . xq) + (q . xr): at most 8 * 31 * 127 * 257 per lane, far inside int32
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
      dot = _mm512_slli_epi32(_mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xq + 64)), 8);
      dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(xr)), hi, _mm512_loadu_si512(xr + 64));
      const __m512 c = _mm512_mul_ps(sv, _mm512_loadu_ps(act.dx.data() + at_ * 16));
      acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), c, acc[r][m]);
      acc[r][m] = _mm512_fmadd_ps(sz, _mm512_loadu_ps(act.xs.data() + at_ * 16), acc[r][m]);  // (z - 8 s) sum
    }
  }
}

// Rows row0 .. row0 + R - 1 (independent chains for the out-of-order core), M activation rows with their
// accumulators in registers (M, R and the weights' bits fixed at compile time).
template <int M, int R, bool Five>
void rows(const uint8_t* w, const uint16_t* s, const uint8_t* high, const Activations& act, int64_t k, int64_t n,
          int64_t row0, int64_t ahead, float* y) {
  const int64_t groups = k / kGroup, full = groups / kStep, left = groups % kStep;
  const RowBlock b{w + row0 * (k / 2), s + row0 * groups * 2, Five ? high + row0 * act.steps * kHighBytes : nullptr,
                   k / 2, groups * 2, act.steps * kHighBytes, std::min(ahead, n - R - row0)};
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t t = 0; t < full; ++t) step<M, R, Five, false>(b, act, t, 0, 0, acc);
  if (left) {
    const __mmask64 codes = (__mmask64(1) << (16 * left)) - 1;  // 16 bytes per group
    const __mmask8 scales = static_cast<__mmask8>((1u << (2 * left)) - 1);  // 2 bf16 per group
    step<M, R, Five, true>(b, act, full, codes, scales, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * n + row0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Weight rows per call of rows<M, R> (int4) and rows8<M, R> (int8) for M activation rows. Few: more rows at once
// (more interleaved streams of weights) read slower, most of all for one activation row. On a Zen 5, over every
// layer of the demo model, one row instead of two was 1.05x (int4) and 1.3x (int8) at batch 1, and two instead of
// four 1.2-1.3x for int4 at M = 2, where int8 kept four (benchmarks/RESULTS.md); on a Zen 4 one row and two were
// even for int4.
template <int M>
constexpr int kInt4Rows = M == 1 ? 1 : M <= 4 ? 2 : 1;
template <int M>
constexpr int kInt8Rows = M == 1 ? 1 : M <= 2 ? 4 : (M <= 4 ? 2 : 1);

// what int4_gemv_with (cpu_kernels_common.h) calls
struct Int4 {
  template <int M>
  static constexpr int kRows = kInt4Rows<M>;
  static Activations activations(const float* x, int64_t m_rows, int64_t k, float offset) {
    return prepare(x, m_rows, k, offset);
  }
  template <int M, int R, bool Five, typename... A>
  static void block(const A&... a) {
    rows<M, R, Five>(a...);
  }
};

// int8 weights: Int8Linear's own, (N, K) int8 in -127..127 with one bf16 scale per output row. The activations
// are split in two int8 parts per block of 32 as above; a 64-byte line of weights covers two blocks, dpbusd's
// lanes 0-7 the first and 8-15 the second, in the natural order. dpbusd multiplies unsigned by signed bytes:
// the weights go in as w + 128 (one xor), and 128 times each lane's activation sum, known per call, is
// taken off in int32, so every lane holds  sum w (256 xq + xr)  exactly before its one conversion to float.

struct Activations8 {
  int64_t lines;             // ceil(K / 64)
  std::vector<int8_t> xq;    // (M, lines * 64), zeros past K
  std::vector<int8_t> xr;
  std::vector<float> dx;     // (M, lines, 16): per lane, the scale of its block, in steps of d / 256
  std::vector<int32_t> off;  // (M, lines, 16): -128 sum (256 xq + xr) over the lane's 4 bytes
};

Activations8 prepare8(const float* x, int64_t m_rows, int64_t k) {
  const int64_t groups = k / kGroup;
  Activations8 a;
  a.lines = (k + 63) / 64;
  a.xq.resize(m_rows * a.lines * 64);
  a.xr.resize(m_rows * a.lines * 64);
  a.dx.resize(m_rows * a.lines * 16);
  a.off.resize(m_rows * a.lines * 16);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at_ = m * a.lines * 64 + g * kGroup;
      const float* xg = x + m * k + g * kGroup;
      const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
      __m512 inv;
      const float amax = block_max(v0, v1, &inv);
      for (int64_t half = 0; half < 2; ++half) {
        int8_t* q = a.xq.data() + at_ + half * 16;
        int8_t* r = a.xr.data() + at_ + half * 16;
        split(half ? v1 : v0, inv, q, r);
        // the saturated bytes, as the products see them, summed per 4-byte lane
        const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m128i r8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r));
        const __m512i both = _mm512_add_epi32(_mm512_slli_epi32(_mm512_cvtepi8_epi32(q8), 8), _mm512_cvtepi8_epi32(r8));
        alignas(64) int32_t t[16];
        _mm512_store_si512(t, both);
        for (int64_t l = 0; l < 4; ++l) {
          const int64_t lane = (g % 2) * 8 + half * 4 + l;
          a.off[(m * a.lines + g / 2) * 16 + lane] = -128 * (t[4 * l] + t[4 * l + 1] + t[4 * l + 2] + t[4 * l + 3]);
        }
      }
      const float scale = amax / 127.f / 256.f;
      for (int64_t l = 0; l < 8; ++l) a.dx[(m * a.lines + g / 2) * 16 + (g % 2) * 8 + l] = scale;
    }
  }
  return a;
}

// The bytes of a row of K int8 values that its last 64-byte line holds (all 64 where K is a multiple of 64)
inline __mmask64 last_line(int64_t k) { return (k % 64) ? (__mmask64(1) << (k % 64)) - 1 : ~__mmask64(0); }

template <int M, int R>
void rows8(const int8_t* w, const uint16_t* scales, const Activations8& act, int64_t k, int64_t n, int64_t row0,
           int64_t ahead, float* y) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail = last_line(k);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t t = 0; t < act.lines; ++t) {
    const bool last = t == act.lines - 1;
    for (int r = 0; r < R; ++r) {
      const int8_t* wp = w + (row0 + r) * k + t * 64;
      _mm_prefetch(reinterpret_cast<const char*>(w + std::min(row0 + r + ahead, n - 1) * k + t * 64), _MM_HINT_T1);
      // past K (a last line of one block) the masked load reads zeros, which meet zero activations
      const __m512i u = _mm512_xor_si512(last ? _mm512_maskz_loadu_epi8(tail, wp) : _mm512_loadu_si512(wp), flip);
      for (int m = 0; m < M; ++m) {
        const int64_t at_ = (m * act.lines + t);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(act.xq.data() + at_ * 64));
        dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), _mm512_loadu_si512(act.off.data() + at_ * 16));
        dot = _mm512_dpbusd_epi32(dot, u, _mm512_loadu_si512(act.xr.data() + at_ * 64));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(act.dx.data() + at_ * 16), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // the row's bf16 scale, once per output
    const float scale = bf16_to_float(scales[row0 + r]);
    for (int m = 0; m < M; ++m) y[m * n + row0 + r] = _mm512_reduce_add_ps(acc[r][m]) * scale;
  }
}

// what int8_gemv_with (cpu_kernels_common.h) calls
struct Int8 {
  template <int M>
  static constexpr int kRows = kInt8Rows<M>;
  static Activations8 activations(const float* x, int64_t m_rows, int64_t k) { return prepare8(x, m_rows, k); }
  template <int M, int R, typename... A>
  static void block(const A&... a) {
    rows8<M, R>(a...);
  }
};

inline __m512 bf16_to_ps(uint16_t h) { return _mm512_set1_ps(bf16_to_float(h)); }

// The codes of group g of a row (16 bytes at codes + 16 g; the row's fifth bits at high, or null) as
// (q - offset) in fp32: weights 0-15 and 16-31.
inline void group_codes(const uint8_t* codes, const uint8_t* high, int64_t g, __m512* q0, __m512* q1) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + g * 16));
  __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  if (high != nullptr) {  // the group's 16 even and 16 odd positions in its step's two masks
    const uint8_t* hp = high + (g / kStep) * kHighBytes + (g % kStep) * 2;
    uint16_t even, odd;
    std::memcpy(&even, hp, 2);
    std::memcpy(&odd, hp + 8, 2);
    lo = _mm_mask_add_epi8(lo, even, lo, _mm_set1_epi8(16));
    hi = _mm_mask_add_epi8(hi, odd, hi, _mm_set1_epi8(16));
  }
  const __m512 offset = _mm512_set1_ps(high != nullptr ? 16.f : 8.f);
  *q0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))), offset);
  *q1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi))), offset);
}

// ---- Batch- and prompt-sized products in int8: an own loop, or at::_int_mm (oneDNN's VNNI or AMX product) --
// A matrix product can scale only whole rows and columns, so here the activations get one scale per row,
// d = max|x| / 127, and the same two int8 parts as above: for a block of M rows, a (2M, K) int8 matrix whose
// rows 0..M-1 are xq and rows M..2M-1 xr; one int8 product of those 2M rows with the int8 weights (exact
// int32 sums), then (y_q + y_r / 256) d c per output, c the weight row's scale. int4 weights go in as int8
// with one scale per row (int4_to_int8), made per call from the codes.
constexpr int64_t kProductRows = 256;  // activation rows per int8 product (oneDNN slows down past ~512 of them)

inline __mmask16 first(int64_t count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }

// A row's int8 step, max|v| / 127, stored at *scale; returns 1 / step (0 for an all-zero row). A NaN or an
// infinity makes the step NaN, so that the row's outputs are NaN as a float product's would be.
inline __m512 row_scale(const float* v, int64_t k, float* scale) {
  __m512 top = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t j = 0; j < k; j += 16) {
    const __m512 x = _mm512_maskz_loadu_ps(first(k - j), v + j);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_NEQ_UQ);  // NaN for NaN and inf
    top = _mm512_max_ps(top, _mm512_abs_ps(x));
  }
  const float amax = _mm512_reduce_max_ps(top);
  *scale = bad == 0 ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  return _mm512_set1_ps(bad == 0 && amax > 0.f ? 127.f / amax : 0.f);
}

// rows [r0, r0 + m) of x (K wide) as the (2m, K) two-part matrix q and their scales d
void split_rows(const float* x, int64_t r0, int64_t m, int64_t k, int8_t* q, float* d) {
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + (r0 + r) * k;
      const __m512 inv = row_scale(row, k, d + r);
      int8_t* xq = q + r * k;
      int8_t* xr = q + (m + r) * k;
      for (int64_t j = 0; j < k; j += 16) {
        if (j + 16 <= k) {
          split(_mm512_loadu_ps(row + j), inv, xq + j, xr + j);
        } else {  // the row's last few: through a buffer, not past the row's end
          int8_t tq[16], tr[16];
          split(_mm512_maskz_loadu_ps(first(k - j), row + j), inv, tq, tr);
          std::memcpy(xq + j, tq, k - j);
          std::memcpy(xr + j, tr, k - j);
        }
      }
    }
  });
}

// the (2m, N) int32 product of split_rows' matrix as m rows of fp32 outputs at y
void combine_rows(const int32_t* prod, const float* d, const float* c, int64_t m, int64_t n, float* y) {
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    const __m512 step = _mm512_set1_ps(1.f / 256.f);
    for (int64_t r = begin; r < end; ++r) {
      const __m512 dr = _mm512_set1_ps(d[r]);
      const int32_t* yq = prod + r * n;
      const int32_t* yr = prod + (m + r) * n;
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = first(n - j);
        const __m512 fq = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, yq + j));
        const __m512 fr = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, yr + j));
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(fq, _mm512_mul_ps(fr, step)), dr),
                                       _mm512_maskz_loadu_ps(mask, c + j));
        _mm512_mask_storeu_ps(y + r * n + j, mask, v);
      }
    }
  });
}

// A few rows of the two-part matrix (decoding batches): qwenlm's own VNNI loop instead of at::_int_mm, which
// reads the weights at a fraction of the bandwidth there (oneDNN is built for many rows). The same exact int32
// sums: dpbusd multiplies unsigned by signed bytes, so the weights go in as w + 128 (one xor) and 128 times
// each row's sum is taken off at the end (made by the same instruction against 128 in every byte). Per block
// of kBlockRows weight rows (in L1 or L2 after the first pass), the rows of the two-part matrix kGroupRows at a
// time, each of them against kWeightRows<M> weight rows at once: one accumulator per pair, up to 24 of them.
// Up to kOwnProductRows two-part rows (24 activation rows) go through this loop: over the demo model's int8
// layers on a 2-core Zen 5, 8 activation rows took 21.6 ms against oneDNN's 46, 17 rows 41 against 54-60, and
// 32 rows were even (87 / 82-87 ms).
constexpr int64_t kOwnProductRows = 48;
constexpr int64_t kGroupRows = 8;
constexpr int64_t kBlockRows = 12;  // a multiple of every kWeightRows<M>
template <int M>
constexpr int kWeightRows = M <= 2 ? 6 : (M <= 6 ? 4 : 3);  // 12 to 24 accumulators

// rows [row0, row0 + R) of the weights times the M rows at q: prod[i * n + row] (wrapping int32 arithmetic, exact
// where the true sum fits); offsets: 128 times each row's sum; the rows `ahead` further on prefetched to L2.
// Accumulator P holds activation row P / R against weight row P % R. (Written as folds over P, not as loops
// over a two-dimensional array: GCC kept such an array on the stack, a store per product.)
template <int M, int R, std::size_t... P>
inline void int_rows_of(std::index_sequence<P...>, const int8_t* q, const uint32_t* offsets, int64_t k,
                        const int8_t* w, int64_t n, int64_t row0, int64_t ahead, int32_t* prod) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t lines = (k + 63) / 64;
  const __mmask64 tail = last_line(k);
  const int8_t* wr = w + row0 * k;
  const int8_t* wa = w + std::min(row0 + ahead, n - R) * k;
  __m512i acc[M * R] = {((void)P, _mm512_setzero_si512())...};
  for (int64_t t = 0; t < lines; ++t) {
    const __mmask64 mask = t == lines - 1 ? tail : ~__mmask64(0);  // past K zeros, meeting zero activations
    __m512i u[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wa + r * k + t * 64), _MM_HINT_T1);
      u[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr + r * k + t * 64), flip);
    }
    ((acc[P] = _mm512_dpbusd_epi32(acc[P], u[P % R], _mm512_maskz_loadu_epi8(mask, q + (P / R) * k + t * 64))), ...);
  }
  ((prod[(P / R) * n + row0 + P % R] =
        static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[P])) - offsets[P / R])), ...);
}

// weight rows [row0, row0 + count) times the M rows at q, kWeightRows<M> at a time (the rest one by one)
template <int M>
void int_group(const int8_t* q, const uint32_t* offsets, int64_t k, const int8_t* w, int64_t n, int64_t row0,
               int64_t count, int64_t ahead, int32_t* prod) {
  constexpr int R = kWeightRows<M>;
  int64_t r = row0;
  for (; r + R <= row0 + count; r += R)
    int_rows_of<M, R>(std::make_index_sequence<M * R>{}, q, offsets, k, w, n, r, ahead, prod);
  for (; r < row0 + count; ++r) int_rows_of<M, 1>(std::make_index_sequence<M>{}, q, offsets, k, w, n, r, ahead, prod);
}

// rows (even, 2 to kOwnProductRows) of q (rows, K) times the weights (N, K): (rows, N) int32 into prod
void own_product(const int8_t* q, int64_t rows, int64_t k, const int8_t* w, int64_t n, int32_t* prod) {
  const int64_t lines = (k + 63) / 64;
  const __mmask64 tail = last_line(k);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 in every byte
  std::vector<uint32_t> offsets(rows);
  for (int64_t i = 0; i < rows; ++i) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t t = 0; t < lines; ++t)
      s = _mm512_dpbusd_epi32(s, flip, _mm512_maskz_loadu_epi8(t == lines - 1 ? tail : ~__mmask64(0), q + i * k + t * 64));
    offsets[i] = static_cast<uint32_t>(_mm512_reduce_add_epi32(s));
  }
  const int64_t ahead = std::max<int64_t>(kBlockRows, kAheadBytes / k);  // rows
  at::parallel_for(0, (n + kBlockRows - 1) / kBlockRows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * kBlockRows, count = std::min(kBlockRows, n - row0);
      for (int64_t i0 = 0; i0 < rows; i0 += kGroupRows) {
        const int64_t m = std::min(kGroupRows, rows - i0), at_ = i0 == 0 ? ahead : 0;  // the first group fetches
        const auto args = std::make_tuple(q + i0 * k, offsets.data() + i0, k, w, n, row0, count, at_, prod + i0 * n);
        switch (m) {
          case 2: std::apply(int_group<2>, args); break;
          case 4: std::apply(int_group<4>, args); break;
          case 6: std::apply(int_group<6>, args); break;
          default: std::apply(int_group<8>, args); break;
        }
      }
    }
  });
}

at::Tensor int8_matmul(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8_matmul: weight (N, K) int8");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == weight.size(0) && scales.scalar_type() == at::kFloat,
              "int8_matmul: scales (N,) float32");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == weight.size(1), "int8_matmul: x (M, K) against weight (N, K)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor c = scales.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor wt = w.t();
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  const int64_t block = std::min(rows, kProductRows);
  at::Tensor q = at::empty({2 * block, k}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({block}, x.options());
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t m = std::min(block, rows - r0);
    split_rows(x.data_ptr<float>(), r0, m, k, q.data_ptr<int8_t>(), d.data_ptr<float>());
    at::Tensor prod;
    if (2 * m <= kOwnProductRows) {
      prod = at::empty({2 * m, n}, x.options().dtype(at::kInt));
      own_product(q.data_ptr<int8_t>(), 2 * m, k, w.data_ptr<int8_t>(), n, prod.data_ptr<int32_t>());
    } else {
      prod = at::_int_mm(q.narrow(0, 0, 2 * m), wt).contiguous();
    }
    combine_rows(prod.data_ptr<int32_t>(), d.data_ptr<float>(), c.data_ptr<float>(), m, n,
                 out.data_ptr<float>() + r0 * n);
  }
  return out;
}

// Int4 weights as int8 with one scale per row: the row dequantised in fp32 (Int4Linear.dequantize(float32)),
// then rounded to steps of max|w| / 127 (this second rounding costs the demo model +0.1 % perplexity).
std::tuple<at::Tensor, at::Tensor> int4_to_int8(const at::Tensor& packed, const at::Tensor& sz,
                                                const std::optional<at::Tensor>& high_bits) {
  const uint8_t* high = check_weights("int4_to_int8", packed, sz, high_bits);
  const int64_t n = packed.size(0), k = packed.size(1) * 2, groups = k / kGroup;
  const int64_t high_row = ((groups + kStep - 1) / kStep) * kHighBytes;
  const at::Tensor codes = packed.contiguous();
  const at::Tensor scales = sz.contiguous();
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kChar));
  at::Tensor steps = at::empty({n}, packed.options().dtype(at::kFloat));
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  int8_t* y = out.data_ptr<int8_t>();
  float* rs = steps.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        __m512 q[2];
        group_codes(w + r * k / 2, high != nullptr ? high + r * high_row : nullptr, g, &q[0], &q[1]);
        const __m512 sc = bf16_to_ps(s[(r * groups + g) * 2]), ze = bf16_to_ps(s[(r * groups + g) * 2 + 1]);
        for (int half = 0; half < 2; ++half)
          _mm512_storeu_ps(row.data() + g * kGroup + half * 16, _mm512_add_ps(_mm512_mul_ps(q[half], sc), ze));
      }
      const __m512 inv = row_scale(row.data(), k, rs + r);
      for (int64_t j = 0; j < k; j += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row.data() + j), inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + r * k + j), _mm512_cvtsepi32_epi8(v));
      }
    }
  });
  return {out, steps};
}


// ---- Attention of one new token (decoding) ------------------------------------------------------------------
// q (B, H, 1, D), k and v (B, KVH, L, D) with rows of D contiguous (views of the KV cache: any other strides),
// bias (B or 1, 1, 1, L) added to the scores or none; H / KVH query heads share a key/value head; D 64 or 128. One work item
// per (batch row, key/value head): its G query heads' scores against the L keys (each key read once, for all G),
// a softmax per head, then the G weighted sums of the values. fp32 or bf16 keys/values,
// fp32 arithmetic throughout (what PyTorch's CPU SDPA does for these shapes, without its per-call blocking).

// e^x for x <= 0 (scores minus their maximum): 2^n e^r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7, below fp32's rounding of the sums it feeds)
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n ln2_hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bf16: the upper half of an fp32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// 16 vectors -> one: lane i holds the sum of v[i]'s lanes (a transpose-and-add tree, ~2 operations a sum)
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 w[4];
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the partial sums of vectors 4i..4i+3
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * i], v[4 * i + 1]), _mm512_unpackhi_ps(v[4 * i], v[4 * i + 1]));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * i + 2], v[4 * i + 3]), _mm512_unpackhi_ps(v[4 * i + 2], v[4 * i + 3]));
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  }
  const __m512 p = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x88), _mm512_shuffle_f32x4(p, q, 0xDD));
}

// One (batch row, key/value head): its G query heads at q (G, D), keys and values rows of D at k and v. The keys
// and values go in blocks of kAttendBytes (attend_keys), each block's rows read from memory once for all G heads
// and then from L1: without blocks, a cache longer than L2 holds (8K fp32 keys of 64: 2 MB per head) was read G
// times from L3 or memory (fp32 caches 1.25x faster at 640 keys, 1.5x at 8K on a Zen 5; benchmarks/RESULTS.md).
// Converting a bf16 block to fp32 once for the G heads instead of at each load was slower (0.7x).
template <typename T, int D>
void attend_one(const float* q, const T* k, const T* v, const float* bias, int64_t g_heads, int64_t len,
                int64_t k_row, int64_t v_row, float scale, float* out, std::vector<float>& scores) {
  constexpr int C = D / 16;  // 16-float chunks of a row
  constexpr int64_t kBlock = attend_keys<T, D>(16);
  scores.resize(g_heads * len);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {  // scores, 16 keys at a time per query head
    const int64_t b1 = std::min(len, b0 + kBlock);
    for (int64_t g = 0; g < g_heads; ++g) {
      __m512 qg[C];
      for (int c = 0; c < C; ++c) qg[c] = _mm512_loadu_ps(q + g * D + c * 16);
      for (int64_t j0 = b0; j0 < b1; j0 += 16) {
        const int64_t n = std::min<int64_t>(16, b1 - j0);
        __m512 part[16];
        for (int jj = 0; jj < 16; ++jj) {
          const T* kj = k + (j0 + std::min<int64_t>(jj, n - 1)) * k_row;  // past the end: the last key again
          __m512 acc = _mm512_mul_ps(qg[0], load16(kj));
          for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qg[c], load16(kj + c * 16), acc);
          part[jj] = acc;
        }
        const __mmask16 mask = first(n);
        __m512 sv = _mm512_mul_ps(sum16(part), sc);
        if (bias != nullptr) sv = _mm512_add_ps(sv, _mm512_maskz_loadu_ps(mask, bias + j0));
        _mm512_mask_storeu_ps(scores.data() + g * len + j0, mask, sv);
      }
    }
  }
  for (int64_t g = 0; g < g_heads; ++g) {  // softmax of each head's row
    float* sg = scores.data() + g * len;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < len; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first(len - j), sg + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 mask = first(len - j);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + j), m));
      _mm512_mask_storeu_ps(sg + j, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 mask = first(len - j);
      _mm512_mask_storeu_ps(sg + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sg + j), inv));
    }
  }
  // the weighted values, block by block: two heads at a time (each value row loaded once for both), even and
  // odd keys in separate sums (independent chains), the sums carried in `out` from block to block
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t b1 = std::min(len, b0 + kBlock);
    for (int64_t g = 0; g < g_heads; g += 2) {
      const bool pair = g + 1 < g_heads;
      const float* p0 = scores.data() + g * len;
      const float* p1 = pair ? p0 + len : p0;
      float* o0 = out + g * D;
      float* o1 = pair ? o0 + D : o0;
      __m512 a0[C], b0s[C], a1[C], b1s[C];
      for (int c = 0; c < C; ++c) {
        a0[c] = b0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o0 + c * 16);
        a1[c] = b0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(o1 + c * 16);
        b0s[c] = b1s[c] = _mm512_setzero_ps();
      }
      int64_t j = b0;
      for (; j + 1 < b1; j += 2) {
        const T* ve = v + j * v_row;
        const T* vo = ve + v_row;
        const __m512 pe0 = _mm512_set1_ps(p0[j]), po0 = _mm512_set1_ps(p0[j + 1]);
        const __m512 pe1 = _mm512_set1_ps(p1[j]), po1 = _mm512_set1_ps(p1[j + 1]);
        for (int c = 0; c < C; ++c) {
          const __m512 e = load16(ve + c * 16), o = load16(vo + c * 16);
          a0[c] = _mm512_fmadd_ps(pe0, e, a0[c]);
          b0s[c] = _mm512_fmadd_ps(po0, o, b0s[c]);
          a1[c] = _mm512_fmadd_ps(pe1, e, a1[c]);
          b1s[c] = _mm512_fmadd_ps(po1, o, b1s[c]);
        }
      }
      if (j < b1) {
        const T* ve = v + j * v_row;
        const __m512 pe0 = _mm512_set1_ps(p0[j]), pe1 = _mm512_set1_ps(p1[j]);
        for (int c = 0; c < C; ++c) {
          const __m512 e = load16(ve + c * 16);
          a0[c] = _mm512_fmadd_ps(pe0, e, a0[c]);
          a1[c] = _mm512_fmadd_ps(pe1, e, a1[c]);
        }
      }
      for (int c = 0; c < C; ++c) {  // (o1 is o0 for a last single head: written second, the same sums)
        _mm512_storeu_ps(o1 + c * 16, _mm512_add_ps(a1[c], b1s[c]));
        _mm512_storeu_ps(o0 + c * 16, _mm512_add_ps(a0[c], b0s[c]));
      }
    }
  }
}

// what attention_of_one (cpu_kernels_common.h) calls
struct Attention {
  template <typename T, int D, typename... A>
  static void one(A&&... a) {
    attend_one<T, D>(std::forward<A>(a)...);
  }
};

// -- argmax over the vocabulary -----------------------------------------------------------------------
// torch.argmax(x, -1) of fp32 rows: the first index of the largest value, or of the first NaN (which
// torch ranks above everything). PyTorch's CPU reduction reads ~2 GB/s (0.33 ms for Qwen's 151,936
// logits); this reads the row twice from cache: its maximum (and whether it has a NaN), then where that
// value first occurs.
int64_t row_argmax(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  const __mmask16 tail = first(n - i);
  if (tail) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
    nan |= _mm512_mask_cmp_ps_mask(tail, v, v, _CMP_UNORD_Q);
    best = _mm512_mask_max_ps(best, tail, best, v);
  }
  const float top = _mm512_reduce_max_ps(best);
  for (i = 0; i < n; i += 16) {
    const __mmask16 lanes = first(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    const __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q)
                              : _mm512_mask_cmp_ps_mask(lanes, v, _mm512_set1_ps(top), _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // not reached: the maximum occurs in the row
}

at::Tensor argmax_rows(const at::Tensor& x) { return argmax_rows_with(x, row_argmax); }

// ---- 4-bit (or 5-bit) codes for fp32 weights in groups of 32 (loading) ----------------------------------------
// Int4Linear's rounding, the same arithmetic as linear.fit_int4_groups' PyTorch code (see there): per group, for
// each step offset in `steps`, codes q = clamp(round((w - lo) * (1 / span * (top + step))), 0, top), the scale
// s and offset m that fit them by least squares, and their squared error; the first step with the smallest
// error wins. Sums run in another order than PyTorch's, so a near tie may pick another step.
inline GroupFit fit_group(const float* w, int top, const std::vector<double>& steps, uint8_t* codes) {
  const __m512 a = _mm512_loadu_ps(w), b = _mm512_loadu_ps(w + 16);
  const float lo = std::min(_mm512_reduce_min_ps(a), _mm512_reduce_min_ps(b));
  const float span = std::max(std::max(_mm512_reduce_max_ps(a), _mm512_reduce_max_ps(b)) - lo, 1e-8f);
  const float sum_w = _mm512_reduce_add_ps(_mm512_add_ps(a, b)), inverse = 1.f / span;
  const __m512 sa = _mm512_sub_ps(a, _mm512_set1_ps(lo)), sb = _mm512_sub_ps(b, _mm512_set1_ps(lo));
  const __m512 zero = _mm512_setzero_ps(), highest = _mm512_set1_ps(static_cast<float>(top));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even, as torch.round
  auto codes_for = [&](float mult, __m512* qa, __m512* qb) {
    const __m512 m = _mm512_set1_ps(mult);
    *qa = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(sa, m), kRound), zero), highest);
    *qb = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(sb, m), kRound), zero), highest);
  };
  const float g = static_cast<float>(kGroup);
  GroupFit best{0.f, 0.f, 0.f};
  float best_err = 0.f;
  for (size_t i = 0; i < steps.size(); ++i) {
    __m512 qa, qb;
    codes_for(inverse * static_cast<float>(top + steps[i]), &qa, &qb);  // (a Python float times a tensor)
    const float sum_q = _mm512_reduce_add_ps(_mm512_add_ps(qa, qb));
    const float sum_qq = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(qa, qa), _mm512_mul_ps(qb, qb)));
    const float sum_qw = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(qa, a), _mm512_mul_ps(qb, b)));
    const float det = g * sum_qq - sum_q * sum_q;
    const float s = det <= 0.f ? span / static_cast<float>(top) : (g * sum_qw - sum_q * sum_w) / det;
    const float m = (sum_w - s * sum_q) / g;
    const __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
    const __m512 ea = _mm512_sub_ps(_mm512_add_ps(vm, _mm512_mul_ps(vs, qa)), a);
    const __m512 eb = _mm512_sub_ps(_mm512_add_ps(vm, _mm512_mul_ps(vs, qb)), b);
    const float err = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(ea, ea), _mm512_mul_ps(eb, eb)));
    if (i == 0 || err < best_err) {
      best_err = err;
      best = {s, m, static_cast<float>(steps[i])};
    }
  }
  __m512 qa, qb;  // the winner's codes, with its step as a float32 tensor holds it (as the PyTorch code)
  codes_for(inverse * (static_cast<float>(top) + best.step), &qa, &qb);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(qa)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(qb)));
  return best;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_groups(const at::Tensor& w, int64_t bits, at::ArrayRef<double> steps) {
  return fit_groups_with(w, bits, steps, fit_group);
}

}  // namespace

TORCH_LIBRARY(qwenlm_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_zeros, Tensor? high=None) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_to_int8(Tensor packed, Tensor scales_zeros, Tensor? high=None) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None) -> Tensor");
  m.def("decode_attention_upto(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor length) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("fit_groups(Tensor w, int bits, float[] steps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenlm_cpu, CPU, m) {
  m.impl("int4_gemv", &int4_gemv_with<Int4>);
  m.impl("int8_gemv", &int8_gemv_with<Int8>);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int4_to_int8", &int4_to_int8);
  m.impl("decode_attention", &decode_attention_with<Attention>);
  m.impl("decode_attention_upto", &decode_attention_upto_with<Attention>);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("fit_groups", &fit_groups);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
