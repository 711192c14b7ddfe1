// Stand-in for cuda/device.cu in builds without CUDA (SPPO_FAST_CUDA=OFF, or AUTO without nvcc).
#include <string>

#include "ops.h"

namespace sppo_fast {
namespace cuda {
bool compiled() { return false; }
int device_count(std::string* why) {
  if (why) *why = "sppo_fast was built without CUDA (SPPO_FAST_CUDA=OFF, or no nvcc at build time)";
  return 0;
}
}  // namespace cuda
}  // namespace sppo_fast
