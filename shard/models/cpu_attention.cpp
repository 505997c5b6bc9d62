// Decode attention on paged KV caches in float32 or float16: one float32 query token per sequence against
// its context, read in place from the cache rows its slots name (no gathered [B, L] copy per layer).
// x86 with AVX2 + FMA + F16C (float16 rows widen in one instruction as they load).
// Built with cpu_linear.cpp by shard/models/cpu_kernels.py, which says what it measured.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_vec.h"

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Cache rows are read from memory once per (sequence, KV head): each key and value row, once loaded,
// serves every query head of its group (up to three at a time), and rows a few places ahead are
// prefetched (the slots are scattered, which the hardware prefetcher does not follow). One query head
// at a time, reading each row g times, took 2x as long at batch 16 (SmolLM2, g = 3).
constexpr int AHEAD = 16;  // rows prefetched ahead of the one in use

// One head's row of a slot, d elements. (Prefetching the whole slot, every KV head, for a sequence's first
// head was slower: 9.6 ms against 8.2.)
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* start = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < d * static_cast<int64_t>(sizeof(T)); i += 64) _mm_prefetch(start + i, _MM_HINT_T0);
}

// Four sums of eight lanes each, scaled, into out[0:4].
inline void store_sums4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float scale, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_mul_ps(s, _mm_set1_ps(scale)));
}

// Scores of G query heads (q + j * d) against KB = 4 * K4 keys: G * KB independent FMA chains (fewer
// waited on FMA latency), each key row loaded once for all G heads. p + j * ps: head j's scores.
template <int G, int K4, typename T>
inline void score_block(const float* q, const T* const* keys, int64_t d, float scale, float* p, int64_t ps, bool prefetch) {
  constexpr int KB = 4 * K4;
  __m256 acc[G][KB];
  _Pragma("GCC unroll 16") for (int j = 0; j < G; j++)
    _Pragma("GCC unroll 16") for (int k = 0; k < KB; k++) acc[j][k] = _mm256_setzero_ps();
  if (prefetch)
    _Pragma("GCC unroll 16") for (int k = 0; k < KB; k++) prefetch_row(keys[k + AHEAD], d);
  for (int64_t i = 0; i < d; i += 8) {
    __m256 qv[G];
    _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) qv[j] = _mm256_loadu_ps(q + j * d + i);
    _Pragma("GCC unroll 16") for (int k = 0; k < KB; k++) {
      const __m256 kv = load8(keys[k] + i);
      _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) acc[j][k] = _mm256_fmadd_ps(qv[j], kv, acc[j][k]);
    }
  }
  _Pragma("GCC unroll 16") for (int j = 0; j < G; j++)
    _Pragma("GCC unroll 16") for (int k = 0; k < KB; k += 4) store_sums4(acc[j][k], acc[j][k + 1], acc[j][k + 2], acc[j][k + 3], scale, p + j * ps + k);
}

// out + j * d, lanes [offset, offset + 8 * NR): inv[j] times the sum over t < n of head j's p[j * ps + t]
// times rows[t]; the G * NR accumulators stay in registers and each row chunk is loaded once for all G heads.
template <int G, int NR, typename T>
inline void weighted_block(const float* p, int64_t ps, const T* const* rows, int64_t n, int64_t d, int64_t offset,
                           const float* inv, float* out, bool prefetch) {
  __m256 acc[G][NR];
  _Pragma("GCC unroll 16") for (int j = 0; j < G; j++)
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; r++) acc[j][r] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t++) {
    if (prefetch) prefetch_row(rows[t + AHEAD], d);
    __m256 pv[G];
    _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) pv[j] = _mm256_set1_ps(p[j * ps + t]);
    const T* row = rows[t] + offset;
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; r++) {
      const __m256 v = load8(row + 8 * r);
      _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) acc[j][r] = _mm256_fmadd_ps(pv[j], v, acc[j][r]);
    }
  }
  _Pragma("GCC unroll 16") for (int j = 0; j < G; j++) {
    const __m256 scale = _mm256_set1_ps(inv[j]);
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; r++) _mm256_storeu_ps(out + j * d + offset + 8 * r, _mm256_mul_ps(acc[j][r], scale));
  }
}

// G heads' scores over n keys (the pointer list padded to a multiple of 8 plus AHEAD more).
template <int G, typename T>
void scores(const float* q, const T* const* keys, int64_t n, int64_t d, float scale, float* p, int64_t ps, bool prefetch) {
  constexpr int K4 = G == 1 ? 2 : 1;  // one head alone: eight keys' chains
  for (int64_t t = 0; t < n; t += 4 * K4) score_block<G, K4>(q, keys + t, d, scale, p + t, ps, prefetch);
}

// G heads' weighted sums of n value rows, over the head size in chunks of up to 8 * NRMAX lanes.
template <int G, typename T>
void weighted_sums(const float* p, int64_t ps, const T* const* rows, int64_t n, int64_t d, const float* inv, float* out,
                   bool prefetch) {
  // G * NR accumulators, G broadcasts and the row chunk in 16 registers (one more spilled an accumulator
  // to the stack, its FMA chain then waited on store forwarding: ~2x slower).
  constexpr int NRMAX = G == 1 ? 8 : G == 2 ? 4 : 3;
  for (int64_t off = 0; off < d; off += 8 * NRMAX) {
    const bool first = prefetch && off == 0;  // later chunks read rows the first pass brought in
    switch (std::min<int64_t>(NRMAX, (d - off) / 8)) {
      case 8: weighted_block<G, (NRMAX >= 8 ? 8 : 1)>(p, ps, rows, n, d, off, inv, out, first); break;
      case 7: weighted_block<G, (NRMAX >= 7 ? 7 : 1)>(p, ps, rows, n, d, off, inv, out, first); break;
      case 6: weighted_block<G, (NRMAX >= 6 ? 6 : 1)>(p, ps, rows, n, d, off, inv, out, first); break;
      case 5: weighted_block<G, (NRMAX >= 5 ? 5 : 1)>(p, ps, rows, n, d, off, inv, out, first); break;
      case 4: weighted_block<G, 4>(p, ps, rows, n, d, off, inv, out, first); break;
      case 3: weighted_block<G, 3>(p, ps, rows, n, d, off, inv, out, first); break;
      case 2: weighted_block<G, 2>(p, ps, rows, n, d, off, inv, out, first); break;
      default: weighted_block<G, 1>(p, ps, rows, n, d, off, inv, out, first); break;
    }
  }
}

// The sequences' attention, cache rows of type T: fills out [B, hq * d]. Query head h * g + j (g = hq / hkv)
// reads KV head h, as q.view(B, hkv, g, d) does.
template <typename T>
void attend(const float* qp, const T* kp, const T* vp, const int64_t* sp, const bool* mp, float* op, int64_t B,
            int64_t hq, int64_t hkv, int64_t d, int64_t L, int64_t S, float scale) {
  const int64_t g = hq / hkv;
  const int64_t ps = (L + 15) / 8 * 8;  // room for the scores of the padded keys
  at::parallel_for(0, B * hkv, 1, [&](int64_t i0, int64_t i1) {
    // The sequence's valid context rows as pointers into the caches, padded with its last row to a
    // multiple of 8 and AHEAD more (what the blocks and the prefetches read past n), then the scores and
    // probabilities of up to three query heads at a time.
    std::vector<const T*> keys(ps + AHEAD), values(ps + AHEAD);
    std::vector<float> p(3 * ps);
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
      for (int64_t t = n; t < (n + 7) / 8 * 8 + AHEAD; t++) keys[t] = keys[n - 1], values[t] = values[n - 1];
      for (int64_t j0 = 0; j0 < g; j0 += 3) {
        const int G = static_cast<int>(std::min<int64_t>(3, g - j0));
        // The head's first group of query heads prefetches its rows; later groups find them cached.
        const bool first = j0 == 0;
        const float* q = qp + (b * hq + h * g + j0) * d;
        float* out = op + (b * hq + h * g + j0) * d;
        if (G == 3) scores<3>(q, keys.data(), n, d, scale, p.data(), ps, first);
        else if (G == 2) scores<2>(q, keys.data(), n, d, scale, p.data(), ps, first);
        else scores<1>(q, keys.data(), n, d, scale, p.data(), ps, first);
        // Softmax numerators in place, 8 lanes at a time (the padding repeats a real key, so it cannot
        // raise the maximum; its numerators are zeroed), and 1 / sum, applied to the sums at the end.
        float inv[3];
        for (int j = 0; j < G; j++) {
          float* pj = p.data() + j * ps;
          const int64_t n8 = (n + 7) / 8 * 8;
          // Three heads' blocks are 4 keys wide: up to n8 the scores may be another item's, which could
          // raise the maximum (and the rounding would depend on what ran before). Padding scores, as above.
          for (int64_t t = n; t < n8; t++) pj[t] = pj[n - 1];
          __m256 top = _mm256_loadu_ps(pj);
          for (int64_t t = 8; t < n8; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(pj + t));
          top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));
          top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0x4e));
          top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0xb1));
          __m256 sum = _mm256_setzero_ps();
          for (int64_t t = 0; t < n8; t += 8) {
            const __m256 e = sluice_vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(pj + t), top));
            _mm256_storeu_ps(pj + t, e);
            sum = _mm256_add_ps(sum, e);
          }
          float total = 0;
          for (int64_t t = n; t < n8; t++) total -= pj[t], pj[t] = 0;
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, sum);
          for (float x : lanes) total += x;
          inv[j] = 1.0f / total;
        }
        if (G == 3) weighted_sums<3>(p.data(), ps, values.data(), n, d, inv, out, first);
        else if (G == 2) weighted_sums<2>(p.data(), ps, values.data(), n, d, inv, out, first);
        else weighted_sums<1>(p.data(), ps, values.data(), n, d, inv, out, first);
      }
    }
  });
}

// q [B, hq, d] float32, caches [slots, hkv, d] float32 or float16, kv_slots [B, L], mask [B, 1, L] -> [B, hq * d].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_slots_in, const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [B, hq, d], caches [S, hkv, d]");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && (cache_type == at::kFloat || cache_type == at::kHalf)
              && v_cache.scalar_type() == cache_type, "float32 queries, float32 or float16 caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  const int64_t B = q_in.size(0), hq = q_in.size(1), d = q_in.size(2), hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d && d % 8 == 0 && hkv > 0 && hq % hkv == 0, "head size a multiple of 8, hq a multiple of hkv");
  TORCH_CHECK(kv_slots_in.scalar_type() == at::kLong && kv_slots_in.dim() == 2 && kv_slots_in.size(0) == B, "kv_slots [B, L] int64");
  const int64_t L = kv_slots_in.size(1);
  TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.numel() == B * L, "mask [B, 1, L] bool");
  const at::Tensor q = q_in.contiguous(), kv_slots = kv_slots_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::zeros({B, hq * d}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const int64_t* sp = kv_slots.const_data_ptr<int64_t>();
  const bool* mp = mask.const_data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t S = k_cache.size(0);
  if (cache_type == at::kHalf) {
    attend(qp, k_cache.const_data_ptr<at::Half>(), v_cache.const_data_ptr<at::Half>(), sp, mp, op, B, hq, hkv, d, L, S,
           static_cast<float>(scale));
  } else {
    attend(qp, k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(), sp, mp, op, B, hq, hkv, d, L, S,
           static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_slots, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("decode_attention", &decode_attention); }
