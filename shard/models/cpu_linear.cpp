// y = x @ w.T for float32 rows x [M, K] and narrow weights w [N, K]: bfloat16, or int8 with one float32
// scale per row. x86 with AVX2 + FMA; K a multiple of 8. Built and loaded by shard/models/cpu_kernels.py,
// which says why these exist (MKL has no fast path for either on AVX2) and what they measured.
// Where the CPU has native bf16 (AVX512-BF16), bfloat16 and int8 weights are packed for it (linear_packed,
// linear_int8_packed): the path is chosen at run time, so one build serves both kinds of host.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

// The largest row count served weight row by weight row (below); past it, register tiles were faster.
constexpr int64_t kStreamRows = 8;

inline __m256 widen(const c10::BFloat16* p) {
  // bfloat16 is float32's upper half: zero-extend to 32 bits and shift into place.
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 widen(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Few input rows (decode steps): memory-bound, so the weights are read as one sequential stream, a whole
// row at a time (the hardware prefetcher's best case: eight rows read side by side took ~25% longer),
// with four accumulators per input row to keep the FMA units busy.
template <int MB, typename W>
inline void stream_row(const float* x, const W* w, const float* scale, float* y, int64_t N, int64_t K, int64_t n) {
  const W* wn = w + n * K;
  __m256 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < 4; u++) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    // ~1 KiB ahead of the stream: 5-15% faster than the hardware prefetcher alone (AVX2 host).
    _mm_prefetch(reinterpret_cast<const char*>(wn + k) + 1024, _MM_HINT_T0);
    for (int u = 0; u < 4; u++) {
      __m256 wv = widen(wn + k + 8 * u);
      for (int m = 0; m < MB; m++)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
    }
  }
  for (; k < K; k += 8) {
    __m256 wv = widen(wn + k);
    for (int m = 0; m < MB; m++) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
  }
  const float s = scale ? scale[n] : 1.0f;
  for (int m = 0; m < MB; m++)
    y[m * N + n] = sum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]))) * s;
}

// The same stream on AVX-512 hosts: sixteen weights widened per instruction, where the AVX2 one's eight
// held one row's int8 weights to 41 GB/s against the memory's ~52 (Zen 5, bench/RESULTS.md session 26).
#define SLUICE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

SLUICE_AVX512 inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SLUICE_AVX512 inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int MB, typename W>
SLUICE_AVX512 inline void stream_row16(const float* x, const W* w, const float* scale, float* y, int64_t N, int64_t K,
                                       int64_t n) {
  const W* wn = w + n * K;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < 4; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(wn + k) + 1024, _MM_HINT_T0);
    for (int u = 0; u < 4; u++) {
      const __m512 wv = widen16(wn + k + 16 * u);
      for (int m = 0; m < MB; m++)
        acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = widen16(wn + k);
    for (int m = 0; m < MB; m++) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
  }
  __m256 tail[MB];  // K is a multiple of 8, not always of 16
  for (int m = 0; m < MB; m++) tail[m] = _mm256_setzero_ps();
  for (; k < K; k += 8) {
    const __m256 wv = widen(wn + k);
    for (int m = 0; m < MB; m++) tail[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), tail[m]);
  }
  const float s = scale ? scale[n] : 1.0f;
  for (int m = 0; m < MB; m++)
    y[m * N + n] = (_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                       _mm512_add_ps(acc[m][2], acc[m][3]))) + sum8(tail[m])) * s;
}

template <typename W>
SLUICE_AVX512 void stream_columns16(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t N,
                                    int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) stream_row16<3>(x + m * K, w, scale, y + m * N, N, K, n);
    if (M - m == 2) stream_row16<2>(x + m * K, w, scale, y + m * N, N, K, n);
    if (M - m == 1) stream_row16<1>(x + m * K, w, scale, y + m * N, N, K, n);
  }
}

// Many input rows (prompt chunks, large batches): compute-bound, so MB x NB accumulators stay in
// registers and each weight vector serves MB rows. The NB weight rows come widened to float32 (once
// per strip and row block), so the inner loop is loads and FMAs only: int8 at 256 rows 466 -> 346 ms.
// `next`, if not null: one weight row of the next strip, widened into `next_out` a vector per step, in the
// spare load, store and shuffle slots of this FMA-bound loop (each of a strip's first four tiles takes one
// row). Widened in a loop of their own, with the FMA units idle, the weights took 30% of 16 rows' time
// (the 30 layers and the vocabulary: 38.8 ms, 28.3 with the widening left out).
template <int MB, int NB, typename W>
inline void tile_f32(const float* x, const float* wb, const float* scale, float* y, int64_t N, int64_t K, int64_t n,
                     const W* next, float* next_out) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int j = 0; j < NB; j++) {
      __m256 wv = _mm256_loadu_ps(wb + j * K + k);
      for (int m = 0; m < MB; m++) acc[m][j] = _mm256_fmadd_ps(wv, xv[m], acc[m][j]);
    }
    if (next) {
      _mm256_storeu_ps(next_out + k, widen(next + k));
      // The row's strip after next comes into the caches meanwhile (no longer than the row: a line a step).
      if (k * 8 < K * static_cast<int64_t>(sizeof(W))) _mm_prefetch(reinterpret_cast<const char*>(next + 4 * K) + k * 8, _MM_HINT_T0);
    }
  }
  // Each row's four sums reduced together and stored as one vector.
  static_assert(NB == 4, "four weight rows per strip");
  for (int m = 0; m < MB; m++) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[m][0], acc[m][1]), _mm256_hadd_ps(acc[m][2], acc[m][3]));
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    if (scale) sums = _mm_mul_ps(sums, _mm_loadu_ps(scale + n));
    _mm_storeu_ps(y + m * N + n, sums);
  }
}

template <typename W>
void widen_rows(const W* w, float* out, int64_t rows, int64_t K) {
  for (int64_t i = 0; i < rows * K; i += 8) _mm256_storeu_ps(out + i, widen(w + i));
}

// Output columns [n0, n1) of every row: one thread's share.
template <typename W>
void columns(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
             int64_t n0, int64_t n1) {
  if (M <= kStreamRows) {
    static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (avx512) return stream_columns16(x, w, scale, y, M, N, K, n0, n1);
    for (int64_t n = n0; n < n1; n++) {
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) stream_row<3>(x + m * K, w, scale, y + m * N, N, K, n);
      if (M - m == 2) stream_row<2>(x + m * K, w, scale, y + m * N, N, K, n);
      if (M - m == 1) stream_row<1>(x + m * K, w, scale, y + m * N, N, K, n);
    }
    return;
  }
  // Blocks of input rows small enough (~96 KiB) to stay in L2 while every weight tile passes over them:
  // without them 256 rows took twice as long. Equal blocks: 16 rows of K = 1536 were cut 15 + 1, and the
  // one-row block re-widened every strip for a quarter of the work per load (down_proj 0.37 -> 0.30 ms).
  const int64_t most = std::max<int64_t>(3, 96 * 1024 / (K * 4));
  const int64_t blocks = (M + most - 1) / most, block = (M + blocks - 1) / blocks;
  // Two widened strips: the one the tiles read, and the next, which they widen a row each as they go.
  std::vector<float> strips(8 * K);
  float *strip = strips.data(), *ahead = strip + 4 * K;
  for (int64_t mb = 0; mb < M; mb += block) {
    const int64_t me = std::min(M, mb + block);
    int64_t n = n0;
    for (bool widened = false; n + 4 <= n1; n += 4, std::swap(strip, ahead)) {
      if (!widened) widen_rows(w + n * K, strip, 4, K);
      const W* next = n + 8 <= n1 ? w + (n + 4) * K : nullptr;
      widened = next != nullptr;
      // Each tile widens one of the next strip's rows, the first four tiles one each.
      int row = 0;
      auto src = [&]() -> const W* { return next && row < 4 ? next + row * K : nullptr; };
      // Threes, ending 2 + 2 rather than 3 + 1 (a one-row tile does a quarter of the work per load).
      int64_t m = mb;
      for (; me - m >= 3 && me - m != 4; m += 3, row++)
        tile_f32<3, 4>(x + m * K, strip, scale, y + m * N, N, K, n, src(), ahead + row * K);
      for (; me - m >= 2; m += 2, row++) tile_f32<2, 4>(x + m * K, strip, scale, y + m * N, N, K, n, src(), ahead + row * K);
      if (me - m == 1) {
        tile_f32<1, 4>(x + m * K, strip, scale, y + m * N, N, K, n, src(), ahead + row * K);
        row++;
      }
      if (next && row < 4) widen_rows(next + row * K, ahead + row * K, 4 - row, K);  // rows no tile took
    }
    for (; n < n1; n++)
      for (int64_t m = mb; m < me; m++) stream_row<1>(x + m * K, w, scale, y + m * N, N, K, n);
  }
}

at::Tensor run(const at::Tensor& x_in, const at::Tensor& w, const float* scale) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.size(1) % 8 == 0, "K must be a multiple of 8");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu() && w.is_contiguous(),
              "float32 rows on the CPU and contiguous weights");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // One contiguous share of whole 4-column tiles per thread.
  const int64_t grain = std::max<int64_t>(4, (N / at::get_num_threads() + 3) / 4 * 4);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (w.scalar_type() == at::kBFloat16)
      columns(xp, w.const_data_ptr<c10::BFloat16>(), scale, yp, M, N, K, n0, n1);
    else
      columns(xp, w.const_data_ptr<int8_t>(), scale, yp, M, N, K, n0, n1);
  });
  return y;
}

// --- AVX512-BF16: packed bfloat16 and int8 weights ------------------------------------------------------
// The weights of y = x @ w.T packed as wp [N / 16, K / 2, 16, 2]: for each block of 16 output columns,
// one 64-byte vector per pair of k holds those 16 columns' weights at k and k + 1 (the pairs vdpbf16ps
// multiplies). x is rounded to bfloat16, each pair broadcast to all lanes, so an accumulator holds 16
// output columns: no horizontal sums, and each weight vector read serves MB rows. Summed in float32,
// stored in float32, and in the same order at every row count: a row's result does not depend on its batch.
#define SLUICE_NATIVE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

template <int MB, int NB>
SLUICE_NATIVE_BF16 inline void packed_tile(const uint32_t* xp, int64_t pairs, const uint32_t* wb, int64_t block_stride,
                                           const float* scale, float* y, int64_t N) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    __m512i wv[NB];
    for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512(wb + j * block_stride + p * 16);
    for (int m = 0; m < MB; m++) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[m * pairs + p])));
      for (int j = 0; j < NB; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, reinterpret_cast<__m512bh>(wv[j]));
    }
  }
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < NB; j++)
      _mm512_storeu_ps(y + m * N + j * 16, scale ? _mm512_mul_ps(acc[m][j], _mm512_loadu_ps(scale + j * 16)) : acc[m][j]);
}

// Rows [m0, m1) of x rounded to bfloat16 (to nearest even); K a multiple of 16.
SLUICE_NATIVE_BF16 void round_rows(const float* x, uint16_t* out, int64_t m0, int64_t m1, int64_t K) {
  for (int64_t i = m0 * K; i < m1 * K; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i))));
}

// Packed int8 weights (the same layout, one byte a weight) widened to bfloat16, `groups` runs of 32: exact,
// since every int8 is a bfloat16.
SLUICE_NATIVE_BF16 void widen_packed(const int8_t* w, uint32_t* out, int64_t groups) {
  for (int64_t i = 0; i < groups; i++) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * i));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    _mm512_storeu_si512(out + 16 * i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

// Few rows (decode steps) of packed int8 weights: memory-bound, so each column block is read once from
// memory as one sequential stream and widened to float32 in registers, as the unpacked stream above does
// (the strips below, widened to bfloat16 in a buffer first, took 2.4x as long at one row). The rows stay in
// float32: a pair of x broadcast to all lanes, one lane per (column, k parity), two pairs of accumulators.
template <int MB>
SLUICE_AVX512 inline void stream_packed_rows(const float* x, const int8_t* wb, const float* scale, float* y, int64_t N,
                                             int64_t K) {
  const int64_t pairs = K / 2;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < 4; u++) acc[m][u] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p += 2) {  // K is a multiple of 16: pairs is even
    _mm_prefetch(reinterpret_cast<const char*>(wb + 32 * p) + 1024, _MM_HINT_T0);
    for (int h = 0; h < 2; h++) {
      const int8_t* w = wb + 32 * (p + h);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
      for (int m = 0; m < MB; m++) {
        double pair;
        std::memcpy(&pair, x + m * K + 2 * (p + h), sizeof pair);
        const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
        acc[m][2 * h] = _mm512_fmadd_ps(lo, xv, acc[m][2 * h]);
        acc[m][2 * h + 1] = _mm512_fmadd_ps(hi, xv, acc[m][2 * h + 1]);
      }
    }
  }
  // Lanes 2c and 2c + 1 hold column c's even and odd k: summed, columns 0-7 from `lo`, 8-15 from `hi`.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 sc = _mm512_loadu_ps(scale);
  for (int m = 0; m < MB; m++) {
    const __m512 lo = _mm512_add_ps(acc[m][0], acc[m][2]), hi = _mm512_add_ps(acc[m][1], acc[m][3]);
    const __m512 sums = _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
    _mm512_storeu_ps(y + m * N, _mm512_mul_ps(sums, sc));
  }
}

SLUICE_AVX512 void stream_packed(const float* x, const int8_t* wp, const float* scale, float* y, int64_t M, int64_t N,
                                 int64_t K, int64_t b0, int64_t b1) {
  const int64_t block = 16 * K;  // bytes
  for (int64_t b = b0; b < b1; b++) {
    // Four rows at a time (16 accumulators); a block's later rows find its weights in L1 (K * 16 bytes).
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) stream_packed_rows<4>(x + m * K, wp + b * block, scale + b * 16, y + m * N + b * 16, N, K);
    switch (M - m) {
      case 3: stream_packed_rows<3>(x + m * K, wp + b * block, scale + b * 16, y + m * N + b * 16, N, K); break;
      case 2: stream_packed_rows<2>(x + m * K, wp + b * block, scale + b * 16, y + m * N + b * 16, N, K); break;
      case 1: stream_packed_rows<1>(x + m * K, wp + b * block, scale + b * 16, y + m * N + b * 16, N, K); break;
    }
  }
}

// Column blocks [b0, b1) of every row: one thread's share. Strips of four blocks (64 columns: 4 * K * 32
// bytes, in L2) pass over all the rows, six at a time (24 accumulators, 4 weight vectors, 1 broadcast).
// int8 weights (W = int8_t, with `scale`) are widened a strip at a time into a buffer that stays in L2 and
// multiplied from there: memory reads their one byte a weight, and the sums are bfloat16 weights' sums, in
// the same order at every row count.
template <typename W>
SLUICE_NATIVE_BF16 void packed_columns(const uint32_t* xp, const W* wp, const float* scale, float* y, int64_t M,
                                       int64_t N, int64_t pairs, int64_t b0, int64_t b1) {
  const int64_t stride = pairs * 16;  // one block's weights, in pairs of bfloat16
  auto rows = [&](auto nb, int64_t b) {
    constexpr int NB = decltype(nb)::value;
    const uint32_t* wb;
    if constexpr (std::is_same_v<W, int8_t>) {
      static thread_local std::vector<uint32_t> strip;
      if (strip.size() < static_cast<size_t>(4 * stride)) strip.resize(4 * stride);
      widen_packed(wp + b * pairs * 32, strip.data(), NB * pairs);
      wb = strip.data();
    } else {
      wb = wp + b * stride;
    }
    const float* sc = scale ? scale + b * 16 : nullptr;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) packed_tile<6, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N);
    switch (M - m) {
      case 5: packed_tile<5, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N); break;
      case 4: packed_tile<4, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N); break;
      case 3: packed_tile<3, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N); break;
      case 2: packed_tile<2, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N); break;
      case 1: packed_tile<1, NB>(xp + m * pairs, pairs, wb, stride, sc, y + m * N + b * 16, N); break;
    }
  };
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) rows(std::integral_constant<int, 4>{}, b);
  for (; b < b1; b++) rows(std::integral_constant<int, 1>{}, b);
}

at::Tensor run_packed(const at::Tensor& x_in, const at::Tensor& wp, const float* scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "packed weights need AVX512-BF16");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2 && wp.is_contiguous(),
              "packed weights [N / 16, K / 2, 16, 2]");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == wp.size(1) * 2 && x_in.size(1) % 16 == 0 &&
                  x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "float32 rows [M, K] on the CPU, K a multiple of 16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = wp.size(0), N = blocks * 16, pairs = K / 2;
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t grain = std::max<int64_t>(4, (blocks / at::get_num_threads() + 3) / 4 * 4);
  if (scale && M <= kStreamRows) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      stream_packed(x.data_ptr<float>(), wp.const_data_ptr<int8_t>(), scale, y.data_ptr<float>(), M, N, K, b0, b1);
    });
    return y;
  }
  std::vector<uint16_t> xb(M * K);
  const float* xf = x.data_ptr<float>();
  if (M * K >= 65536)
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) { round_rows(xf, xb.data(), m0, m1, K); });
  else
    round_rows(xf, xb.data(), 0, M, K);
  const auto* xp = reinterpret_cast<const uint32_t*>(xb.data());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    if (scale)
      packed_columns(xp, wp.const_data_ptr<int8_t>(), scale, yp, M, N, pairs, b0, b1);
    else
      packed_columns(xp, reinterpret_cast<const uint32_t*>(wp.const_data_ptr<c10::BFloat16>()), nullptr, yp, M, N,
                     pairs, b0, b1);
  });
  return y;
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& wp) {
  TORCH_CHECK(wp.scalar_type() == at::kBFloat16, "packed bfloat16 weights");
  return run_packed(x, wp, nullptr);
}

at::Tensor linear_int8_packed(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& scale) {
  TORCH_CHECK(wp.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && wp.dim() == 4 &&
                  scale.numel() == wp.size(0) * 16 && scale.is_contiguous(),
              "packed int8 weights with one float32 scale per row");
  return run_packed(x, wp, scale.const_data_ptr<float>());
}

// ------------------------------------------------------------------------------------------------------

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bfloat16 weights");
  return run(x, w, nullptr);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == w.size(0) &&
                  scale.is_contiguous(),
              "int8 weights with one float32 scale per row");
  return run(x, w, scale.const_data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(sluice, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor wp) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_int8_packed(Tensor x, Tensor wp, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_packed", &linear_packed);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int8_packed", &linear_int8_packed);
}
