// pybind11 module sppo_fast._C: only argument marshalling lives here. Python has validated every
// tensor (sppo_fast/ops.py), labels included (they are not re-checked here: see ops.h); here we
// re-check dtype codes and sizes, and release the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;
using namespace sppo_fast;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_dtype(int dtype, const char* what) {
  if (dtype < kFloat32 || dtype > kFloat64)
    throw std::invalid_argument(std::string(what) + ": unknown dtype code " + std::to_string(dtype));
}

void check_sizes(int64_t B, int64_t T, int64_t V) {
  if (B < 0 || T < 0 || V <= 0)
    throw std::invalid_argument("logits: need B >= 0, T >= 0, V >= 1; got B=" + std::to_string(B) +
                                " T=" + std::to_string(T) + " V=" + std::to_string(V));
}


}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sppo_fast native kernels (CPU; CUDA when compiled in). Use sppo_fast.ops, not this.";

  m.def(
      "logprob_fwd",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
         uintptr_t labels, int64_t lsb, int64_t lst, int64_t ignore_index, uintptr_t token_logp,
         uintptr_t lse, uintptr_t seq_logp, int num_threads, uintptr_t stream, int device) {
        check_dtype(dtype, "logits");
        check_sizes(B, T, V);
        LogprobFwdArgs a{ptr<const void>(logits), dtype, B, T, V, sb, st,
                         ptr<const int64_t>(labels), lsb, lst, ignore_index,
                         ptr<void>(token_logp), ptr<void>(lse), ptr<void>(seq_logp),
                         num_threads < 1 ? 1 : num_threads};
        py::gil_scoped_release nogil;
        if (device >= 0) cuda::logprob_fwd(a, stream, device);
        else cpu::logprob_fwd(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"),
      py::arg("st"), py::arg("labels"), py::arg("lsb"), py::arg("lst"), py::arg("ignore_index"),
      py::arg("token_logp"), py::arg("lse"), py::arg("seq_logp"), py::arg("num_threads"),
      py::arg("stream") = 0, py::arg("device") = -1,
      "Per-row (max, log-sum) and label log-prob of logits[B, T, V], plus per-sequence sums (CPU;\n"
      "CUDA device pointers when device >= 0, on `stream`; seq_logp must be null there).");

  m.def(
      "logprob_bwd",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
         uintptr_t labels, int64_t lsb, int64_t lst, int64_t ignore_index, uintptr_t lse,
         uintptr_t coef, int64_t csb, int64_t cst, uintptr_t out, int64_t osb, int64_t ost,
         int num_threads, uintptr_t stream, int device, int64_t col0, uintptr_t label_logp) {
        check_dtype(dtype, "logits");
        check_sizes(B, T, V);
        LogprobBwdArgs a{ptr<const void>(logits), dtype, B, T, V, sb, st,
                         ptr<const int64_t>(labels), lsb, lst, ignore_index,
                         ptr<const void>(lse), ptr<const void>(coef), csb, cst,
                         ptr<void>(out), osb, ost, num_threads < 1 ? 1 : num_threads, col0,
                         ptr<const void>(label_logp)};
        py::gil_scoped_release nogil;
        if (device >= 0) cuda::logprob_bwd(a, stream, device);
        else cpu::logprob_bwd(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sb"),
      py::arg("st"), py::arg("labels"), py::arg("lsb"), py::arg("lst"), py::arg("ignore_index"),
      py::arg("lse"), py::arg("coef"), py::arg("csb"), py::arg("cst"), py::arg("out"),
      py::arg("osb"), py::arg("ost"), py::arg("num_threads"), py::arg("stream") = 0,
      py::arg("device") = -1, py::arg("col0") = 0, py::arg("label_logp") = 0,
      "out = coef * (onehot(label - col0) - softmax) from the saved row stats of the full rows, whose "
      "columns [col0, col0 + V) logits holds (CPU, or CUDA); with label_logp ([B, T] contiguous, "
      "the accumulation dtype), the label entry is -coef * expm1(label_logp).");

  m.def(
      "pairwise",
      [](uintptr_t cmp, int dtype, int64_t B, int64_t K, int64_t sb, int64_t si, int64_t sj,
         int mode, uintptr_t scores, uintptr_t probs, uintptr_t win_rates, uintptr_t chosen,
         uintptr_t rejected, uintptr_t chosen_probs, uintptr_t chosen_probs_win,
         uintptr_t chosen_probs_lose, uintptr_t tied, int num_threads, uintptr_t stream,
         int device) {
        if (dtype != kFloat32 && dtype != kFloat64)
          throw std::invalid_argument("cmp: the CPU aggregation takes float32 or float64");
        if (K < 2) throw std::invalid_argument("cmp: need K >= 2 candidates");
        if (mode != 0 && mode != 1) throw std::invalid_argument("mode: 0 (official) or 1 (direct)");
        PairwiseArgs a{ptr<const void>(cmp), dtype, B, K, sb, si, sj, mode,
                       ptr<float>(scores), ptr<double>(probs), ptr<double>(win_rates),
                       ptr<int64_t>(chosen), ptr<int64_t>(rejected), ptr<double>(chosen_probs),
                       ptr<double>(chosen_probs_win), ptr<double>(chosen_probs_lose),
                       ptr<bool>(tied), num_threads < 1 ? 1 : num_threads};
        py::gil_scoped_release nogil;
        if (device >= 0) cuda::pairwise(a, stream, device);
        else cpu::pairwise(a);
      },
      py::arg("cmp"), py::arg("dtype"), py::arg("B"), py::arg("K"), py::arg("sb"), py::arg("si"),
      py::arg("sj"), py::arg("mode"), py::arg("scores"), py::arg("probs"), py::arg("win_rates"),
      py::arg("chosen"), py::arg("rejected"), py::arg("chosen_probs"), py::arg("chosen_probs_win"),
      py::arg("chosen_probs_lose"), py::arg("tied"), py::arg("num_threads"), py::arg("stream") = 0,
      py::arg("device") = -1,
      "PairRM aggregation of cmp[B, K, K] into scores, probabilities and the SPPO selection (CPU).");

  m.def(
      "deberta_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t c2p, uintptr_t p2c, uintptr_t rel,
         uintptr_t qpos, uintptr_t key_mask, uintptr_t out, int dtype, int64_t B, int64_t H,
         int64_t LQ, int64_t LK, int64_t D, py::tuple strides, int num_threads) {
        if (dtype != kFloat32 && dtype != kFloat64)
          throw std::invalid_argument("deberta_attention: the CPU kernel takes float32 or float64");
        if (B < 0 || H < 0 || LQ < 0 || LK < 1 || D < 1)
          throw std::invalid_argument("deberta_attention: need B, H, LQ >= 0 and LK, D >= 1");
        if (strides.size() != 20) throw std::invalid_argument("deberta_attention: 20 strides");
        int64_t st[20];
        for (int i = 0; i < 20; ++i) st[i] = strides[i].cast<int64_t>();
        DebertaAttnArgs a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                          ptr<const void>(c2p), ptr<const void>(p2c), ptr<const int32_t>(rel),
                          ptr<const int64_t>(qpos), ptr<const uint8_t>(key_mask), ptr<void>(out),
                          dtype, B, H, LQ, LK, D,
                          st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8],
                          st[9], st[10], st[11], st[12], st[13], st[14], st[15], st[16], st[17],
                          st[18], st[19], num_threads < 1 ? 1 : num_threads};
        py::gil_scoped_release nogil;
        cpu::deberta_attention(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("c2p"), py::arg("p2c"), py::arg("rel"),
      py::arg("qpos"), py::arg("key_mask"), py::arg("out"), py::arg("dtype"), py::arg("B"),
      py::arg("H"), py::arg("LQ"), py::arg("LK"), py::arg("D"), py::arg("strides"),
      py::arg("num_threads"),
      "DeBERTa disentangled attention forward without [LQ, LK] tensors (CPU). strides: q (b, h, m), "
      "k (b, h, n), v (b, h, n), c2p (b, h, m), p2c (b, h, n), qpos (b), key_mask (b), out (b, h, m).");

  m.def(
      "advise_hugepages",
      [](uintptr_t p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        // Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh buffer before it
        // is first written: one fault per 2 MiB instead of per 4 KiB. A no-op where THP is off.
        const uintptr_t huge = uintptr_t(2) << 20;
        uintptr_t lo = (p + huge - 1) & ~(huge - 1), hi = (p + nbytes) & ~(huge - 1);
        if (hi > lo) return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#endif
        (void)p; (void)nbytes;
        return false;
      },
      py::arg("ptr"), py::arg("nbytes"),
      "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [ptr, ptr + nbytes); True if applied.");
  m.def("cpu_isa", &cpu::isa, "Instruction set the CPU kernels currently dispatch to.");
  m.def("cpu_best_isa", &cpu::best_isa, "Best instruction set this processor supports.");
  m.def("cpu_set_isa", &cpu::set_isa, py::arg("name"),
        "Force 'base', 'avx2' or 'avx512' (tests, benchmarks); False if the CPU lacks it.");
  m.def("cuda_compiled", &cuda::compiled, "Whether the CUDA sources were compiled in.");
  m.def(
      "cuda_device_count",
      []() {
        std::string why;
        int n = cuda::device_count(&why);
        return py::make_tuple(n, why);
      },
      "(number of CUDA devices, reason when there are none)");
#ifdef SPPO_FAST_CUDA_ARCHS_CSV
  m.attr("cuda_archs") = SPPO_FAST_CUDA_ARCHS_CSV;  // e.g. "90" or "80,90"
#else
  m.attr("cuda_archs") = "";
#endif
#ifdef SPPO_FAST_VERSION
  m.attr("__version__") = SPPO_FAST_VERSION;
#endif
}
