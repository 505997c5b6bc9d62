// Decode attention on float32 paged KV caches: one query token per sequence against its context, read
// in place from the cache rows its slots name (no gathered [B, L] copy per layer). x86 with AVX2 + FMA.
// Built with cpu_linear.cpp by shard/models/cpu_kernels.py, which says what it measured.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace {

// Four keys' dot products with one query at once: four independent FMA chains (one chain per key
// waited on FMA latency: ~4x slower), reduced together.
inline void dot4(const float* q, const float* const* keys, int64_t d, float scale, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[0] + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[1] + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[2] + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[3] + i), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_mul_ps(s, _mm_set1_ps(scale)));
}

// out[0:8*NR] = sum over t of p[t] * rows[t][0:8*NR]: the accumulators stay in registers.
template <int NR>
inline void weighted_sum(const float* p, const float* const* rows, int64_t n, int64_t offset, float* out) {
  __m256 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t++) {
    const __m256 pv = _mm256_set1_ps(p[t]);
    const float* row = rows[t] + offset;
    for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 8 * r), acc[r]);
  }
  for (int r = 0; r < NR; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);
}

void weighted_sum_any(const float* p, const float* const* rows, int64_t n, int64_t d, float* out) {
  for (int64_t off = 0; off < d; off += 64) {
    switch (std::min<int64_t>(8, (d - off) / 8)) {
      case 8: weighted_sum<8>(p, rows, n, off, out + off); break;
      case 7: weighted_sum<7>(p, rows, n, off, out + off); break;
      case 6: weighted_sum<6>(p, rows, n, off, out + off); break;
      case 5: weighted_sum<5>(p, rows, n, off, out + off); break;
      case 4: weighted_sum<4>(p, rows, n, off, out + off); break;
      case 3: weighted_sum<3>(p, rows, n, off, out + off); break;
      case 2: weighted_sum<2>(p, rows, n, off, out + off); break;
      default: weighted_sum<1>(p, rows, n, off, out + off); break;
    }
  }
}

// e^x for x <= 0 (scores minus their maximum), Cephes' polynomial: ~1e-7 relative error. A scalar expf
// per score would cost more than reading the cache.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// q [B, hq, d], caches [slots, hkv, d], kv_slots [B, L], mask [B, 1, L] -> [B, hq * d]. Query head
// h * g + i (g = hq / hkv) reads KV head h, as q.view(B, hkv, g, d) does.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_slots_in, const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [B, hq, d], caches [S, hkv, d]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "float32 queries and caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  const int64_t B = q_in.size(0), hq = q_in.size(1), d = q_in.size(2), hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d && d % 8 == 0 && hkv > 0 && hq % hkv == 0, "head size a multiple of 8, hq a multiple of hkv");
  TORCH_CHECK(kv_slots_in.scalar_type() == at::kLong && kv_slots_in.dim() == 2 && kv_slots_in.size(0) == B, "kv_slots [B, L] int64");
  const int64_t L = kv_slots_in.size(1);
  TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.numel() == B * L, "mask [B, 1, L] bool");
  const at::Tensor q = q_in.contiguous(), kv_slots = kv_slots_in.contiguous(), mask = mask_in.contiguous();
  const int64_t g = hq / hkv, S = k_cache.size(0);
  at::Tensor out = at::zeros({B, hq * d}, q.options());
  const float *qp = q.const_data_ptr<float>(), *kp = k_cache.const_data_ptr<float>(), *vp = v_cache.const_data_ptr<float>();
  const int64_t* sp = kv_slots.const_data_ptr<int64_t>();
  const bool* mp = mask.const_data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * hkv, 1, [&](int64_t i0, int64_t i1) {
    // The sequence's valid context rows as pointers into the caches (padded to a multiple of 4 with the
    // last one), then each query head's scores and probabilities over them.
    std::vector<const float*> keys(L + 4), values(L + 4);
    std::vector<float> p((L + 8) / 8 * 8 + 8);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / hkv, h = i % hkv;
      int64_t n = 0;
      for (int64_t l = 0; l < L; l++) {
        if (!mp[b * L + l]) continue;
        const int64_t slot = sp[b * L + l];
        TORCH_CHECK(slot >= 0 && slot < S, "a context slot outside the cache");
        keys[n] = kp + (slot * hkv + h) * d;
        values[n++] = vp + (slot * hkv + h) * d;
      }
      if (n == 0) continue;  // nothing to attend to: zeros (the masked softmax would give NaN)
      for (int64_t t = n; t < (n + 3) / 4 * 4; t++) keys[t] = keys[n - 1];
      for (int64_t j = 0; j < g; j++) {
        const float* qj = qp + (b * hq + h * g + j) * d;
        for (int64_t t = 0; t < n; t += 4) dot4(qj, keys.data() + t, d, fscale, p.data() + t);
        const float top = *std::max_element(p.begin(), p.begin() + n);
        const __m256 m = _mm256_set1_ps(top);
        for (int64_t t = 0; t < n; t += 8) _mm256_storeu_ps(p.data() + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(p.data() + t), m)));
        float sum = 0;
        for (int64_t t = 0; t < n; t++) sum += p[t];
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < n; t++) p[t] *= inv;
        weighted_sum_any(p.data(), values.data(), n, d, op + (b * hq + h * g + j) * d);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_slots, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("decode_attention", &decode_attention); }
