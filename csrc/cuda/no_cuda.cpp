// Stand-in for cuda/device.cu in builds without CUDA (SPPO_FAST_CUDA=OFF, or AUTO without nvcc).
#include <stdexcept>
#include <string>

#include "ops.h"

namespace sppo_fast {
namespace cuda {
bool compiled() { return false; }
int device_count(std::string* why) {
  if (why) *why = "sppo_fast was built without CUDA (SPPO_FAST_CUDA=OFF, or no nvcc at build time)";
  return 0;
}
[[noreturn]] static void unavailable() {
  throw std::runtime_error("sppo_fast was built without CUDA (SPPO_FAST_CUDA=OFF, or no nvcc at build time)");
}
void logprob_fwd(const LogprobFwdArgs&, uintptr_t, int) { unavailable(); }
void logprob_bwd(const LogprobBwdArgs&, uintptr_t, int) { unavailable(); }
void pairwise(const PairwiseArgs&, uintptr_t, int) { unavailable(); }
}  // namespace cuda
}  // namespace sppo_fast
