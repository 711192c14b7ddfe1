// PairRM aggregation on the CPU: prompts in parallel, each through the shared implementation.
#include "common/pairwise_impl.h"

namespace sppo_fast {
namespace cpu {

void pairwise(const PairwiseArgs& a) {
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.dtype == kFloat64) pairwise_impl::aggregate_one<double>(a, b);
    else pairwise_impl::aggregate_one<float>(a, b);
  }
}

}  // namespace cpu
}  // namespace sppo_fast
