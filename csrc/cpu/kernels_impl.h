// Token log-prob forward and SPPO backward on the CPU. This file is compiled once per instruction
// set (kernels_base.cpp, kernels_avx2.cpp, kernels_avx512.cpp), each time inside its own namespace
// SPPO_ISA_NS, with the compiler auto-vectorising the branch-free inner loops for that ISA.
// dispatch.cpp picks one at run time.
//
// Cost model per row of V logits: the forward reads the row once from memory (a chunk is read a
// second time from L1 to add up its exponentials); the backward reads it once and writes it once.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <omp.h>

#include "ops.h"

#ifndef SPPO_ISA_NS
#error "define SPPO_ISA_NS before including kernels_impl.h"
#endif

namespace sppo_fast {
namespace cpu {
namespace SPPO_ISA_NS {

// Rows are processed in chunks that stay in L1 (8 KiB of float32).
constexpr int64_t kChunk = 2048;

// ---- scalar bit conversions, written branch-free so that loops over them vectorise ----------
static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  // round to nearest even on the 16 dropped bits; NaN stays a quiet NaN
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
}

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // normal numbers: move exponent and mantissa into place and re-bias the exponent (127 - 15)
  float normal = bits_to_f32((em << 13) + (112u << 23));
  // subnormals: em * 2^-24 exactly
  float sub = float(int32_t(em)) * 5.9604644775390625e-08f;
  float inf_nan = bits_to_f32(0x7f800000u | ((em & 0x3ffu) << 13));
  float mag = em < 0x0400u ? sub : (em >= 0x7c00u ? inf_nan : normal);
  return bits_to_f32(f32_to_bits(mag) | sign);
}

static inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // normal range: drop 13 mantissa bits with round to nearest even and re-bias the exponent
  uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  // subnormal range (|f| < 2^-14): adding 0.5f puts the fp16 subnormal ulp (2^-24) at the last
  // mantissa bit, so the hardware's float rounding does the round to nearest even for us
  uint32_t sub = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3f000000u;
  uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN or overflow to infinity
  uint32_t r = a >= 0x477ff000u ? big : (a < 0x38800000u ? sub : normal);
  return uint16_t(r | sign);
}

// ---- exp ------------------------------------------------------------------------------------------
// exp(x) for float and x <= 88 (callers pass x - max or x - logsumexp, both <= ~0): x = n * ln2 + r
// with |r| <= ln2 / 2, a degree-6 minimax polynomial for e^r, and 2^n built in the exponent bits.
// At most ~1 ulp (measured over every float in [-87.3, 0.5]). Below x = -87.3 the forward clamps
// at exp(-87.3) ~ 1.2e-38 (nil next to a softmax's largest term, 1, and one blend cheaper); the
// backward flushes to 0 there, so masked (-inf) logits get exactly zero gradient.
template <bool kFlushTiny>
static inline float exp_f32(float x) {
  const bool tiny = x < -87.33654f;
  x = tiny ? -87.33654f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;   // ln2 split in a short high part (exact product) ...
  r = r - n * -2.12194440e-4f;      // ... and the rest
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float y = p * bits_to_f32(uint32_t(int32_t(n) + 127) << 23);
  if constexpr (kFlushTiny) return tiny ? 0.0f : y;
  return y;
}

template <typename A, bool kFlushTiny = false> static inline A exp_acc(A x) {
  if constexpr (std::is_same<A, float>::value) return exp_f32<kFlushTiny>(x);
  else return std::exp(x);
}

// ---- loading and storing rows ---------------------------------------------------------------------
template <typename T> struct Io;
template <> struct Io<float> {
  using A = float;
  static inline float ld(const float* p, int64_t i) { return p[i]; }
  static inline void st(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Io<double> {
  using A = double;
  static inline double ld(const double* p, int64_t i) { return p[i]; }
  static inline void st(double* p, int64_t i, double v) { p[i] = v; }
};
struct Bf16 { uint16_t v; };
struct Half { uint16_t v; };
template <> struct Io<Bf16> {
  using A = float;
  static inline float ld(const Bf16* p, int64_t i) { return bf16_to_f32(p[i].v); }
  static inline void st(Bf16* p, int64_t i, float v) { p[i].v = f32_to_bf16(v); }
};
template <> struct Io<Half> {
  using A = float;
  static inline float ld(const Half* p, int64_t i) { return f16_to_f32(p[i].v); }
  static inline void st(Half* p, int64_t i, float v) { p[i].v = f32_to_f16(v); }
};

// Chunk of a row as accumulation-type values: a pointer into the row itself when T == A,
// otherwise converted into buf.
template <typename T, typename A>
static inline const A* load_chunk(const T* row, int64_t n, A* buf) {
  if constexpr (std::is_same<T, A>::value) {
    (void)buf; (void)n;
    return row;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Io<T>::ld(row, i);
    return buf;
  }
}

// ---- rows in parallel -------------------------------------------------------------------------------
// Calls body(r, b, t, label, buf) for every row r = b * T + t of a [B, T, V] view, rows spread over
// OpenMP threads (dynamic: ignored rows cost nothing), each thread with its own L1-sized buffer.
template <typename A, typename Body>
static inline void for_each_row(int64_t B, int64_t T, const int64_t* labels, int64_t lsb,
                                int64_t lst, int num_threads, const Body& body) {
  const int64_t rows = B * T;
#pragma omp parallel num_threads(num_threads)
  {
    alignas(64) A buf[kChunk];
#pragma omp for schedule(dynamic, 8)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / T, t = r % T;
      body(r, b, t, labels[b * lsb + t * lst], buf);
    }
  }
}

// ---- forward --------------------------------------------------------------------------------------
// One pass over the row: per chunk, its max, a rescale of the running sum if the max grew, and the
// chunk's sum of exponentials. The running max starts at -FLT_MAX (finite), so a chunk of -inf
// logits never forms (-inf) - (-inf). A row whose logits are all -inf has no softmax: its
// log-prob and (max, log-sum) are NaN, as the reference's, and so is its gradient (the CUDA and
// Triton backends agree). Such a row is the one where the max never left the sentinel and the
// sum stayed below 1 (the max's own term is exp(0) = 1).
template <typename T>
static void fwd_rows(const LogprobFwdArgs& a) {
  using A = typename Io<T>::A;
  const T* base = static_cast<const T*>(a.logits);
  A* tok = static_cast<A*>(a.token_logp);
  A* lse_out = static_cast<A*>(a.lse);
  const int64_t V = a.V;

  for_each_row<A>(a.B, a.T, a.labels, a.lsb, a.lst, a.num_threads,
                  [&](int64_t r, int64_t b, int64_t t, int64_t label, A* buf) {
      if (label == a.ignore_index) { tok[r] = 0; lse_out[2 * r] = lse_out[2 * r + 1] = 0; return; }
      const T* row = base + b * a.sb + t * a.st;
      A m = -std::numeric_limits<A>::max(), s = 0;
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = V - c < kChunk ? V - c : kChunk;
        const A* x = load_chunk<T, A>(row + c, n, buf);
        A cm = -std::numeric_limits<A>::max();
#pragma omp simd reduction(max : cm)
        for (int64_t i = 0; i < n; ++i) cm = x[i] > cm ? x[i] : cm;
        if (cm > m) { s *= exp_acc<A>(m - cm); m = cm; }
        A cs = 0;
#pragma omp simd reduction(+ : cs)
        for (int64_t i = 0; i < n; ++i) cs += exp_acc<A>(x[i] - m);
        s += cs;
      }
      // Keep the max and log(sum) apart: the backward forms (x - max) - log(sum), whose rounding
      // error is that of log(sum) (a few units), not that of max + log(sum) (up to |x|).
      if (!(m > -std::numeric_limits<A>::max() || s >= A(1))) {
        tok[r] = lse_out[2 * r] = lse_out[2 * r + 1] = std::numeric_limits<A>::quiet_NaN();
        return;
      }
      const A ls = std::log(s);
      lse_out[2 * r] = m;
      lse_out[2 * r + 1] = ls;
      tok[r] = (Io<T>::ld(row, label) - m) - ls;
  });
  if (a.seq_logp) {
    A* seq = static_cast<A*>(a.seq_logp);
    // Sequence sums in double: with beta = 0.001 the SPPO targets reach +-400 nats.
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      double acc = 0;
      for (int64_t t = 0; t < a.T; ++t) acc += double(tok[b * a.T + t]);
      seq[b] = A(acc);
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------
template <typename T>
static void bwd_rows(const LogprobBwdArgs& a) {
  using A = typename Io<T>::A;
  const T* base = static_cast<const T*>(a.logits);
  T* obase = static_cast<T*>(a.out);
  const A* lse_in = static_cast<const A*>(a.lse);
  const A* coef = static_cast<const A*>(a.coef);
  const int64_t V = a.V;

  for_each_row<A>(a.B, a.T, a.labels, a.lsb, a.lst, a.num_threads,
                  [&](int64_t r, int64_t b, int64_t t, int64_t label, A* buf) {
      const T* row = base + b * a.sb + t * a.st;
      T* orow = obase + b * a.osb + t * a.ost;
      if (label == a.ignore_index) {
        for (int64_t i = 0; i < V; ++i) Io<T>::st(orow, i, A(0));
        return;
      }
      const A g = coef[b * a.csb + t * a.cst];
      const A m = lse_in[2 * r], ls = lse_in[2 * r + 1];
      const int64_t col = label - a.col0;  // the label's column in this slice, if it is in it
      const bool has_label = col >= 0 && col < V;
      // read before an in-place write can clobber it
      const A* llp = static_cast<const A*>(a.label_logp);
      const A lp_label = !has_label ? A(0) : llp ? llp[r] : (A(Io<T>::ld(row, col)) - m) - ls;
      const A ng = -g;
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = V - c < kChunk ? V - c : kChunk;
        if constexpr (std::is_same<T, A>::value) {
          const A* x = row + c;
          A* o = orow + c;
          if (x == o) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) o[i] = ng * exp_acc<A, true>((o[i] - m) - ls);
          } else {
            const A* __restrict xr = x;
            A* __restrict orr = o;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) orr[i] = ng * exp_acc<A, true>((xr[i] - m) - ls);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buf[i] = ng * exp_acc<A, true>((Io<T>::ld(row + c, i) - m) - ls);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) Io<T>::st(orow + c, i, buf[i]);
        }
      }
      // label term: g * (1 - p) = -g * expm1(log p), accurate when p is close to 1
      if (has_label) Io<T>::st(orow, col, ng * std::expm1(lp_label));
      (void)buf;  // unused when T is the accumulation type
  });
}

inline void logprob_fwd(const LogprobFwdArgs& a) {
  switch (a.dtype) {
    case kFloat32: fwd_rows<float>(a); break;
    case kFloat64: fwd_rows<double>(a); break;
    case kBFloat16: fwd_rows<Bf16>(a); break;
    case kFloat16: fwd_rows<Half>(a); break;
  }
}

inline void logprob_bwd(const LogprobBwdArgs& a) {
  switch (a.dtype) {
    case kFloat32: bwd_rows<float>(a); break;
    case kFloat64: bwd_rows<double>(a); break;
    case kBFloat16: bwd_rows<Bf16>(a); break;
    case kFloat16: bwd_rows<Half>(a); break;
  }
}

}  // namespace SPPO_ISA_NS
}  // namespace cpu
}  // namespace sppo_fast
