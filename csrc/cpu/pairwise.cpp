// PairRM aggregation on the CPU: scores, pairwise win probabilities, win rates and the SPPO
// selection for every prompt of a batch. Formulas and operation order follow reference.py, which
// in turn follows LLM-Blender's get_scores_from_cmps and SPPO's compute_prob.py, so that the
// "official" mode reproduces their numbers exactly (including NumPy's pairwise summation order).
#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace sppo_fast {
namespace cpu {
namespace {

// NumPy's summation order for a contiguous reduction (pairwise blocks of 8 accumulators,
// halving above 128 elements). Matching it is what makes the sums bit-identical to NumPy's.
template <typename A, typename Get>
A numpy_sum(const Get& get, int64_t lo, int64_t n) {
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

template <typename A>
void aggregate(const PairwiseArgs& a) {
  const A* cmp = static_cast<const A*>(a.cmp);
  const int64_t K = a.K;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<A> d(K);
    std::vector<double> p(K);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      const A* m = cmp + b * a.sb;
      auto at = [&](int64_t i, int64_t j) -> A { return i == j ? A(0) : m[i * a.si + j * a.sj]; };
      float* scores = a.scores + b * K;
      // score_i = mean_j (M[i, j] - M[j, i]) in cmp's dtype, stored as float32 like LLM-Blender
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) d[j] = at(i, j) - at(j, i);
        A s = numpy_sum<A>([&](int64_t j) { return d[j]; }, 0, K);
        scores[i] = float(s / A(K));
      }
      double* probs = a.probs + b * K * K;
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) {
          double pij;
          if (a.mode == 0) {
            pij = 1.0 / (1.0 + std::exp(double(scores[j]) - double(scores[i])));
          } else {
            const double x = (double(at(i, j)) - double(at(j, i))) / 2.0;
            pij = 1.0 / (1.0 + std::exp(-x));
          }
          probs[i * K + j] = pij;
        }
        a.win_rates[b * K + i] =
            numpy_sum<double>([&](int64_t j) { return probs[i * K + j]; }, 0, K) / double(K);
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
  }
}

}  // namespace

void pairwise(const PairwiseArgs& a) {
  if (a.dtype == kFloat64) aggregate<double>(a);
  else aggregate<float>(a);
}

}  // namespace cpu
}  // namespace sppo_fast
