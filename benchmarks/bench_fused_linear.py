"""Benchmark fused_linear_sppo_loss (lm_head GEMM + log-probs + SPPO loss, no logits tensor).

    python benchmarks/bench_fused_linear.py            # N = 16 x 256 tokens, H = 512, V = 32000, fp32

Providers: ``reference`` (F.linear, then log_softmax + gather + sum + loss, autograd), ``torch-lce``
(torch's F.linear_cross_entropy(reduction="none") for the token log-probs, then the SPPO loss),
``cpp`` (sppo_fast.fused_linear_sppo_loss with its default ``weight_grad``; ``cpp-recompute`` and
``cpp-accumulate`` name the mode, ``cpp-acc50`` the recompute mode with ``accumulate_fraction=0.5``,
and so on for ``triton`` and ``cuda``), and ``gemm3``: only the three GEMMs any exact method must
do (logits, d_hidden, d_weight: 6 N H V FLOPs), timed in the same run as the yardstick. Peers where
installed (skipped with the reason otherwise): ``liger`` (Liger-Kernel's LigerFusedLinearDPOLoss with
loss_type="sppo_hard"; pure torch, runs on a CPU too) and, on a GPU, ``cce`` (cut-cross-entropy).
All tokens are labelled by default (--prompt-frac 0), so that every method does all 6 N H V FLOPs.
Each provider runs in a fresh process; extra peak memory is its peak RSS minus the inputs'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

OP = "fused_linear_sppo_loss"
PROVIDERS = ["gemm3", "reference", "torch-lce", "liger", "cpp", "cpp-recompute"]  # liger: if installed
# on a GPU, bf16's default is the vocabulary pass (recompute); cuda-accumulate is the other mode
# (the targets first: a GPU run that hits its time limit keeps them)
GPU_PROVIDERS = ["gemm3", "cuda", "liger", "cuda-acc50", "cce", "cuda-accumulate", "reference", "triton", "torch-lce"]
OURS = ("cpp", "triton", "cuda")


def _ours(provider: str):
    """fused_linear_sppo_loss's backend and mode keywords for one of our providers ("cuda",
    "cpp-recompute", "cuda-acc50": recompute with accumulate_fraction 0.5, ...), else None."""
    backend, _, mode = provider.partition("-")
    if backend not in OURS:
        return None
    if mode.startswith("acc") and mode[3:].isdigit():
        return {"backend": backend, "weight_grad": "recompute", "accumulate_fraction": int(mode[3:]) / 100}
    return {"backend": backend, "weight_grad": mode or "auto"}


def _inputs(args):
    import torch

    dev = "cuda" if args.cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = getattr(torch, args.dtype)
    S = 2 * args.B
    # filled in place: no temporary inflates the peak memory measured after the inputs exist
    hidden = torch.empty(S, args.T, args.H, dtype=dtype, device=dev).normal_(generator=g).requires_grad_()
    weight = torch.empty(args.V, args.H, dtype=dtype, device=dev).normal_(0.0, args.H ** -0.5, generator=g)
    weight.requires_grad_()
    labels = torch.randint(0, args.V, (S, args.T), generator=g, device=dev)
    labels[:, : int(args.T * args.prompt_frac)] = -100
    ref_logps = torch.randn(S, generator=g, device=dev) * 10 - 3 * args.T
    probs = {"chosen_probs_win": 0.5 + torch.rand(args.B, generator=g, device=dev) / 2,
             "chosen_probs_lose": torch.rand(args.B, generator=g, device=dev) / 2}
    return hidden, weight, labels, ref_logps, probs


def _dense_grad(x):
    """Identity whose backward hands on a contiguous gradient: cut-cross-entropy's backward views
    the gradient of its per-token losses, and a sum's gradient is an expanded (stride 0) tensor
    that cannot be viewed (seen on an H100)."""
    import torch

    class DenseGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g.contiguous()

    return DenseGrad.apply(x)


def _fn(provider, args, hidden, weight, labels, ref_logps, probs, backward):
    """The timed call: forward (no grad) or forward + backward; ``gemm3``: the three GEMMs alone."""
    import torch

    if provider == "gemm3":
        N = hidden.shape[0] * hidden.shape[1]
        h2 = hidden.detach().reshape(N, args.H)
        w = weight.detach()
        logits = torch.empty(N, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        dh, dw = torch.empty_like(h2), torch.empty_like(w)

        def gemms():
            torch.mm(h2, w.t(), out=logits)
            if backward:
                torch.mm(logits, w, out=dh)
                torch.mm(logits.t(), h2, out=dw)
        return gemms
    loss_fn = _loss_fn(provider, args, hidden, weight, labels, ref_logps, probs)
    if not backward:
        def fwd():
            with torch.no_grad():
                return loss_fn()
        return fwd

    def full():
        hidden.grad = weight.grad = None
        loss_fn().backward()
    return full


def _loss_fn(provider, args, hidden, weight, labels, ref_logps, probs):
    """A callable that returns the provider's scalar loss (autograd on) for these inputs."""
    import torch.nn.functional as F

    import sppo_fast
    from sppo_fast import reference as R

    B, H = args.B, args.H
    beta = args.beta

    def sppo(pol):
        return R.sppo_loss(pol[:B], pol[B:], ref_logps[:B], ref_logps[B:], beta=beta, **probs).mean()

    if provider == "reference":
        def loss_fn():
            return sppo(R.sequence_logps(F.linear(hidden, weight), labels))
    elif provider == "torch-lce":
        def loss_fn():
            nll = F.linear_cross_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1),
                                         reduction="none", ignore_index=-100)
            return sppo(-nll.view(labels.shape).sum(-1))
    elif _ours(provider):
        mode = _ours(provider)

        def loss_fn():
            return sppo_fast.fused_linear_sppo_loss(hidden, weight, labels, ref_logps, beta=beta,
                                                    chunk_tokens=args.chunk_tokens or None, **mode, **probs)[0]
    elif provider == "cce":  # Apple's cut-cross-entropy: per-token losses, then the SPPO loss
        from cut_cross_entropy import linear_cross_entropy

        def loss_fn():
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none", ignore_index=-100)
            return sppo(-_dense_grad(nll.reshape(labels.shape).float()).sum(-1))
    elif provider == "liger":  # Liger-Kernel's fused linear DPO loss with TRL's sppo_hard
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=beta, loss_type="sppo_hard", use_ref_model=False)

        def loss_fn():
            return liger(weight, hidden, labels)[0]
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return loss_fn


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vocab_pass_mib or args.min_slab:  # tuning experiments on the vocabulary pass's slabs
        import dataclasses

        from sppo_fast import linear

        real = linear._options

        def tuned(*a, **k):
            o = real(*a, **k)
            if args.vocab_pass_mib and o.vocab_elems:
                o = dataclasses.replace(o, vocab_elems=(args.vocab_pass_mib << 20) // 2)  # 16-bit elements
            return dataclasses.replace(o, min_slab=args.min_slab) if args.min_slab else o
        linear._options = tuned
    inputs = _inputs(args)
    out = {"env": harness.environment(), "inputs_peak_rss": harness.peak_rss_bytes()}
    if args.provider != "inputs":
        base = torch.cuda.memory_allocated() if args.cuda else 0  # gemm3's buffers count too
        fn = _fn(args.provider, args, *inputs, backward=args.mode == "full")
        if args.cuda:
            out["cuda_extra_peak"] = harness.cuda_extra_peak(fn, inputs[:2], base=base)
        out["time"] = harness.time_fn(fn, warmup=args.warmup, reps=args.reps, cuda=args.cuda)
    out["peak_rss"] = harness.peak_rss_bytes()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8, help="pairs; the batch holds 2B sequences (default 8)")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--prompt-frac", dest="prompt_frac", type=float, default=0.0,
                   help="fraction of each sequence labelled -100 (default 0: all tokens count)")
    p.add_argument("--chunk-tokens", dest="chunk_tokens", type=int, default=0,
                   help="sppo_fast's tokens per chunk (default 0: the library's default budget)")
    p.add_argument("--vocab-pass-mib", dest="vocab_pass_mib", type=int, default=0,
                   help="experiment: the GPU vocabulary pass's widest slab in MiB of 16-bit logits "
                        "(default 0: the library's, 64)")
    p.add_argument("--min-slab", dest="min_slab", type=int, default=0,
                   help="experiment: the vocabulary pass's narrowest slab in d_weight (default 0: 256)")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    N = 2 * args.B * args.T
    flops = 6 * N * args.H * args.V
    d = harness.Driver(Path(__file__).resolve(), OP,
                       f"N={N} (2B={2 * args.B} x T={args.T}) H={args.H} V={args.V} {args.dtype}"
                       + (f" chunk={args.chunk_tokens}" if args.chunk_tokens else "")
                       + (f" vocab-pass={args.vocab_pass_mib}MiB" if args.vocab_pass_mib else "")
                       + (f" min-slab={args.min_slab}" if args.min_slab else ""),
                       harness.common_argv(args, ["B", "T", "H", "V", "dtype", "beta", "prompt-frac", "chunk-tokens",
                                                  "vocab-pass-mib", "min-slab"]),
                       args.out, f"{args.dtype}-H{args.H}-V{args.V}")
    providers = list(args.providers or (GPU_PROVIDERS if args.cuda else PROVIDERS))
    if "torch-lce" in providers:
        import torch

        if not hasattr(torch.nn.functional, "linear_cross_entropy"):  # torch < 2.12 (the H100's 2.11)
            print(f"  torch-lce          skipped: torch {torch.__version__} has no "
                  "torch.nn.functional.linear_cross_entropy")
            providers.remove("torch-lce")
    for provider in providers:
        for mode in args.modes:
            r = d.run(provider, mode)
            if r is None:
                break
            t = r["time"]["median"]
            line = f"  {provider:<10} {mode:<8} {t * 1e3:9.1f} ms"
            if mode == "full":
                d.row(provider, mode, "gflops_6NHV", flops / t / 1e9, "GFLOP/s")
                line += f"  {flops / t / 1e9:7.1f} GFLOP/s (6NHV)  extra peak {r['extra_peak'] / 2**20:8.1f} MiB"
            print(line)
    res = d.results
    ours = [p for (p, m) in res if m == "full" and _ours(p)]
    for p in ours:
        if ("gemm3", "full") in res:
            ratio = res[(p, "full")]["time"]["median"] / res[("gemm3", "full")]["time"]["median"]
            d.row(p, "full", "time_vs_gemm3", ratio, "x")
            print(f"  {p} takes {ratio:.3f}x the time of the three GEMMs alone")
        if ("reference", "full") in res:
            mem = res[(p, "full")]["extra_peak"] / res[("reference", "full")]["extra_peak"]
            d.row(p, "full", "peak_vs_reference", 100 * mem, "%")
            print(f"  {p}'s extra peak memory is {100 * mem:.1f}% of the eager reference's")
        for peer in ("torch-lce", "liger", "cce"):
            if (peer, "full") in res:
                mem = res[(p, "full")]["extra_peak"] / res[(peer, "full")]["extra_peak"]
                d.row(p, "full", f"peak_vs_{peer}", 100 * mem, "%")
                print(f"  {p}'s extra peak memory is {100 * mem:.1f}% of {peer}'s")
    d.speedups("reference", ["torch-lce", "liger", "cce", *ours])
    for peer in ("torch-lce", "liger", "cce"):
        d.speedups(peer, ours)
    d.write()


if __name__ == "__main__":
    main()
