// What qwenlm's two builds of the CPU kernels share (cpu_kernels.cpp for AVX-512 VNNI, cpu_kernels_avx2.cpp
// for AVX2): the weights' layout constants, the bf16 scale conversion, the padding of activation rows to one
// compiled loop each, the split of the weight rows over the threads, the weights' checks, and the drivers of
// int4_gemv, int8_gemv, argmax_rows and fit_groups around each build's own per-row and per-group code; and two
// small operations of eager decoding both builds have as they are (rms_norm, rotary). No vector instructions here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kStep = 4;  // groups per step: one cache line of codes
constexpr int64_t kMaxRows = 16;
// Prefetch distance in weight bytes. The software prefetches go to L2 (T1), not L1: on a 2-core AMD EPYC
// (Zen 4), with two rows at a time, the weights were read 1.24x (int4) and 1.73x (int8) faster at batch 1
// than with T0 and four rows (benchmarks/RESULTS.md); without prefetches, ~1.5x slower; the distance
// (3-32 KB) hardly mattered.
constexpr int64_t kAheadBytes = 8192;
constexpr int64_t kHighBytes = 16;     // fifth bits per step of 128 weights (5-bit weights only)

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The N weight rows in blocks of R over the threads; a last partial block row by row.
template <int R, typename Block, typename Row>
void over_rows(int64_t n, const Block& block, const Row& row) {
  at::parallel_for(0, (n + R - 1) / R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * R;
      if (row0 + R <= n) {
        block(row0);
      } else {
        for (int64_t r = row0; r < n; ++r) row(r);
      }
    }
  });
}

// The activations (M, K) as fp32, padded with zero rows up to 1, 2, 4, 8 or 16 (one compiled loop each;
// zero rows cost no weight reads); run(x, std::integral_constant<int, padded>) makes the (padded, N) output.
template <typename Run>
at::Tensor padded_rows(const char* name, const at::Tensor& x_in, const Run& run) {
  const int64_t m_rows = x_in.size(0), k = x_in.size(1);
  TORCH_CHECK(m_rows >= 1 && m_rows <= kMaxRows, name, ": 1 to 16 rows");
  const int64_t padded = m_rows == 1 ? 1 : m_rows <= 2 ? 2 : m_rows <= 4 ? 4 : m_rows <= 8 ? 8 : 16;
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  if (padded != m_rows) x = at::cat({x, at::zeros({padded - m_rows, k}, x.options())});
  at::Tensor out;
  switch (padded) {
    case 1: out = run(x, std::integral_constant<int, 1>{}); break;
    case 2: out = run(x, std::integral_constant<int, 2>{}); break;
    case 4: out = run(x, std::integral_constant<int, 4>{}); break;
    case 8: out = run(x, std::integral_constant<int, 8>{}); break;
    default: out = run(x, std::integral_constant<int, 16>{}); break;
  }
  return padded == m_rows ? out : out.narrow(0, 0, m_rows).contiguous();
}

// The weights both functions take: (N, K/2) uint8 codes and (N, K/32, 2) bf16 scales and zeros, and for
// 5-bit weights their fifth bits (N, ceil(K/128) * 16) uint8; returns the fifth bits' pointer or null.
const uint8_t* check_weights(const char* name, const at::Tensor& packed, const at::Tensor& sz,
                             const std::optional<at::Tensor>& high) {
  TORCH_CHECK(packed.dim() == 2 && sz.dim() == 3, name, ": packed (N, K/2), sz (N, K/32, 2)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && sz.scalar_type() == at::kBFloat16, name, ": uint8 codes, bf16 scales");
  TORCH_CHECK(sz.size(0) == packed.size(0) && sz.size(1) * kGroup == packed.size(1) * 2 && sz.size(2) == 2,
              name, ": scales must be (N, K/32, 2)");
  if (!high.has_value()) return nullptr;
  const int64_t steps = (sz.size(1) + kStep - 1) / kStep;
  TORCH_CHECK(high->dim() == 2 && high->scalar_type() == at::kByte && high->size(0) == packed.size(0) &&
                  high->size(1) == steps * kHighBytes && high->is_contiguous(),
              name, ": fifth bits must be contiguous uint8 (N, ceil(K/128) * 16)");
  return high->data_ptr<uint8_t>();
}

// int4_gemv and int8_gemv around a build's kernel K: the checks, the padding of activation rows, and the split of
// the weight rows over the threads. K::kRows<M> weight rows per block for M activation rows; K::activations(x,
// M, k[, offset]) the activations prepared once per call; K::block<M, R[, Five]>(...) R weight rows times them.
template <typename K>
at::Tensor int4_gemv_with(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& sz,
                          const std::optional<at::Tensor>& high_bits) {
  const uint8_t* high = check_weights("int4_gemv", packed, sz, high_bits);
  TORCH_CHECK(x_in.dim() == 2, "int4_gemv: x (M, K)");
  const int64_t k = x_in.size(1), n = packed.size(0);
  TORCH_CHECK(k % (2 * kGroup) == 0 && packed.size(1) * 2 == k, "int4_gemv: K must be a multiple of 64 and match the codes");
  const at::Tensor codes = packed.contiguous();
  const at::Tensor scales = sz.contiguous();
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  return padded_rows("int4_gemv", x_in, [&](const at::Tensor& x, auto rows_m) {
    constexpr int M = decltype(rows_m)::value, R = K::template kRows<M>;
    at::Tensor out = at::empty({M, n}, x.options());
    const auto act = K::activations(x.data_ptr<float>(), M, k, high != nullptr ? 16.f : 8.f);
    const int64_t ahead = std::max<int64_t>(R, kAheadBytes / (k / 2));  // rows
    float* y = out.data_ptr<float>();
    const auto over = [&](auto five) {
      constexpr bool Five = decltype(five)::value;
      over_rows<R>(n, [&](int64_t row0) { K::template block<M, R, Five>(w, s, high, act, k, n, row0, ahead, y); },
                   [&](int64_t row) { K::template block<M, 1, Five>(w, s, high, act, k, n, row, ahead, y); });
    };
    if (high != nullptr) {
      over(std::true_type{});
    } else {
      over(std::false_type{});
    }
    return out;
  });
}

template <typename K>
at::Tensor int8_gemv_with(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8_gemv: weight (N, K) int8");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == weight.size(0), "int8_gemv: scales (N,)");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == weight.size(1), "int8_gemv: x (M, K) against weight (N, K)");
  const int64_t k = x_in.size(1), n = weight.size(0);
  TORCH_CHECK(k % kGroup == 0, "int8_gemv: K must be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16, "int8_gemv: bf16 scales");
  const at::Tensor wc = weight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const int8_t* w = wc.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>());
  return padded_rows("int8_gemv", x_in, [&](const at::Tensor& x, auto rows_m) {
    constexpr int M = decltype(rows_m)::value, R = K::template kRows<M>;
    at::Tensor out = at::empty({M, n}, x.options());
    const auto act = K::activations(x.data_ptr<float>(), M, k);
    const int64_t ahead = std::max<int64_t>(R, kAheadBytes / k);  // rows
    float* y = out.data_ptr<float>();
    over_rows<R>(n, [&](int64_t row0) { K::template block<M, R>(w, s, act, k, n, row0, ahead, y); },
                 [&](int64_t row) { K::template block<M, 1>(w, s, act, k, n, row, ahead, y); });
    return out;
  });
}

// Keys (and values) per block of attend_one: kAttendBytes of rows of D elements of T, in multiples of `multiple`
constexpr int64_t kAttendBytes = 32768;
template <typename T, int D>
constexpr int64_t attend_keys(int64_t multiple) {
  const int64_t keys = kAttendBytes / (D * static_cast<int64_t>(sizeof(T)));
  return keys < multiple ? multiple : keys / multiple * multiple;
}

// decode_attention(_upto): the checks, the bias, and the (batch row, key/value head) items over the threads,
// each through the build's K::one<T, D>(q, k, v, bias, g_heads, len, k_row, v_row, scale, out, scores): the G
// query heads of one key/value head (cpu_kernels.cpp explains the arithmetic)
template <typename K, typename T, int D>
void attend(const at::Tensor& qf, const at::Tensor& k, const at::Tensor& v, const float* bias, int64_t bias_batch,
            int64_t len, float scale, at::Tensor& out) {
  const int64_t b = k.size(0), kvh = k.size(1), bias_row = k.size(2), g_heads = qf.size(1) / kvh;
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, b * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / kvh, head = item % kvh;
      const int64_t q_at = (row * qf.size(1) + head * g_heads) * D;
      K::template one<T, D>(qp + q_at, kp + row * k.stride(0) + head * k.stride(1), vp + row * v.stride(0) + head * v.stride(1),
                       bias != nullptr ? bias + (bias_batch == 1 ? 0 : row) * bias_row : nullptr, g_heads, len,
                       k.stride(2), v.stride(2), scale, op + q_at, scores);
    }
  });
}

template <typename K, typename T>
void attend_sized(const at::Tensor& qf, const at::Tensor& k, const at::Tensor& v, const float* bias,
                  int64_t bias_batch, int64_t len, float scale, at::Tensor& out) {
  if (k.size(3) == 64) {
    attend<K, T, 64>(qf, k, v, bias, bias_batch, len, scale, out);
  } else {
    attend<K, T, 128>(qf, k, v, bias, bias_batch, len, scale, out);
  }
}

template <typename K>
at::Tensor attention_of_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& length_in) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "decode_attention: q (B, H, 1, D), k and v (B, KVH, L, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0 && k.size(2) > 0,
              "decode_attention: k and v of one shape (B, KVH, L, D), H a multiple of KVH, L >= 1");
  TORCH_CHECK(k.size(3) == 64 || k.size(3) == 128, "decode_attention: head size must be 64 or 128");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kHalf),
              "decode_attention: k and v both float32, both bfloat16 or both float16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v rows must be contiguous");
  int64_t len = k.size(2);  // the keys attended: all, or the first `length` (a static cache's filled part)
  if (length_in.has_value()) {
    TORCH_CHECK(length_in->numel() == 1 && length_in->scalar_type() == at::kLong && length_in->device().is_cpu(),
                "decode_attention: length must be one int64 on the CPU");
    len = length_in->contiguous().data_ptr<int64_t>()[0];
    TORCH_CHECK(len >= 1 && len <= k.size(2), "decode_attention: length ", len, " outside 1..", k.size(2));
  }
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor bias;
  int64_t bias_batch = 1;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 4 && bias_in->size(1) == 1 && bias_in->size(2) == 1 && bias_in->size(3) == k.size(2) &&
                    (bias_in->size(0) == 1 || bias_in->size(0) == k.size(0)),
                "decode_attention: bias (B or 1, 1, 1, L)");
    bias = bias_in->to(at::kFloat).contiguous();
    bias_batch = bias.size(0);
  }
  at::Tensor out = at::empty(qf.sizes(), qf.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(k.size(3)));
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (k.scalar_type() == at::kFloat) {
    attend_sized<K, float>(qf, k, v, bp, bias_batch, len, scale, out);
  } else if (k.scalar_type() == at::kHalf) {
    attend_sized<K, at::Half>(qf, k, v, bp, bias_batch, len, scale, out);
  } else {
    attend_sized<K, uint16_t>(qf, k, v, bp, bias_batch, len, scale, out);
  }
  return out.to(q.scalar_type());
}

template <typename K>
at::Tensor decode_attention_with(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& bias) {
  return attention_of_one<K>(q, k, v, bias, std::nullopt);
}

// the first `length` keys only (a tensor: a static cache's filled part). An op of its own, not an argument
// of decode_attention: steps compiled before it existed (inductor's caches) call decode_attention with
// its four arguments
template <typename K>
at::Tensor decode_attention_upto_with(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& length) {
  return attention_of_one<K>(q, k, v, bias, length);
}

// A group's fitted scale and offset and the step offset that won (fit_groups)
struct GroupFit {
  float scale, offset, step;
};

// argmax_rows: the rows of x (B, V) each through the build's row_argmax(row, V), over the threads
template <typename RowArgmax>
at::Tensor argmax_rows_with(const at::Tensor& x, const RowArgmax& row_argmax) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: x (B, V) float32 with V >= 1");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * n, n);
  });
  return out;
}

// fit_groups: every group of 32 weights of w (N, K) through the build's fit_group(group, top, steps, codes)
template <typename Fit>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_groups_with(const at::Tensor& w_in, int64_t bits,
                                                               at::ArrayRef<double> steps_in, const Fit& fit_group) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kFloat && w_in.size(1) % kGroup == 0,
              "fit_groups: w (N, K) float32 with K a multiple of 32");
  TORCH_CHECK((bits == 4 || bits == 5) && !steps_in.empty(), "fit_groups: bits 4 or 5 and at least one step");
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1), groups = k / kGroup;
  const int top = (1 << bits) - 1;
  const float middle = static_cast<float>(1 << (bits - 1));
  const std::vector<double> steps(steps_in.begin(), steps_in.end());
  at::Tensor codes = at::empty({n, k}, w.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n, groups}, w.options());
  at::Tensor zero = at::empty({n, groups}, w.options());
  const float* wp = w.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  at::parallel_for(0, n * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const GroupFit f = fit_group(wp + i * kGroup, top, steps, cp + i * kGroup);
      sp[i] = f.scale;
      zp[i] = f.offset + middle * f.scale;
    }
  });
  return {codes, scale, zero};
}

// rms_norm: every row of x (..., K) float32 divided by its root mean square, then times w (K,): (x * (1 /
// sqrt(mean(x^2) + eps))) * w, the reference's order of operations; the squares summed in float32 over 16
// lanes (another order than PyTorch's mean: equal to ~1e-7). One operation for the eight of an eager
// RMSNorm.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat && w_in.dim() == 1 &&
                  x_in.dim() >= 1 && x_in.size(-1) == w_in.size(0) && w_in.size(0) > 0,
              "rms_norm: x (..., K) and weight (K,) float32");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t k = w.size(0), rows = x.numel() / k;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * k;
      float lanes[16] = {};
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        for (int j = 0; j < 16; ++j) lanes[j] += xr[i + j] * xr[i + j];
      }
      for (; i < k; ++i) lanes[i % 16] += xr[i] * xr[i];
      for (int width = 8; width >= 1; width /= 2) {
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
      }
      const float inv = 1.f / std::sqrt(lanes[0] / static_cast<float>(k) + epsf);
      float* o = op + r * k;
      for (int64_t c = 0; c < k; ++c) o[c] = (xr[c] * inv) * wp[c];
    }
  });
  return out;
}

// rotary: x (B, T, H, D) float32 (rows of D contiguous; e.g. the queries and keys side by side in a view of
// the QKV projection) rotated in Qwen's rotate-half layout by cos and sin (A, 1, T, d), A 1 or B, d <= D even:
// y_i = x_i c_i - x_{i+d/2} s_i and y_{i+d/2} = x_{i+d/2} c_{i+d/2} + x_i s_{i+d/2} for i < d/2, the features
// from d on as they are; (B, T, H, D) contiguous. The reference's products and sums in its order: the same
// bits. One operation for the nine of the eager rotation.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1,
              "rotary: x (B, T, H, D) float32 with contiguous rows");
  TORCH_CHECK(cos_in.sizes() == sin_in.sizes() && cos_in.dim() == 4 && cos_in.scalar_type() == at::kFloat &&
                  sin_in.scalar_type() == at::kFloat && (cos_in.size(0) == 1 || cos_in.size(0) == x.size(0)) &&
                  cos_in.size(1) == 1 && cos_in.size(2) == x.size(1) && cos_in.size(3) % 2 == 0 &&
                  cos_in.size(3) <= x.size(3),
              "rotary: cos and sin (1 or B, 1, T, d) float32, d even and at most D");
  const at::Tensor c = cos_in.contiguous(), s = sin_in.contiguous();
  const int64_t b = x.size(0), t = x.size(1), heads = x.size(2), d_all = x.size(3), d = c.size(3), half = d / 2;
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2), tables = c.size(0);
  at::Tensor out = at::empty({b, t, heads, d_all}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, b * t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t row = bt / t, pos = bt % t;
      const float* cr = cp + ((tables == 1 ? 0 : row) * t + pos) * d;
      const float* sr = sp + ((tables == 1 ? 0 : row) * t + pos) * d;
      for (int64_t h = 0; h < heads; ++h) {
        const float* xr = xp + row * sb + pos * st + h * sh;
        float* o = op + (bt * heads + h) * d_all;
        for (int64_t i = 0; i < half; ++i) {
          o[i] = xr[i] * cr[i] + (-xr[i + half]) * sr[i];
          o[i + half] = xr[i + half] * cr[i + half] + xr[i] * sr[i + half];
        }
        for (int64_t i = d; i < d_all; ++i) o[i] = xr[i];
      }
    }
  });
  return out;
}

}  // namespace
