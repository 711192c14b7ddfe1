"""Triton kernels of sppo_fast, installed as ``sppo_fast.kernels`` (never as a top-level module).

``logprobs`` (token log-probs and the SPPO gradient, fused), ``pairwise`` (PairRM aggregation) and
``deberta_attention`` (DeBERTa's disentangled attention without [L, L] tensors); the ``triton``
backend (``sppo_fast._triton``) and the PairRM engine call them. Every launcher runs on its
tensors' GPU (:func:`on_device`), whatever the current device is.
"""

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Triton launches on the *current* device and its current stream: make that ``t``'s."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_attention_inputs(q, k, v, c2p, p2c, rel_index, qpos, key_mask, *, any_table_layout=False,
                           key_len=None) -> None:
    """The inputs of the fused DeBERTa attention (Triton's, or the CPU kernel in ``sppo_fast._C``):
    shapes, dtypes, devices and the unit strides the kernels assume, named when wrong. With
    ``any_table_layout`` (Triton's kernel) the ``[L, 2S]`` tables may be column-major (views of
    ``[2S, L]`` tensors) as well."""
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, H, LQ, D], got shape {tuple(q.shape)}")
    B, H, LQ, D = q.shape
    LK = k.shape[2] if k.dim() == 4 else -1
    want = {"k": (B, H, LK, D), "v": (B, H, LK, D), "qpos": (B, LQ), "key_mask": (B, LK),
            "rel_index": (2 * LK - 1,), "key_len": (B,)}
    if c2p is not None:
        want["c2p"] = (B, H, LQ, c2p.shape[-1])
    if p2c is not None:
        want["p2c"] = (B, H, LK, p2c.shape[-1])
    given = {"k": k, "v": v, "c2p": c2p, "p2c": p2c, "rel_index": rel_index, "qpos": qpos, "key_mask": key_mask,
             "key_len": key_len}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name}: expected shape {want[name]} for q of shape {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        column_major_ok = any_table_layout and name in ("c2p", "p2c") and t.stride(-2) == 1
        if t.numel() and t.stride(-1) != 1 and not column_major_ok:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}"
                             + (" (or the one before it, for a [2S, L] table's transposed view)"
                                if any_table_layout and name in ("c2p", "p2c") else ""))
    for name in ("k", "v", "c2p", "p2c"):
        t = given[name]
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
    if key_mask is not None and key_len is not None:
        raise ValueError("key_mask and key_len: pass one of them (key_len is a right-padded batch's mask)")
    for name in ("rel_index", "qpos", "key_len"):
        t = given[name]
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q: the last dimension must be contiguous (stride 1), got strides {q.stride()}")
    if rel_index is None and (c2p is not None or p2c is not None):
        raise ValueError("rel_index is needed with c2p or p2c")
    if qpos is None and LQ > LK and (c2p is not None or p2c is not None):
        raise ValueError(f"q has {LQ} queries but there are {LK} keys: without qpos the queries are "
                         f"positions 0..LQ-1, which must be keys too (pass qpos for a subset)")
