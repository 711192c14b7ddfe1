// The CPU kernels compiled for the "base" instruction set (flags in CMakeLists.txt).
#define SPPO_ISA_NS isa_base
#include "cpu/kernels_impl.h"
#include "cpu/attention_impl.h"

namespace sppo_fast {
namespace cpu {
namespace isa_base {
void run_fwd(const LogprobFwdArgs& a) { logprob_fwd(a); }
void run_bwd(const LogprobBwdArgs& a) { logprob_bwd(a); }
void run_attention(const DebertaAttnArgs& a) { deberta_attention(a); }
}  // namespace isa_base
}  // namespace cpu
}  // namespace sppo_fast
