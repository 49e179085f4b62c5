// qwenlm's decoding kernels for x86 CPUs with AVX2 and FMA but without AVX-512 VNNI (qwenlm.quant.cpu_kernel
// builds this file there instead of cpu_kernels.cpp): int4_gemv (4- and 5-bit weights), int8_gemv,
// decode_attention, argmax_rows and, for loading, fit_groups, on the same weight layouts as cpu_kernels.cpp (whose
// header explains them),
// except the fifth bits of 5-bit weights (high_bits_layout). AVX2 has no byte dot product: its maddubs (unsigned
// bytes times signed bytes, pairs summed into int16) and madd_epi16 (int16 pairs into int32) run at about one
// 256-bit instruction per two cycles on a Zen 1, so what counts here is multiplying instructions per weight.
// int4/int5: the activations are int8 per block of 8 (x = d round(x / d), d = max|x| / 127; llama.cpp's Q8
// rounding on blocks a quarter as long), multiplied by the codes as bytes with maddubs: 6 multiplying
// instructions per 128 weights (see below). cpu_kernels.cpp's two int8 parts (~15 bits) would need twice the
// maddubs; an earlier version of this file held them as int16 (x / d in 127 * 256 steps per block of 32) and
// widened the codes to int16 by shifts and masks: 8 madd_epi16 and 6 shifts per 128 weights (14 for 5-bit
// weights), 1.5x slower for the demo model's 4-bit layers. Text scored through decode_step at int4 (the demo
// model, 2 x 512 tokens) had perplexity 17.5494 this way, 17.5523 with the int16 activations
// (benchmarks/RESULTS.md). int8: the activations int16 (the ~15 bits), the int8 weights widened to int16 and
// multiplied 16 at a time with madd_epi16 into exact int32 sums, as cpu_kernels.cpp up to the order of float
// sums (and its residual's saturation at +127/256 of a step). The
// prompt-sized products (int8_matmul, int4_to_int8) are not built here: PyTorch's run instead
// (cpu_kernel.provides).

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

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

// 16 int32 (a: the first 8) as int8 with signed saturation, in order
inline void store_bytes(__m256i a, __m256i b, int8_t* out) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // a0-7, b0-7 as int16
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}

// A block of 32 activations as int16, x / d = round(x * 32512 / max|x|) (d = max|x| / 32512: the resolution of
// cpu_kernels.cpp's two int8 parts, 127 * 256 steps), in their order, at out; returns d (0 for a zero block).
inline float block_int16(const float* x, int16_t* out) {
  __m256 v[4];
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j);
  const float amax =
      hmax(_mm256_max_ps(_mm256_max_ps(abs_ps(v[0]), abs_ps(v[1])), _mm256_max_ps(abs_ps(v[2]), abs_ps(v[3]))));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f), c256 = _mm256_set1_ps(256.f);
  for (int j = 0; j < 4; j += 2) {  // (x * (127 / amax)) * 256, the scale cpu_kernels.cpp's two parts have
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(v[j], inv), c256));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(v[j + 1], inv), c256));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
  return amax / 127.f / 256.f;
}

// ---- int4 / int5 weights ----------------------------------------------------------------------------------
// A step of four groups (128 weights, a 64-byte line of codes) is two halves of 32 bytes, h = 0, 1 (positions
// 64h..64h+63: groups 2h and 2h + 1). A half's low nibbles (and mask) are its even positions 64h + 2b, its high
// nibbles (shift and mask) its odd ones, b = 0..31 (Int4Linear's layout: weight 2b in the low nibble of byte b).
// The activations are int8 per block of 8 positions, x = d round(x / d) with d = max|x| / 127, stored per half
// as the even positions then the odd ones, so that maddubs (unsigned codes times signed activations, pairs
// summed into int16, at most 2 * 31 * 127) of the two, added (at most 15,748) and summed in pairs again into
// int32 by madd_epi16 with ones, leaves in int32 lane l of a half the 8 positions 64h + 8l..8l + 7: one
// activation block (its d per lane) of one group (lanes 0-3: group 2h, 4-7: 2h + 1). Per 128 weights 6
// multiplying instructions and 2 shifts (the 16-bit activations of an earlier version: 8 and 6). 5-bit weights'
// fifth bits come as 16 bytes per step (high_bits_layout for this build): bit 2r + u of byte i belongs to the
// byte 16u + i of nibble register r (the low, high nibbles of half 0, then of half 1), added as 16 to the codes.

struct Activations {
  int64_t steps;           // ceil(groups / 4)
  std::vector<int8_t> x;   // (M, steps, 128) int8 in the order above; zeros past the row's groups
  std::vector<float> dx;   // (M, steps, 16): per int32 lane of a half's product, the d of its block of 8
  std::vector<float> xs;   // (M, steps, 8): [-offset sum_g(rounded x), sum_g(x)] per group against [s_g, z_g]
};

// offset: 8 for 4-bit codes, 16 for 5-bit ones (w = (q - offset) * s + z)
Activations prepare(const float* x, int64_t m_rows, int64_t k, float offset) {
  const int64_t groups = k / kGroup;
  Activations a;
  a.steps = (groups + kStep - 1) / kStep;
  a.x.resize(m_rows * a.steps * 128);
  a.dx.resize(m_rows * a.steps * 16);
  a.xs.resize(m_rows * a.steps * 8);
  alignas(32) int32_t q[8];
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at_ = m * a.steps + g / kStep, h = (g % kStep) / 2, upper = g % 2;
      const float* xg = x + m * k + g * kGroup;
      int8_t* half = a.x.data() + at_ * 128 + h * 64;
      __m256 sum = _mm256_setzero_ps(), rounded = _mm256_setzero_ps();
      for (int64_t j = 0; j < 4; ++j) {  // the group's blocks of 8: lanes 4 upper + j of the half's product
        const __m256 v = _mm256_loadu_ps(xg + 8 * j);
        sum = _mm256_add_ps(sum, v);
        const float amax = hmax(abs_ps(v)), d = amax / 127.f;
        const __m256i qv = _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f)));
        rounded = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qv), _mm256_set1_ps(d), rounded);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), qv);
        for (int64_t i = 0; i < 8; ++i) {  // position 32 upper + 8 j + i of the half: odd ones after the even
          const int64_t e = 32 * upper + 8 * j + i;
          half[(e % 2) * 32 + e / 2] = static_cast<int8_t>(q[i]);
        }
        a.dx[at_ * 16 + h * 8 + 4 * upper + j] = d;
      }
      // the offset against the rounded activations, so that their rounding errors meet q - offset (-8..7 or
      // -16..15), not q (0..15 or 0..31): half the error; the zeros against the exact ones
      float* s = a.xs.data() + at_ * 8;
      s[2 * (g % kStep)] = -offset * hsum(rounded);
      s[2 * (g % kStep) + 1] = hsum(sum);
    }
  }
  return a;
}

struct RowBlock {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint8_t* high;  // 5-bit weights only
  int64_t code_stride, scale_stride, high_stride, lead;
};

// bytes a b of a bf16 as the upper half of an fp32, in four 32-bit lanes (a pshufb control; -1: a zero byte)
#define QWENLM_BF16_LANES(a, b) -1, -1, a, b, -1, -1, a, b, -1, -1, a, b, -1, -1, a, b

// One step (four groups) of the block's R rows against M activation rows; Masked: the rows' last groups,
// fewer than four (`left`), read through a zeroed copy so that nothing past the row is read.
template <int M, int R, bool Five, bool Masked>
inline void step(const RowBlock& b, const Activations& act, int64_t t, int64_t left, __m256 (&acc)[R][M][2]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
  // from the step's 8 bf16 [s0 z0 s1 z1 s2 z2 s3 z3] (in both 128-bit lanes): a half's scales per int32 lane
  // of its product (s of group 2h, then 2h + 1), and all eight as fp32
  const __m256i half_scales[2] = {_mm256_setr_epi8(QWENLM_BF16_LANES(0, 1), QWENLM_BF16_LANES(4, 5)),
                                  _mm256_setr_epi8(QWENLM_BF16_LANES(8, 9), QWENLM_BF16_LANES(12, 13))};
  const __m256i all_scales = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                              -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
  const uint8_t* codes = b.codes + t * 64;
  const uint16_t* scales = b.scales + t * 8;
  const uint8_t* high = Five ? b.high + t * kHighBytes : nullptr;
  for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + (r + b.lead) * b.code_stride), _MM_HINT_T1);
    if ((t & 3) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(scales + (r + b.lead) * b.scale_stride), _MM_HINT_T1);
      if (Five) _mm_prefetch(reinterpret_cast<const char*>(high + (r + b.lead) * b.high_stride), _MM_HINT_T1);
    }
    const uint8_t* wp = codes + r * b.code_stride;
    const uint16_t* sp = scales + r * b.scale_stride;
    alignas(32) uint8_t wbuf[64];
    alignas(16) uint16_t sbuf[8];
    if (Masked) {
      std::memset(wbuf, 0, sizeof wbuf);
      std::memset(sbuf, 0, sizeof sbuf);
      std::memcpy(wbuf, wp, 16 * left);
      std::memcpy(sbuf, sp, 2 * 2 * left);
      wp = wbuf;
      sp = sbuf;
    }
    const __m256i sb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp)));
    const __m256 sv[2] = {_mm256_castsi256_ps(_mm256_shuffle_epi8(sb, half_scales[0])),
                          _mm256_castsi256_ps(_mm256_shuffle_epi8(sb, half_scales[1]))};
    const __m256 sz = _mm256_castsi256_ps(_mm256_shuffle_epi8(sb, all_scales));
    __m256i c[4];  // the codes: low and high nibbles of half 0, then of half 1
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * h));
      c[2 * h] = _mm256_and_si256(v, low4);
      c[2 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    if (Five) {  // bit 2n + u of byte i -> 16 in byte 16u + i of register n: the upper lane shifted by one bit,
      // then register n's bit 2n moved to bit 4 (shifts of 16-bit words: no bit below 4 crosses a byte)
      const __m128i f = _mm_loadu_si128(reinterpret_cast<const __m128i*>(high + r * b.high_stride));
      const __m256i hb = _mm256_inserti128_si256(_mm256_castsi128_si256(f), _mm_srli_epi16(f, 1), 1);
      c[0] = _mm256_or_si256(c[0], _mm256_and_si256(_mm256_slli_epi16(hb, 4), sixteen));
      c[1] = _mm256_or_si256(c[1], _mm256_and_si256(_mm256_slli_epi16(hb, 2), sixteen));
      c[2] = _mm256_or_si256(c[2], _mm256_and_si256(hb, sixteen));
      c[3] = _mm256_or_si256(c[3], _mm256_and_si256(_mm256_srli_epi16(hb, 2), sixteen));
    }
    for (int m = 0; m < M; ++m) {
      const int64_t at_ = m * act.steps + t;
      const __m256i* xv = reinterpret_cast<const __m256i*>(act.x.data() + at_ * 128);
      for (int h = 0; h < 2; ++h) {
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(c[2 * h], _mm256_loadu_si256(xv + 2 * h)),
                                               _mm256_maddubs_epi16(c[2 * h + 1], _mm256_loadu_si256(xv + 2 * h + 1)));
        const __m256 d = _mm256_mul_ps(sv[h], _mm256_loadu_ps(act.dx.data() + at_ * 16 + 8 * h));
        acc[r][m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d, acc[r][m][h]);
      }
      // (z - offset s) sum, per group
      acc[r][m][0] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(act.xs.data() + at_ * 8), acc[r][m][0]);
    }
  }
}
#undef QWENLM_BF16_LANES

template <int M, int R, bool Five>
void rows(const uint8_t* w, const uint16_t* s, const uint8_t* high, const Activations& act, int64_t k, int64_t n,
          int64_t row0, int64_t ahead, float* y) {
  const int64_t groups = k / kGroup, full = groups / kStep, left = groups % kStep;
  const RowBlock b{w + row0 * (k / 2), s + row0 * groups * 2, Five ? high + row0 * act.steps * kHighBytes : nullptr,
                   k / 2, groups * 2, act.steps * kHighBytes, std::min(ahead, n - R - row0)};
  __m256 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < full; ++t) step<M, R, Five, false>(b, act, t, 0, acc);
  if (left) step<M, R, Five, true>(b, act, full, left, acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * n + row0 + r] = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
}

// what int4_gemv_with (cpu_kernels_common.h) calls
struct Int4 {
  template <int M>  // one weight row per call: two (the registers spilled) were ~4 % slower decoding on a Zen 1
  static constexpr int kRows = 1;
  static Activations activations(const float* x, int64_t m_rows, int64_t k, float offset) {
    return prepare(x, m_rows, k, offset);
  }
  template <int M, int R, bool Five, typename... A>
  static void block(const A&... a) {
    rows<M, R, Five>(a...);
  }
};

// ---- int8 weights -----------------------------------------------------------------------------------------
// (N, K) int8 in -127..127, one bf16 scale per row; each block of 32 weights widened to int16 (two registers)
// and multiplied by the int16 activations in their natural order.

struct Activations8 {
  int64_t blocks;          // K / 32
  std::vector<int16_t> x;  // (M, K)
  std::vector<float> dx;   // (M, blocks): the block's d
};

Activations8 prepare8(const float* x, int64_t m_rows, int64_t k) {
  Activations8 a;
  a.blocks = k / kGroup;
  a.x.resize(m_rows * k);
  a.dx.resize(m_rows * a.blocks);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < a.blocks; ++g)
      a.dx[m * a.blocks + g] = block_int16(x + m * k + g * kGroup, a.x.data() + m * k + g * kGroup);
  return a;
}

template <int M, int R>
void rows8(const int8_t* w, const uint16_t* scales, const Activations8& act, int64_t k, int64_t n, int64_t row0,
           int64_t ahead, float* y) {
  const int64_t lead = std::min(ahead, n - R - row0);
  __m256 acc[R][M][2];  // two chains per output: even and odd blocks
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < act.blocks; ++g) {
    for (int r = 0; r < R; ++r) {
      const int8_t* wp = w + (row0 + r) * k + g * kGroup;
      if ((g & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + lead * k), _MM_HINT_T1);
      const __m128i* wv = reinterpret_cast<const __m128i*>(wp);
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wv)), w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wv + 1));
      for (int m = 0; m < M; ++m) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(act.x.data() + m * k + g * kGroup);
        // exact in int32: at most 4 * 127 * 32512 per lane
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
        __m256& a = acc[r][m][g & 1];
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(act.dx[m * act.blocks + g]), a);
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // the row's bf16 scale, once per output
    const float scale = bf16_to_float(scales[row0 + r]);
    for (int m = 0; m < M; ++m) y[m * n + row0 + r] = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1])) * scale;
  }
}

// what int8_gemv_with (cpu_kernels_common.h) calls
struct Int8 {
  template <int M>  // weight rows per call: two for one or two activation rows, else one (16 registers)
  static constexpr int kRows = M <= 2 ? 2 : 1;
  static Activations8 activations(const float* x, int64_t m_rows, int64_t k) { return prepare8(x, m_rows, k); }
  template <int M, int R, typename... A>
  static void block(const A&... a) {
    rows8<M, R>(a...);
  }
};

// ---- Attention of one new token (decoding) ------------------------------------------------------------------
// cpu_kernels.cpp's attend_one on registers of 8: the G query heads' scores against the keys (8 keys at a time,
// in blocks read from memory once for all G heads), a softmax per head, and the weighted values, two heads at a
// time over 32 columns at a time (8 sums in registers).

// the first `count` of 8 lanes
inline __m256i first8(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))), lanes);
}

// e^x for x <= 0: cpu_kernels.cpp's exp_nonpositive, 2^n built in the exponent bits (n >= -126 after the clamp)
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {  // bf16: the upper half of an fp32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// 8 vectors -> one: lane i holds the sum of v[i]'s lanes
inline __m256 sum8(const __m256 (&v)[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: rows 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename T, int D>
void attend_one(const float* q, const T* k, const T* v, const float* bias, int64_t g_heads, int64_t len,
                int64_t k_row, int64_t v_row, float scale, float* out, std::vector<float>& scores) {
  constexpr int C = D / 8;  // 8-float chunks of a row
  constexpr int64_t kBlock = attend_keys<T, D>(8);
  scores.resize(g_heads * len);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {  // scores, block by block, 8 keys at a time per query head
    const int64_t b1 = std::min(len, b0 + kBlock);
    for (int64_t g = 0; g < g_heads; ++g) {
      const float* qg = q + g * D;  // (from L1)
      for (int64_t j0 = b0; j0 < b1; j0 += 8) {
        const int64_t n = std::min<int64_t>(8, b1 - j0);
        __m256 part[8];
        for (int jj = 0; jj < 8; ++jj) {
          const T* kj = k + (j0 + std::min<int64_t>(jj, n - 1)) * k_row;  // past the end: the last key again
          __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(kj));
          for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c * 8), load8(kj + c * 8), acc);
          part[jj] = acc;
        }
        const __m256i mask = first8(n);
        __m256 sv = _mm256_mul_ps(sum8(part), sc);
        if (bias != nullptr) sv = _mm256_add_ps(sv, _mm256_maskload_ps(bias + j0, mask));
        _mm256_maskstore_ps(scores.data() + g * len + j0, mask, sv);
      }
    }
  }
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < g_heads; ++g) {  // softmax of each head's row
    float* sg = scores.data() + g * len;
    __m256 top = minus_inf;
    for (int64_t j = 0; j < len; j += 8) {
      const __m256i mask = first8(len - j);
      top = _mm256_max_ps(top, _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(sg + j, mask), _mm256_castsi256_ps(mask)));
    }
    const __m256 m = _mm256_set1_ps(hmax(top));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j += 8) {
      const __m256i mask = first8(len - j);
      const __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(sg + j, mask), m)),
                                     _mm256_castsi256_ps(mask));
      _mm256_maskstore_ps(sg + j, mask, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int64_t j = 0; j < len; j += 8) {
      const __m256i mask = first8(len - j);
      _mm256_maskstore_ps(sg + j, mask, _mm256_mul_ps(_mm256_maskload_ps(sg + j, mask), inv));
    }
  }
  // the weighted values, block by block: two heads at a time (each value row loaded once for both), 32 columns
  // per pass, the sums carried in `out` from block to block
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t b1 = std::min(len, b0 + kBlock);
    for (int64_t g = 0; g < g_heads; g += 2) {
      const bool pair = g + 1 < g_heads;
      const float* p0 = scores.data() + g * len;
      const float* p1 = pair ? p0 + len : p0;
      float* o0 = out + g * D;
      float* o1 = pair ? o0 + D : o0;
      for (int c0 = 0; c0 < C; c0 += 4) {
        __m256 a0[4], a1[4];
        for (int c = 0; c < 4; ++c) {
          a0[c] = b0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o0 + (c0 + c) * 8);
          a1[c] = b0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o1 + (c0 + c) * 8);
        }
        for (int64_t j = b0; j < b1; ++j) {
          const T* vj = v + j * v_row + c0 * 8;
          const __m256 w0 = _mm256_broadcast_ss(p0 + j), w1 = _mm256_broadcast_ss(p1 + j);
          for (int c = 0; c < 4; ++c) {
            const __m256 e = load8(vj + c * 8);
            a0[c] = _mm256_fmadd_ps(w0, e, a0[c]);
            a1[c] = _mm256_fmadd_ps(w1, e, a1[c]);
          }
        }
        for (int c = 0; c < 4; ++c) {  // (o1 is o0 for a last single head: the same sums)
          _mm256_storeu_ps(o1 + (c0 + c) * 8, a1[c]);
          _mm256_storeu_ps(o0 + (c0 + c) * 8, a0[c]);
        }
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

// ---- argmax of logits ---------------------------------------------------------------------------------------
// torch.argmax's answer: the first NaN where there is one, else the first maximum (two passes over the row).
int64_t row_argmax(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int nan = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  float top = hmax(best);
  for (; i < n; ++i) {
    if (std::isnan(x[i])) nan = 1;
    top = std::max(top, x[i]);
  }
  const __m256 target = _mm256_set1_ps(top);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (nan ? std::isnan(x[i]) : x[i] == top) return i;
  return 0;  // not reached: the maximum occurs in the row
}

at::Tensor argmax_rows(const at::Tensor& x) { return argmax_rows_with(x, row_argmax); }

// ---- 4-bit (or 5-bit) codes for fp32 weights in groups of 32 (loading) ----------------------------------------
// cpu_kernels.cpp's fit_groups (linear.fit_int4_groups' arithmetic; see there) on four registers of 8.
inline float hmin(__m256 v) {
  const __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_min_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_min_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// the sum of the four registers' lanes
inline float sum4(const __m256 (&v)[4]) { return hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]))); }

inline GroupFit fit_group(const float* w, int top, const std::vector<double>& steps, uint8_t* codes) {
  __m256 x[4], sx[4];
  for (int j = 0; j < 4; ++j) x[j] = _mm256_loadu_ps(w + 8 * j);
  const float lo = hmin(_mm256_min_ps(_mm256_min_ps(x[0], x[1]), _mm256_min_ps(x[2], x[3])));
  const float span = std::max(hmax(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3]))) - lo, 1e-8f);
  const float sum_w = sum4(x), inverse = 1.f / span;
  for (int j = 0; j < 4; ++j) sx[j] = _mm256_sub_ps(x[j], _mm256_set1_ps(lo));
  const __m256 zero = _mm256_setzero_ps(), highest = _mm256_set1_ps(static_cast<float>(top));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even, as torch.round
  auto codes_for = [&](float mult, __m256 (&q)[4]) {
    const __m256 m = _mm256_set1_ps(mult);
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(sx[j], m), kRound), zero), highest);
  };
  const float g = static_cast<float>(kGroup);
  GroupFit best{0.f, 0.f, 0.f};
  float best_err = 0.f;
  for (size_t i = 0; i < steps.size(); ++i) {
    __m256 q[4], qq[4], qw[4], e[4];
    codes_for(inverse * static_cast<float>(top + steps[i]), q);  // (a Python float times a tensor)
    for (int j = 0; j < 4; ++j) {
      qq[j] = _mm256_mul_ps(q[j], q[j]);
      qw[j] = _mm256_mul_ps(q[j], x[j]);
    }
    const float sum_q = sum4(q), sum_qq = sum4(qq), sum_qw = sum4(qw);
    const float det = g * sum_qq - sum_q * sum_q;
    const float s = det <= 0.f ? span / static_cast<float>(top) : (g * sum_qw - sum_q * sum_w) / det;
    const float m = (sum_w - s * sum_q) / g;
    const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
    for (int j = 0; j < 4; ++j) {
      const __m256 d = _mm256_sub_ps(_mm256_add_ps(vm, _mm256_mul_ps(vs, q[j])), x[j]);
      e[j] = _mm256_mul_ps(d, d);
    }
    const float err = sum4(e);
    if (i == 0 || err < best_err) {
      best_err = err;
      best = {s, m, static_cast<float>(steps[i])};
    }
  }
  __m256 q[4];  // the winner's codes, with its step as a float32 tensor holds it (as the PyTorch code)
  codes_for(inverse * (static_cast<float>(top) + best.step), q);
  for (int j = 0; j < 4; j += 2) {
    const __m256i a = _mm256_cvtps_epi32(q[j]), b = _mm256_cvtps_epi32(q[j + 1]);
    store_bytes(a, b, reinterpret_cast<int8_t*>(codes + 8 * j));  // 0..31: the same bytes as uint8
  }
  return best;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_groups(const at::Tensor& w, int64_t bits, at::ArrayRef<double> steps) {
  return fit_groups_with(w, bits, steps, fit_group);
}

}  // namespace

// the same schemas as cpu_kernels.cpp's
TORCH_LIBRARY(qwenlm_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_zeros, Tensor? high=None) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scales) -> Tensor");
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
  m.impl("decode_attention", &decode_attention_with<Attention>);
  m.impl("decode_attention_upto", &decode_attention_upto_with<Attention>);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("fit_groups", &fit_groups);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
