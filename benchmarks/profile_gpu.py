"""Where the GPU time goes: one call under ``torch.profiler``, CUDA time per kernel (and per input
shape), for the next round of tuning.

    python benchmarks/profile_gpu.py linear [--V 32000] [--weight-grad auto]   # fused_linear_sppo_loss
    python benchmarks/profile_gpu.py pairrm [--prompts 4]                      # PairRM ranking, v3-large
    python benchmarks/profile_gpu.py linear --cpu --T 64 --H 256 --V 4000      # the same on the CPU

``linear``: one forward+backward of ``fused_linear_sppo_loss`` (N = 16384, H = 4096, bf16, backend
``cuda``) after a warm-up; the table groups the GEMMs by shape, so the vocabulary pass's slab widths
and their share of the time show. ``pairrm``: ``PairRMRanker.rank`` on a few DeBERTa-v3-large prompts
(random weights, the benchmark's texts), the fused attention against the rest of the backbone.
Prints the table and writes it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _linear(args, dev):
    import torch

    import sppo_fast

    g = torch.Generator(device=dev).manual_seed(0)
    S, T, H, V = 16, args.T, args.H, args.V
    hidden = torch.empty(S, T, H, dtype=torch.bfloat16, device=dev).normal_(generator=g).requires_grad_()
    weight = torch.empty(V, H, dtype=torch.bfloat16, device=dev).normal_(0.0, H ** -0.5, generator=g)
    weight.requires_grad_()
    labels = torch.randint(0, V, (S, T), generator=g, device=dev)
    ref = torch.randn(S, generator=g, device=dev) * 10 - 3 * T
    probs = {"chosen_probs_win": 0.5 + torch.rand(S // 2, generator=g, device=dev) / 2,
             "chosen_probs_lose": torch.rand(S // 2, generator=g, device=dev) / 2}
    backend = "cuda" if dev == "cuda" else "cpp"

    def step():
        hidden.grad = weight.grad = None
        loss = sppo_fast.fused_linear_sppo_loss(hidden, weight, labels, ref, beta=0.001, backend=backend,
                                                weight_grad=args.weight_grad, **probs)[0]
        loss.backward()
    return step


def _pairrm(args, dev):
    import torch

    from bench_pairrm import build, make_texts
    from sppo_fast import pairrm as prm

    model, tok = build(args.model, dev)
    prompts, cands = make_texts(args.prompts, 5, args.model)
    ranker = prm.PairRMRanker(model, tok, progress=False)

    def step():
        with torch.no_grad():
            ranker.rank(prompts, cands)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["linear", "pairrm"])
    p.add_argument("--T", type=int, default=1024, help="linear: tokens per sequence (16 sequences)")
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--model", choices=["tiny", "large"], default="large", help="pairrm: the model size")
    p.add_argument("--cpu", action="store_true", help="profile on the CPU (backend cpp) instead")
    p.add_argument("--weight-grad", dest="weight_grad", default="auto")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rows", type=int, default=30, help="table rows (default 30)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("profile_gpu.py needs a CUDA device (or --cpu)")
    dev = "cpu" if args.cpu else "cuda"
    sync = (lambda: None) if args.cpu else torch.cuda.synchronize
    step = _linear(args, dev) if args.what == "linear" else _pairrm(args, dev)
    step()  # warm-up: compilation, autotuning, allocator
    sync()
    activities = [ProfilerActivity.CPU] + ([] if args.cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        sync()
    key = "cpu_time_total" if args.cpu else "cuda_time_total"
    by_kernel = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=args.rows)
    name = "the CPU" if args.cpu else torch.cuda.get_device_name()
    text = f"{args.what} on {name}\n\nby kernel / op\n{by_kernel}\n\nby op and input shape\n{by_shape}\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
