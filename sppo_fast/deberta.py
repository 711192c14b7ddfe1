"""DeBERTa-v2/v3 inference on a Hugging Face ``DebertaV2Model``'s own modules, with less [L, L] work.

PairRM reads only three positions of the backbone's last layer, and DeBERTa's attention spends most
of its time in elementwise and gather passes over ``[B, H, L, L]`` tensors. :func:`encode` runs the
same weights as ``DebertaV2Model.forward`` (eval mode, no dropout) with two exact changes:

- **Last-layer pruning** (``query_positions``): the last layer computes queries, attention, the
  output projection and the feed-forward only at the rows that will be read; keys and values still
  cover every token. For a 2-layer model this removes almost half the work; for 24 layers ~4%.
- **One index, two gathers, no extra passes**: with ``idx[i, j] = clamp(bucket(i - j) + S, 0, 2S-1)``
  (``S`` = position buckets), content-to-position is ``c2p[i, j] = (q_i . k_pos)[idx[i, j]]`` and,
  because the log-bucketing is odd (``bucket(-r) = -bucket(r)``), position-to-content is
  ``p2c[i, j] = (k_j . q_pos)[idx[i, j]]``, a gather of ``k @ q_pos^T`` along its *position* dim:
  no ``[L, L]`` transpose. ``1/sqrt(d * 3)`` is folded into ``q`` and ``q_pos`` instead of three
  divisions of ``[L, L]`` tensors; ``idx`` is built once (cached, sliced per length), not per layer; the
  padding mask is applied only when a batch has padding.

The result equals Hugging Face's eager path up to float rounding (the tests hold it to the float64
truth). The fused kernels of :mod:`sppo_fast.kernels` remove the ``[L, L]`` tensors altogether.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor


_INDEX_CACHE: dict[tuple, Tensor] = {}


@contextlib.contextmanager
def _plain_tensors():
    """Build cached tensors as ordinary tensors even when called under ``torch.inference_mode``
    (the ranker runs there): an inference tensor in a cache would make every later autograd use
    raise "Inference tensors cannot be saved for backward"."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _bucket_index(L: int, buckets: int, max_position: int, device: torch.device) -> Tensor:
    """``[L, L]`` int64 ``clamp(bucket(i - j) + span, 0, 2 * span - 1)`` (Hugging Face's bucketing).

    It depends on ``i - j`` only, so one table per (bucketing, device), grown to the longest length
    seen (a power of two), serves every shorter length as a ``[:L, :L]`` view.
    """
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    key = (buckets, max_position, str(device))
    table = _INDEX_CACHE.get(key)
    if table is None or table.shape[0] < L:
        n = 1 << max(L - 1, 1).bit_length()
        span = buckets if buckets > 0 else max_position
        with _plain_tensors():
            x = torch.empty(1, n, 1, device=device)
            rel = build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0]
            table = _INDEX_CACHE[key] = torch.clamp(rel + span, 0, 2 * span - 1)
    return table[:L, :L]


_INDEX_1D_CACHE: dict[tuple, Tensor] = {}


def _bucket_index_1d(L: int, buckets: int, max_position: int, device: torch.device) -> Tensor:
    """int32 ``[2L - 1]``: entry ``r + L - 1`` is ``clamp(bucket(r) + span, 0, 2 * span - 1)`` for
    ``r = i - j`` in ``-(L-1)..L-1`` (Hugging Face's float32 bucketing, elementwise, so exactly the
    values of its ``[L, L]`` index). What the fused kernel reads instead of an ``[L, L]`` index."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    key = (buckets, max_position, str(device))
    table = _INDEX_1D_CACHE.get(key)
    n = (table.shape[0] + 1) // 2 if table is not None else 0
    if n < L:
        n = 1 << max(L - 1, 1).bit_length()
        span = buckets if buckets > 0 else max_position
        with _plain_tensors():
            rel = torch.arange(-(n - 1), n, device=device)
            if buckets > 0 and max_position > 0:
                rel = make_log_bucket_position(rel, buckets, max_position).to(torch.long)
            table = _INDEX_1D_CACHE[key] = torch.clamp(rel + span, 0, 2 * span - 1).to(torch.int32)
    return table[n - L: n + L - 1]


def _heads(x: Tensor, H: int) -> Tensor:
    """``[B, L, H * d] -> [B, H, L, d]``."""
    B, L, _ = x.shape
    return x.view(B, L, H, -1).transpose(1, 2)


def attention(attn, hidden: Tensor, rel_embeddings: Tensor, key_mask: Optional[Tensor],
              rows: Optional[Tensor] = None, impl: str = "torch", key_len: Optional[Tensor] = None) -> Tensor:
    """One ``DisentangledSelfAttention`` (``attn``) forward: ``[B, L, D] -> [B, Lq, D]``.

    ``key_mask [B, L]`` bool (``None``: no padding); ``rows [B, Lq]`` the query positions to compute
    (``None``: all). ``impl``: ``"torch"`` (gathers on ``[B, H, Lq, L]`` tensors), or a fused kernel
    with no ``[Lq, L]`` tensor: ``"triton"`` (:mod:`sppo_fast.kernels.deberta_attention`, CUDA) or
    ``"cpp"`` (the CPU kernel in ``sppo_fast._C``, float32/float64). ``key_len [B]``: where
    ``key_mask`` is right padding, its rows' lengths (Triton's kernel then masks by a compare, and
    only in the key blocks past a row's end, instead of loading the mask); trusted, not checked.
    """
    B, L, _ = hidden.shape
    H = attn.num_attention_heads
    types = attn.pos_att_type
    scale = math.sqrt(attn.attention_head_size * (1 + ("c2p" in types) + ("p2c" in types)))
    hq = hidden if rows is None else torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    q = _heads(attn.query_proj(hq), H) * (1.0 / scale)
    k = _heads(attn.key_proj(hidden), H)
    v = _heads(attn.value_proj(hidden), H)
    if impl in ("triton", "cpp"):
        return _fused_attention(attn, q, k, v, rel_embeddings, key_mask, rows, scale, impl, key_len)
    scores = q @ k.transpose(-1, -2)  # [B, H, Lq, L]
    if attn.relative_attention and types:
        span = attn.pos_ebd_size
        rel = rel_embeddings[: 2 * span].to(hidden.dtype)
        idx = _bucket_index(L, attn.position_buckets, attn.max_relative_positions, hidden.device)
        if rows is not None:
            idx_q = idx[rows]  # [B, Lq, L]
            idx_e = idx_q[:, None].expand(B, H, -1, L)
        else:
            idx_e = idx.expand(B, H, L, L)
        if "c2p" in types:
            pos_k = _heads((attn.key_proj if attn.share_att_key else attn.pos_key_proj)(rel[None]), H)
            scores += torch.gather(q @ pos_k.transpose(-1, -2), -1, idx_e)
        if "p2c" in types:
            pos_q = _heads((attn.query_proj if attn.share_att_key else attn.pos_query_proj)(rel[None]), H)
            kq_t = (pos_q * (1.0 / scale)) @ k.transpose(-1, -2)  # [B|1, H, 2S, L]: (k_j . q_pos)^T
            scores += torch.gather(kq_t.expand(B, H, -1, L), -2, idx_e)
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1)
    ctx = probs @ v  # [B, H, Lq, d]
    return ctx.transpose(1, 2).reshape(B, ctx.shape[2], -1)


def _fused_attention(attn, q: Tensor, k: Tensor, v: Tensor, rel_embeddings: Tensor,
                     key_mask: Optional[Tensor], rows: Optional[Tensor], scale: float,
                     impl: str = "triton", key_len: Optional[Tensor] = None) -> Tensor:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_embeddings)):
        raise RuntimeError(f"attn_impl {impl!r}: the fused attention kernels are inference only (no "
                           "gradient); use 'torch' or 'hf' to differentiate, or run under torch.no_grad()")
    if impl == "cpp":
        from ._native import deberta_attention
    else:
        from .kernels.deberta_attention import deberta_attention

    B, H, Lq, _ = q.shape
    L = k.shape[2]
    types = attn.pos_att_type if attn.relative_attention else []
    c2p = p2c = rel_index = None
    if types:
        span = attn.pos_ebd_size
        rel = rel_embeddings[: 2 * span].to(q.dtype)
        rel_index = _bucket_index_1d(L, attn.position_buckets, attn.max_relative_positions, q.device)
        # the two [L, 2S] position tables, once per layer: linear in L (Triton's kernel may take
        # them as transposed views of [2S, L] tables, kernels.deberta_attention.TRANSPOSED_TABLES)
        transposed = impl == "triton" and _triton_transposed_tables()
        if "c2p" in types:
            pos_k = _heads((attn.key_proj if attn.share_att_key else attn.pos_key_proj)(rel[None]), H)
            c2p = (pos_k @ q.transpose(-1, -2)).transpose(-1, -2) if transposed else q @ pos_k.transpose(-1, -2)
        if "p2c" in types:
            pos_q = _heads((attn.query_proj if attn.share_att_key else attn.pos_query_proj)(rel[None]), H)
            pos_q = pos_q * (1.0 / scale)
            p2c = (pos_q @ k.transpose(-1, -2)).transpose(-1, -2) if transposed else k @ pos_q.transpose(-1, -2)
    qpos = rows.to(torch.int32).contiguous() if rows is not None else None
    v = v.to(q.dtype)
    k = k.to(q.dtype)
    if key_len is not None and key_mask is None:
        raise ValueError("key_len without key_mask: pass the mask too (key_len only says that it is "
                         "right padding, which Triton's kernel masks more cheaply)")
    if impl == "triton" and key_len is not None:
        ctx = deberta_attention(q, k, v, c2p, p2c, rel_index, qpos, key_len=key_len)  # [B, H, Lq, d]
    else:
        mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None
        ctx = deberta_attention(q, k, v, c2p, p2c, rel_index, qpos, mask)
    return ctx.transpose(1, 2).reshape(B, Lq, -1)


def _triton_transposed_tables() -> bool:
    from .kernels import deberta_attention as kda

    return kda.TRANSPOSED_TABLES


ENCODE_IMPLS = ("torch", "triton", "cpp")


def encode(backbone, input_ids: Tensor, attention_mask: Tensor,
           query_positions: Optional[Tensor] = None, impl: str = "torch",
           padded: Optional[bool | str] = None) -> Tensor:
    """Final hidden states of ``backbone`` (a ``DebertaV2Model``) in eval mode.

    Returns ``[B, L, D]``, or ``[B, Q, D]`` at ``query_positions [B, Q]`` (the last layer is then
    computed only there). Equals ``backbone(input_ids, attention_mask).last_hidden_state`` (gathered).
    ``impl``: the attention, ``"torch"``, ``"triton"`` or ``"cpp"`` (see :func:`attention`). ``padded``:
    whether any key is masked out (``True``/``False``), or ``"right"`` where moreover every row of
    the mask is ones then zeros (right padding, which the Triton kernel masks more cheaply; trusted,
    not checked), if the caller knows; ``None``: found out here (one host sync).
    """
    if impl not in ENCODE_IMPLS:
        raise ValueError(f"impl: expected one of {ENCODE_IMPLS}, got {impl!r}")
    enc = backbone.encoder
    if getattr(enc, "conv", None) is not None or getattr(backbone, "z_steps", 0) > 1:
        raise NotImplementedError("DeBERTa convolution layers and z_steps are not supported; use the "
                                  "Hugging Face attention implementation")
    if padded not in (None, True, False, "right"):
        raise ValueError(f"padded: expected None, True, False or 'right', got {padded!r}")
    mask = attention_mask.bool()
    lengths = None
    if padded is None or padded == "right":
        lengths = mask.sum(1, dtype=torch.int32)
    if padded is None:  # one host sync, which saves an [L, L] pass where nothing is masked
        cols = torch.arange(mask.shape[1], device=mask.device)
        some, right = torch.stack([~mask.all(), (mask == (cols < lengths[:, None])).all()]).tolist()
        padded = ("right" if right else True) if some else False
    key_mask = mask if padded else None
    key_len = lengths if padded == "right" else None
    h = backbone.embeddings(input_ids=input_ids, mask=attention_mask)
    rel_emb = enc.get_rel_embedding()
    n = len(enc.layer)
    for i, layer in enumerate(enc.layer):
        rows = query_positions if i == n - 1 else None
        ctx = attention(layer.attention.self, h, rel_emb, key_mask, rows, impl, key_len)
        residual = h if rows is None else torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
        a = layer.attention.output(ctx, residual)
        h = layer.output(layer.intermediate(a), a)
    if query_positions is not None and n == 0:
        h = torch.gather(h, 1, query_positions[..., None].expand(-1, -1, h.shape[-1]))
    return h
