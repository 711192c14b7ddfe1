"""Triton kernel: PairRM aggregation of cmp[B, K, K] for any K in [2, 64], one launch, one program per
prompt. Same formulas and operation order as ``sppo_fast.reference.pairrm_aggregate``: sums follow
NumPy's pairwise order (8 interleaved accumulators), so scores match LLM-Blender's bit for bit.
The data is tiny (K*K values per prompt); the kernel exists to keep the whole ranking step on the GPU
without host round trips, not for bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device

MAX_K = 64
# Output order (the fields of sppo_fast.PairwiseResult).
FIELDS = ("scores", "probs", "win_rates", "chosen", "rejected", "chosen_probs", "chosen_probs_win",
          "chosen_probs_lose", "tied")


@triton.jit
def _row_term(m_ptr, i, j, K, si, sj, MODE: tl.constexpr):
    """MODE 0: cmp[i, j] - cmp[j, i] (0 on the diagonal); MODE 1: the stored row m_ptr[i*si + j]."""
    if MODE == 0:
        a = tl.load(m_ptr + i * si + j * sj, mask=(j < K) & (j != i), other=0.0)
        bb = tl.load(m_ptr + j * si + i * sj, mask=(j < K) & (j != i), other=0.0)
        return a - bb
    else:
        return tl.load(m_ptr + i * si + j * sj, mask=j < K, other=0.0)


@triton.jit
def _numpy_sum(m_ptr, i, K, si, sj, MODE: tl.constexpr):
    """sum_j term(i, j) in NumPy's order for K <= 128 (left to right below 8 values; above, 8
    interleaved accumulators, combined pairwise, then the leftovers)."""
    if K < 8:
        res = _row_term(m_ptr, i, 0, K, si, sj, MODE) * 0.0 - 0.0
        for j in range(0, K):
            res += _row_term(m_ptr, i, j, K, si, sj, MODE)
    else:
        lane = tl.arange(0, 8)
        r = _row_term(m_ptr, i, lane, K, si, sj, MODE)
        for g in range(1, K // 8):
            r += _row_term(m_ptr, i, g * 8 + lane, K, si, sj, MODE)
        zero = r * 0.0
        r0 = tl.sum(tl.where(lane == 0, r, zero), 0)
        r1 = tl.sum(tl.where(lane == 1, r, zero), 0)
        r2 = tl.sum(tl.where(lane == 2, r, zero), 0)
        r3 = tl.sum(tl.where(lane == 3, r, zero), 0)
        r4 = tl.sum(tl.where(lane == 4, r, zero), 0)
        r5 = tl.sum(tl.where(lane == 5, r, zero), 0)
        r6 = tl.sum(tl.where(lane == 6, r, zero), 0)
        r7 = tl.sum(tl.where(lane == 7, r, zero), 0)
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for j in range(K - K % 8, K):
            res += _row_term(m_ptr, i, j, K, si, sj, MODE)
    return res


@triton.jit
def _pairwise_kernel(
    cmp_ptr, scores_ptr, probs_ptr, win_ptr, chosen_ptr, rejected_ptr, cp_ptr, cpw_ptr, cpl_ptr,
    tied_ptr, K, sb, si, sj,
    DIRECT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    m_ptr = cmp_ptr + b * sb
    s_ptr = scores_ptr + b * K
    p_ptr = probs_ptr + b * K * K
    # scores in cmp's dtype, stored as float32 (LLM-Blender keeps a float32 array); div_rn: a
    # float32 "/" compiles to the GPU's approximate division (2 ulp), NumPy's is correctly rounded
    for i in range(0, K):
        total = _numpy_sum(m_ptr, i, K, si, sj, 0)
        if total.dtype == tl.float32:
            score = tl.math.div_rn(total, K.to(tl.float32))
        else:  # float64 "/" is correctly rounded
            score = total / K
        tl.store(s_ptr + i, score.to(tl.float32))
    # each phase reads back, in other threads' lanes, what the last one stored: a block barrier
    # (which also orders global memory within the block) between them
    tl.debug_barrier()
    cols = tl.arange(0, 64)
    for i in range(0, K):
        if DIRECT:
            a = tl.load(m_ptr + i * si + cols * sj, mask=(cols < K) & (cols != i), other=0.0).to(tl.float64)
            bb = tl.load(m_ptr + cols * si + i * sj, mask=(cols < K) & (cols != i), other=0.0).to(tl.float64)
            p = 1.0 / (1.0 + tl.exp(-((a - bb) / 2.0)))
        else:
            s_i = tl.load(s_ptr + i).to(tl.float64)
            s_j = tl.load(s_ptr + cols, mask=cols < K, other=0.0).to(tl.float64)
            p = 1.0 / (1.0 + tl.exp(s_j - s_i))
        tl.store(p_ptr + i * K + cols, p, mask=cols < K)
    tl.debug_barrier()
    for i in range(0, K):
        tl.store(win_ptr + b * K + i, _numpy_sum(p_ptr, i, K, K, 1, 1) / K)
    tl.debug_barrier()
    # selection: first index of the max / min score
    w = tl.zeros((), tl.int32)  # typed, not a Python 0: loop-carried values keep one type
    lo = tl.zeros((), tl.int32)
    s_w = tl.load(s_ptr)
    s_l = s_w
    for i in range(1, K):
        s_i = tl.load(s_ptr + i)
        if s_i > s_w:
            w = i
            s_w = s_i
        if s_i < s_l:
            lo = i
            s_l = s_i
    tl.store(chosen_ptr + b, w)
    tl.store(rejected_ptr + b, lo)
    tl.store(tied_ptr + b, (s_w == s_l).to(tl.int8))
    tl.store(cp_ptr + b, tl.load(p_ptr + w * K + lo))
    tl.store(cpw_ptr + b, tl.load(win_ptr + b * K + w))
    tl.store(cpl_ptr + b, tl.load(win_ptr + b * K + lo))


def pairwise(cmp: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """PairRM aggregation of ``cmp[B, K, K]`` (float32 or float64, 2 <= K <= 64) in one launch.

    Returns the tensors named in ``FIELDS``, in that order.
    """
    B, K, _ = cmp.shape
    if K > MAX_K:
        raise ValueError(f"cmp: the Triton aggregation takes K <= {MAX_K} candidates, got K = {K}")
    dev, f64, i64 = cmp.device, torch.float64, torch.int64
    out = (torch.empty((B, K), dtype=torch.float32, device=dev),
           torch.empty((B, K, K), dtype=f64, device=dev), torch.empty((B, K), dtype=f64, device=dev),
           torch.empty((B,), dtype=i64, device=dev), torch.empty((B,), dtype=i64, device=dev),
           *(torch.empty((B,), dtype=f64, device=dev) for _ in range(3)),
           torch.empty((B,), dtype=torch.int8, device=dev))
    if B:
        with on_device(cmp):
            _pairwise_kernel[(B,)](cmp, *out, K, cmp.stride(0), cmp.stride(1), cmp.stride(2),
                                   DIRECT=mode == "direct", num_warps=1)
    return (*out[:-1], out[-1].bool())
