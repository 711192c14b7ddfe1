"""Compile every Triton kernel for sm_90 ahead of time, without a GPU (Triton ships ptxas).

Run as a script in a process without TRITON_INTERPRET (tests/test_triton.py does): a kernel that
only works in the interpreter (a non-constexpr global, a loop-carried value that changes type, an
unsupported cast) fails here with Triton's compile error, on any machine.
"""

import functools
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sppo_fast.kernels import deberta_attention, logprobs, pairwise

TARGET = GPUTarget("cuda", 90, 32)


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(fn, signature, constexprs, num_warps=4, divisible=()):
    """Compile for sm_90; return (registers, stack bytes a thread uses, SASS text) when Triton's
    bundled cuobjdump can read the cubin (else None). ``divisible``: the arguments that Triton's
    launcher would see as multiples of 16 at run time (it specialises on that, and vectorises)."""
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options={"num_warps": num_warps})
    return _read_cubin(kernel)


def _read_cubin(kernel):
    """(registers, stack bytes a thread, SASS text) of a compiled kernel, or None where Triton's
    bundled cuobjdump is missing or cannot read it."""
    if not os.path.exists(CUOBJDUMP) or "cubin" not in kernel.asm:
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            r = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, timeout=60)
            sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(w.split(":", 1) for line in r.stdout.splitlines() if "REG:" in line
                  for w in line.split() if ":" in w)
    if r.returncode != 0 or not {"REG", "STACK"} <= fields.keys():
        return None  # another cuobjdump, another format: no resource report
    return int(fields["REG"]), int(fields["STACK"]), sass.stdout if sass.returncode == 0 else ""


_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA\s+(0x[0-9a-f]+)")


def hot_loop_paths(sass: str) -> tuple[int, ...]:
    """Instructions a thread issues per iteration of the kernel's longest loop, along each side of
    the first if/else inside it (one number when there is none), taking the shortest way through
    any other branch of the iteration (in the fused attention: skipping the padding mask, which
    only the key blocks past a row's end run). A static proxy for the kernel's cost where, as in the fused
    attention, it is bound by issue rather than by the tensor cores."""
    code = [(int(a, 16), t) for a, t in _SASS_LINE.findall(sass)]
    back = [(int(m.group(2), 16), a) for a, t in code if (m := _BRANCH.match(t)) and int(m.group(2), 16) < a]
    if not back:
        return ()
    lo, hi = max(back, key=lambda r: r[1] - r[0])
    body = [(a, t) for a, t in code if lo <= a <= hi]
    at = {a: n for n, (a, _) in enumerate(body)}

    def shortest_from(forced: dict):
        """``shortest(n)``: instructions from body[n] to the end of the iteration, the shortest way
        (``forced``: the branches whose way is fixed, index -> taken); memoised, so that a chain of
        guarded regions costs linear time."""
        @functools.lru_cache(maxsize=None)
        def shortest(n: int) -> int:
            count = 0
            while n < len(body):
                count += 1
                m = _BRANCH.match(body[n][1])
                target = int(m.group(2), 16) if m else -1
                if not m or not lo < target <= hi or target <= body[n][0]:
                    n += 1  # not a branch, or the loop's own back edge (the iteration's last instruction)
                    continue
                if not m.group(1):  # an unconditional jump forward
                    n = at[target]
                    continue
                if n in forced:
                    n = at[target] if forced[n] else n + 1
                    continue
                return count + min(shortest(at[target]), shortest(n + 1))
            return count
        return shortest

    for n, (a, t) in enumerate(body):
        m = _BRANCH.match(t)
        if m and m.group(1) and a < int(m.group(2), 16) <= hi:  # the first forward conditional branch
            target = int(m.group(2), 16)
            first = [(b, u) for b, u in body if a < b < target]
            end = _BRANCH.match(first[-1][1]) if first else None
            if end and not end.group(1) and int(end.group(2), 16) > target:  # an if/else: its first side
                return shortest_from({n: False})(0), shortest_from({n: True})(0)  # jumps over the second
            break
    return (shortest_from({})(0),)


ATTENTION_STRIDES = ["s_qb", "s_qh", "s_qm", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "s_cb", "s_ch",
                     "s_cm", "s_cs", "s_pb", "s_ph", "s_pn", "s_ps", "s_mb", "s_ob", "s_oh", "s_om", "s_xb"]


def attention_build(dt, block_m, block_n, *, rel=True, qpos=False, mask=True, columns=False, monotone=True,
                    wide=False):
    """(signature, constexprs, divisible arguments) of the fused attention as Triton's launcher
    builds it for PairRM's shapes: 16-byte aligned tensors, head size 64, strides below 2^31 typed
    i32, those that are multiples of 16 (the model's and the row-major tables') marked so, and those
    equal to 1 (the tables' stride along 2S, or along L for the transposed views of
    ``columns``) made constants, as the launcher makes them. ``mask``: True (a general key mask),
    ``"len"`` (a right-padded batch's key lengths, the ranker's) or False (no padding)."""
    ones = {"s_cm": 1, "s_pn": 1} if columns else {"s_cs": 1, "s_ps": 1}
    signature = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "C2P": f"*{dt}", "P2C": f"*{dt}", "REL": "*i32",
                 "QPOS": "*i32", "KMASK": "*i8", "KLEN": "*i32", "OUT": f"*{dt}",
                 **{k: "constexpr" if k in ones else "i32" for k in ATTENTION_STRIDES},
                 "H": "i32", "LQ": "i32", "LK": "i32", "D": "i32", "REL_ZERO": "i32", "L_BUCKET": "i32"}
    flags = {"HAS_C2P": rel, "HAS_P2C": rel, "HAS_QPOS": qpos, "HAS_MASK": mask is True,
             "HAS_KLEN": mask == "len", "MONOTONE": monotone,
             "WIDE": wide, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 64, "DOT_F32": False,
             "PRECISION": "ieee" if dt == "fp32" else "tf32"}
    signature.update({k: "constexpr" for k in flags})
    divisible = [n for n, t in signature.items() if t.startswith("*")] + [
        "s_qb", "s_qh", "s_qm", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "s_ob", "s_oh", "s_om", "D"]
    if not columns:
        divisible += ["s_cb", "s_ch", "s_cm", "s_pb", "s_ph", "s_pn"]
    return signature, {**flags, **ones}, divisible


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
                     {"BLOCK_V": logprobs.DEFAULT_CONFIG.block_v, "SINGLE": single, "ACC": acc},
                     num_warps=logprobs.DEFAULT_CONFIG.num_warps)
            n += 1
        for llp in (False, True):  # (the vocabulary pass's label log-probs)
            _compile(logprobs._sppo_bwd_kernel,
                     {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": acc_ptr, "coef_ptr": acc_ptr,
                      "out_ptr": f"*{dt}", "llp_ptr": acc_ptr, "T": "i32", "V": "i32", **strides,
                      "stride_cb": "i64", "stride_ct": "i64", "stride_ob": "i64", "stride_ot": "i64",
                      "ignore_index": "i64", "col0": "i64", "BLOCK_V": "constexpr", "ACC": "constexpr",
                      "HAS_LLP": "constexpr", "LIB_EXPM1": "constexpr"},
                     {"BLOCK_V": logprobs.DEFAULT_CONFIG.block_v, "ACC": acc, "HAS_LLP": llp, "LIB_EXPM1": True},
                     num_warps=logprobs.DEFAULT_CONFIG.num_warps)
            n += 1
    for dt in ("fp32", "fp64"):
        for direct in (False, True):
            _compile(pairwise._pairwise_kernel,
                     {"cmp_ptr": f"*{dt}", "scores_ptr": "*fp32", "probs_ptr": "*fp64", "win_ptr": "*fp64",
                      "chosen_ptr": "*i64", "rejected_ptr": "*i64", "cp_ptr": "*fp64", "cpw_ptr": "*fp64",
                      "cpl_ptr": "*fp64", "tied_ptr": "*i8", "K": "i32", "sb": "i64", "si": "i64", "sj": "i64",
                      "DIRECT": "constexpr"}, {"DIRECT": direct}, num_warps=1)
            n += 1
    spills, opt_in_spills = [], []
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        block_m, block_n, warps = deberta_attention.LAUNCH[torch_dt]
        # (mask "len": the ranker's right-padded batches; True: a general key mask)
        for rel, qpos, mask, columns, monotone, wide in (
                (True, False, "len", False, True, False), (True, True, "len", False, True, False),
                (True, False, True, False, True, False), (False, False, "len", False, True, False),
                (True, False, "len", True, True, False), (True, False, False, False, False, False),
                (True, True, "len", False, True, True)):
            signature, constexprs, divisible = attention_build(
                dt, block_m, block_n, rel=rel, qpos=qpos, mask=mask, columns=columns, monotone=monotone, wide=wide)
            usage = _compile(deberta_attention._deberta_attention_fwd, signature, constexprs, num_warps=warps,
                             divisible=divisible)
            n += 1
            if usage is not None:
                what = (f"{dt} rel={rel} qpos={qpos} mask={mask}" + (" column-major tables" if columns else "")
                        + ("" if monotone else " non-monotone index") + (" 64-bit table offsets" if wide else ""))
                loop = sorted(hot_loop_paths(usage[2]))  # (the shorter side is the uniform tiles')
                per = " / ".join(f"{x * warps * 32 / (block_m * block_n):.1f}" for x in loop)
                sides = " (uniform / general tiles)" if len(loop) == 2 else ""
                print(f"attention {what}: {usage[0]} registers, {usage[1]} stack bytes, "
                      f"{per} instructions a score in the key loop{sides}")
                if usage[1]:
                    (opt_in_spills if columns else spills).append(f"{what} ({usage[1]} bytes)")
    print(f"compiled {n} kernel variants for sm_90 (Triton {triton.__version__})")
    # the fused attention's default launches (deberta_attention.LAUNCH) must keep everything in
    # registers; the opt-in transposed tables are reported (Triton 3.6 spills 8 bytes there)
    print("attention launches that spill:", ", ".join(spills) if spills else "none")
    print("opt-in attention variants that spill:", ", ".join(opt_in_spills) if opt_in_spills else "none")


if __name__ == "__main__":
    main()
