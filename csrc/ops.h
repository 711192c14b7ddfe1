// sppo_fast native entry points. Tensors cross this boundary as raw pointers, sizes, strides (in
// elements) and dtype codes; Python (sppo_fast/ops.py, and linear.py for the labels it passes) has
// validated shapes, dtypes, devices and the label range before any of these run. The kernels trust
// that: a label outside [0, V) other than ignore_index reads outside its row.
#pragma once
#include <cstdint>
#include <string>

namespace sppo_fast {

// Must match sppo_fast/_native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// logits viewed as [B, T, V] with unit stride along V; row (b, t) starts at b * sb + t * st.
// Accumulation type A is float for 16/32-bit logits and double for float64 logits; every
// A-typed buffer below (token_logp, lse, seq_logp, coef) holds A.
struct LogprobFwdArgs {
  const void* logits; int dtype; int64_t B, T, V, sb, st;
  const int64_t* labels; int64_t lsb, lst; int64_t ignore_index;
  void* token_logp;  // [B, T] contiguous A: log softmax(row)[label], 0 where ignored
  void* lse;         // [B, T, 2] contiguous A: (max(row), log(sum(exp(row - max)))), so that
                     // logsumexp = max + log-sum; zeros where ignored (the row is never read)
  void* seq_logp;    // [B] A or nullptr: sum over t of token_logp (accumulated in double)
  int num_threads;
};

// out[b, t, :] = coef[b * csb + t * cst] * (onehot(label) - softmax(logits[b, t, :]));
// zero rows where the label is ignored. out has the logits' dtype and may alias logits exactly.
struct LogprobBwdArgs {
  const void* logits; int dtype; int64_t B, T, V, sb, st;
  const int64_t* labels; int64_t lsb, lst; int64_t ignore_index;
  const void* lse;   // [B, T, 2] contiguous A, as written by the forward
  const void* coef; int64_t csb, cst;  // A
  void* out; int64_t osb, ost;
  int num_threads;
  // vocabulary index of column 0: the rows are the slice [col0, col0 + V) of the full rows, and a
  // label outside it gets no one-hot term (a slab of the vocabulary, as linear.py's second pass uses)
  int64_t col0 = 0;
  // [B, T] contiguous A, or nullptr: each row's label log-prob as computed from the logits its
  // lse came from; the label entry is then -coef * expm1(label_logp) (linear.py's vocabulary pass,
  // whose recomputed logits differ from those in the last bits: 1 - p would cancel for p ~ 1)
  const void* label_logp = nullptr;
};

// PairRM aggregation over cmp[B, K, K] (float32 or float64, any strides); see reference.py.
struct PairwiseArgs {
  const void* cmp; int dtype; int64_t B, K, sb, si, sj;
  int mode;  // 0 = official, 1 = direct
  float* scores;        // [B, K]
  double* probs;        // [B, K, K]
  double* win_rates;    // [B, K]
  int64_t* chosen;      // [B]
  int64_t* rejected;    // [B]
  double* chosen_probs; double* chosen_probs_win; double* chosen_probs_lose;  // [B]
  bool* tied;           // [B]
  int num_threads;
};

// DeBERTa disentangled attention, forward (CPU; float32 or float64): out = softmax(q k^T + c2p
// + p2c, masked) v per (b, h), with c2p[i, j] = c2p_table[b, h, i, rel[pos_i - j + LK - 1]] and
// p2c[i, j] = p2c_table[b, h, j, rel[pos_i - j + LK - 1]]; no [LQ, LK] tensor. q is pre-scaled.
// Every tensor has unit stride along its last dimension; rel, qpos and key_mask are contiguous.
struct DebertaAttnArgs {
  const void* q; const void* k; const void* v;
  const void* c2p;            // [B, H, LQ, 2S] or nullptr
  const void* p2c;            // [B, H, LK, 2S] or nullptr
  const int32_t* rel;         // [2 LK - 1] bucket index (read only with c2p or p2c)
  const int64_t* qpos;        // [B, LQ] absolute query positions, or nullptr for 0..LQ-1
  const uint8_t* key_mask;    // [B, LK] nonzero = a real key, or nullptr
  void* out;                  // [B, H, LQ, D]
  int dtype;
  int64_t B, H, LQ, LK, D;
  int64_t q_sb, q_sh, q_sm, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  int64_t c_sb, c_sh, c_sm, p_sb, p_sh, p_sn, x_sb, m_sb, o_sb, o_sh, o_sm;
  int num_threads;
};

namespace cpu {
void deberta_attention(const DebertaAttnArgs& a);
void logprob_fwd(const LogprobFwdArgs& a);
void logprob_bwd(const LogprobBwdArgs& a);
void pairwise(const PairwiseArgs& a);
// Instruction set the CPU kernels dispatch to: "avx512", "avx2" or "base".
std::string isa();
// Force an instruction set (for tests and benchmarks); returns false if the CPU lacks it.
bool set_isa(const std::string& name);
std::string best_isa();
}  // namespace cpu

namespace cuda {
bool compiled();
// Number of visible CUDA devices; 0 with a reason in *why when there are none.
int device_count(std::string* why);
// The same three ops on device pointers, launched on `stream` (torch's current CUDA stream) of
// `device`. Launch failures raise std::runtime_error naming the kernel and the CUDA error.
void logprob_fwd(const LogprobFwdArgs& a, uintptr_t stream, int device);
void logprob_bwd(const LogprobBwdArgs& a, uintptr_t stream, int device);
void pairwise(const PairwiseArgs& a, uintptr_t stream, int device);
}  // namespace cuda

}  // namespace sppo_fast
