"""PairRM ranking throughput: sppo_fast's engine against LLM-Blender's own ``Blender.rank``.

    python benchmarks/bench_pairrm.py                      # this CPU: tiny model, 64 prompts x K=5
    python benchmarks/bench_pairrm.py --cuda --model large # GPU: DeBERTa-v3-large shapes, random weights

Both sides run the same weights (LLM-Blender's ``CrossCompareReranker`` shares our backbone, see
``sppo_fast.llm_blender_compat``) on the same texts: prompts ~150 and candidates ~300 tokens on the
CPU (``--model tiny``), lengths drawn from 50-1000 tokens on the GPU (``--model large``). Providers:

- ``llm-blender-bN``: ``Blender.rank(..., batch_size=N)`` (SPPO uses N = 1) on the first
  ``--blender-prompts`` prompts (it is the slow side); batch size 1 runs first, the others last.
  Prompts differ in length, so prompts/s depends on which prompts: the default provider is timed on
  those same first prompts as well (``sppo-fast-on-blender-prompts``), the like-for-like comparison;
- ``sppo-fast``: :class:`sppo_fast.pairrm.PairRMRanker` with its default attention (``"auto"``: the
  fused Triton kernel on CUDA, the C++ kernel on CPU);
- ``sppo-fast-torch``: the lean PyTorch attention path;
- ``sppo-fast-hf``: the same engine on Hugging Face's eager attention (isolates the engine's gain);
- ``sppo-fast-transposed``, ``sppo-fast-autotune``: the fused kernel's opt-in variants (CUDA; see
  ``sppo_fast.kernels.deberta_attention``); the autotuned one warms up on all the prompts (ranks them
  twice), so that no tuning is timed;

Rows: prompts per second, wall time, peak memory (CUDA) and the largest score difference from
LLM-Blender at batch size 1, in the harness's long CSV format.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, environment, write_rows  # noqa: E402


def make_texts(n: int, K: int, model: str, seed: int = 0):
    from sppo_fast.tiny import synthetic_text

    rng = random.Random(seed)
    # synthetic text runs ~1.15 tokens per word with the tiny tokenizer
    if model == "tiny":
        p_words, c_words = (100, 160), (200, 320)
    else:
        p_words, c_words = (45, 870), (45, 870)
    prompts = [synthetic_text(rng, rng.randint(*p_words)) for _ in range(n)]
    cands = [[synthetic_text(rng, rng.randint(*c_words)) for _ in range(K)] for _ in range(n)]
    return prompts, cands


def build(model_size: str, device: str):
    from sppo_fast import pairrm as prm

    if model_size == "tiny":
        model, tok = prm.tiny_pairrm(seed=0)
    else:  # the released architecture (DeBERTa-v3-large, ~435M parameters) with random weights
        from sppo_fast.tiny import tiny_tokenizer

        tok = tiny_tokenizer(seed=0)
        prm.add_marker_tokens(tok)
        model, tok = prm.tiny_pairrm(seed=0, tokenizer=tok, base=prm.DEBERTA_V3_LARGE)
    prm.redraw_weights_(model, seed=1)
    return model.to(device).eval(), tok


def llm_blender_provider(model, tok, device: str, *, fp16: bool):
    """LLM-Blender's ranker on a deep copy of ``model``, in fp16 with ``fp16`` (as ``Blender.loadranker``
    runs it on CUDA). The copy: its ``.half()`` would otherwise round, in place, the shared backbone
    weights that the other providers (and the score comparison) use."""
    import copy

    from sppo_fast.llm_blender_compat import llm_blender_ranker

    blender = llm_blender_ranker(copy.deepcopy(model), tok, device=device)
    if fp16:
        blender.ranker.half()
    return blender


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--blender-prompts", type=int, default=16, help="prompts LLM-Blender ranks (default 16)")
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--blender-batch-sizes", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--providers", nargs="*", default=["llm-blender", "sppo-fast", "sppo-fast-torch", "sppo-fast-hf"])
    p.add_argument("--budget", type=int, default=None, help="PairRMRanker budget (default: the ranker's)")
    p.add_argument("--sweep-budgets", dest="sweep_budgets", type=int, nargs="*", default=[],
                   help="also run the default provider at each of these budgets (rows sppo-fast-budget-N)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    from sppo_fast import pairrm as prm
    from sppo_fast.llm_blender_compat import import_llm_blender

    if "llm-blender" in args.providers:
        try:
            import_llm_blender()
        except ImportError:
            print("  llm-blender is not installed: its providers are skipped (pip install llm-blender==0.0.2)")
            args.providers = [x for x in args.providers if x != "llm-blender"]

    device = "cuda" if args.cuda else "cpu"
    env = environment()
    model, tok = build(args.model, device)
    prompts, cands = make_texts(args.prompts, args.K, args.model)
    n_tok = np.mean([len(tok(x)["input_ids"]) for x in prompts[:16]]), \
        np.mean([len(tok(x)["input_ids"]) for c in cands[:4] for x in c])
    shape = f"{args.model} B={args.prompts} K={args.K} prompt~{n_tok[0]:.0f} cand~{n_tok[1]:.0f} tokens"
    print(f"pairrm ranking: {shape} on {env['device']} ({env['threads']} threads)")
    slug = "cuda" if args.cuda else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"pairrm-{args.model}-{slug}.csv"
    rows: list[Row] = []

    def record(provider: str, n: int, seconds: float, extra: dict) -> None:
        vals = {"prompts_per_s": (n / seconds, "prompts/s"), "time": (seconds, "s"), **extra}
        for metric, (v, unit) in vals.items():
            rows.append(Row("pairrm_rank", provider, "forward", shape, metric, float(v), unit, **env))
        write_rows(out, rows)
        print(f"  {provider:<18} {n / seconds:8.3f} prompts/s  ({n} prompts in {seconds:.1f} s)"
              + "".join(f"  {k} {v:.3g}" for k, (v, _) in extra.items()))

    def timed(fn):
        if args.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        r = fn()
        if args.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mem = {"peak_memory": (torch.cuda.max_memory_allocated() / 2**20, "MiB")} if args.cuda else {}
        return r, dt, mem

    truth = None
    blender = llm_blender_provider(model, tok, device, fp16=args.cuda) if "llm-blender" in args.providers else None

    def run_blender(bs: int) -> None:
        nonlocal truth
        n = max(bs, min(args.blender_prompts, args.prompts))
        with torch.no_grad():
            # warm-up, as for every provider (allocator, kernels, caches): one batch
            blender.rank(prompts[:bs], cands[:bs], return_scores=True, batch_size=bs, disable_tqdm=True)
            scores, dt, mem = timed(lambda: blender.rank(prompts[:n], cands[:n], return_scores=True,
                                                         batch_size=bs, disable_tqdm=True))
        if bs == 1:
            truth = scores
        record(f"llm-blender-b{bs}", n, dt, mem)

    # batch size 1 (SPPO's setting and the score yardstick) first, the other batch sizes last: the
    # engine's rows come before LLM-Blender's slow ones where a time limit cuts the run short
    if blender is not None and 1 in args.blender_batch_sizes:
        run_blender(1)
    runs = [(provider, impl, args.budget) for provider, impl in
            (("sppo-fast", "auto"), ("sppo-fast-torch", "torch"), ("sppo-fast-hf", "hf"),
             ("sppo-fast-transposed", "auto"), ("sppo-fast-autotune", "auto"))
            if provider in args.providers]
    runs += [(f"sppo-fast-budget-{b}", "auto", b) for b in args.sweep_budgets]
    try:
        from sppo_fast.kernels import deberta_attention as kda
    except ImportError:  # no Triton: the fused kernel's variants do not exist here
        kda = None
    for provider, impl, budget in runs:
        if kda is not None:  # the fused kernel's opt-in variants (CUDA): [2S, L] tables; autotuning
            kda.set_transposed_tables(provider == "sppo-fast-transposed")
            kda.set_autotune(provider == "sppo-fast-autotune")
        ranker = prm.PairRMRanker(model, tok, progress=False, attn_impl=impl, budget=budget)
        # warm-up (allocator, bucket index cache): two prompts; with autotuning the whole set, so that
        # every bucket shape the timed run meets is tuned already (else it tunes inside the timed region)
        n_warm = args.prompts if provider == "sppo-fast-autotune" else 2
        ranker.rank(prompts[:n_warm], cands[:n_warm])
        res, dt, mem = timed(lambda: ranker.rank(prompts, cands))
        extra = dict(mem)
        if truth is not None:
            diff = np.abs(res.scores.numpy()[: len(truth)] - truth).max()
            extra["max_abs_score_diff_vs_llm_blender"] = (float(diff), "")
        record(provider, args.prompts, dt, extra)
        n1 = len(truth) if truth is not None else 0
        if provider == "sppo-fast" and 0 < n1 < args.prompts:  # the prompts LLM-Blender ranked
            res, dt, mem = timed(lambda: ranker.rank(prompts[:n1], cands[:n1]))
            record("sppo-fast-on-blender-prompts", n1, dt, dict(mem))
    if kda is not None:
        kda.set_transposed_tables(False)
        kda.set_autotune(False)
    if blender is not None:
        for bs in args.blender_batch_sizes:
            if bs != 1:
                run_blender(bs)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
