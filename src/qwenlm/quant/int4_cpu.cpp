// 4-bit weight x few-row activation product for x86 CPUs with AVX-512 VNNI (qwenlm.quant.cpu_kernel), and
// the weights dequantised to bf16 (or fp32) in one pass for prompt-sized products (int4_dequant, at the end).
//
// Weights: Int4Linear's own layout, (N, K/2) bytes, weight 2i of a row in the low nibble of byte i, 2i+1 in
// the high one; per group of 32 weights a bf16 scale s and zero z, w = (q - 8) * s + z, passed as (N, G, 2).
// Activations are split per block of 32 into two int8 parts, x = d (xq + xr / 256) with d = max|x| / 127
// (xq as llama.cpp's Q8 blocks, xr the rounding residual: ~15 bits in all, so the activations lose about
// what bf16 loses), and a group's sum  sum_j x_j (q_j s + z - 8 s)  becomes
// s d / 256 (256 q.xq + q.xr)  +  (z - 8 s) sum_j x_j : the dot products are 64 byte products per VNNI
// instruction, the second term uses the exact block sum of x.
// Two groups (64 weights, 32 bytes) go through one 512-bit register:
//   codes = [lo nibbles of g | lo of g+1 | hi of g | hi of g+1]  (16 bytes each)
// and the activations are stored once per call in the matching order (even positions of g, of g+1, odd
// positions of g, of g+1), so that dpbusd's 4-byte lanes 0-3 and 8-11 belong to group g, 4-7 and 12-15 to g+1.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxRows = 16;
constexpr int64_t kAheadBytes = 8192;  // prefetch distance in weight bytes

struct Activations {
  std::vector<int8_t> xq;    // (M, G/2, 64) int8, in the register order above
  std::vector<int8_t> xr;    // the same for the rounding residual, in steps of 1/256 of xq's
  std::vector<float> dx;     // (M, G/2, 16): per lane, the int8 scale of the lane's group
  std::vector<float> xs;     // (M, G/2, 4): [-8 sum_g, sum_g, -8 sum_g1, sum_g1] against [s_g, z_g, s_g1, z_g1]
};

Activations prepare(const float* x, int64_t m_rows, int64_t k) {
  const int64_t pairs = k / (2 * kGroup);
  Activations a;
  a.xq.resize(m_rows * pairs * 64);
  a.xr.resize(m_rows * pairs * 64);
  a.dx.resize(m_rows * pairs * 16);
  a.xs.resize(m_rows * pairs * 4);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t p = 0; p < pairs; ++p) {
      int8_t* q = a.xq.data() + (m * pairs + p) * 64;
      int8_t* r = a.xr.data() + (m * pairs + p) * 64;
      float* d = a.dx.data() + (m * pairs + p) * 16;
      float* s = a.xs.data() + (m * pairs + p) * 4;
      for (int64_t h = 0; h < 2; ++h) {  // group g = 2p + h
        const float* xg = x + m * k + (2 * p + h) * kGroup;
        const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        // x / d = xq + xr / 256 (round to nearest, the default mode; saturated to int8): about 15 bits
        const __m512 fe = _mm512_mul_ps(_mm512_permutex2var_ps(v0, evens, v1), inv);
        const __m512 fo = _mm512_mul_ps(_mm512_permutex2var_ps(v0, odds, v1), inv);
        const __m512i e = _mm512_cvtps_epi32(fe), o = _mm512_cvtps_epi32(fo);
        const __m512 k256 = _mm512_set1_ps(256.f);
        const __m512i re = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(fe, _mm512_cvtepi32_ps(e)), k256));
        const __m512i ro = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(fo, _mm512_cvtepi32_ps(o)), k256));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + h * 16), _mm512_cvtsepi32_epi8(e));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 + h * 16), _mm512_cvtsepi32_epi8(o));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r + h * 16), _mm512_cvtsepi32_epi8(re));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r + 32 + h * 16), _mm512_cvtsepi32_epi8(ro));
        const float scale = amax / 127.f / 256.f;  // the combined sum below is in steps of d / 256
        for (int64_t l = 0; l < 4; ++l) {
          d[h * 4 + l] = scale;
          d[8 + h * 4 + l] = scale;
        }
        s[2 * h] = -8.f * sum;
        s[2 * h + 1] = sum;
      }
    }
  }
  return a;
}

// R weight rows at a time (independent chains for the out-of-order core), M activation rows with their
// accumulators in registers (M and R fixed at compile time).
template <int M, int R>
void rows(const uint8_t* w, const uint16_t* s, const Activations& act, int64_t k, int64_t n, int64_t row0,
          int64_t ahead, float* y) {
  const int64_t pairs = k / (2 * kGroup);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
  __m512 acc[R][M];
  __m128 off[R][M];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      acc[r][m] = _mm512_setzero_ps();
      off[r][m] = _mm_setzero_ps();
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      // the rows a few blocks ahead: more loads in flight than the hardware prefetcher starts by itself
      _mm_prefetch(reinterpret_cast<const char*>(w + std::min(row + ahead, n - 1) * (k / 2) + p * 32), _MM_HINT_T0);
      if ((p & 7) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(s + std::min(row + ahead, n - 1) * (k / kGroup) * 2 + p * 4), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + row * (k / 2) + p * 32));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      // [s_g, z_g, s_g1, z_g1] bf16 -> fp32
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + row * (k / kGroup) * 2 + p * 4));
      const __m128 szf = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
      const __m512 sv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(szf));
      for (int m = 0; m < M; ++m) {  // the activations of pair p come from L1 (few KB per call)
        const int64_t at_ = m * pairs + p;
        const __m512i xv = _mm512_loadu_si512(act.xq.data() + at_ * 64);
        const __m512i xr = _mm512_loadu_si512(act.xr.data() + at_ * 64);
        // 256 * (q . xq) + (q . xr): at most 4 * 15 * 127 * 257 per lane, far inside int32
        const __m512i dot = _mm512_dpbusd_epi32(
            _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv), 8), q, xr);
        const __m512 c = _mm512_mul_ps(sv, _mm512_loadu_ps(act.dx.data() + at_ * 16));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), c, acc[r][m]);
        off[r][m] = _mm_fmadd_ps(szf, _mm_loadu_ps(act.xs.data() + at_ * 4), off[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      alignas(16) float t[4];
      _mm_store_ps(t, off[r][m]);
      y[m * n + row0 + r] = _mm512_reduce_add_ps(acc[r][m]) + (t[0] + t[1] + t[2] + t[3]);
    }
  }
}

template <int M>
void all_rows(const uint8_t* w, const uint16_t* s, const Activations& act, int64_t k, int64_t n, float* y) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t ahead = std::max<int64_t>(R, kAheadBytes / (k / 2));  // rows
  at::parallel_for(0, (n + R - 1) / R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * R;
      if (row0 + R <= n) {
        rows<M, R>(w, s, act, k, n, row0, ahead, y);
      } else {
        for (int64_t row = row0; row < n; ++row) rows<M, 1>(w, s, act, k, n, row, ahead, y);
      }
    }
  });
}

// The weights both functions take: (N, K/2) uint8 codes and (N, K/32, 2) bf16 scales and zeros.
void check_weights(const char* name, const at::Tensor& packed, const at::Tensor& sz) {
  TORCH_CHECK(packed.dim() == 2 && sz.dim() == 3, name, ": packed (N, K/2), sz (N, K/32, 2)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && sz.scalar_type() == at::kBFloat16, name, ": uint8 codes, bf16 scales");
  TORCH_CHECK(sz.size(0) == packed.size(0) && sz.size(1) * kGroup == packed.size(1) * 2 && sz.size(2) == 2,
              name, ": scales must be (N, K/32, 2)");
}

at::Tensor int4_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& sz) {
  check_weights("int4_gemv", packed, sz);
  TORCH_CHECK(x_in.dim() == 2, "int4_gemv: x (M, K)");
  const int64_t m_rows = x_in.size(0), k = x_in.size(1), n = packed.size(0);
  TORCH_CHECK(k % (2 * kGroup) == 0 && packed.size(1) * 2 == k, "int4_gemv: K must be a multiple of 64 and match the codes");
  TORCH_CHECK(m_rows >= 1 && m_rows <= kMaxRows, "int4_gemv: 1 to 16 rows");
  // rows padded with zeros up to 1, 2, 4, 8 or 16 (one compiled loop each); zero rows cost no weight reads
  const int64_t padded = m_rows == 1 ? 1 : m_rows <= 2 ? 2 : m_rows <= 4 ? 4 : m_rows <= 8 ? 8 : 16;
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  if (padded != m_rows) x = at::cat({x, at::zeros({padded - m_rows, k}, x.options())});
  const at::Tensor codes = packed.contiguous();
  const at::Tensor scales = sz.contiguous();
  at::Tensor out = at::empty({padded, n}, x.options());
  const Activations act = prepare(x.data_ptr<float>(), padded, k);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* y = out.data_ptr<float>();
  switch (padded) {
    case 1: all_rows<1>(w, s, act, k, n, y); break;
    case 2: all_rows<2>(w, s, act, k, n, y); break;
    case 4: all_rows<4>(w, s, act, k, n, y); break;
    case 8: all_rows<8>(w, s, act, k, n, y); break;
    default: all_rows<16>(w, s, act, k, n, y); break;
  }
  return padded == m_rows ? out : out.narrow(0, 0, m_rows).contiguous();
}

// fp32 -> bf16 bits, round to nearest even (as c10::BFloat16 does for finite values), in the low 16 bits
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }

inline __m512 bf16_to_ps(uint16_t h) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(h) << 16)); }

// The weights as an (N, K) matrix for prompt-sized products, in one pass, exactly Int4Linear.dequantize():
// in bf16 ((q - 8) * s) rounded to bf16, + z rounded to bf16, as PyTorch's bf16 element-wise ops round; with
// float32 the same two steps in fp32 (built with -ffp-contract=off: a fused multiply-add would round once).
at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& sz, bool float32) {
  check_weights("int4_dequant", packed, sz);
  const int64_t n = packed.size(0), k = packed.size(1) * 2, groups = k / kGroup;
  const at::Tensor codes = packed.contiguous();
  const at::Tensor scales = sz.contiguous();
  at::Tensor out = at::empty({n, k}, packed.options().dtype(float32 ? at::kFloat : at::kBFloat16));
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  uint16_t* y = float32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* yf = float32 ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512 eight = _mm512_set1_ps(8.f);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k / 2 + g * 16));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        const __m512 sc = bf16_to_ps(s[(r * groups + g) * 2]), ze = bf16_to_ps(s[(r * groups + g) * 2 + 1]);
        for (int half = 0; half < 2; ++half) {  // weights 0-15 (bytes 0-7), then 16-31 (bytes 8-15)
          const __m128i q8 = half == 0 ? _mm_unpacklo_epi8(lo, hi) : _mm_unpackhi_epi8(lo, hi);
          const __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8)), eight);
          const int64_t at_ = r * k + g * kGroup + half * 16;
          if (float32) {
            _mm512_storeu_ps(yf + at_, _mm512_add_ps(_mm512_mul_ps(q, sc), ze));
          } else {
            const __m512 v = round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(q, sc)), ze));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + at_), _mm512_cvtepi32_epi16(bf16_bits(v)));
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenlm_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor");
  m.def("int4_dequant(Tensor packed, Tensor scales_zeros, bool float32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenlm_cpu, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_dequant", &int4_dequant);
}
