"""Triton kernels: token log-probs (one pass per row) and the SPPO backward from the saved row stats.

Layout shared with the C++ backend: logits are viewed as ``[B, T, V]`` with explicit strides (so a
``logits[:, :-1]`` view needs no copy) and unit stride along V; per row we keep only
``lse[row] = (max, log(sum(exp(x - max))))`` in float32, never the softmax.

Traffic per row of V logits: the forward reads it once; the backward reads it once and writes the
gradient once (in place when asked) -- 3 * N * V * elem bytes for forward + backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import on_device

# read when the kernels are defined, as Triton itself does: the interpreter has no libdevice.expm1
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# A large negative *finite* start for running maxima: a block of -inf logits then never forms
# (-inf) - (-inf) = NaN.
NEG_BIG = tl.constexpr(-3.0e38)


@dataclass(frozen=True)
class LogprobConfig:
    """Launch configuration. ``split``: logits per program along V (a row longer than that is cut
    across programs and their partial (max, sum) combined); ``block_v``: logits per loop step."""

    block_v: int = 4096
    split: int = 65536
    num_warps: int = 8


DEFAULT_CONFIG = LogprobConfig()
_CANDIDATES = [LogprobConfig(b, s, w) for b in (1024, 2048, 4096) for s in (32768, 65536)
               for w in (4, 8, 16)]
_TUNED: dict = {}


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, labels_ptr, tok_ptr, lse_ptr, part_ptr,
    T, V, stride_lb, stride_lt, stride_yb, stride_yt, ignore_index, split, n_split,
    BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + b * stride_yb + t * stride_yt)
    base = logits_ptr + b * stride_lb + t * stride_lt
    start = part * split
    m = tl.full((), NEG_BIG, ACC)
    s = tl.zeros((), ACC)
    if label != ignore_index:
        for off in range(0, split, BLOCK_V):  # split is a multiple of BLOCK_V
            cols = start + off + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
    if SINGLE:
        keep = label != ignore_index
        ls = tl.log(tl.where(keep, s, 1.0))  # ignored rows have s = 0 and are zeroed below
        x_label = tl.load(base + label, mask=keep, other=0.0).to(ACC)
        tl.store(tok_ptr + row, tl.where(keep, (x_label - m) - ls, 0.0))
        tl.store(lse_ptr + 2 * row, tl.where(keep, m, 0.0))
        tl.store(lse_ptr + 2 * row + 1, tl.where(keep, ls, 0.0))
    else:
        tl.store(part_ptr + (row * n_split + part) * 2, m)
        tl.store(part_ptr + (row * n_split + part) * 2 + 1, s)


@triton.jit
def _sppo_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, coef_ptr, out_ptr, llp_ptr,
    T, V, stride_lb, stride_lt, stride_yb, stride_yt, stride_cb, stride_ct, stride_ob, stride_ot,
    ignore_index, col0,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, HAS_LLP: tl.constexpr, LIB_EXPM1: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + b * stride_yb + t * stride_yt)
    keep = label != ignore_index
    g = tl.where(keep, tl.load(coef_ptr + b * stride_cb + t * stride_ct).to(ACC), 0.0)
    m = tl.load(lse_ptr + 2 * row)
    ls = tl.load(lse_ptr + 2 * row + 1)
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(logits_ptr + b * stride_lb + t * stride_lt + cols, mask=mask, other=0.0).to(ACC)
    p = tl.exp(tl.where(keep, (x - m) - ls, float("-inf")))  # ignored rows: p = 0, no overflow
    grad = g * (tl.where(cols + col0 == label, 1.0, 0.0) - p)  # a label outside the slice: no term
    if HAS_LLP:
        # the label's entry from its given log-prob: -g * expm1(lp), accurate where p ~ 1
        lp = tl.load(llp_ptr + row, mask=keep, other=0.0).to(ACC)
        if LIB_EXPM1:
            em1 = libdevice.expm1(lp)
        else:  # the interpreter: Kahan's exp/log form, within ~2 ulp with exact exp and log
            u = tl.exp(lp)
            um1 = u - 1.0
            edge = (u == 1.0) | (um1 == -1.0)  # lp ~ 0: lp itself; u = 0: -1 (and no log(0))
            em1 = tl.where(u == 1.0, lp, tl.where(um1 == -1.0, -1.0, um1 * lp / tl.log(tl.where(edge, 2.0, u))))
        grad = tl.where((cols + col0 == label) & keep, -g * em1, grad)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the GPU's cast does it too, Triton's interpreter truncates.
        # A NaN first becomes the quiet NaN 0x7FC00000: the GPU's own NaN, 0x7FFFFFFF, would carry
        # into the sign bit and come out as -0 (seen on an H100)
        bits = grad.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = tl.where(grad != grad, 0x7FC00000, bits)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = grad.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + cols, out, mask=mask)


def _config(V: int, dtype: torch.dtype, fn) -> LogprobConfig:
    """The named default, or (opt-in: SPPO_FAST_AUTOTUNE=1) the fastest candidate for (V, dtype)."""
    if os.environ.get("SPPO_FAST_AUTOTUNE") != "1":
        return DEFAULT_CONFIG
    key = (fn.__name__, V, dtype)
    if key not in _TUNED:
        times = {c: triton.testing.do_bench(lambda c=c: fn(c), warmup=5, rep=20) for c in _CANDIDATES}
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(cfg: LogprobConfig, V: int) -> int:
    return min(cfg.block_v, triton.next_power_of_2(V))


def logprob_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                config: LogprobConfig | None = None):
    """``(token_logp[B, T], lse[B, T, 2], seq_logp[B])`` for ``logits[B, T, V]``: float32, or
    float64 for float64 logits (accumulation in the same type)."""
    B, T, V = logits.shape
    dev = logits.device
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tok = torch.empty((B, T), dtype=acc, device=dev)
    lse = torch.empty((B, T, 2), dtype=acc, device=dev)

    def launch(cfg: LogprobConfig):
        blk = _block(cfg, V)
        split = min(triton.cdiv(cfg.split, blk), triton.cdiv(V, blk)) * blk
        n_split = triton.cdiv(V, split)
        part = (torch.empty((B * T, n_split, 2), dtype=acc, device=dev) if n_split > 1 else tok)
        _logprob_fwd_kernel[(B * T, n_split)](
            logits, labels, tok, lse, part, T, V, logits.stride(0), logits.stride(1),
            labels.stride(0), labels.stride(1), ignore_index, split, n_split,
            BLOCK_V=blk, SINGLE=n_split == 1, ACC=_tl_acc(acc), num_warps=cfg.num_warps)
        return part, n_split

    if B * T:
        with on_device(logits):
            part, n_split = launch(config or _config(V, logits.dtype, launch))
        if n_split > 1:  # combine the partial (max, sum) of each row's pieces: O(rows) work
            keep = labels != ignore_index
            m = part[..., 0].amax(1).view(B, T)
            s = (part[..., 1] * torch.exp(part[..., 0] - m.view(-1, 1))).sum(1).view(B, T)
            x_label = logits.gather(2, torch.where(keep, labels, 0)[..., None])[..., 0].to(acc)
            zero = torch.zeros((), device=dev)
            tok.copy_(torch.where(keep, (x_label - m) - torch.log(s), zero))
            lse.copy_(torch.stack([torch.where(keep, m, zero), torch.where(keep, torch.log(s), zero)], -1))
    seq = tok.sum(1, dtype=torch.float64).to(acc)
    return tok, lse, seq


def logprob_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                ignore_index: int, out: torch.Tensor, config: LogprobConfig | None = None,
                col0: int = 0, label_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``coef[b, t] * (onehot(labels[b, t]) - softmax(logits[b, t]))`` into ``out`` (may be logits).

    With ``col0``, ``logits`` holds columns ``[col0, col0 + V)`` of the rows ``lse`` describes.
    With ``label_logp`` (contiguous [B, T], ``lse``'s dtype) the label entry is
    ``-coef * expm1(label_logp)``."""
    B, T, V = logits.shape
    if B * T == 0:
        return out

    def launch(cfg: LogprobConfig, src: torch.Tensor = logits, dst: torch.Tensor = out):
        blk = _block(cfg, V)
        _sppo_bwd_kernel[(B * T, triton.cdiv(V, blk))](
            src, labels, lse, coef, dst, lse if label_logp is None else label_logp, T, V, src.stride(0),
            src.stride(1), labels.stride(0), labels.stride(1), coef.stride(0), coef.stride(1),
            dst.stride(0), dst.stride(1), ignore_index, col0, BLOCK_V=blk, ACC=_tl_acc(lse.dtype),
            HAS_LLP=label_logp is not None, LIB_EXPM1=not _INTERPRET, num_warps=cfg.num_warps)

    with on_device(logits):
        if config is None and os.environ.get("SPPO_FAST_AUTOTUNE") == "1":
            # timed on a scratch copy: the candidates' runs must not overwrite logits that out aliases
            scratch = logits.clone()

            def trial(cfg: LogprobConfig):
                launch(cfg, scratch, scratch)
            trial.__name__ = "logprob_bwd"
            config = _config(V, logits.dtype, trial)
        launch(config or DEFAULT_CONFIG)
    return out
