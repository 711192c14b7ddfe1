"""The fused DeBERTa attention's sm_90 build, read without a GPU: registers, spills, shared memory,
programs per SM, and the key loop's instructions per score, for a list of launches.

    python benchmarks/sass_attention.py                     # the default launches, bf16
    python benchmarks/sass_attention.py --launches 64x64w4s1 128x64w8 --dtype fp16

Each launch is compiled as Triton's launcher would compile it for PairRM's shapes (16-byte aligned
tensors, strides typed 32-bit and marked divisible by 16, head size 64: ``tests/triton_aot.py``'s
``attention_build``, which its compile test uses too) and disassembled with Triton's bundled
``cuobjdump``. The instruction count is static:
instructions a thread issues per iteration of the key loop, divided by the scores a thread owns
(BLOCK_M x BLOCK_N / threads), on each side of the uniform-tile branch. The fused attention is bound
by issue and latency rather than by its tensor cores, so this is a proxy for time where no GPU is at
hand; it says nothing of memory stalls, which only a GPU run measures. Programs per SM: the least that
the register file, shared memory and the warp and program limits allow (``_programs_per_sm``).
Rows go to ``benchmarks/results/deberta_attention-sass-sm90.csv`` (``harness.Row``; the device is
"sm_90 build (no GPU)").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from harness import Row, environment, write_rows  # noqa: E402

DEFAULT_LAUNCHES = ["64x64w4", "64x64w4s2", "64x64w4s1", "128x64w8", "128x32w4", "64x32w4", "256x64w8"]


def _programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """sm_90: a 65536-register file allocated in 256-register steps per warp; 228 KB of shared memory,
    1 KB of it reserved per program; at most 64 warps and 32 programs."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = (228 * 1024) // (shared + 1024)
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", nargs="*", default=DEFAULT_LAUNCHES,
                   help="BLOCK_MxBLOCK_NwWARPS[sSTAGES], e.g. 64x64w4 or 64x64w4s1 (default: a sweep)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--mask", default="len", choices=["len", "mask", "none"],
                   help="padding as key lengths (the ranker's right-padded batches, default), as a general "
                        "key mask, or none")
    p.add_argument("--out", type=Path, default=HERE / "results" / "deberta_attention-sass-sm90.csv")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)

    import triton
    from triton.compiler import ASTSource

    import triton_aot as aot
    from sppo_fast.kernels import deberta_attention as kda

    try:
        env = environment()
    except (AttributeError, ImportError, RuntimeError):  # (no native extension: only the ISA is missing)
        import time

        import torch

        env = {"isa": "", "threads": torch.get_num_threads(), "torch": torch.__version__, "sppo_fast": "",
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    env["device"] = "sm_90 build (no GPU)"
    env["torch"] = f"{env['torch']}, triton {triton.__version__}"
    dt = args.dtype
    fn = kda._deberta_attention_fwd
    rows = []
    print(f"{'launch':<12}{'terms':<8}{'regs':>6}{'stack':>7}{'smem KB':>9}{'prog/SM':>9}  instructions a score")
    for spec in args.launches:
        try:
            bm, bn, warps, *stages = kda.parse_launch(spec)
        except ValueError as exc:
            raise SystemExit(f"--launches: {exc}") from None
        options = {"num_warps": warps, **({"num_stages": stages[0]} if stages else {})}
        for rel in (True, False):
            mask = {"len": "len", "mask": True, "none": False}[args.mask]
            signature, constexprs, divisible = aot.attention_build(dt, bm, bn, rel=rel, mask=mask)
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                    target=aot.TARGET, options=options)
            usage = aot._read_cubin(kernel)
            if usage is None:
                raise SystemExit("Triton's bundled cuobjdump could not read the cubin: nothing to report")
            regs, stack, sass = usage
            shared = kernel.metadata.shared
            loop = sorted(aot.hot_loop_paths(sass))
            per = [x * warps * 32 / (bm * bn) for x in loop]
            progs = _programs_per_sm(regs, warps, shared)
            terms = "rel" if rel else "no-rel"
            print(f"{spec:<12}{terms:<8}{regs:>6}{stack:>7}{shared / 1024:>9.0f}{progs:>9}  "
                  + " / ".join(f"{x:.1f}" for x in per) + ("  (uniform / general tiles)" if len(per) == 2 else ""))
            shape = f"{dt} D=64 mask={args.mask}"
            base = dict(op="deberta_attention-sass", provider=spec, mode=terms, shape=shape, **env)
            rows += [Row(metric="registers", value=regs, unit="per thread", **base),
                     Row(metric="stack", value=stack, unit="bytes per thread", **base),
                     Row(metric="shared_memory", value=shared / 1024, unit="KiB", **base),
                     Row(metric="programs_per_sm", value=progs, unit="programs", **base)]
            names = ["instructions_uniform_tile", "instructions_general_tile"] if len(per) == 2 else ["instructions"]
            rows += [Row(metric=n, value=round(x, 2), unit="per score", **base) for n, x in zip(names, per)]
            write_rows(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
