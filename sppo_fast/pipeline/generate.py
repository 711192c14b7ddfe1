"""Sampling K responses per prompt from the current policy (batched Hugging Face ``generate``).

As the official ``generate.py``: the chat template with the generation prompt, temperature 0.7,
top_p 0.9, one seed per sample index (official: ``seed = 50``, sample ``k`` drawn with ``seed * k``).
Here each (prompt, sample) pair gets its own random stream, seeded by :func:`sample_seed` from the
sample's seed and the prompt's text, and every row of a batch draws only from its own stream: a
candidate depends on its prompt, its sample index and the seed, not on the batch size, on which
prompts share its batch, or on a resumed run's chunking (the vLLM backend uses the same seeds). The
sampler is ours (a logits processor under greedy decoding): temperature, then top-k if asked, then
top-p as Hugging Face's warpers (top-p: the smallest set of tokens whose probability reaches
``top_p``, at least one), then one draw with a uniform from the row's generator. ``top_k=0`` (the
default) means no top-k, as the official vLLM sampling; Hugging Face's own ``generate`` would apply
its default ``top_k=50`` silently.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .data import prompt_text


def sample_seed(seed: int, k: int, prompt: str) -> int:
    """The seed of sample ``k`` of ``prompt``: 63 bits of SHA-256 of the run's seed, the sample index
    and the prompt's text (one seed per sample index as the official ``seed * k``, but every sample
    differs for any seed, 0 included, and different prompts get independent streams)."""
    digest = hashlib.sha256(f"{seed}\0{k}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RowSampler:
    """A ``LogitsProcessor`` that samples each row with its own ``torch.Generator`` and returns
    scores that are ``-inf`` except at the drawn token, so greedy decoding emits the sample.

    ``generators`` holds one per row: a ``torch.Generator``, or an int seed for a generator made at
    the first call on the device of the scores (which, for a model split over devices with
    ``device_map``, is not the device of its first parameter).

    Each row's generator yields that row's uniforms, drawn ``BLOCK`` at a time; a draw is the first
    token whose float64 cumulative probability exceeds ``u`` times the total (inverse-CDF sampling),
    for all rows at once. Row r's t-th token depends only on its own seed and scores, whatever the
    batch, and a decoding step costs a few kernels rather than a few per row.
    """

    BLOCK = 256  # uniforms drawn per row and generator call

    def __init__(self, generators: Sequence[torch.Generator | int], temperature: float, top_p: float,
                 top_k: int = 0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {top_k}")
        self.generators, self.temperature, self.top_p, self.top_k = list(generators), temperature, top_p, top_k
        self._u, self._next = None, 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:  # ties with the k-th largest are kept
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1)  # ascending: drop the low tail
            tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[:, -1] = False
            logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        probs = logits.softmax(-1, dtype=torch.float64)
        if len(self.generators) != probs.shape[0]:
            raise ValueError(f"RowSampler has {len(self.generators)} generators for {probs.shape[0]} rows")
        if self._u is None or self._next == self.BLOCK:
            self.generators = [torch.Generator(scores.device).manual_seed(g) if isinstance(g, int) else g
                               for g in self.generators]
            self._u = torch.stack([torch.rand(self.BLOCK, generator=g, dtype=torch.float64, device=g.device)
                                   for g in self.generators]).to(scores.device)
            self._next = 0
        u = self._u[:, self._next: self._next + 1]
        self._next += 1
        cdf = probs.cumsum(-1)
        ok = torch.isfinite(cdf[:, -1]).all() & (cdf[:, -1] > 0).all()  # NaN / inf logits, or no token left
        if cdf.device.type == "cpu":
            if not ok:
                raise ValueError("RowSampler: a row's scores are NaN, +inf or all -inf; no token can be drawn")
        elif hasattr(torch, "_assert_async"):  # checked on the device, no host sync
            torch._assert_async(ok)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # never a zero-probability token...
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
        pick = torch.minimum(pick, last)  # ...nor past the last possible one, whatever the rounding
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, k: int = 5, temperature: float = 0.7,
             top_p: float = 0.9, top_k: int = 0, max_new_tokens: int = 2048, seed: int = 50,
             batch_size: int = 16, progress: bool = True, desc: str = "generating",
             on_samples: Optional[Callable[[int], None]] = None) -> list[list[str]]:
    """``candidates[b][i]``: the i-th sampled response to ``prompts[b]`` (special tokens removed).
    ``on_samples(n)`` is called after every batch with its number of samples (e.g. a caller's bar)."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    RowSampler([], temperature, top_p, top_k)  # argument checks before any work
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded
    out: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        texts = [prompt_text(tokenizer, p) for p in prompts]
        with tqdm(total=k * len(prompts), desc=desc, unit="sample", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i in range(k):
                for s in range(0, len(texts), batch_size):
                    gens = [sample_seed(seed, i, p) for p in prompts[s: s + batch_size]]
                    # the template carries BOS already: add no second one
                    enc = tokenizer(texts[s: s + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                    sampler = LogitsProcessorList([RowSampler(gens, temperature, top_p, top_k)])
                    ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                         logits_processor=sampler, temperature=None, top_p=None, top_k=None)
                    new = ids[:, enc["input_ids"].shape[1]:]
                    for j, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
                        out[s + j].append(text.strip())
                    bar.update(len(new))
                    if on_samples is not None:
                        on_samples(len(new))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
