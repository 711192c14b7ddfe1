"""Compile every Triton kernel for sm_90 ahead of time, without a GPU (Triton ships ptxas).

Run as a script in a process without TRITON_INTERPRET (tests/test_triton.py does): a kernel that
only works in the interpreter (a non-constexpr global, a loop-carried value that changes type, an
unsupported cast) fails here with Triton's compile error, on any machine.
"""

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sppo_fast.kernels import deberta_attention, logprobs, pairwise

TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, signature, constexprs):
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
    return len(kernel.asm["ptx"])


def main() -> None:
    n = 0
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        acc_ptr = "*fp64" if dt == "fp64" else "*fp32"
        acc = tl.float64 if dt == "fp64" else tl.float32
        strides = {k: "i64" for k in ("stride_lb", "stride_lt", "stride_yb", "stride_yt")}
        for single in (True, False):
            _compile(logprobs._logprob_fwd_kernel,
                     {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "tok_ptr": acc_ptr, "lse_ptr": acc_ptr,
                      "part_ptr": acc_ptr, "T": "i32", "V": "i32", **strides, "ignore_index": "i64",
                      "split": "i32", "n_split": "i32", "BLOCK_V": "constexpr", "SINGLE": "constexpr",
                      "ACC": "constexpr"},
                     {"BLOCK_V": logprobs.DEFAULT_CONFIG.block_v, "SINGLE": single, "ACC": acc})
            n += 1
        _compile(logprobs._sppo_bwd_kernel,
                 {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": acc_ptr, "coef_ptr": acc_ptr,
                  "out_ptr": f"*{dt}", "T": "i32", "V": "i32", **strides, "stride_cb": "i64",
                  "stride_ct": "i64", "stride_ob": "i64", "stride_ot": "i64", "ignore_index": "i64",
                  "col0": "i64", "BLOCK_V": "constexpr", "ACC": "constexpr"},
                 {"BLOCK_V": logprobs.DEFAULT_CONFIG.block_v, "ACC": acc})
        n += 1
    for dt in ("fp32", "fp64"):
        for direct in (False, True):
            _compile(pairwise._pairwise_kernel,
                     {"cmp_ptr": f"*{dt}", "scores_ptr": "*fp32", "probs_ptr": "*fp64", "win_ptr": "*fp64",
                      "chosen_ptr": "*i64", "rejected_ptr": "*i64", "cp_ptr": "*fp64", "cpw_ptr": "*fp64",
                      "cpl_ptr": "*fp64", "tied_ptr": "*i8", "K": "i32", "sb": "i64", "si": "i64", "sj": "i64",
                      "DIRECT": "constexpr"}, {"DIRECT": direct})
            n += 1
    strides = ["s_qb", "s_qh", "s_qm", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "s_cb", "s_ch", "s_cm",
               "s_pb", "s_ph", "s_pn", "s_mb", "s_ob", "s_oh", "s_om", "s_xb"]
    for dt in ("bf16", "fp16", "fp32"):
        for rel, qpos, mask in ((True, False, False), (True, True, True), (False, False, True)):
            _compile(deberta_attention._deberta_attention_fwd,
                     {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "C2P": f"*{dt}", "P2C": f"*{dt}",
                      "REL": "*i32", "QPOS": "*i32", "KMASK": "*i8", "OUT": f"*{dt}",
                      **{k: "i64" for k in strides}, "H": "i32", "LQ": "i32", "LK": "i32", "D": "i32",
                      "REL_ZERO": "i32", "HAS_C2P": "constexpr", "HAS_P2C": "constexpr",
                      "HAS_QPOS": "constexpr", "HAS_MASK": "constexpr", "BLOCK_M": "constexpr",
                      "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "DOT_F32": "constexpr",
                      "PRECISION": "constexpr"},
                     {"HAS_C2P": rel, "HAS_P2C": rel, "HAS_QPOS": qpos, "HAS_MASK": mask,
                      "BLOCK_M": deberta_attention.BLOCK_M, "BLOCK_N": deberta_attention.BLOCK_N,
                      "BLOCK_D": 64, "DOT_F32": False, "PRECISION": "ieee" if dt == "fp32" else "tf32"})
            n += 1
    print(f"compiled {n} kernel variants for sm_90")


if __name__ == "__main__":
    main()
