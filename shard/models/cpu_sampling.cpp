// The two statistics every sampling row of a step needs, from one read of its logits each: the greedy
// token (argmax, the first of equal maxima, as torch.argmax) and the logsumexp (for the chosen token's
// logprob). ATen's argmax and logsumexp took ~1.1 ms a step at batch 16 over a 49k vocabulary (2-core
// AVX2 host), argmax alone 0.5 ms. And the grammar masks of the constrained rows (mask_logits, below).
// x86 with AVX2 + FMA; built by shard/models/cpu_kernels.py.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_vec.h"

namespace {

// One row: (index of its first maximum, logsumexp). NaNs are not looked for: logits are finite or -inf.
std::pair<int64_t, float> row_stats(const float* r, int64_t V) {
  const int64_t V8 = V / 8 * 8;
  float top = -std::numeric_limits<float>::infinity();
  int64_t at = 0;
  if (V8) {
    // Each lane's maximum and the first position it was seen at, then the lanes compared.
    __m256 best = _mm256_loadu_ps(r);
    __m256i where = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), pos = where;
    const __m256i step = _mm256_set1_epi32(8);
    for (int64_t v = 8; v < V8; v += 8) {
      pos = _mm256_add_epi32(pos, step);
      const __m256 x = _mm256_loadu_ps(r + v);
      const __m256 more = _mm256_cmp_ps(x, best, _CMP_GT_OQ);
      best = _mm256_blendv_ps(best, x, more);
      where = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(pos), more));
    }
    alignas(32) float lanes[8];
    alignas(32) int32_t places[8];
    _mm256_store_ps(lanes, best);
    _mm256_store_si256(reinterpret_cast<__m256i*>(places), where);
    top = lanes[0], at = places[0];
    for (int i = 1; i < 8; i++)
      if (lanes[i] > top || (lanes[i] == top && places[i] < at)) top = lanes[i], at = places[i];
  }
  for (int64_t v = V8; v < V; v++)
    if (r[v] > top) top = r[v], at = v;
  if (top == -std::numeric_limits<float>::infinity()) return {at, top};  // every token masked
  const __m256 m = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t v = 0; v < V8; v += 8) sum = _mm256_add_ps(sum, sluice_vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(r + v), m)));
  alignas(32) float parts[8];
  _mm256_store_ps(parts, sum);
  float total = 0;
  for (float p : parts) total += p;
  for (int64_t v = V8; v < V; v++) total += std::exp(r[v] - top);
  return {at, top + std::log(total)};
}

// logits [n, V] float32 -> (argmax [n] int64, logsumexp [n] float32).
std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits_in) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat && logits_in.device().is_cpu(),
              "float32 logits [n, vocab] on the CPU");
  TORCH_CHECK(logits_in.size(1) > 0 && logits_in.size(1) < (int64_t{1} << 31), "a vocabulary of 1 to 2^31 - 1 tokens");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor chosen = at::empty({n}, logits.options().dtype(at::kLong)), lse = at::empty({n}, logits.options());
  const float* lp = logits.const_data_ptr<float>();
  int64_t* cp = chosen.data_ptr<int64_t>();
  float* sp = lse.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) std::tie(cp[i], sp[i]) = row_stats(lp + i * V, V);
  });
  return {chosen, lse};
}

// Grammar masks (shard/grammar.py): -inf in logits [n, V] wherever bit t % 32 of bitmask[i, t / 32] is 0.
// Unpacking the bits with ATen ops (shift, and, masked_fill over [n, V]) took 0.6-2 ms a step at 16 rows
// over a 49k vocabulary (Zen 5 host): up to a tenth of a decode step. Words that allow all 32 tokens are skipped.
void mask_logits(at::Tensor& logits, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
                  logits.is_contiguous(),
              "contiguous float32 logits [n, vocab] on the CPU");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() &&
                  bitmask.size(0) == logits.size(0) && bitmask.size(1) * 32 >= logits.size(1),
              "a contiguous int32 bitmask [n, ceil(vocab / 32)]");
  const int64_t n = logits.size(0), V = logits.size(1), W = bitmask.size(1);
  float* lp = logits.data_ptr<float>();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bitmask.const_data_ptr<int32_t>());
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 ninf8 = _mm256_set1_ps(ninf);
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      float* row = lp + i * V;
      const uint32_t* words = bp + i * W;
      for (int64_t w = 0; w * 32 < V; w++) {
        const uint32_t bits = words[w];
        if (bits == 0xFFFFFFFFu) continue;
        float* out = row + w * 32;
        if (V - w * 32 >= 32) {  // eight tokens at a time: each lane tests its own bit, a blend writes -inf
          for (int j = 0; j < 4; j++) {
            const __m256i lane = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits >> (8 * j))), lane_bits);
            const __m256 banned = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_setzero_si256()));
            _mm256_storeu_ps(out + 8 * j, _mm256_blendv_ps(_mm256_loadu_ps(out + 8 * j), ninf8, banned));
          }
        } else {
          for (int64_t b = 0; b < V - w * 32; b++) out[b] = (bits >> b) & 1u ? out[b] : ninf;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("argmax_logsumexp(Tensor logits) -> (Tensor, Tensor)");
  m.def("mask_logits(Tensor(a!) logits, Tensor bitmask) -> ()");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) {
  m.impl("argmax_logsumexp", &argmax_logsumexp);
  m.impl("mask_logits", &mask_logits);
}
