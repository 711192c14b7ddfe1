"""One DeBERTa disentangled-attention layer: Hugging Face's eager attention against ours.

    python benchmarks/bench_deberta_attention.py                          # CPU: tiny PairRM shapes
    python benchmarks/bench_deberta_attention.py --cuda --model large     # GPU: DeBERTa-v3-large, bf16

Providers (same module weights, same inputs, relative-position embeddings already normalised):
- ``hf``: ``DisentangledSelfAttention.forward`` (its relative positions built once, outside the timing,
  as its encoder does once per forward);
- ``torch``: :func:`sppo_fast.deberta.attention` (one cached bucket index, no [L, L] transpose,
  no mask pass without padding);
- ``triton``: the fused kernel (CUDA only): no [L, L] tensor; ``triton-autotune``: the same with
  Triton's autotuner choosing tiles, warps and stages (opt-in, ``SPPO_FAST_ATTN_AUTOTUNE=1``);
  ``triton-transposed``: with the position tables built as [2S, L] (opt-in,
  ``SPPO_FAST_ATTN_TABLES=transposed``); ``--launches``: at given fixed launches; with
  ``--padded``, ``triton`` masks by the rows' lengths (as the ranker does: right padding) and
  ``triton-general-mask`` by loading the key mask;
- ``cpp``: the CPU kernel in ``sppo_fast._C`` (CPU only): no [L, L] tensor;
- ``flashdeberta``: FlashDeBERTa's attention when the package is installed (``pip install flashdeberta``).
Rows: median time (ms, 20/80% quantiles) and, on CUDA, peak memory beyond the inputs (MiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, cuda_extra_peak, environment, relative, time_fn, write_rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny")
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--padded", action="store_true",
                   help="pad the last tenth of the last batch row (the engine's buckets are padded; "
                        "without padding the torch path skips its mask pass)")
    p.add_argument("--providers", nargs="*",
                   default=["hf", "torch", "cpp", "triton", "triton-autotune", "triton-transposed", "flashdeberta"])
    p.add_argument("--launches", nargs="*", default=[],
                   help="also time the fused kernel at these fixed launches, BLOCK_MxBLOCK_NwWARPS each "
                        "(e.g. 128x64w8, or 64x64w4s1 with 1 pipeline stage): rows triton-128x64w8, ...")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder, build_relative_position

    from sppo_fast import deberta
    from sppo_fast import pairrm as prm

    dev = "cuda" if args.cuda else "cpu"
    dtype = torch.bfloat16 if args.cuda else torch.float32
    lengths = args.lengths or ([1024, 2048, 4096] if args.cuda else [256, 700])
    config = prm.pairrm_config(base=prm.DEBERTA_V3_LARGE if args.model == "large" else prm.TINY,
                               num_hidden_layers=1)
    torch.manual_seed(0)
    enc = DebertaV2Encoder(config).eval().to(dev, dtype)
    attn = enc.layer[0].attention.self
    env = environment()
    name = f"deberta_attention-{args.model}{'-padded' if args.padded else ''}-{'cuda' if args.cuda else 'cpu'}.csv"
    out = args.out or Path(__file__).parent / "results" / name
    rows: list[Row] = []
    print(f"deberta attention ({args.model}: hidden {config.hidden_size}, {config.num_attention_heads} heads, "
          f"batch {args.batch}, {dtype}) on {env['device']}")
    for L in lengths:
        shape = f"{args.model} B={args.batch}{' padded' if args.padded else ''} L={L} H={config.num_attention_heads} d={config.hidden_size // config.num_attention_heads} {str(dtype)[6:]}"
        x = torch.randn(args.batch, L, config.hidden_size, device=dev, dtype=dtype)
        rel_emb = enc.get_rel_embedding()
        mask2 = torch.ones(args.batch, L, device=dev, dtype=torch.long)
        if args.padded:
            mask2[-1, L - L // 10:] = 0
        key_mask = mask2.bool() if args.padded else None
        key_len = mask2.sum(1, dtype=torch.int32) if args.padded else None  # right padding, as the engine's
        ext = enc.get_attention_mask(mask2)
        rel_pos = build_relative_position(x, x, bucket_size=config.position_buckets,
                                          max_position=enc.max_relative_positions)
        calls = {
            "hf": lambda: attn(x, ext, relative_pos=rel_pos, rel_embeddings=rel_emb)[0],
            "torch": lambda: deberta.attention(attn, x, rel_emb, key_mask, None, "torch"),
            "triton": lambda: deberta.attention(attn, x, rel_emb, key_mask, None, "triton", key_len),
            "triton-general-mask": lambda: deberta.attention(attn, x, rel_emb, key_mask, None, "triton"),
            "triton-autotune": lambda: _with_switch("set_autotune", lambda: deberta.attention(
                attn, x, rel_emb, key_mask, None, "triton", key_len)),
            "triton-transposed": lambda: _with_switch("set_transposed_tables", lambda: deberta.attention(
                attn, x, rel_emb, key_mask, None, "triton", key_len)),
            "cpp": lambda: deberta.attention(attn, x, rel_emb, key_mask, None, "cpp"),
        }
        for spec in args.launches:
            calls[f"triton-{spec}"] = _with_launch(spec, calls["triton"], dtype)
        try:
            import flashdeberta  # noqa: F401
        except ImportError:
            pass
        else:
            calls["flashdeberta"] = _flashdeberta_call(config, attn, x, ext, rel_pos, rel_emb)
        base = None
        for provider in args.providers + [f"triton-{spec}" for spec in args.launches]:
            gpu_only = provider.startswith("triton")
            if provider not in calls or gpu_only != args.cuda and (gpu_only or provider == "cpp"):
                why = ("not installed" if provider == "flashdeberta" else "CUDA only" if gpu_only
                       else "CPU only" if provider == "cpp" else "unknown provider")
                print(f"  {provider:<13} skipped ({why})")
                continue
            with torch.inference_mode():
                try:
                    y = calls[provider]()
                except Exception as exc:  # an unsupported peer configuration: report and go on
                    print(f"  {provider:<13} failed: {type(exc).__name__}: {exc}")
                    continue
                real = mask2.bool()  # (the outputs of padded queries are never read)
                if base is None:
                    base = y.float()[real]
                err = float((y.float()[real] - base).abs().max())
                mem = cuda_extra_peak(calls[provider]) / 2**20 if args.cuda else float("nan")
                t = time_fn(calls[provider], reps=args.reps, cuda=args.cuda)
            for metric, v, unit in (("time_median", t["median"] * 1e3, "ms"), ("time_q20", t["q20"] * 1e3, "ms"),
                                    ("time_q80", t["q80"] * 1e3, "ms"), ("extra_peak_memory", mem, "MiB"),
                                    ("max_abs_diff_vs_first", err, "")):
                rows.append(Row("deberta_attention", provider, "forward", shape, metric, v, unit, **env))
            write_rows(out, rows)
            peak = f"peak +{mem:8.1f} MiB" if args.cuda else "peak (CUDA only)"
            print(f"  L={L:<5} {provider:<13} {t['median'] * 1e3:9.2f} ms   {peak}   max|diff| {err:.2g}")
        ref = {r.provider: r.value for r in rows if r.shape == shape and r.metric == "time_median"}
        for provider, v in ref.items():
            if provider != "hf" and "hf" in ref:
                rows.append(Row("deberta_attention", provider, "forward", shape, "speedup_vs_hf", ref["hf"] / v,
                                "x", **env))
                print(f"  L={L:<5} {provider}: {relative(ref['hf'] / v)} than hf")
        write_rows(out, rows)
    print(f"wrote {out}")


def _with_launch(spec: str, call, dtype):
    """``call`` with the fused kernel's fixed launch for ``dtype`` set to ``spec`` ("64x64w4", or
    "64x64w4s1" with the number of pipeline stages)."""
    from sppo_fast.kernels import deberta_attention as kda

    try:
        launch = kda.parse_launch(spec)
    except ValueError as exc:
        raise SystemExit(f"--launches: {exc}") from None

    def run():
        saved = kda.LAUNCH[dtype]
        kda.LAUNCH[dtype] = launch
        try:
            return call()
        finally:
            kda.LAUNCH[dtype] = saved
    return run


def _with_switch(setter: str, call):
    """``call`` with one of the fused kernel's opt-in switches (``set_transposed_tables``,
    ``set_autotune``) on; the autotuner tunes on its first call, the warm-up's."""
    from sppo_fast.kernels import deberta_attention as kda

    getattr(kda, setter)(True)
    try:
        return call()
    finally:
        getattr(kda, setter)(False)


def _flashdeberta_call(config, attn, x, ext, rel_pos, rel_emb):
    """FlashDeBERTa's attention module with our layer's weights (its API, as far as it matches)."""
    from flashdeberta.model import FlashDisentangledSelfAttention  # type: ignore

    fa = FlashDisentangledSelfAttention(config).to(x.device, x.dtype).eval()
    fa.load_state_dict(attn.state_dict(), strict=False)
    # its forward takes the 2-D [B, L] mask (it sums it to choose the varlen path)
    mask2 = ext[:, 0, 0, :].long() if ext.dim() == 4 else ext
    return lambda: fa(x, mask2, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]


if __name__ == "__main__":
    main()
