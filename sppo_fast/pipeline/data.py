"""Tokenisation of SPPO training pairs: the official trainer's layout, with exactly one BOS and one EOS.

A sequence is ``BOS + prompt + response + EOS`` where the prompt is the chat template with the
generation prompt; labels are -100 on the prompt and on padding. Truncation is the official
trainer's (TRL's DPO ``tokenize_row``, truncation mode ``keep_end``), decided per pair from the
longer of its two responses (EOS counted): only when ``prompt + longer response`` exceeds
``max_length`` is the prompt cut to its last ``max_prompt_length`` tokens, and only if the pair is
still too long are both responses cut to their first ``max_length - max_prompt_length`` tokens; a
response cut there loses its EOS, as in the official code (a cut-off answer is not taught to stop).
Unlike it: the BOS stays at the head of a cut prompt (``keep_end`` cut it off), the template's
own BOS is not doubled by the tokenizer, and the EOS is added once (the official code can produce
``<s><s>`` and ``</s></s>``).
"""

from __future__ import annotations

import dataclasses
import numbers
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


def encode_responses(tokenizer, prompt: str, responses: Sequence[str], *, max_length: int = 1024,
                     max_prompt_length: int = 512) -> list[Encoded]:
    """``BOS + prompt + response + EOS`` for each response to one prompt (a chosen and a rejected one),
    truncated together by the official rule (see the module's docstring); labels -100 on the prompt."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    while p and bos is not None and p[0] == bos:  # the template's BOS (or the double one)
        p = p[1:]
    head = [bos] if bos is not None else []
    rs = []
    for response in responses:
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        while r and r[-1] == eos:
            r = r[:-1]
        rs.append(r + [eos])
    longer = max(map(len, rs), default=0)
    if len(head) + len(p) + longer > max_length:  # cut the prompt's start, keep the BOS
        keep = max_prompt_length - len(head)
        p = p[len(p) - keep:] if len(p) > keep else p
    p = head + p
    if len(p) + longer > max_length:
        rs = [r[: max_length - max_prompt_length] for r in rs]
    return [Encoded(tuple(p + r), tuple([IGNORE_INDEX] * len(p) + r)) for r in rs]


def encode_pair(tokenizer, prompt: str, response: str, *, max_length: int = 1024,
                max_prompt_length: int = 512) -> Encoded:
    """:func:`encode_responses` of one response: ``BOS + prompt + response + EOS``, truncated by the
    official rule with this response as the pair's longer one."""
    return encode_responses(tokenizer, prompt, [response], max_length=max_length,
                            max_prompt_length=max_prompt_length)[0]


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


# the probability fields each loss type reads (sppo_hard: none)
PROB_FIELDS = {"sppo": ("chosen_probs_win", "chosen_probs_lose"), "sppo_single": ("chosen_probs",), "sppo_hard": ()}


def _response(rec: dict, side: str, n: int) -> str:
    resp = rec[side]
    if isinstance(resp, list):  # official: [user turn, assistant turn]
        last = resp[-1] if resp else None
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            raise ValueError(f"record {n}: {side} is a message list whose last turn is not the assistant's "
                             f"(got {last.get('role') if isinstance(last, dict) else last!r}): no response to train on")
        resp = last.get("content")
    if not isinstance(resp, str) or not isinstance(rec["prompt"], str):
        raise ValueError(f"record {n}: prompt and {side} must be text (or a message list), "
                         f"got {type(rec['prompt']).__name__} and {type(resp).__name__}")
    return resp


def encode_records(tokenizer, records: Sequence[dict], *, max_length: int = 1024, max_prompt_length: int = 512,
                   loss_type: Optional[str] = None) -> list[dict]:
    """Per record (official fields: ``prompt``, ``chosen`` and ``rejected`` as message lists or
    strings), the chosen and rejected :class:`Encoded`, truncated together. Every probability
    given must be a number in [0, 1]; with ``loss_type``, every record must give those it reads
    (checked here, before any model work, not when its batch comes to be trained)."""
    needed = PROB_FIELDS[loss_type] if loss_type is not None else ()
    out = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"record {n}: expected a dict of fields, got {type(rec).__name__}")
        for field in ("prompt", "chosen", "rejected"):
            if field not in rec:
                raise ValueError(f"record {n}: missing field {field!r}")
        responses = [_response(rec, "chosen", n), _response(rec, "rejected", n)]
        for field in needed:
            if rec.get(field) is None:
                raise ValueError(f"record {n}: missing field {field!r} (loss_type={loss_type!r} reads it)")
        for field in ("chosen_probs", "chosen_probs_win", "chosen_probs_lose"):
            v = rec.get(field)
            if v is not None and not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 <= v <= 1.0):
                raise ValueError(f"record {n}: {field} must be a probability in [0, 1], got {v!r}")
        chosen, rejected = encode_responses(tokenizer, rec["prompt"], responses, max_length=max_length,
                                            max_prompt_length=max_prompt_length)
        out.append({"chosen": chosen, "rejected": rejected})
    return out
