// DeBERTa-v2/v3 disentangled attention, forward only, on the CPU: the same formula as the Triton
// kernel (kernels/deberta_attention.py), with no [L, L] tensor. Compiled once per instruction set
// with kernels_impl.h (whose exp and namespace it shares).
//
// One task is a block of kAttnRows query rows of one (batch, head). Its thread keeps K of that
// head transposed ([D, LK], so that the scores of one query against every key are D
// broadcast-multiply-adds over contiguous rows) and one row of LK scores; memory is O(D * LK) per
// thread. Per query row: the scores q . k_j, the two relative terms gathered from the [L, 2S]
// tables through the [2 LK - 1] bucket index, the padding mask, a softmax in the accumulation
// type, and sum_j p_j v_j.
#pragma once
#include <algorithm>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace sppo_fast {
namespace cpu {
namespace SPPO_ISA_NS {

constexpr int64_t kAttnRows = 16;  // query rows per task (one transposed K serves them all)
constexpr int64_t kGroup = 4;      // query rows whose scores / outputs one micro-kernel keeps in registers

// s[r][j0 .. j0 + W) = sum_d q_r[d] * kt[d][j0 .. j0 + W) for kGroup rows: one load of kt per d
// serves kGroup rows, and the accumulators stay in registers.
template <typename T, int64_t W>
static inline void qk_block(const T* const* q, const T* kt, int64_t LKp, int64_t D, int64_t j0,
                            T* s) {
  T acc[kGroup][W] = {};
  for (int64_t d = 0; d < D; ++d) {
    const T* kd = kt + d * LKp + j0;
    for (int64_t r = 0; r < kGroup; ++r) {
      const T qrd = q[r][d];
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) acc[r][w] += qrd * kd[w];
    }
  }
  for (int64_t r = 0; r < kGroup; ++r)
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) s[r * LKp + j0 + w] = acc[r][w];
}

// o_r[d0 .. d0 + CW) = sum_j p_r[j] * v_j[d0 .. d0 + CW) for kGroup rows; CW = two lines of head
// dims (all of D = 32 in float32), which measured 2x faster than one line (one broadcast of p
// serves two multiply-adds).
template <typename T, int64_t CW>
static inline void pv_block(const T* p, int64_t LKp, int64_t LK, const T* v, int64_t v_sn,
                            int64_t d0, int64_t D, T (*out)[CW]) {
  T acc[kGroup][CW] = {};
  const int64_t n = D - d0 < CW ? D - d0 : CW;
  if (n == CW) {  // whole chunks of head dims: straight loads (the usual case, D = 32, 64, ...)
    for (int64_t j = 0; j < LK; ++j) {
      const T* vj = v + j * v_sn + d0;
      for (int64_t r = 0; r < kGroup; ++r) {
        const T prj = p[r * LKp + j];
#pragma omp simd
        for (int64_t w = 0; w < CW; ++w) acc[r][w] += prj * vj[w];
      }
    }
  } else {
    for (int64_t j = 0; j < LK; ++j) {
      const T* vj = v + j * v_sn + d0;
      T vv[CW];
#pragma omp simd
      for (int64_t w = 0; w < CW; ++w) vv[w] = w < n ? vj[w] : T(0);
      for (int64_t r = 0; r < kGroup; ++r) {
        const T prj = p[r * LKp + j];
#pragma omp simd
        for (int64_t w = 0; w < CW; ++w) acc[r][w] += prj * vv[w];
      }
    }
  }
  for (int64_t r = 0; r < kGroup; ++r)
    for (int64_t w = 0; w < CW; ++w) out[r][w] = acc[r][w];
}

// s[j] += c[idx[j]] (content-to-position) and s[j] += p[j * ps + idx[j]] (position-to-content)
// for j < n: hardware gathers where the compiler would not emit them (it judges them unprofitable;
// measured 2x faster here for c2p and 1.5x for p2c), else a plain loop.
template <typename T>
static inline void add_gather(T* s, const T* c, const int32_t* idx, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    for (; j + 16 <= n; j += 16)
      _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j),
                                            _mm512_i32gather_ps(_mm512_loadu_si512(idx + j), c, 4)));
  } else {
    for (; j + 8 <= n; j += 8)
      _mm512_storeu_pd(s + j, _mm512_add_pd(_mm512_loadu_pd(s + j),
                                            _mm512_i32gather_pd(_mm256_loadu_si256(
                                                reinterpret_cast<const __m256i*>(idx + j)), c, 8)));
  }
#endif
  for (; j < n; ++j) s[j] += c[idx[j]];
}

template <typename T>
static inline void add_gather_rows(T* s, const T* p, int64_t ps, const int32_t* idx, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (ps <= std::numeric_limits<int32_t>::max() / 64) {  // offsets j * ps + idx fit in int32
    if constexpr (std::is_same<T, float>::value) {
      const __m512i lane = _mm512_mullo_epi32(
          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int32_t(ps)));
      for (; j + 16 <= n; j += 16) {
        const __m512i ix = _mm512_add_epi32(_mm512_loadu_si512(idx + j), lane);
        _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_i32gather_ps(ix, p + j * ps, 4)));
      }
    } else {
      const __m256i lane = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm256_set1_epi32(int32_t(ps)));
      for (; j + 8 <= n; j += 8) {
        const __m256i ix = _mm256_add_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j)), lane);
        _mm512_storeu_pd(s + j, _mm512_add_pd(_mm512_loadu_pd(s + j), _mm512_i32gather_pd(ix, p + j * ps, 8)));
      }
    }
  }
#endif
  for (; j < n; ++j) s[j] += p[j * ps + idx[j]];
}

template <typename T>
static void deberta_attention_rows(const DebertaAttnArgs& a) {
  constexpr int64_t W = 64 / sizeof(T);  // one 64-byte line of keys (or of head dims) at a time
  const T* Q = static_cast<const T*>(a.q);
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  const T* C2P = static_cast<const T*>(a.c2p);
  const T* P2C = static_cast<const T*>(a.p2c);
  T* O = static_cast<T*>(a.out);
  const int64_t LQ = a.LQ, LK = a.LK, D = a.D;
  const int64_t LKp = (LK + W - 1) / W * W;  // kt and score rows padded to whole lines
  const int64_t nblk = (LQ + kAttnRows - 1) / kAttnRows;
  const int64_t tasks = a.B * a.H * nblk;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // the bucket index reversed, so that a query's indices run forwards with the key:
  // rel[pos - j + LK - 1] = relr[LK - 1 - pos + j]
  std::vector<int32_t> relr;
  if (C2P || P2C) {
    relr.resize(static_cast<size_t>(2 * LK - 1));
    for (int64_t t = 0; t < 2 * LK - 1; ++t) relr[static_cast<size_t>(t)] = a.rel[2 * LK - 2 - t];
  }
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<T> kt(static_cast<size_t>(D * LKp), T(0)), sbuf(static_cast<size_t>(kGroup * LKp));
    std::vector<T> zero_q(static_cast<size_t>(D), T(0));
    int64_t have = -1;  // the (batch, head) whose K is in kt
    // static: a thread's tasks are consecutive, so it transposes each head's K about once
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / nblk, i0 = (task % nblk) * kAttnRows;
      const int64_t b = bh / a.H, h = bh % a.H;
      const T* k = K + b * a.k_sb + h * a.k_sh;
      const T* v = V + b * a.v_sb + h * a.v_sh;
      if (bh != have) {
        for (int64_t j = 0; j < LK; ++j)
          for (int64_t d = 0; d < D; ++d) kt[static_cast<size_t>(d * LKp + j)] = k[j * a.k_sn + d];
        have = bh;
      }
      const uint8_t* km = a.key_mask ? a.key_mask + b * a.m_sb : nullptr;
      const T* p2c = P2C ? P2C + b * a.p_sb + h * a.p_sh : nullptr;
      const int64_t i_end = std::min(LQ, i0 + kAttnRows);
      for (int64_t g0 = i0; g0 < i_end; g0 += kGroup) {
        const int64_t rows = std::min(kGroup, i_end - g0);
        const T* q[kGroup];
        for (int64_t r = 0; r < kGroup; ++r)  // (a short last group repeats a zero query)
          q[r] = r < rows ? Q + b * a.q_sb + h * a.q_sh + (g0 + r) * a.q_sm : zero_q.data();
        T* s0 = sbuf.data();
        for (int64_t j0 = 0; j0 < LKp; j0 += W) qk_block<T, W>(q, kt.data(), LKp, D, j0, s0);
        T inv[kGroup];
        bool dead[kGroup];  // rows with no finite score: their output is fill[r], not p v
        T fill[kGroup];
        for (int64_t r = 0; r < kGroup; ++r) {
          T* s = s0 + r * LKp;
          inv[r] = T(0);
          dead[r] = false;
          if (r >= rows) { std::fill(s, s + LK, T(0)); continue; }
          const int64_t i = g0 + r;
          const int64_t pos = a.qpos ? a.qpos[b * a.x_sb + i] : i;
          const int32_t* rel = relr.data() + (LK - 1 - pos);  // rel[j]: the bucket of (pos - j)
          if (C2P) add_gather(s, C2P + b * a.c_sb + h * a.c_sh + i * a.c_sm, rel, LK);
          if (p2c) add_gather_rows(s, p2c, a.p_sn, rel, LK);
          if (km) {
#pragma omp simd
            for (int64_t j = 0; j < LK; ++j) s[j] = km[j] ? s[j] : neg_inf;
          }
          T mx = neg_inf;
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < LK; ++j) mx = s[j] > mx ? s[j] : mx;
          if (!(mx > neg_inf)) {
            // every key masked (a padded query, never read): zeros, not NaN; but a row whose
            // scores are NaN (the max above skips NaN) stays NaN, as the formula gives
            bool nan = false;
            for (int64_t j = 0; j < LK; ++j) nan = nan || s[j] != s[j];
            dead[r] = true;
            fill[r] = nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
            std::fill(s, s + LK, T(0));
            continue;
          }
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < LK; ++j) {
            s[j] = exp_acc<T, true>(s[j] - mx);  // masked keys: exactly 0
            sum += s[j];
          }
          inv[r] = T(1) / sum;
        }
        for (int64_t d0 = 0; d0 < D; d0 += 2 * W) {
          T ob[kGroup][2 * W];
          pv_block<T, 2 * W>(s0, LKp, LK, v, a.v_sn, d0, D, ob);
          const int64_t n = std::min(2 * W, D - d0);
          for (int64_t r = 0; r < rows; ++r) {
            T* o = O + b * a.o_sb + h * a.o_sh + (g0 + r) * a.o_sm + d0;
            for (int64_t w = 0; w < n; ++w) o[w] = dead[r] ? fill[r] : ob[r][w] * inv[r];
          }
        }
      }
    }
  }
}

inline void deberta_attention(const DebertaAttnArgs& a) {
  if (a.dtype == kFloat64) deberta_attention_rows<double>(a);
  else deberta_attention_rows<float>(a);
}

}  // namespace SPPO_ISA_NS
}  // namespace cpu
}  // namespace sppo_fast
