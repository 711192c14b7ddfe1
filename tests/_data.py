"""Random test inputs: uneven shapes, masked prompts and padding, optional huge logits."""

import torch


def make_batch(B, T, V, dtype, gen, *, scale=3.0, ignore_frac=0.25, fully_masked=(), huge=False,
               extra_time=0):
    """logits [B, T + extra_time, V] and aligned labels [B, T + extra_time] with -100 on a prompt
    prefix of each row (random length) and on the rows listed in fully_masked."""
    logits = torch.randn(B, T + extra_time, V, generator=gen) * scale
    if huge:
        logits = logits * 3000.0  # |x| ~ 1e4
    logits = logits.to(dtype)
    labels = torch.randint(0, V, (B, T + extra_time), generator=gen)
    prompt = torch.randint(0, max(1, int(T * ignore_frac)) + 1, (B,), generator=gen)
    pos = torch.arange(T + extra_time)
    labels[pos[None, :] < prompt[:, None]] = -100
    for b in fully_masked:
        labels[b] = -100
    return logits, labels


# DeBERTa attention variants the fused and lean paths are held to (tiny PairRM overrides):
# shared and separate position projections, each relative term alone, none, no bucketing,
# few buckets (so short texts cross the log boundary and max_relative_positions), odd head size.
ATTENTION_CONFIGS = {
    "pairrm": {},
    "separate-position-projections": dict(share_att_key=False),
    "c2p-only": dict(pos_att_type="c2p"),
    "p2c-only": dict(pos_att_type="p2c", share_att_key=False),
    "no-relative-terms": dict(pos_att_type=""),
    "no-buckets": dict(position_buckets=-1, max_relative_positions=20),
    "16-buckets": dict(position_buckets=16, max_relative_positions=64, num_attention_heads=2),
    "head-size-48": dict(hidden_size=96, num_attention_heads=2, intermediate_size=128),
}


def deberta_case(tiny, config: str, lengths, *, seed: int = 0):
    """A PairRM of the attention variant ``config`` (O(1) weights), a padded batch of token ids of
    the given lengths, three pooled positions per row, and the model's float64 copy:
    ``(model, model64, ids, mask, pos)``."""
    from sppo_fast import pairrm as prm

    model, tok = tiny
    if config != "pairrm":
        model, _ = prm.tiny_pairrm(seed=2, tokenizer=tok, **ATTENTION_CONFIGS[config])
        prm.redraw_weights_(model, seed=3)
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(5, model.config.vocab_size, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    pos = torch.stack([torch.randint(0, n, (3,), generator=g) for n in lengths])
    m64 = prm.PairRM(model.config).eval()
    m64.load_state_dict(model.state_dict())
    return model, m64.double(), ids, mask, pos


def dense_attention(q, k, v, c2p, p2c, idx, qpos, key_mask, dtype):
    """The formula with [LQ, LK] tensors: in float64 (truth) or in ``dtype`` as autocast runs it
    (products in dtype, softmax in float32)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rows = qpos.long() if qpos is not None else torch.arange(q.shape[2])[None].expand(q.shape[0], -1)
    r = rows[:, None, :, None] - torch.arange(k.shape[2])[None, None, None, :]  # [B, 1, LQ, LK]
    g = idx.long()[r + k.shape[2] - 1].expand(q.shape[0], q.shape[1], -1, -1)
    s = (q @ k.transpose(-1, -2)).float() if dtype != torch.float64 else q @ k.transpose(-1, -2)
    if c2p is not None:
        s = s + torch.gather(c2p.to(dtype), -1, g).to(s.dtype)
    if p2c is not None:
        s = s + torch.gather(p2c.to(dtype).transpose(-1, -2), -2, g).to(s.dtype)
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return (p.to(dtype) @ v).to(dtype)


def attention_case(B, H, LQ, LK, D, S, *, subset=False, padded=False, scale=1.0, seed=0):
    """Inputs of the fused DeBERTa attention at float64: q (pre-scaled), k, v, the two [L, 2S] tables,
    the bucket index, query positions (``subset``) and a key mask (``padded``)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g, dtype=torch.float64) * scale / D ** 0.5
    k = torch.randn(B, H, LK, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, LK, D, generator=g, dtype=torch.float64)
    c2p = torch.randn(B, H, LQ, 2 * S, generator=g, dtype=torch.float64) * scale
    p2c = torch.randn(B, H, LK, 2 * S, generator=g, dtype=torch.float64) * scale
    from sppo_fast import deberta

    idx = deberta._bucket_index_1d(LK, S, 4 * S, torch.device("cpu"))
    qpos = torch.stack([torch.randperm(LK, generator=g)[:LQ] for _ in range(B)]).int() if subset else None
    mask = None
    if padded:
        lengths = torch.randint(1, LK + 1, (B,), generator=g)
        lengths[0] = LK
        mask = (torch.arange(LK)[None] < lengths[:, None]).to(torch.int8)
    return q, k, v, c2p, p2c, idx, qpos, mask
