"""DeBERTa-v2/v3 disentangled attention, fused: no [L, L] tensor of any kind (inference only).

DeBERTa's attention score is ``s[i, j] = q_i . k_j + c2p[i, j] + p2c[i, j]`` (all pre-scaled by
``1/sqrt(3d)``) with

    c2p[i, j] = (q_i . k_pos)[idx(i - j)]      C2P = q @ k_pos^T: [L, 2S], computed once
    p2c[i, j] = (k_j . q_pos)[idx(i - j)]      P2C = k @ q_pos^T: [L, 2S], computed once

where ``idx(r) = clamp(bucket(r) + S, 0, 2S - 1)`` (S = position buckets; p2c uses the same index as
c2p because the log-bucketing is odd, ``bucket(-r) = -bucket(r)``). One program owns a block of
queries and walks the keys in blocks, flash-attention style: ``q k^T`` by ``tl.dot``, with the two
relative terms as its accumulator, gathered from the ``[L, 2S]`` tables with the index read from a
table of ``idx(r)`` (exactly Hugging Face's float32 bucketing, built once on the host, reversed and
padded here so the reads run along the keys and need no mask), the padding mask (for a right-padded
batch, the rows' lengths: a compare, in the key blocks past a row's end only), and an online softmax
in float32; the ``[BLOCK_M, BLOCK_N]`` scores live only in registers. Far from the diagonal
every distance of a tile falls in the same (clamped) bucket; the kernel sees that from the tile's two
corners and reads one column of each table instead of gathering. Memory is linear in L: the two
tables, the index and the output.

Queries may be a subset (``QPOS``: their absolute positions), which is how PairRM's last layer
computes only the three rows it reads.
"""

from __future__ import annotations

import collections
import os
import re
import threading

import torch
import triton
import triton.language as tl

from . import check_attention_inputs, on_device

# Triton's interpreter multiplies 16-bit tl.dot operands wrongly: upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The fixed launch, by input dtype: (BLOCK_M, BLOCK_N, num_warps[, num_stages]). Chosen from the sm_90
# build (tests/triton_aot.py compiles it as the launcher specialises it at run time, and counts the hot
# loop's instructions): 64 x 64 over 4 warps issues 16-18 (uniform tiles) to 24-25 (3.6) or 23.6
# (3.9) instructions a score with right padding given as key lengths (the ranker's), at 168
# registers and no spill in both Triton 3.6 and 3.9: three programs an SM. The kernel timed on the
# H100 issued 59 in 3.6's build, at 230 registers: two programs an SM. float32's dot runs on the FMA
# units (~200 a score whatever the tile); 32 x 16 over 4 warps does not spill.
LAUNCH = {torch.float16: (64, 64, 4), torch.bfloat16: (64, 64, 4), torch.float32: (32, 16, 4)}


def parse_launch(spec: str) -> tuple[int, ...]:
    """``"64x64w4"`` -> ``(64, 64, 4)``; ``"64x64w4s1"`` -> ``(64, 64, 4, 1)`` (BLOCK_M x BLOCK_N,
    warps, and optionally pipeline stages)."""
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)(?:s(\d+))?", spec.strip())
    if not m:
        raise ValueError(f"an attention launch is BLOCK_MxBLOCK_NwWARPS[sSTAGES], such as 64x64w4 or "
                         f"64x64w4s1; got {spec!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


# SPPO_FAST_ATTN_LAUNCH=64x32w4 (say): the 16-bit launch, without editing LAUNCH (for timing one)
if os.environ.get("SPPO_FAST_ATTN_LAUNCH"):
    LAUNCH[torch.float16] = LAUNCH[torch.bfloat16] = parse_launch(os.environ["SPPO_FAST_ATTN_LAUNCH"])

# Opt-in (SPPO_FAST_ATTN_AUTOTUNE=1, or set_autotune(True)): let Triton's autotuner pick the tile
# shape, warps and pipeline stages on the GPU, once per head size, set of terms and power-of-two
# bucket of (batch x heads x queries, keys): the best tile depends on how many blocks a size gives.
# Not yet measured, so LAUNCH above stays the default; the GPU benchmark times both (provider
# "triton-autotune"). Never in the interpreter (its timings mean nothing).
_AUTOTUNE = os.environ.get("SPPO_FAST_ATTN_AUTOTUNE") == "1"


def _config(m, n, w, st, r):
    try:
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st, maxnreg=r)
    except TypeError:  # a Triton without maxnreg: the candidates that need it are left out
        return None if r else triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)


_CONFIGS = [c for c in (_config(*x) for x in ((64, 64, 4, 3, None), (64, 64, 4, 2, None), (64, 64, 4, 1, None),
                                              (64, 64, 4, 2, 128), (64, 64, 4, 1, 168), (128, 64, 8, 3, None),
                                              (128, 64, 8, 2, 128), (128, 32, 4, 3, None), (256, 64, 8, 2, None),
                                              (64, 32, 4, 3, None), (32, 16, 4, 3, None)))
            if c is not None]
# (sm_90 builds, 16 bits, benchmarks/sass_attention.py: 64 x 64 over 4 warps takes 168 registers in
# Triton 3.6 and 3.9, three programs an SM; one stage takes 128-140 and half the shared memory (four
# programs an SM in 3.9, three in 3.6); 64 x 32 fits four at 15-30% more instructions a score;
# 128 x 64 over 8 warps issues a few percent fewer, one program an SM. Which wins is for the GPU
# to say.)


# Opt-in (SPPO_FAST_ATTN_TABLES=transposed, or set_transposed_tables(True)): sppo_fast.deberta builds
# the two position tables as [2S, L] (the same GEMMs, operands swapped) and passes their transposed
# views. A warp's gather then reads idx * L + i for neighbouring i (c2p) or j (p2c): one or two memory
# sectors wherever the bucket index is the same for the warp's elements (the log-bucketed and the
# clamped distances, most tiles at L ~ 1000-2000), where a row-major table costs one sector a row.
# Not yet measured, hence opt-in; the GPU benchmark times it (provider "triton-transposed").
TRANSPOSED_TABLES = os.environ.get("SPPO_FAST_ATTN_TABLES") == "transposed"


def set_transposed_tables(enabled: bool) -> None:
    """Have :func:`sppo_fast.deberta.attention` build the position tables as ``[2S, L]`` (``True``)."""
    global TRANSPOSED_TABLES
    TRANSPOSED_TABLES = bool(enabled)


def _length_bucket(bh: int, lq: int, lk: int) -> int:
    """The autotuner's key for the problem's size: batch x heads x queries and keys, each rounded up
    to a power of two (unused by the kernel itself)."""
    return 64 * max(bh * lq - 1, 0).bit_length() + max(lk - 1, 0).bit_length()


def _launch_config(dtype: torch.dtype) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, num_warps[, num_stages]) for ``dtype``'s launch (float32's for any other:
    :func:`deberta_attention` refuses float64)."""
    return LAUNCH.get(dtype, LAUNCH[torch.float32])


def set_autotune(enabled: bool) -> None:
    """Choose the launch: the autotuned one (``True``) or the fixed one of ``LAUNCH`` (``False``)."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


@triton.jit
def _deberta_attention_fwd(
    Q, K, V, C2P, P2C, REL, QPOS, KMASK, KLEN, OUT,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_cb, s_ch, s_cm, s_cs, s_pb, s_ph, s_pn, s_ps, s_mb, s_ob, s_oh, s_om, s_xb,
    H, LQ, LK, D, REL_ZERO, L_BUCKET,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_KLEN: tl.constexpr, MONOTONE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # (batch x heads on axis 0, whose limit is 2^31 - 1, not 65535)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    if HAS_QPOS:
        qpos = tl.minimum(tl.maximum(tl.load(QPOS + b * s_xb + offs_m, mask=m_ok, other=0), 0), LK - 1)
    else:
        qpos = offs_m
    # the tables of this (batch, head), addressed by 32-bit offsets; rows past the end read the last
    # row (their scores are discarded), so the gathers need no mask
    p_base = P2C + b * s_pb + h * s_ph
    if WIDE:  # a table whose offsets within one (batch, head) pass 2^31 (never PairRM's)
        c_rows = C2P + b * s_cb + h * s_ch + tl.minimum(offs_m, LQ - 1).to(tl.int64) * s_cm
    else:
        c_rows = C2P + b * s_cb + h * s_ch + (tl.minimum(offs_m, LQ - 1) * s_cm).to(tl.int32)
    # keys past the row's length (a right-padded batch, KLEN) are masked by a compare, and only in
    # the blocks that reach past the row's end, where a general mask (KMASK) costs a byte load, its
    # address, a test and the selects for every key column a thread holds, in every block (16
    # columns at 64 x 64 over 4 warps: ~3.4 instructions a score)
    if HAS_KLEN:
        k_end = tl.minimum(tl.load(KLEN + b), LK)
    else:
        k_end = LK
    q_lo = tl.min(qpos, 0)
    q_hi = tl.max(qpos, 0)
    # running max starts at a large finite negative number: fully masked blocks give 0, not NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_C2P or HAS_P2C:
            # REL is the padded, reversed index table: REL[j - i + REL_ZERO] = idx(i - j), so a warp's
            # reads run along the keys and none needs a mask (the masked version of the old kernel
            # was laid out against the dot: 64-bit pointers through shared memory, the softmax twice).
            # The relative terms enter as the accumulator of q k^T. (A dot of its own in each branch,
            # with the uniform tile's two columns added after it, issues more instructions in the
            # Triton 3.6 and 3.9 builds; so does folding the key mask into the terms.)
            if WIDE:
                p_rows = p_base + tl.minimum(offs_n, LK - 1).to(tl.int64) * s_pn
            else:
                p_rows = p_base + (tl.minimum(offs_n, LK - 1) * s_pn).to(tl.int32)
            bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            # with a monotone table, a tile whose two corner distances share a bucket (|i - j| past
            # the last bucket, clamped) has that bucket everywhere: one column of each table
            u = 0
            uniform = False
            if MONOTONE:
                u = tl.load(REL + (start + BLOCK_N - 1 - q_lo + REL_ZERO))
                uniform = u == tl.load(REL + (start - q_hi + REL_ZERO))
                if WIDE:
                    u = u.to(tl.int64)
            if uniform:
                if HAS_C2P:
                    bias += tl.load(c_rows + u * s_cs).to(tl.float32)[:, None]
                if HAS_P2C:
                    bias += tl.load(p_rows + u * s_ps).to(tl.float32)[None, :]
            else:
                # (the hint that no two keys' index addresses are known to be adjacent gives the index
                # load the gathers' layout in Triton 3.6, which otherwise moves the gathers' 64-bit
                # pointers between two layouts through shared memory: 252 registers, two programs an
                # SM, instead of 168 and three; Triton 3.9 builds the same code either way. With a
                # loaded key mask, 3.6's general tiles then issue 29.5 instructions a score, not 27.5,
                # at 166 registers instead of 252)
                idx = tl.load((REL + REL_ZERO + tl.max_contiguous(offs_n, 1))[None, :] - qpos[:, None])
                if WIDE:
                    idx = idx.to(tl.int64)
                if HAS_C2P:  # (no zeros + first term: x + 0 is not x for x = -0, so it would cost an add)
                    bias = tl.load(c_rows[:, None] + idx * s_cs).to(tl.float32)
                    if HAS_P2C:
                        bias += tl.load(p_rows[None, :] + idx * s_ps).to(tl.float32)
                else:
                    bias = tl.load(p_rows[None, :] + idx * s_ps).to(tl.float32)
            s = tl.dot(q, tl.trans(k), acc=bias, input_precision=PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_MASK:
            key_ok = n_ok & (tl.load(KMASK + b * s_mb + offs_n, mask=n_ok, other=0) != 0)
            s = tl.where(key_ok[None, :], s, float("-inf"))
        elif start + BLOCK_N > k_end:  # (uniform branch: only the blocks that reach past the keys)
            s = tl.where((offs_n < k_end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2((m_i - m_new) * 1.4426950408889634)
        p = tl.math.exp2(s * 1.4426950408889634 - (m_new * 1.4426950408889634)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row with every key masked (never read) stays finite
    out = acc / l_i[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# What the kernel reads in place of rel_index: the table reversed (so that a warp's reads run along the
# keys) and padded with its end values by at least a tile on each side (so that no read needs a mask),
# with whether it is monotone (which the uniform-tile shortcut needs). Built once per rel_index and
# kept while its version counter stands: the cache holds the source tensor, so its memory cannot be
# reused by another while the entry lives. (A write that bypasses the counter, through ``.data`` or a
# NumPy alias, is not seen; an inference tensor has no counter, so it is not cached.)
REL_PAD = 256  # >= every BLOCK_M and BLOCK_N of LAUNCH and _CONFIGS
WIDE_OFFSETS = 2 ** 31  # a table offset from here on takes the kernel's 64-bit path (tests lower it)
_REL_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_REL_LOCK = threading.Lock()


def _kernel_rel_table(rel_index: torch.Tensor) -> tuple[torch.Tensor, bool, int, int]:
    key = None if rel_index.is_inference() else (
        rel_index.untyped_storage().data_ptr(), rel_index.storage_offset(), rel_index.shape[0],
        rel_index.stride(0), rel_index.dtype, rel_index.device, rel_index._version)
    with _REL_LOCK:
        hit = _REL_CACHE.get(key) if key is not None else None
        if hit is not None:
            _REL_CACHE.move_to_end(key)
            return hit[1:]
    rev = rel_index.flip(0).to(torch.int32)
    table = torch.cat([rev[:1].expand(REL_PAD), rev, rev[-1:].expand(REL_PAD)]).contiguous()
    # whether it is monotone, and its range (the wrapper checks it against the tables' width): one
    # synchronisation per table, not per call
    stats = torch.stack([(rev[1:] <= rev[:-1]).all().to(torch.int64), rev.min().to(torch.int64),
                         rev.max().to(torch.int64)]).tolist() if rev.numel() else [1, 0, 0]
    monotone, lo, hi = bool(stats[0]), int(stats[1]), int(stats[2])
    if key is not None:
        with _REL_LOCK:
            _REL_CACHE[key] = (rel_index, table, monotone, lo, hi)
            while len(_REL_CACHE) > 32:
                _REL_CACHE.popitem(last=False)
    return table, monotone, lo, hi


def deberta_attention(q, k, v, c2p=None, p2c=None, rel_index=None, qpos=None, key_mask=None, key_len=None):
    """``softmax(q k^T + c2p + p2c, masked) @ v`` without materialising any [LQ, LK] tensor.

    Args (``B`` batch, ``H`` heads, ``LQ`` queries, ``LK`` keys, ``D`` head size, ``S`` buckets):
        q: ``[B, H, LQ, D]``, already scaled by ``1/sqrt(3D)`` (last dim contiguous);
        k, v: ``[B, H, LK, D]``;
        c2p: ``[B, H, LQ, 2S]`` = ``q @ k_pos^T`` or None; p2c: ``[B, H, LK, 2S]`` = ``k @ q_pos^T``
            (q_pos scaled) or None; either row-major or the transposed view of a ``[.., 2S, L]``
            table (``TRANSPOSED_TABLES``: the gathers of tiles far from the diagonal, where the
            bucket index barely changes, then read neighbouring addresses);
        rel_index: int32 ``[2 LK - 1]``, ``rel_index[r + LK - 1] = clamp(bucket(r) + S, 0, 2S - 1)``;
        qpos: int32 ``[B, LQ]`` absolute query positions (None: ``0..LQ-1``), in ``[0, LK)``: the
            kernel clamps them there (a guard on its reads; it does not check them, which would
            cost a synchronisation, so an out-of-range position gives the nearest one's result);
        key_mask: ``[B, LK]``, nonzero where a key is a real token (None: no padding);
        key_len: int ``[B]``, the same for a right-padded batch, cheaper: keys ``j >= key_len[b]``
            are padding (values past ``LK`` count as ``LK``). At most one of the two.
    Returns ``[B, H, LQ, D]`` in q's dtype.
    """
    check_attention_inputs(q, k, v, c2p, p2c, rel_index, qpos, key_mask, any_table_layout=True, key_len=key_len)
    if q.dtype == torch.float64:  # (it would compute in float32 and return float64, silently)
        raise TypeError("deberta_attention: the Triton kernel runs float32, bfloat16 or float16; for float64 "
                        "use the CPU kernel (sppo_fast._native.deberta_attention) or attn_impl='torch'")
    B, H, LQ, D = q.shape
    out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    dummy = q
    c = c2p if c2p is not None else dummy
    p = p2c if p2c is not None else dummy
    m = key_mask if key_mask is not None else dummy
    if out.numel() == 0:
        return out
    rel, monotone, lo, hi = _kernel_rel_table(rel_index) if rel_index is not None else (dummy, False, 0, 0)
    widths = [t.shape[-1] for t in (c2p, p2c) if t is not None]
    if widths and (lo < 0 or hi >= min(widths)):  # (the kernel's gathers would read outside the tables)
        raise ValueError(f"rel_index: buckets must lie in [0, {min(widths)}) (the tables' width), got {lo}..{hi}")
    x = qpos if qpos is not None else rel
    # (clamped here: an int64 length past 2^31 would wrap in int32)
    n = key_len.clamp(0, k.shape[2]).to(torch.int32).contiguous() if key_len is not None else rel
    if _AUTOTUNE and not _INTERPRET:
        grid = lambda meta: (B * H, triton.cdiv(LQ, meta["BLOCK_M"]))  # noqa: E731
    else:
        grid = (B * H, triton.cdiv(LQ, _launch_config(q.dtype)[0]))
    # 32-bit offsets inside one (batch, head) slice of each table, unless one could pass 2^31
    wide = any(t is not None and (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= WIDE_OFFSETS
               for t in (c2p, p2c))
    with on_device(q):
        _launch(grid, q, k, v, c, p, rel, x, m, n, out, c2p is not None, p2c is not None, qpos is not None,
                key_mask is not None, key_len is not None, monotone, wide)
    return out


def _launch(grid, q, k, v, c, p, rel, x, m, n, out, has_c2p, has_p2c, has_qpos, has_mask, has_klen, monotone, wide):
    H, LQ, D = q.shape[1], q.shape[2], q.shape[3]
    LK = k.shape[2]
    tuned = _AUTOTUNE and not _INTERPRET
    kernel = _tuned_fwd if tuned else _deberta_attention_fwd
    bm, bn, warps, *stages = _launch_config(q.dtype)
    if max(bm, bn) > REL_PAD:  # (the index table's padding must cover a tile past either end)
        raise ValueError(f"deberta_attention: a {bm} x {bn} tile needs REL_PAD >= {max(bm, bn)}, it is {REL_PAD}")
    tiles = {} if tuned else {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps,
                              **({"num_stages": stages[0]} if stages else {})}
    kernel[grid](
        q, k, v, c, p, rel, x, m, n, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        c.stride(0), c.stride(1), c.stride(2), c.stride(3), p.stride(0), p.stride(1), p.stride(2), p.stride(3),
        m.stride(0), out.stride(0), out.stride(1), out.stride(2), x.stride(0),
        H, LQ, LK, D, LK - 1 + REL_PAD, _length_bucket(q.shape[0] * H, LQ, LK),
        HAS_C2P=has_c2p, HAS_P2C=has_p2c, HAS_QPOS=has_qpos, HAS_MASK=has_mask, HAS_KLEN=has_klen,
        MONOTONE=monotone, WIDE=wide,
        **tiles, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_F32=_INTERPRET,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# the same kernel behind Triton's autotuner (used only with set_autotune(True) on a GPU)
if any(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) > REL_PAD for c in _CONFIGS):  # (not an assert: -O)
    raise RuntimeError("deberta_attention: an autotune tile is wider than the index table's padding")
_tuned_fwd = triton.autotune(_CONFIGS, key=["D", "L_BUCKET", "HAS_C2P", "HAS_P2C", "HAS_QPOS", "HAS_MASK",
                                             "HAS_KLEN", "MONOTONE", "WIDE"])(
    _deberta_attention_fwd)
