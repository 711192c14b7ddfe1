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
