// The lean decoder's per-token operations between its matrix products, fused: fp32, AVX2 + FMA.
//
// A decoding step feeds one token per row, so each operation between two products works on a
// few thousand numbers, and its cost is the call (dispatch, allocation, a pass over memory),
// not the arithmetic. transformers' path takes ~8 ATen calls for rotary embedding and the cache
// write, ~7 for RMSNorm and its residual add, 2 for SwiGLU, and a flash-attention kernel built
// for long queries. Here each is one call:
//   add_rms_norm: h += y (in place), then RMSNorm(h) * weight;
//   silu_mul:     silu(gate) * up;
//   attend:       rotary embedding of q and k at each row's position, k and v written into the
//                 key/value buffers at `slot`, then one-query attention over slots 0..slot, the
//                 query heads that share a key/value head read it once (GQA).
// The sums run in other orders than ATen's (and exp is a polynomial within ~2 ulp), so results
// differ from the ATen path in the last bits: the lean decoder uses these for sampling only.
// Built on first use by grpo.rollout.kernels (torch.utils.cpp_extension).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n.
// x is clamped to [-87.3, 88.3], where 2^n stays a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void check_rows(const torch::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat, "decode_ops: ", name, " must be fp32");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == width && t.stride(1) == 1,
              "decode_ops: ", name, " must be (rows, ", width, ") with contiguous rows");
}

// h += y (y optional), in place; returns h / sqrt(mean(h^2) + eps) * weight. h, y: (rows, D).
torch::Tensor add_rms_norm(torch::Tensor h, const c10::optional<torch::Tensor>& y,
                           const torch::Tensor& weight, double eps) {
  const int64_t D = weight.numel();
  TORCH_CHECK(D % 8 == 0 && weight.is_contiguous(), "add_rms_norm: width a multiple of 8");
  check_rows(h, D, "h");
  if (y.has_value()) check_rows(*y, D, "y");
  auto out = torch::empty({h.size(0), D}, h.options());
  float* H = h.data_ptr<float>();
  const float* Y = y.has_value() ? y->data_ptr<float>() : nullptr;
  const float* W = weight.data_ptr<float>();
  const int64_t hs = h.stride(0), ys = y.has_value() ? y->stride(0) : 0;
  for (int64_t m = 0; m < h.size(0); ++m) {
    float* row = H + m * hs;
    __m256 squares = _mm256_setzero_ps();
    for (int64_t k = 0; k < D; k += 8) {
      __m256 v = _mm256_loadu_ps(row + k);
      if (Y) {
        v = _mm256_add_ps(v, _mm256_loadu_ps(Y + m * ys + k));
        _mm256_storeu_ps(row + k, v);
      }
      squares = _mm256_fmadd_ps(v, v, squares);
    }
    const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(hsum(squares) / D + float(eps)));
    float* o = out.data_ptr<float>() + m * D;
    for (int64_t k = 0; k < D; k += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + k), scale);
      _mm256_storeu_ps(o + k, _mm256_mul_ps(v, _mm256_loadu_ps(W + k)));
    }
  }
  return out;
}

// silu(gate) * up = gate / (1 + e^-gate) * up. gate, up: (rows, F).
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  const int64_t F = gate.size(-1);
  TORCH_CHECK(F % 8 == 0, "silu_mul: width a multiple of 8");
  check_rows(gate, F, "gate");
  check_rows(up, F, "up");
  auto out = torch::empty({gate.size(0), F}, gate.options());
  const float* G = gate.data_ptr<float>();
  const float* U = up.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t m = 0; m < gate.size(0); ++m) {
    const float* g = G + m * gate.stride(0);
    const float* u = U + m * up.stride(0);
    for (int64_t k = 0; k < F; k += 8) {
      const __m256 x = _mm256_loadu_ps(g + k);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
      const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
      _mm256_storeu_ps(O + m * F + k, _mm256_mul_ps(s, _mm256_loadu_ps(u + k)));
    }
  }
  return out;
}

// Rotary embedding of one head (d floats) into `out`: x cos + roll(x, d/2) sin', where sin' is
// the sine with its first half negated (transformers' x cos + rotate_half(x) sin).
inline void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
}

// q: (rows, heads d), k, v: (rows, kv_heads d); cos, sin: (positions, d) tables, `positions`
// (rows,) each row's; keys, values: (rows, kv_heads, capacity, d) buffers; mask: (rows,
// capacity) bool, true where a slot may be attended, or none (all). Writes the rotated k and v
// at `slot` and returns the attention output (rows, heads d).
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, torch::Tensor keys, torch::Tensor values,
                     int64_t slot, const c10::optional<torch::Tensor>& mask, double scale) {
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), capacity = keys.size(2),
                d = keys.size(3);
  const int64_t heads = q.size(1) / d, groups = heads / kv_heads, length = slot + 1;
  TORCH_CHECK(d % 8 == 0 && heads == groups * kv_heads, "attend: head size a multiple of 8");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && values.sizes() == keys.sizes() &&
                  keys.scalar_type() == torch::kFloat && values.scalar_type() == torch::kFloat,
              "attend: contiguous fp32 key/value buffers of one shape");
  TORCH_CHECK(slot >= 0 && slot < capacity, "attend: slot outside the buffers");
  check_rows(q, heads * d, "q");
  check_rows(k, kv_heads * d, "k");
  check_rows(v, kv_heads * d, "v");
  check_rows(cos, d, "cos");
  check_rows(sin, d, "sin");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "attend: contiguous rotary tables");
  const torch::Tensor pos = positions.to(torch::kLong).contiguous();
  TORCH_CHECK(pos.numel() == rows, "attend: one position per row");
  const int64_t* P = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(P[r] >= 0 && P[r] < cos.size(0), "attend: position outside the rotary tables");
  }
  torch::Tensor allowed;
  if (mask.has_value()) {
    allowed = mask->to(torch::kBool).contiguous();
    TORCH_CHECK(allowed.numel() == rows * capacity, "attend: mask must be (rows, capacity)");
  }
  const bool* A = allowed.defined() ? allowed.data_ptr<bool>() : nullptr;
  auto out = torch::empty({rows, heads * d}, q.options());
  float* O = out.data_ptr<float>();
  float* K = keys.data_ptr<float>();
  float* V = values.data_ptr<float>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(groups * d), score(groups * ((length + 7) & ~int64_t(7)));
    const int64_t stride = (length + 7) & ~int64_t(7);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kh = task % kv_heads;
      const float* c = cos.data_ptr<float>() + P[r] * d;
      const float* s = sin.data_ptr<float>() + P[r] * d;
      float* kbuf = K + (r * kv_heads + kh) * capacity * d;
      float* vbuf = V + (r * kv_heads + kh) * capacity * d;
      rotate(k.data_ptr<float>() + r * k.stride(0) + kh * d, c, s, d, kbuf + slot * d);
      const float* vin = v.data_ptr<float>() + r * v.stride(0) + kh * d;
      std::copy(vin, vin + d, vbuf + slot * d);
      for (int64_t g = 0; g < groups; ++g) {
        const float* qin = q.data_ptr<float>() + r * q.stride(0) + (kh * groups + g) * d;
        rotate(qin, c, s, d, query.data() + g * d);
      }
      const bool* allow = A ? A + r * capacity : nullptr;
      for (int64_t g = 0; g < groups; ++g) {  // scores, then softmax weights, per query head
        const float* qg = query.data() + g * d;
        float* sc = score.data() + g * stride;
        float top = -INFINITY;
        for (int64_t t = 0; t < length; ++t) {
          if (allow && !allow[t]) {
            sc[t] = -INFINITY;
            continue;
          }
          const float* kt = kbuf + t * d;
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          int64_t i = 0;
          for (; i + 16 <= d; i += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), _mm256_loadu_ps(kt + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), _mm256_loadu_ps(kt + i + 8), a1);
          }
          if (i < d) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), _mm256_loadu_ps(kt + i), a0);
          sc[t] = hsum(_mm256_add_ps(a0, a1)) * float(scale);
          top = std::max(top, sc[t]);
        }
        for (int64_t t = length; t < stride; ++t) sc[t] = -INFINITY;
        const __m256 shift = _mm256_set1_ps(top), ninf = _mm256_set1_ps(-INFINITY);
        __m256 total = _mm256_setzero_ps();
        for (int64_t t = 0; t < stride; t += 8) {
          const __m256 x = _mm256_loadu_ps(sc + t);
          const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ),
                                            exp8(_mm256_sub_ps(x, shift)));
          _mm256_storeu_ps(sc + t, e);
          total = _mm256_add_ps(total, e);
        }
        const float inverse = 1.0f / hsum(total);
        float* o = O + r * heads * d + (kh * groups + g) * d;
        for (int64_t i = 0; i < d; i += 64) {  // the weighted sum of v, 64 dimensions at a time
          const int64_t width = std::min<int64_t>(64, d - i) / 8;
          __m256 acc[8];
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
          for (int64_t t = 0; t < length; ++t) {
            if (sc[t] == 0.0f) continue;
            const __m256 w = _mm256_set1_ps(sc[t]);
            const float* vt = vbuf + t * d + i;
            for (int j = 0; j < width; ++j) {
              acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * j), acc[j]);
            }
          }
          const __m256 inv = _mm256_set1_ps(inverse);
          for (int j = 0; j < width; ++j) _mm256_storeu_ps(o + i + 8 * j, _mm256_mul_ps(acc[j], inv));
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("attend", &attend);
}
