// Run-time choice of the instruction set for the CPU kernels.
#include <atomic>
#include <string>

#include "ops.h"

namespace sppo_fast {
namespace cpu {

#define SPPO_DECLARE_ISA(ns)                   \
  namespace ns {                               \
  void run_fwd(const LogprobFwdArgs& a);       \
  void run_bwd(const LogprobBwdArgs& a);       \
  void run_attention(const DebertaAttnArgs& a); \
  }
SPPO_DECLARE_ISA(isa_base)
#if defined(SPPO_HAVE_X86_ISAS)
SPPO_DECLARE_ISA(isa_avx2)
SPPO_DECLARE_ISA(isa_avx512)
#endif
#undef SPPO_DECLARE_ISA

namespace {
enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has(Isa isa) {
#if defined(SPPO_HAVE_X86_ISAS)
  __builtin_cpu_init();
  switch (isa) {
    case kBase: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                       __builtin_cpu_supports("f16c");
    case kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         cpu_has(kAvx2);
  }
  return false;
#else
  return isa == kBase;
#endif
}

Isa detect() { return cpu_has(kAvx512) ? kAvx512 : (cpu_has(kAvx2) ? kAvx2 : kBase); }

std::atomic<int>& current() {
  static std::atomic<int> isa{detect()};
  return isa;
}

const char* name(int isa) { return isa == kAvx512 ? "avx512" : (isa == kAvx2 ? "avx2" : "base"); }
}  // namespace

std::string isa() { return name(current().load()); }
std::string best_isa() { return name(detect()); }

bool set_isa(const std::string& n) {
  Isa want;
  if (n == "base") want = kBase;
  else if (n == "avx2") want = kAvx2;
  else if (n == "avx512") want = kAvx512;
  else return false;
  if (!cpu_has(want)) return false;
  current().store(want);
  return true;
}

void logprob_fwd(const LogprobFwdArgs& a) {
  switch (current().load()) {
#if defined(SPPO_HAVE_X86_ISAS)
    case kAvx512: isa_avx512::run_fwd(a); return;
    case kAvx2: isa_avx2::run_fwd(a); return;
#endif
    default: isa_base::run_fwd(a); return;
  }
}

void logprob_bwd(const LogprobBwdArgs& a) {
  switch (current().load()) {
#if defined(SPPO_HAVE_X86_ISAS)
    case kAvx512: isa_avx512::run_bwd(a); return;
    case kAvx2: isa_avx2::run_bwd(a); return;
#endif
    default: isa_base::run_bwd(a); return;
  }
}

void deberta_attention(const DebertaAttnArgs& a) {
  switch (current().load()) {
#if defined(SPPO_HAVE_X86_ISAS)
    case kAvx512: isa_avx512::run_attention(a); return;
    case kAvx2: isa_avx2::run_attention(a); return;
#endif
    default: isa_base::run_attention(a); return;
  }
}

}  // namespace cpu
}  // namespace sppo_fast
