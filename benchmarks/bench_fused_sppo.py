"""Benchmark fused_sppo_loss forward and forward+backward: the eager reference against the backends.

    python benchmarks/bench_fused_sppo.py                      # N = 16 x 256 tokens, V = 32000, fp32
    python benchmarks/bench_fused_sppo.py --dtype bfloat16 --V 128256 --compile

The reference is what a plain PyTorch SPPO trainer does: log_softmax + gather + sum + loss and
autograd. Every provider runs in its own fresh process, which also gives its peak RSS; the extra
peak memory of a provider is its peak minus that of a process that only allocates the inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

OP = "fused_sppo_loss"
CPU_PROVIDERS = ["reference", "cpp", "cpp-inplace"]
# reference-compile last: its compilation can take minutes, and a time limit then keeps the others' rows
GPU_PROVIDERS = ["copy", "reference", "triton", "cuda", "reference-compile"]


def _inputs(args, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n_seq = 2 * args.B
    # filled in place: no temporary inflates the peak memory measured after the inputs exist
    logits = torch.empty(n_seq, args.T, args.V, dtype=dtype, device=device)
    logits.normal_(0.0, 2.0, generator=g if device == "cpu" else None)
    labels = torch.randint(0, args.V, (n_seq, args.T), generator=g)
    labels[:, : args.T // 4] = -100  # a prompt prefix
    labels = labels.to(device)
    ref_logps = (torch.randn(n_seq, generator=g) * 10 - 3 * args.T).to(device)
    probs = {"chosen_probs_win": (0.5 + torch.rand(args.B, generator=g) / 2).to(device),
             "chosen_probs_lose": (torch.rand(args.B, generator=g) / 2).to(device)}
    return logits, labels, ref_logps, probs


def _step_fn(provider, logits, labels, ref_logps, probs, beta, backward):
    """One forward (+ backward) of the loss for ``provider``."""
    import torch

    import sppo_fast
    from sppo_fast import reference as R

    def reference_loss(x):
        B = x.shape[0] // 2
        pol = R.sequence_logps(x, labels)
        return R.sppo_loss(pol[:B], pol[B:], ref_logps[:B], ref_logps[B:], beta=beta, **probs).mean()

    if provider == "copy":  # the yardstick: a device copy of a logits-sized buffer
        dst = torch.empty_like(logits)
        return lambda: dst.copy_(logits)
    if provider.startswith("reference"):
        loss_fn = torch.compile(reference_loss) if provider.endswith("compile") else reference_loss
    else:
        backend = provider.split("-")[0]
        inplace = provider.endswith("inplace")

        def loss_fn(x):
            return sppo_fast.fused_sppo_loss(x, labels, ref_logps, beta=beta, backend=backend,
                                             inplace_backward=inplace, **probs)[0]

    if not backward:
        def fwd():
            with torch.no_grad():
                return loss_fn(logits)
        return fwd

    leaf = logits.requires_grad_()

    def full():
        loss_fn(_Consume.apply(leaf)).backward()
    return full


def _consume_class():
    import torch

    class Consume(torch.autograd.Function):
        """Identity whose backward drops the logits' gradient, as the lm_head backward would consume
        it. Without it, the gradient would be accumulated into a leaf's .grad (an extra copy when
        it shares the logits' memory), which a training step never does."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return None

    return Consume


def worker(args) -> dict:
    import torch

    global _Consume
    _Consume = _consume_class()
    device = "cuda" if args.cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    logits, labels, ref_logps, probs = _inputs(args, device)
    out = {"env": harness.environment(), "inputs_peak_rss": harness.peak_rss_bytes()}
    if args.provider == "inputs":
        out["peak_rss"] = out["inputs_peak_rss"]
        return out
    cuda = device == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0  # the copy provider's buffer counts too
    fn = _step_fn(args.provider, logits, labels, ref_logps, probs, args.beta, args.mode == "full")
    if cuda:
        out["cuda_extra_peak"] = harness.cuda_extra_peak(fn, [logits], base=base)
    out["time"] = harness.time_fn(fn, warmup=args.warmup, reps=args.reps, cuda=cuda)
    out["peak_rss"] = harness.peak_rss_bytes()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8, help="pairs; the batch holds 2B sequences (default 8)")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--V", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    providers = args.providers or (GPU_PROVIDERS if args.cuda else CPU_PROVIDERS)
    if args.compile and "reference-compile" not in providers:
        providers = providers + ["reference-compile"]
    N = 2 * args.B * args.T
    logits_bytes = N * args.V * {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    d = harness.Driver(Path(__file__).resolve(), OP,
                       f"N={N} (2B={2 * args.B} x T={args.T}) V={args.V} {args.dtype}",
                       harness.common_argv(args, ["B", "T", "V", "dtype", "beta"]), args.out,
                       f"{args.dtype}-V{args.V}")
    for provider in providers:
        for mode in args.modes:
            r = d.run(provider, mode)
            if r is None:
                break
            t = r["time"]
            d.row(provider, mode, "tokens_per_s", N / t["median"], "tokens/s")
            line = f"  {provider:<18} {mode:<8} {t['median'] * 1e3:9.1f} ms [{t['q20'] * 1e3:.1f}, {t['q80'] * 1e3:.1f}]"
            if provider == "copy":
                d.row(provider, mode, "copy_bandwidth", 2 * logits_bytes / t["median"] / 1e9, "GB/s")
                print(f"  {provider:<18} device copy {2 * logits_bytes / t['median'] / 1e9:8.1f} GB/s")
                break
            if mode == "full":
                # minimum traffic of a two-pass algorithm: read logits twice, write the gradient once
                d.row(provider, mode, "effective_bandwidth", 3 * logits_bytes / t["median"] / 1e9, "GB/s")
                # the gradient is an output (none for the in-place variant: it reuses the logits)
                beyond = r["extra_peak"] - (0 if provider.endswith("inplace") else logits_bytes)
                d.row(provider, mode, "peak_beyond_logits_and_grad_pct", 100 * beyond / logits_bytes, "%")
                line += (f"  extra peak {r['extra_peak'] / 2**20:8.1f} MiB ({100 * beyond / logits_bytes:+.1f}% "
                         "of the logits beyond logits + gradient)")
            print(line)
    d.speedups("reference", [p for p in providers if p != "copy"])
    copy = next((r for (p, _), r in d.results.items() if p == "copy"), None)
    if copy is not None:
        copy_bw = 2 * logits_bytes / copy["time"]["median"]
        for p in providers:
            if (p, "full") in d.results and p != "copy":
                frac = 3 * logits_bytes / d.results[(p, "full")]["time"]["median"] / copy_bw
                d.row(p, "full", "fraction_of_copy_bandwidth", 100 * frac, "%")
                print(f"  {p}: {100 * frac:.0f}% of the device copy bandwidth (3 N V bytes, forward+backward)")
    d.write()


if __name__ == "__main__":
    main()
