// y = x W^T + b for a few rows of x (the lean decoder's batch), fp32, AVX2 + FMA.
//
// Decoding multiplies a handful of rows by every weight matrix once per token, so a product is
// bound by reading W once from memory. W is read in its own row-major layout (no packed copy):
// each output n streams its row W[n, :] once, 8 floats at a time, against up to 8 rows of x
// (held in L1), one accumulator vector per row; the next row of W is prefetched into L1 and W
// 16 KB further on into L2. More rows of x take further passes over the same tile of 64 W rows,
// which is in cache by then. Outputs are
// split over torch's threads. Every output's sum runs over k in the same order whatever the batch,
// the row block or the thread count, so the result of a row does not depend on the other rows.
// Built on first use by grpo.rollout.products (torch.utils.cpp_extension).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kTile = 64;  // W rows per tile: each tile's rows are reused by every row block
// Floats of W ahead (16 KB) that each line's L2 prefetch asks for: with only the next row asked
// into L1 a core has too few misses in flight to stream at the memory's rate (SmolLM2's decoding
// products 31.6 -> 24.0 ms a step on an AVX-512 EPYC; docs/performance.md, change 21).
constexpr int64_t kAhead = 4096;
// x rows per pass: 8 while they fit L1 beside W's lines (K <= 1024 floats: 32 KB), else 4.
inline int64_t row_block(int64_t K) { return K <= 1024 ? 8 : 4; }

// Outputs n0..n1 of R rows of x (row stride K) into y (row stride N).
template <int R>
void outputs(const float* x, int64_t K, const float* w, int64_t n0, int64_t n1,
             const float* bias, float* y, int64_t N) {
  const int64_t whole = K & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    __m256 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < whole; k += 8) {
      if ((k & 15) == 0) {  // once per 64-byte line: the next row into L1, W further on into L2
        if (n + 1 < N) _mm_prefetch((const char*)(row + K + k), _MM_HINT_T0);
        _mm_prefetch((const char*)(row + k + kAhead), _MM_HINT_T1);
      }
      const __m256 v = _mm256_loadu_ps(row + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * K + k), acc[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      float total = _mm_cvtss_f32(s);
      for (int64_t k = whole; k < K; ++k) total += row[k] * x[r * K + k];
      y[r * N + n] = bias ? total + bias[n] : total;
    }
  }
}

using Block = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*,
                       float*, int64_t);
constexpr Block kBlocks[8] = {outputs<1>, outputs<2>, outputs<3>, outputs<4>,
                              outputs<5>, outputs<6>, outputs<7>, outputs<8>};

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat,
              "few_rows.linear: fp32 only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "few_rows.linear: a contiguous 2-D W");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.size(-1) == K, "few_rows.linear: x's last dimension must be W's columns");
  const torch::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat && b.numel() == N, "few_rows.linear: bias");
  }
  auto y = torch::empty({M, N}, x.options());
  const float* X = rows.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  const float* B = b.defined() ? b.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  const int64_t block = row_block(K);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += kTile) {
      const int64_t stop = std::min(n + kTile, end);
      for (int64_t m = 0; m < M; m += block) {
        kBlocks[std::min(block, M - m) - 1](X + m * K, K, W, n, stop, B, Y + m * N, N);
      }
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("linear", &linear); }
