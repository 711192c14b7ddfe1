"""Rankers and the SPPO training set.

A ranker is anything with ``pair_matrix(prompts, candidates) -> M[B, K, K]`` (``M[b, i, j]``: the logit
that candidate ``i`` beats ``j``): :class:`sppo_fast.pairrm.PairRMRanker` for real runs, or
:class:`HashWordRanker`, a judge with known preferences for the embedded default and the tests.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import torch
from torch import Tensor

from .. import ops


class HashWordRanker:
    """A judge with known, documented preferences: it likes words with a high fixed score.

    Every word gets a score in [0, 1) from a stable hash (``blake2b`` of the lower-cased word);
    a response's utility is the mean score of its words (0.5 for an empty response), and
    ``M[i, j] = scale * (u_i - u_j)``, antisymmetric, with no position bias. A policy can only learn
    which words it likes from the comparisons, which is what SPPO has to do with PairRM.
    """

    def __init__(self, scale: float = 20.0):
        self.scale = scale

    def fingerprint(self) -> str:
        """What the matrices depend on: the scale (the word scores are fixed by the hash)."""
        return f"blake2b-4 word scores, scale={self.scale!r}"

    @staticmethod
    def word_score(word: str) -> float:
        return int.from_bytes(hashlib.blake2b(word.lower().encode(), digest_size=4).digest(), "big") / 2 ** 32

    def utility(self, text: str) -> float:
        words = re.findall(r"\w+", text)
        return sum(map(self.word_score, words)) / len(words) if words else 0.5

    def pair_matrix(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        u = torch.tensor([[self.utility(c) for c in cs] for cs in candidates], dtype=torch.float32)
        m = self.scale * (u[:, :, None] - u[:, None, :])
        return m * (1 - torch.eye(u.shape[1]))


def ranker_fingerprint(ranker) -> str:
    """The ranker's identity, for the ranking stage's resume checks: its class and its
    ``fingerprint()`` (:class:`~sppo_fast.pairrm.PairRMRanker`: truncation, weights, tokenizer;
    :class:`HashWordRanker`: its scale), else its ``repr``. A class with neither gets its name only:
    object's default repr holds a memory address, which would refuse every resume."""
    cls = type(ranker)
    name = f"{cls.__module__}.{cls.__qualname__}"
    fingerprint = getattr(ranker, "fingerprint", None)
    if callable(fingerprint):
        return f"{name}: {fingerprint()}"
    return name if cls.__repr__ is object.__repr__ else f"{name}: {ranker!r}"


def training_records(prompts: Sequence[str], candidates: Sequence[Sequence[str]], cmp: Tensor, *,
                     mode: str = "official", backend: str = "auto") -> tuple[list[dict], int]:
    """SPPO's training records from the pairwise logits, and the number of tied prompts left out.

    Each record has the official fields (``prompt``, ``chosen``, ``rejected`` as [user, assistant]
    messages, ``chosen_probs``, ``chosen_probs_win``, ``chosen_probs_lose``) plus all candidates,
    scores and the matrix. A prompt whose K scores are all equal has no chosen/rejected pair
    (the official code would train on ``chosen == rejected``): it is counted and left out, and so
    is a record whose chosen text equals its rejected text (no preference to learn from; a ranker
    that scores duplicates unequally would otherwise produce one).
    """
    from ..pairrm import RankResult

    agg = ops.pairrm_aggregate(cmp, mode, backend=backend)
    rows = RankResult(cmp, *agg).records(prompts, candidates)
    kept = [r for r in rows if not r["tied"] and r["chosen"][1]["content"] != r["rejected"][1]["content"]]
    return kept, len(rows) - len(kept)


def win_rate(ranker, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts where response ``a`` beats ``b`` under ``ranker``, both orders averaged
    (``M[a, b] - M[b, a] > 0``; exact ties count one half)."""
    cmp = ranker.pair_matrix(prompts, [[x, y] for x, y in zip(a, b)])
    d = cmp[:, 0, 1] - cmp[:, 1, 0]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
