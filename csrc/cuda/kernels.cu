// CUDA kernels of sppo_fast: token log-prob forward, SPPO backward, PairRM aggregation.
//
// Same contract as the CPU kernels (csrc/ops.h): logits viewed as [B, T, V] with unit stride along
// V and explicit row strides, int64 indexing, float32 accumulation (double for fp64 input), and per
// row only (max, log-sum) kept for the backward. One block per row; 16-byte vectorised, coalesced
// loads and stores on the aligned middle of each row, scalar head and tail. Traffic: the forward
// reads each row once; the backward reads it once and writes the gradient once (in place allowed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/pairwise_impl.h"
#include "ops.h"

namespace sppo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sppo_fast CUDA ") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}

// ---- element conversions ------------------------------------------------------------------------
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// 16 bytes of T: one vectorised load or store.
template <typename T> struct alignas(16) Vec { T v[16 / sizeof(T)]; };

// The aligned middle of a row: [head, head + nvec * VEC) starts on a 16-byte boundary.
template <typename T>
__device__ __forceinline__ void split_row(const T* row, int64_t V, int64_t* head, int64_t* nvec) {
  constexpr int64_t VEC = 16 / sizeof(T);
  const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(row) % 16) / int64_t(sizeof(T));
  int64_t h = mis ? VEC - mis : 0;
  h = h < V ? h : V;
  *head = h;
  *nvec = (V - h) / VEC;
}

// ---- (max, sum of exp(x - max)) pairs and their block reduction ---------------------------------
template <typename A> struct MS { A m, s; };

template <typename A>
__device__ __forceinline__ MS<A> merge(MS<A> a, MS<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  return {m, a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m)};
}

template <typename A>
__device__ __forceinline__ void add(MS<A>& ms, A x) {  // online update with one exp per element
  if (x > ms.m) { ms.s = ms.s * exp_acc(ms.m - x) + A(1); ms.m = x; }
  else ms.s += exp_acc(x - ms.m);
}

template <typename A>
__device__ MS<A> block_reduce(MS<A> v) {
  __shared__ A sm[kThreads / 32], ss[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    MS<A> w{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, w);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = v.m; ss[warp] = v.s; }
  __syncthreads();
  if (warp == 0) {
    const A big = sizeof(A) == 8 ? A(-DBL_MAX) : A(-FLT_MAX);
    v = lane < kThreads / 32 ? MS<A>{sm[lane], ss[lane]} : MS<A>{big, A(0)};
    for (int o = 16; o > 0; o >>= 1) {
      MS<A> w{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
      v = merge(v, w);
    }
  }
  return v;  // valid in thread 0
}

// ---- forward --------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_fwd_kernel(LogprobFwdArgs a) {
  using A = typename Acc<T>::type;
  constexpr int64_t VEC = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  const int64_t b = r / a.T, t = r % a.T;
  const int64_t label = a.labels[b * a.lsb + t * a.lst];
  A* tok = static_cast<A*>(a.token_logp);
  A* lse = static_cast<A*>(a.lse);
  if (label == a.ignore_index) {
    if (threadIdx.x == 0) { tok[r] = 0; lse[2 * r] = 0; lse[2 * r + 1] = 0; }
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + b * a.sb + t * a.st;
  const A big = sizeof(A) == 8 ? A(-DBL_MAX) : A(-FLT_MAX);  // finite: no (-inf) - (-inf)
  MS<A> ms{big, A(0)};
  int64_t head, nvec;
  split_row(row, a.V, &head, &nvec);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) add(ms, A(to_acc(row[i])));
  const Vec<T>* vrow = reinterpret_cast<const Vec<T>*>(row + head);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T> v = vrow[i];
    A x[VEC];
    A mx = big;
#pragma unroll
    for (int k = 0; k < VEC; ++k) { x[k] = to_acc(v.v[k]); mx = x[k] > mx ? x[k] : mx; }
    if (mx > ms.m) { ms.s *= exp_acc(ms.m - mx); ms.m = mx; }
#pragma unroll
    for (int k = 0; k < VEC; ++k) ms.s += exp_acc(x[k] - ms.m);
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < a.V; i += blockDim.x) add(ms, A(to_acc(row[i])));
  ms = block_reduce(ms);
  if (threadIdx.x == 0) {
    // a row of -inf logits (the max still the sentinel, the sum below the max's own exp(0) = 1)
    // has no softmax: NaN log-prob and statistics, hence a NaN gradient, as the reference and the
    // CPU backend give; a NaN logit propagates through the sum
    const bool ok = ms.m > big || ms.s >= A(1);
    const A nan = A(NAN);
    const A ls = log(ms.s);
    lse[2 * r] = ok ? ms.m : nan;
    lse[2 * r + 1] = ok ? ls : nan;
    tok[r] = ok ? (A(to_acc(row[label])) - ms.m) - ls : nan;
  }
}

// ---- backward -------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_bwd_kernel(LogprobBwdArgs a) {
  using A = typename Acc<T>::type;
  constexpr int64_t VEC = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  const int64_t b = r / a.T, t = r % a.T;
  const int64_t label = a.labels[b * a.lsb + t * a.lst];
  const bool keep = label != a.ignore_index;
  const int64_t col = label - a.col0;  // the label's column in this slice (may be outside it)
  const A* lse = static_cast<const A*>(a.lse);
  const A g = keep ? static_cast<const A*>(a.coef)[b * a.csb + t * a.cst] : A(0);
  const A m = lse[2 * r], ls = lse[2 * r + 1];
  const A* llp = static_cast<const A*>(a.label_logp);
  const A lp_label = llp && keep ? llp[r] : A(0);
  const T* row = static_cast<const T*>(a.logits) + b * a.sb + t * a.st;
  T* orow = static_cast<T*>(a.out) + b * a.osb + t * a.ost;
  // each element is read, then written, by the same thread: safe when out == logits
  // g * (onehot - p) = -g * p off the label and -g * expm1(log p) on it (accurate when p ~ 1)
  auto grad = [&](A x, int64_t i) -> A {
    if (!keep) return A(0);
    if (i == col) return -g * A(expm1(llp ? lp_label : (x - m) - ls));
    return -g * exp_acc((x - m) - ls);
  };
  int64_t head, nvec;
  split_row(orow, a.V, &head, &nvec);  // orow and row share their alignment in every use here
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16) == (reinterpret_cast<uintptr_t>(orow) % 16);
  if (!aligned) { head = a.V; nvec = 0; }
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) orow[i] = from_acc<T>(grad(to_acc(row[i]), i));
  const Vec<T>* vin = reinterpret_cast<const Vec<T>*>(row + head);
  Vec<T>* vout = reinterpret_cast<Vec<T>*>(orow + head);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec<T> v = vin[i];
    Vec<T> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_acc<T>(grad(to_acc(v.v[k]), head + i * VEC + k));
    vout[i] = o;
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < a.V; i += blockDim.x)
    orow[i] = from_acc<T>(grad(to_acc(row[i]), i));
}

// ---- PairRM aggregation: one thread per prompt -----------------------------------------------------
template <typename A>
__global__ void pairwise_kernel(PairwiseArgs a) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < a.B) pairwise_impl::aggregate_one<A>(a, b);
}

// Makes `device` current for one launch and restores the caller's device afterwards: the driver's
// current context is shared with torch's runtime, so leaving it changed would move torch's
// current device under the caller.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// One block per row: the grid's x dimension holds at most 2^31 - 1 blocks.
unsigned int row_blocks(int64_t rows) {
  if (rows > 2147483647LL)
    throw std::invalid_argument("logits: more than 2^31 - 1 rows (B * T) for one CUDA launch");
  return static_cast<unsigned int>(rows);
}

}  // namespace

namespace {
// Calls f(T{}) with T the element type named by a dtype code.
template <typename F>
void with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat16: f(__half{}); break;
    default: throw std::invalid_argument("logits: unknown dtype code");
  }
}
}  // namespace

void logprob_fwd(const LogprobFwdArgs& a, uintptr_t stream, int device) {
  if (a.B * a.T == 0) return;
  const unsigned int rows = row_blocks(a.B * a.T);
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(a.dtype, [&](auto tag) { logprob_fwd_kernel<decltype(tag)><<<rows, kThreads, 0, s>>>(a); });
  check(cudaGetLastError(), "logprob_fwd_kernel launch");
}

void logprob_bwd(const LogprobBwdArgs& a, uintptr_t stream, int device) {
  if (a.B * a.T == 0) return;
  const unsigned int rows = row_blocks(a.B * a.T);
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(a.dtype, [&](auto tag) { logprob_bwd_kernel<decltype(tag)><<<rows, kThreads, 0, s>>>(a); });
  check(cudaGetLastError(), "logprob_bwd_kernel launch");
}

void pairwise(const PairwiseArgs& a, uintptr_t stream, int device) {
  if (a.B == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int threads = 128;
  const int64_t blocks = (a.B + threads - 1) / threads;
  if (a.dtype == kFloat64) pairwise_kernel<double><<<blocks, threads, 0, s>>>(a);
  else pairwise_kernel<float><<<blocks, threads, 0, s>>>(a);
  check(cudaGetLastError(), "pairwise_kernel launch");
}

}  // namespace cuda
}  // namespace sppo_fast
