"""How exact is each fused-linear provider? Gradients and loss against a float64 truth.

    python benchmarks/accuracy_fused_linear.py --dtype bfloat16            # CPU, small shape
    python benchmarks/accuracy_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V 32000 --dtype bfloat16

The speed benchmark (``bench_fused_linear.py``) compares time and memory; this one asks what the
memory bought. Every provider computes the same SPPO loss on the same inputs (``bench_fused_linear``'s
``_inputs`` and ``_fn``), backward with an upstream gradient of 1.7, in one process; the truth is the
eager reference in float64 on float64 copies of the inputs. For each of loss, ``d_hidden`` and
``d_weight``: the largest error relative to the truth's largest entry (``max_err``) and the error's
norm relative to the truth's (``rms_err``), and both as a multiple of the same-dtype eager
reference's (``*_vs_reference``): our tests hold our kernels to about 1x.

Providers: ``reference``, ``torch-lce``, ``cce`` (cut-cross-entropy, GPU; its defaults, so
``filter_eps="high"`` and gradients summed in the inputs' 16-bit dtype across blocks), and ours
(``cpp``, ``cuda``, ``triton``, with ``-recompute`` / ``-accumulate`` / ``-acc50``). Liger-Kernel's
``sppo_hard`` is another loss (no reference log-probs, fixed targets), so it is not compared here.

``--cce-interpreter`` runs cut-cross-entropy's Triton kernels in Triton's CPU interpreter (slow:
small shapes, and float16, since the interpreter's bfloat16 arithmetic is wrong). The interpreter
has no ``libdevice.log1p``; its one use (the forward's log-add-exp) is replaced by ``log(1 + x)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OP = "fused_linear_sppo_loss_accuracy"
CPU_PROVIDERS = ["reference", "torch-lce", "cpp", "cpp-recompute", "cpp-accumulate"]
GPU_PROVIDERS = ["reference", "cuda", "cuda-accumulate", "cuda-acc50", "cce", "torch-lce", "triton"]
UPSTREAM = 1.7


def _cce_on_the_interpreter() -> None:
    """cut-cross-entropy's kernels in Triton's interpreter (must run before triton is imported)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language
    from cut_cross_entropy import tl_utils

    globals()["tl"] = triton.language  # (a jit function finds `tl` in its module's globals)

    @triton.jit
    def log1p(a):
        return tl.log(1.0 + a)  # noqa: F821
    tl_utils.tl_log1p = log1p  # looked up in tl_utils' globals at call time


def _grads(provider, args, inputs):
    """(loss, d_hidden, d_weight) in float64, backward with the upstream gradient UPSTREAM."""
    import bench_fused_linear as bfl

    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    loss = bfl._loss_fn(provider, args, *inputs)()
    (loss * UPSTREAM).backward()
    return loss.detach().double(), hidden.grad.double(), weight.grad.double()


def _stats(got, truth) -> tuple[float, float]:
    err = (got - truth).abs()
    scale = truth.abs().max().clamp_min(1e-300)
    return (err.max() / scale).item(), (err.norm() / truth.norm().clamp_min(1e-300)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=4, help="pairs; the batch holds 2B sequences (default 4)")
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--prompt-frac", dest="prompt_frac", type=float, default=0.0)
    p.add_argument("--chunk-tokens", dest="chunk_tokens", type=int, default=0)
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--cce-interpreter", dest="cce_interpreter", action="store_true",
                   help="run cut-cross-entropy in Triton's CPU interpreter (float16, small shapes)")
    p.add_argument("--out", type=Path, default=None, help="CSV (long format, harness.FIELDS)")
    args = p.parse_args()
    if args.cce_interpreter:
        _cce_on_the_interpreter()

    import torch

    import bench_fused_linear as bfl
    import harness
    from sppo_fast import reference as R

    inputs = bfl._inputs(args)
    hidden, weight, labels, ref_logps, probs = inputs
    # the truth: the eager reference in float64 on float64 copies of the same inputs
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    B = args.B
    pol = R.sequence_logps(torch.nn.functional.linear(h64, w64), labels)
    loss64 = R.sppo_loss(pol[:B], pol[B:], ref_logps[:B].double(), ref_logps[B:].double(), beta=args.beta,
                         **{k: v.double() for k, v in probs.items()}).mean()
    (loss64 * UPSTREAM).backward()
    truth = (loss64.detach(), h64.grad, w64.grad)
    del pol, h64, w64

    N = 2 * args.B * args.T
    shape = f"N={N} (2B={2 * args.B} x T={args.T}) H={args.H} V={args.V} {args.dtype}"
    env = harness.environment()
    rows, ref = [], None
    providers = args.providers or (GPU_PROVIDERS if args.cuda else CPU_PROVIDERS)
    # the reference first: every other provider's error is also given as a multiple of its error
    providers = ["reference", *[p for p in providers if p != "reference"]]
    if "torch-lce" in providers and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        print(f"  {'torch-lce':<16} skipped: torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        providers.remove("torch-lce")
    print(f"{OP}: {shape}, upstream gradient {UPSTREAM}; errors relative to the float64 truth's largest "
          f"entry (max) and norm (rms); (x): the same-dtype eager reference's multiple")
    for provider in providers:
        try:
            got = _grads(provider, args, inputs)
        except Exception as exc:  # noqa: BLE001 - a peer that is not installed, or fails: say so, go on
            print(f"  {provider:<16} skipped: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        st = {name: _stats(g, t) for name, g, t in zip(("loss", "d_hidden", "d_weight"), got, truth)}
        if provider == "reference":
            ref = st
        cells = []
        for name, (mx, rms) in st.items():
            for metric, value, unit in ((f"{name}_max_err", mx, "rel"), (f"{name}_rms_err", rms, "rel")):
                rows.append(harness.Row(OP, provider, "full", shape, metric, value, unit, **env))
            if ref is not None and provider != "reference" and ref[name][0] > 0:
                k = mx / ref[name][0]
                rows.append(harness.Row(OP, provider, "full", shape, f"{name}_max_err_vs_reference", k, "x", **env))
                cells.append(f"{name} {mx:.2e} ({k:.2f}x) rms {rms:.2e}")
            else:
                cells.append(f"{name} {mx:.2e} rms {rms:.2e}")
        print(f"  {provider:<16} " + "  ".join(cells))
        if args.out:  # after every provider: a run cut short by a time limit keeps what it measured
            harness.write_rows(args.out, rows)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
