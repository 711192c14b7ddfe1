// PairRM aggregation of one prompt, shared by the CPU backend (cpu/pairwise.cpp) and the CUDA
// backend (cuda/kernels.cu): compiled as host code by g++ and as host+device code by nvcc.
// Formulas and operation order follow sppo_fast/reference.py (LLM-Blender get_scores_from_cmps,
// SPPO compute_prob.py), including NumPy's pairwise summation order, so the scores are bit-identical
// to NumPy's; probabilities go through the platform's exp (within 1 ulp of the reference).
#pragma once
#include <math.h>

#include <cstdint>

#include "ops.h"

#if defined(__CUDACC__)
#define SPPO_HD __host__ __device__
#else
#define SPPO_HD
#endif

namespace sppo_fast {
namespace pairwise_impl {

// NumPy's order for a contiguous sum: left to right below 8 values; up to 128, 8 interleaved
// accumulators combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) plus the leftovers; above, halves.
template <typename A, typename Get>
SPPO_HD A numpy_sum(const Get& get, int64_t lo, int64_t n) {
  if (n < 8) {
    A res = A(-0.0);
    for (int64_t i = 0; i < n; ++i) res += get(lo + i);
    return res;
  }
  if (n <= 128) {
    A r[8];
    for (int k = 0; k < 8; ++k) r[k] = get(lo + k);
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int k = 0; k < 8; ++k) r[k] += get(lo + i + k);
    A res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += get(lo + i);
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_sum<A>(get, lo, n2) + numpy_sum<A>(get, lo + n2, n - n2);
}

// Aggregates prompt b of a.cmp (A = float or double, cmp's dtype) into the outputs of a.
template <typename A>
SPPO_HD void aggregate_one(const PairwiseArgs& a, int64_t b) {
  const A* m = static_cast<const A*>(a.cmp) + b * a.sb;
  const int64_t K = a.K, si = a.si, sj = a.sj;
  auto at = [=](int64_t i, int64_t j) -> A { return i == j ? A(0) : m[i * si + j * sj]; };
  float* scores = a.scores + b * K;
  // score_i = mean_j (M[i, j] - M[j, i]) in cmp's dtype, stored as float32 like LLM-Blender
  for (int64_t i = 0; i < K; ++i) {
    auto diff = [=](int64_t j) -> A { return at(i, j) - at(j, i); };
    scores[i] = float(numpy_sum<A>(diff, 0, K) / A(K));
  }
  double* probs = a.probs + b * K * K;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < K; ++j) {
      double x;
      if (a.mode == 0) {
        x = double(scores[i]) - double(scores[j]);  // P = 1 / (1 + exp(s_j - s_i))
      } else {
        x = (double(at(i, j)) - double(at(j, i))) / 2.0;  // P = sigmoid((M_ij - M_ji) / 2)
      }
      probs[i * K + j] = 1.0 / (1.0 + exp(-x));
    }
    const double* row = probs + i * K;
    auto get = [=](int64_t j) -> double { return row[j]; };
    a.win_rates[b * K + i] = numpy_sum<double>(get, 0, K) / double(K);
  }
  int64_t w = 0, l = 0;
  for (int64_t i = 1; i < K; ++i) {
    if (scores[i] > scores[w]) w = i;
    if (scores[i] < scores[l]) l = i;
  }
  a.chosen[b] = w;
  a.rejected[b] = l;
  a.tied[b] = scores[w] == scores[l];
  a.chosen_probs[b] = probs[w * K + l];
  a.chosen_probs_win[b] = a.win_rates[b * K + w];
  a.chosen_probs_lose[b] = a.win_rates[b * K + l];
}

}  // namespace pairwise_impl
}  // namespace sppo_fast
