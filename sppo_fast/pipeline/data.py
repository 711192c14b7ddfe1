"""Tokenisation of SPPO training pairs: the official trainer's layout, with exactly one BOS and one EOS.

A sequence is ``BOS + prompt + response + EOS`` where the prompt is the chat template with the
generation prompt. Like the official trainer (TRL's DPO tokenisation): the prompt is truncated from
the left to ``max_prompt_length`` tokens, the response to ``max_length - max_prompt_length``; labels
are -100 on the prompt and on padding. Unlike it: the template's own BOS is not doubled by the
tokenizer, and the EOS is added once (the official code can produce ``<s><s>`` and ``</s></s>``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import next_token_labels

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized (prompt, response): ``input_ids`` and ``labels`` (-100 on the prompt)."""
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def prompt_text(tokenizer, prompt: str) -> str:
    """The chat template applied to one user turn, with the generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; SPPO prompts are chat-formatted")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_pair(tokenizer, prompt: str, response: str, *, max_length: int = 1024,
                max_prompt_length: int = 512) -> Encoded:
    """``BOS + prompt`` (left-truncated) ``+ response`` (cut) ``+ EOS``; labels -100 on the prompt."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    while p and bos is not None and p[0] == bos:  # the template's BOS (or the double one)
        p = p[1:]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    while r and r[-1] == eos:
        r = r[:-1]
    head = [bos] if bos is not None else []
    p = head + p[len(p) - (max_prompt_length - len(head)):] if len(head) + len(p) > max_prompt_length else head + p
    r = r[: max_length - max_prompt_length - 1] + [eos]
    return Encoded(tuple(p + r), tuple([IGNORE_INDEX] * len(p) + r))


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and next-token ``labels`` (already shifted:
    position t holds the label of token t+1, so logits or hidden states are used as they are)."""
    T = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": next_token_labels(labels)}


def encode_records(tokenizer, records: Sequence[dict], *, max_length: int = 1024, max_prompt_length: int = 512,
                   pad_id: Optional[int] = None) -> list[dict]:
    """Per record (official fields: ``prompt``, ``chosen`` and ``rejected`` as message lists or
    strings), the chosen and rejected :class:`Encoded`."""
    out = []
    for n, rec in enumerate(records):
        for field in ("prompt", "chosen", "rejected"):
            if field not in rec:
                raise ValueError(f"record {n}: missing field {field!r}")
        for field in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose"):
            v = rec.get(field)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"record {n}: {field} must be a probability in [0, 1], got {v!r}")
        pair = {}
        for side in ("chosen", "rejected"):
            resp = rec[side]
            if isinstance(resp, list) and resp and isinstance(resp[-1], dict):  # official: [user, assistant]
                resp = resp[-1].get("content")
            if not isinstance(resp, str) or not isinstance(rec["prompt"], str):
                raise ValueError(f"record {n}: prompt and {side} must be text (or a message list), "
                                 f"got {type(rec['prompt']).__name__} and {type(resp).__name__}")
            pair[side] = encode_pair(tokenizer, rec["prompt"], resp, max_length=max_length,
                                     max_prompt_length=max_prompt_length)
        out.append(pair)
    return out
