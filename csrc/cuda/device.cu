// CUDA runtime queries for the CUDA backend. Compiled only when the build finds nvcc
// (SPPO_FAST_CUDA=AUTO or ON); cudart is linked statically, so importing the extension on a
// machine without a GPU or driver works and the backend reports why it cannot run.
#include <cuda_runtime.h>

#include <string>

#include "ops.h"

namespace sppo_fast {
namespace cuda {

bool compiled() { return true; }

int device_count(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later queries start clean
    return 0;
  }
  if (n == 0 && why) *why = "cudaGetDeviceCount found no device";
  return n;
}

}  // namespace cuda
}  // namespace sppo_fast
