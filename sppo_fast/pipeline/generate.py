"""Sampling K responses per prompt from the current policy (batched Hugging Face ``generate``).

As the official ``generate.py``: the chat template with the generation prompt, temperature 0.7,
top_p 0.9, and one seed per sample index (sample ``k`` of every prompt is drawn with seed
``seed * k``, official ``seed = 50``), so reruns and resumed runs give the same candidates (for the
same ``batch_size``: a batch draws its rows' random numbers from one stream).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import prompt_text


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, k: int = 5, temperature: float = 0.7,
             top_p: float = 0.9, max_new_tokens: int = 2048, seed: int = 50, batch_size: int = 16,
             progress: bool = True) -> list[list[str]]:
    """``candidates[b][i]``: the i-th sampled response to ``prompts[b]`` (special tokens removed)."""
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded
    out: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        texts = [prompt_text(tokenizer, p) for p in prompts]
        with tqdm(total=k * len(prompts), desc="generating", unit="sample", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i in range(k):
                torch.manual_seed(seed * i)
                for s in range(0, len(texts), batch_size):
                    # the template carries BOS already: add no second one
                    enc = tokenizer(texts[s: s + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                    ids = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_new_tokens, pad_token_id=pad)
                    new = ids[:, enc["input_ids"].shape[1]:]
                    for j, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
                        out[s + j].append(text.strip())
                    bar.update(len(new))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
