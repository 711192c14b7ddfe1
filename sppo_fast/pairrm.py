"""PairRM, the pairwise reward model SPPO ranks with, and an engine that scores every ordered pair.

SPPO samples K responses per prompt and asks PairRM about all K(K-1) ordered pairs. PairRM reads

    [CLS] <|source|> x [SEP] [CLS] <|candidate1|> y_i [SEP] [CLS] <|candidate2|> y_j [SEP]

through a DeBERTa-v3 backbone and returns ``M[i, j] = head([h_src; h_c1]) - head([h_src; h_c2])``,
the logit that ``y_i`` beats ``y_j`` (``h_*`` are the final hidden states at the three marker tokens).
The official pipeline runs the 20 pair positions one after another with batch size 1. Here:

- :class:`PairRM` is LLM-Blender's ``DebertaV2PairRM`` (same architecture, same state-dict names),
  so ``PairRM.from_pretrained("llm-blender/PairRM-hf")`` loads the released weights, and
  :func:`load_pairrm` also reads the original ``llm-blender/PairRM`` checkpoint layout.
- :class:`PairInputBuilder` tokenizes each text once per prompt (not once per pair), with the official
  truncation, and neutralises marker strings inside user text.
- :class:`PairRMRanker` builds all ordered pairs of many prompts, sorts them by length into buckets
  bounded by ``rows * L**2`` (the size of DeBERTa's attention tensors), runs each bucket once and
  hands ``M[B, K, K]`` to :func:`sppo_fast.pairrm_aggregate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import _io, deberta, ops
from .reference import PAIRWISE_MODES, PairwiseResult

try:  # transformers is needed for the model; the rest of sppo_fast works without it
    from transformers import DebertaV2Config
    from transformers.modeling_outputs import SequenceClassifierOutput
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Model, DebertaV2PreTrainedModel
except ImportError as _err:  # pragma: no cover - exercised only without transformers
    raise ImportError("sppo_fast.pairrm needs transformers: pip install 'transformers>=4.46'") from _err

SOURCE_MARKER = "<|source|>"
CANDIDATE1_MARKER = "<|candidate1|>"
CANDIDATE2_MARKER = "<|candidate2|>"
CANDIDATE_MARKER = "<|candidate|>"
# Order matters: LLM-Blender adds them in this order, so they get consecutive ids (128001..128004).
MARKERS = (SOURCE_MARKER, CANDIDATE1_MARKER, CANDIDATE2_MARKER, CANDIDATE_MARKER)

ATTN_IMPLS = ("torch", "triton", "cpp", "hf")
SOURCE_MAX_LENGTH = 1224
CANDIDATE_MAX_LENGTH = 412

# DeBERTa-v3-large, the backbone of the released PairRM (vocab 128000 + [MASK] + the 4 markers).
DEBERTA_V3_LARGE = dict(
    vocab_size=128005, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
    layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1, position_buckets=256,
    norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False,
    pad_token_id=0, sep_token_id=2,
)
# The tiny model of the tests, benchmarks and the embedded default: same architecture, 2 layers.
TINY = dict(DEBERTA_V3_LARGE, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=512)


def neutralise_markers(text: str) -> str:
    """``text`` with every PairRM marker string broken by a space after its ``<``.

    The tokenizer turns a literal ``"<|source|>"`` in user text into the marker token, which would
    make PairRM pool the wrong position (LLM-Blender crashes on it). ``"< |source|>"`` tokenizes as
    ordinary text. Texts without markers are returned unchanged.
    """
    while any(m in text for m in MARKERS):
        for m in MARKERS:
            text = text.replace(m, m[0] + " " + m[1:])
    return text


def add_marker_tokens(tokenizer) -> dict[str, int]:
    """Add the four PairRM markers as ordinary tokens (as LLM-Blender does); returns their ids."""
    tokenizer.add_tokens(list(MARKERS))
    return {m: tokenizer.convert_tokens_to_ids(m) for m in MARKERS}


def pairrm_config(tokenizer=None, *, base: dict = TINY, **overrides) -> DebertaV2Config:
    """A PairRM config: DeBERTa-v2 backbone fields plus LLM-Blender's head and marker fields.

    With ``tokenizer`` (which must hold the markers, see :func:`add_marker_tokens`), the vocabulary
    size and the marker, separator and padding ids are read from it.
    """
    fields = dict(base, n_tasks=1, drop_out=0.05, source_prefix_id=128001, cand1_prefix_id=128002,
                  cand2_prefix_id=128003, cand_prefix_id=128004)
    if tokenizer is not None:
        ids = _marker_ids(tokenizer)
        fields.update(vocab_size=len(tokenizer), sep_token_id=tokenizer.sep_token_id,
                      pad_token_id=tokenizer.pad_token_id, source_prefix_id=ids[SOURCE_MARKER],
                      cand1_prefix_id=ids[CANDIDATE1_MARKER], cand2_prefix_id=ids[CANDIDATE2_MARKER],
                      cand_prefix_id=ids[CANDIDATE_MARKER])
    fields.update(overrides)
    return DebertaV2Config(**fields)


def _marker_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for m in MARKERS:
        i = tokenizer.convert_tokens_to_ids(m)
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != m:
            raise ValueError(f"tokenizer has no {m!r} token; PairRM needs its four marker tokens: "
                             "call sppo_fast.pairrm.add_marker_tokens(tokenizer) first")
        ids[m] = i
    return ids


class PairRM(DebertaV2PreTrainedModel):
    """LLM-Blender's ``DebertaV2PairRM``: a DeBERTa-v2/v3 backbone and a two-layer head.

    ``M = head([h_src; h_c1]) - head([h_src; h_c2])`` averaged over ``n_tasks``. State-dict names
    (``pretrained_model.*``, ``head_layer.{1,4}.*``) are LLM-Blender's, so its checkpoints load
    unchanged and ours load into its class.
    """

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.n_tasks = config.n_tasks
        self.drop_out = config.drop_out
        self.pretrained_model = DebertaV2Model(config)
        self.hidden_size = config.hidden_size
        self.sep_token_id = config.sep_token_id
        self.source_prefix_id = config.source_prefix_id
        self.cand_prefix_id = config.cand_prefix_id
        self.cand1_prefix_id = config.cand1_prefix_id
        self.cand2_prefix_id = config.cand2_prefix_id
        H = config.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(self.drop_out), nn.Linear(2 * H, H), nn.Tanh(),
                                        nn.Dropout(self.drop_out), nn.Linear(H, self.n_tasks))
        self.post_init()

    def pair_logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, *,
                    attn_impl: Optional[str] = None, padded: Optional[bool | str] = None) -> Tensor:
        """``M`` for each row: ``input_ids, attention_mask [N, L]``, ``positions [N, 3]`` (the
        indices of the source, candidate-1 and candidate-2 markers). Returns ``[N]`` float32
        (float64 for a float64 model).

        ``attn_impl``: ``"torch"`` (default, :func:`sppo_fast.deberta.encode`: the last layer only
        at the three pooled rows, leaner attention), ``"triton"`` (the same with the fused attention
        kernel, no ``[L, L]`` tensor; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpp"`` (the same
        with the CPU attention kernel of ``sppo_fast._C``, float32/float64) or ``"hf"``
        (Hugging Face's eager forward, as LLM-Blender runs it). Same weights, same result up to float rounding. Default: ``"torch"``
        in eval mode, ``"hf"`` in training mode (the inference path has no dropout). ``padded``: whether
        the mask has any 0, or ``"right"`` for right padding, if the caller knows (saves a host sync;
        see :func:`sppo_fast.deberta.encode`).
        """
        if attn_impl is None:
            attn_impl = "hf" if self.training else "torch"
        if attn_impl == "hf":
            h = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(h.shape[0], device=h.device)
            src, c1, c2 = (h[rows, positions[:, k]] for k in range(3))
        elif attn_impl in deberta.ENCODE_IMPLS:
            src, c1, c2 = deberta.encode(self.pretrained_model, input_ids, attention_mask, positions,
                                         impl=attn_impl, padded=padded).unbind(1)
        else:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
        # One head call on [2N, 2H]: the same GEMMs as LLM-Blender's two calls, half the launches.
        scores = self.head_layer(torch.cat([torch.cat([src, c1], -1), torch.cat([src, c2], -1)], 0))
        left, right = (scores if scores.dtype == torch.float64 else scores.float()).chunk(2, 0)
        return (left - right).mean(-1)

    def marker_positions(self, input_ids: Tensor) -> Tensor:
        """``[N, 3]`` positions of the source / candidate-1 / candidate-2 markers, one each per row."""
        cols = []
        for name, tid in (("<|source|>", self.source_prefix_id), ("<|candidate1|>", self.cand1_prefix_id),
                          ("<|candidate2|>", self.cand2_prefix_id)):
            hit = input_ids == tid
            count = hit.sum(-1)
            if bool((count != 1).any()):
                bad = int((count != 1).nonzero()[0, 0])
                raise ValueError(f"input_ids row {bad}: expected exactly one {name} token (id {tid}), "
                                 f"found {int(count[bad])}")
            cols.append(hit.int().argmax(-1))
        return torch.stack(cols, -1)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **_unused) -> SequenceClassifierOutput:
        """LLM-Blender's interface: the markers are found in ``input_ids``; ``logits`` is ``[N]``.
        With ``labels`` (``>0``: candidate 1 better), the loss is ``-log sigmoid(logit * sign)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.pair_logits(input_ids, attention_mask, self.marker_positions(input_ids))
        loss = None
        if labels is not None:
            loss = -nn.functional.logsigmoid(logits * labels.float().sign().reshape(-1)).mean()
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_pairrm(name_or_path: str = "llm-blender/PairRM-hf", *, backbone: Optional[str] = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **hub_kwargs):
    """``(model, tokenizer)`` of a released PairRM, from the hub (online users) or a local folder.

    Reads both layouts:

    - the Hugging Face port (``llm-blender/PairRM-hf``): a ``deberta-v2`` config with the marker
      ids, tokenizer files with the markers, ``PairRM``'s weights;
    - LLM-Blender's original (``llm-blender/PairRM``, what SPPO loads): a ``RankerConfig`` json and
      a state dict. Its backbone config and tokenizer come from ``backbone`` (default: the config's
      ``model_name``, ``microsoft/deberta-v3-large``), plus the markers, as ``Blender.loadranker``
      builds them.
    """
    from transformers import AutoConfig, AutoTokenizer

    def local(p, **kw):
        def fetch(name):
            if Path(name).exists():
                return Path(name)
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, **kw, **hub_kwargs))
        return _io.local_or_hub(p, "PairRM", fetch)

    path = local(name_or_path)
    cfg = json.loads((path / "config.json").read_text())
    if "ranker_type" not in cfg:  # the Hugging Face port
        tokenizer = AutoTokenizer.from_pretrained(path)
        _marker_ids(tokenizer)
        model = PairRM.from_pretrained(path)
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if cfg.get("ranker_type") != "pairranker":
        raise ValueError(f"{path}: ranker_type {cfg.get('ranker_type')!r} is not PairRM's 'pairranker'")
    # config and tokenizer only: the backbone's own weights are replaced by the checkpoint's
    bb = local(backbone or cfg.get("model_name") or "microsoft/deberta-v3-large",
               allow_patterns=["*.json", "*.model", "*.txt"])
    tokenizer = AutoTokenizer.from_pretrained(bb)
    add_marker_tokens(tokenizer)
    base = {k: v for k, v in AutoConfig.from_pretrained(bb).to_dict().items() if k in DEBERTA_V3_LARGE}
    config = pairrm_config(tokenizer, base=base, n_tasks=cfg.get("n_tasks", 1), drop_out=cfg.get("drop_out", 0.05))
    model = PairRM(config)
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match PairRM: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids, each text tokenized once: ``source`` is ``[CLS] <|source|> x [SEP]``,
    ``candidates[k]`` is ``[CLS] <|candidate|> y_k [SEP]`` (the marker is swapped per pair slot)."""
    source: np.ndarray
    candidates: tuple[np.ndarray, ...]

    def canonical(self) -> tuple[int, ...]:
        """``c[k]``: the first candidate whose token ids (after truncation) equal candidate ``k``'s."""
        first: dict[bytes, int] = {}
        return tuple(first.setdefault(c.tobytes(), k) for k, c in enumerate(self.candidates))


class PairInputBuilder:
    """Tokenize prompts and candidates for PairRM exactly as LLM-Blender's collator does.

    - Literal ``"[SEP]"`` (the tokenizer's separator) in any text becomes a space (official).
    - Marker strings in user text are neutralised (:func:`neutralise_markers`; the official code
      crashes on them), and so are other forms the tokenizer's normaliser maps onto a marker
      (full-width ``"＜｜source｜＞"`` under NFKC): the same space after the first character.
    - Truncation (official): the source to ``source_max_length`` tokens (1224, ``[CLS]``/``[SEP]``
      included), each candidate to ``candidate_max_length + (source_max_length - S) // 2`` (412 + ...)
      where ``S`` is the longest source among ``truncation_group`` consecutive prompts.
      ``truncation_group=1`` (default) is what SPPO gets (it ranks with batch size 1) and equals the
      Hugging Face port's per-example budget ``(1224 + 2 * 412 - S) // 2``; ``truncation_group=B``
      reproduces LLM-Blender's ``rank(..., batch_size=B)``.
    """

    def __init__(self, tokenizer, *, source_max_length: int = SOURCE_MAX_LENGTH,
                 candidate_max_length: int = CANDIDATE_MAX_LENGTH, truncation_group: int = 1):
        if source_max_length < 3 or candidate_max_length < 3:
            raise ValueError("source_max_length and candidate_max_length must be >= 3 "
                             "([CLS], marker, [SEP])")
        if truncation_group < 1:
            raise ValueError(f"truncation_group must be >= 1, got {truncation_group}")
        if tokenizer.sep_token is None or tokenizer.cls_token is None:
            raise ValueError("PairRM's tokenizer needs [CLS] and [SEP] tokens")
        self.tokenizer = tokenizer
        self.ids = _marker_ids(tokenizer)
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        self.truncation_group = truncation_group
        self.sep_id = tokenizer.sep_token_id

    def _prepare(self, texts: Sequence[str], marker: str, name: Callable[[int], str]) -> list[str]:
        """``marker + text`` with the text's markers neutralised and ``[SEP]`` replaced by a space."""
        out = []
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name(k)} is {type(text).__name__}; PairRM texts must be str")
            out.append(marker + neutralise_markers(text).replace(self.tokenizer.sep_token, " "))
        return out

    def _tokenize(self, texts: list[str], name: Callable[[int], str]) -> list[list[int]]:
        """Token ids of ``[CLS] <marker> text [SEP]`` strings, with exactly one marker token each;
        ``name(k)`` names text ``k`` in errors."""
        # verbose=False: no "sequence length is longer than the specified maximum" warning; _cut
        # truncates every text to its budget before the model sees it
        if not texts:
            return []
        try:
            ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        except Exception as err:  # say which text, not only what the tokenizer disliked
            self._raise_for_bad_text(texts, name, err)
            raise
        markers = set(self.ids.values())
        for k, row in enumerate(ids):
            # row[1] is the text's own marker; any other is user text that the tokenizer's normaliser
            # (NFKC: "＜｜source｜＞" is "<|source|>") turned into one, which neutralise_markers,
            # working on the raw text, could not see
            if not markers.isdisjoint(row[2:]):
                ids[k] = self._break_normalised_markers(texts[k], markers)
        return ids

    def _raise_for_bad_text(self, texts: list[str], name: Callable[[int], str], err: Exception) -> None:
        """Raise a ValueError naming the first of ``texts`` the tokenizer cannot encode (if any)."""
        for k, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as bad:  # e.g. a lone surrogate "\ud800": not valid text
                where = bad.start - text.index(">") - 1  # the position in the user's text, past our marker
                raise ValueError(f"{name(k)} cannot be tokenized: {bad.reason} ({text[bad.start]!r}) at "
                                 f"character {where}") from err
            try:
                self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)
            except Exception as bad:
                raise ValueError(f"{name(k)} cannot be tokenized: {type(bad).__name__}: {bad}") from bad

    def _break_normalised_markers(self, text: str, markers: set[int]) -> list[int]:
        """Token ids of ``text`` after each span that the tokenizer reads as a marker token (past
        the text's own marker) got a space after its first character, as :func:`neutralise_markers`
        does to the ASCII form: ``"＜ ｜source｜＞"`` normalises to ``"< |source|>"``, ordinary text."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"the tokenizer reads a PairRM marker token in user text {text[:80]!r} that "
                             "neutralise_markers could not break (a slow tokenizer has no character offsets "
                             "to find it): use the fast tokenizer")
        for _ in range(8):  # one pass breaks every span; more only if breaking one made another
            enc = self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False,
                                 return_offsets_mapping=True)
            spans = [o for t, o in zip(enc["input_ids"][2:], enc["offset_mapping"][2:]) if t in markers]
            if not spans:
                return enc["input_ids"]
            for a, _ in sorted(spans, reverse=True):
                text = text[:a + 1] + " " + text[a + 1:]
        raise ValueError(f"could not neutralise the PairRM marker forms in user text {text[:80]!r}")

    def _cut(self, ids: list[int], n: int) -> np.ndarray:
        # = the tokenizer's own truncation to max_length n: keep [CLS] + n - 2 tokens, then [SEP]
        if len(ids) > n:
            ids = ids[: n - 1] + [self.sep_id]
        return np.asarray(ids, dtype=np.int64)

    def encode(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
               names: Optional[tuple[Callable[[int], str], Callable[[int, int], str]]] = None) -> list[EncodedPrompt]:
        """Token ids of each prompt and its candidates (see the class docstring for truncation).
        ``names``: how errors name prompt ``b`` and candidate ``i`` of prompt ``b`` (default
        ``prompts[b]``, ``candidates[b][i]``)."""
        if len(prompts) != len(candidates):
            raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists")
        prompt_name, cand_name = names or (lambda b: f"prompts[{b}]", lambda b, i: f"candidates[{b}][{i}]")
        owner = [(b, i) for b, cs in enumerate(candidates) for i in range(len(cs))]

        def flat_name(k: int) -> str:
            return cand_name(*owner[k])
        src = self._tokenize(self._prepare(prompts, SOURCE_MARKER, prompt_name), prompt_name)
        flat = self._prepare([c for cs in candidates for c in cs], CANDIDATE_MARKER, flat_name)
        cand = iter(self._tokenize(flat, flat_name))
        out = []
        src = [self._cut(s, self.source_max_length) for s in src]
        for g in range(0, len(prompts), self.truncation_group):
            longest = max(len(s) for s in src[g: g + self.truncation_group])
            budget = self.candidate_max_length + (self.source_max_length - longest) // 2
            for b in range(g, min(g + self.truncation_group, len(prompts))):
                cs = tuple(self._cut(next(cand), budget) for _ in candidates[b])
                out.append(EncodedPrompt(src[b], cs))
        for e in out:  # the pooled positions below rely on each marker sitting at index 1
            if e.source[1] != self.ids[SOURCE_MARKER] or any(c[1] != self.ids[CANDIDATE_MARKER] for c in e.candidates):
                raise ValueError("tokenizer did not keep the PairRM marker as the token after [CLS]; "
                                 "is it a [CLS] x [SEP] tokenizer with the markers added?")
        return out


class RankResult(NamedTuple("_RankFields", [("cmp", Tensor), *((f, Tensor) for f in PairwiseResult._fields)])):
    """``cmp[B, K, K]``, PairRM's logits (float32, ``cmp[b, i, j]``: candidate ``i`` in the first
    slot beats ``j``; diagonal 0), then :class:`sppo_fast.PairwiseResult`'s fields (scores, probs,
    win_rates, chosen, rejected, chosen_probs, chosen_probs_win, chosen_probs_lose, tied)."""

    __slots__ = ()

    def records(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[dict]:
        """One dict per prompt with SPPO's official fields (``prompt``, ``chosen``, ``rejected`` as
        ``[user, assistant]`` message lists, ``chosen_probs``, ``chosen_probs_win``,
        ``chosen_probs_lose``) plus the candidates, ``scores``, ``cmp``, ``probs``, ``win_rates``,
        the chosen/rejected indices and ``tied``."""
        out = []
        for b, (p, cs) in enumerate(zip(prompts, candidates)):
            w, l = int(self.chosen[b]), int(self.rejected[b])
            out.append({
                "prompt": p,
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": cs[w]}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": cs[l]}],
                "chosen_probs": float(self.chosen_probs[b]),
                "chosen_probs_win": float(self.chosen_probs_win[b]),
                "chosen_probs_lose": float(self.chosen_probs_lose[b]),
                "candidates": list(cs),
                "scores": self.scores[b].tolist(),
                "cmp": self.cmp[b].tolist(),
                "probs": self.probs[b].tolist(),
                "win_rates": self.win_rates[b].tolist(),
                "chosen_index": w,
                "rejected_index": l,
                "tied": bool(self.tied[b]),
            })
        return out


def record_schema():
    """The Parquet schema of :meth:`RankResult.records` rows, as ``rank_dataset`` writes them."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    f64 = pa.float64()
    return pa.schema([
        ("prompt", pa.string()), ("chosen", msgs), ("rejected", msgs), ("chosen_probs", f64),
        ("chosen_probs_win", f64), ("chosen_probs_lose", f64), ("candidates", pa.list_(pa.string())),
        ("scores", pa.list_(f64)), ("cmp", pa.list_(pa.list_(f64))), ("probs", pa.list_(pa.list_(f64))),
        ("win_rates", pa.list_(f64)), ("chosen_index", pa.int64()), ("rejected_index", pa.int64()),
        ("tied", pa.bool_()),
    ])



COMPARE_MODES = ("[A,B]", "[B,A]", "[A,B]+[B,A]")


class PairRMRanker:
    """Batched PairRM ranking: every ordered pair of many prompts, bucketed by length.

    Args:
        model, tokenizer: a :class:`PairRM` and its tokenizer (with the markers).
        budget: the most ``rows * L**2`` one forward may hold (``L``: the bucket's longest row).
            DeBERTa's eager attention builds several ``[rows, heads, L, L]`` tensors; on a CPU they
            must stay in cache, which is why the budget counts ``L**2`` and not tokens. Default:
            ``2**20`` on CPU (measured, see ``benchmarks/bench_pairrm.py``), ``2**26`` on CUDA.
        max_rows: the most pair rows in one forward (default 256).
        prompts_per_step: prompts whose pairs are sorted and bucketed together (default 64;
            rounded up to a multiple of ``truncation_group``, whose prompts share one budget).
        autocast_dtype: ``torch.float16`` (default on CUDA, as the official fp16 runs) or
            ``torch.bfloat16`` autocast; ``None`` runs in the model's dtype (default on CPU: fp32).
        attn_impl: the backbone's attention, see :meth:`PairRM.pair_logits`. ``"auto"`` (default):
            the fused Triton kernel on CUDA when Triton is installed, the CPU kernel (``"cpp"``) for a
            float32/float64 model on the CPU without autocast, else ``"torch"``.
        mode, backend: passed to :func:`sppo_fast.pairrm_aggregate`.
        progress: show a progress bar over prompts.
        Remaining keyword arguments go to :class:`PairInputBuilder` (truncation).
    """

    def __init__(self, model: PairRM, tokenizer, *, budget: Optional[int] = None,
                 max_rows: int = 256, prompts_per_step: int = 64,
                 autocast_dtype: Optional[torch.dtype] = "auto", attn_impl: str = "auto",
                 mode: str = "official",
                 backend: str = "auto", progress: bool = True, **builder_kwargs):
        if mode not in PAIRWISE_MODES:
            raise ValueError(f"mode: expected one of {PAIRWISE_MODES}, got {mode!r}")
        if attn_impl not in ATTN_IMPLS + ("auto",):
            raise ValueError(f"attn_impl: expected 'auto' or one of {ATTN_IMPLS}, got {attn_impl!r}")
        if max_rows < 1 or prompts_per_step < 1:
            raise ValueError("max_rows and prompts_per_step must be >= 1")
        self.model = model.eval()
        self.builder = PairInputBuilder(tokenizer, **builder_kwargs)
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        from . import _triton

        self.autocast_dtype = (torch.float16 if on_cuda else None) if autocast_dtype == "auto" else autocast_dtype
        cpp_problem = _cpp_attention_problem(self.device, next(model.parameters()).dtype, self.autocast_dtype)
        if attn_impl == "auto":
            float64 = next(model.parameters()).dtype == torch.float64 and self.autocast_dtype is None
            attn_impl = ("triton" if on_cuda and not float64 and _triton.problem(self.device) is None else
                         "cpp" if cpp_problem is None else "torch")
        elif attn_impl == "triton":
            why = _triton.problem(self.device)
            if why:
                raise ops.BackendUnavailableError(f"attn_impl='triton': {why}")
        elif attn_impl == "cpp" and cpp_problem:
            raise ops.BackendUnavailableError(f"attn_impl='cpp' {cpp_problem}")
        self.attn_impl = attn_impl
        self.budget = int(budget if budget is not None else (2 ** 26 if on_cuda else 2 ** 20))
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self.max_rows = max_rows
        group = self.builder.truncation_group
        self.prompts_per_step = -(-prompts_per_step // group) * group
        self.mode = mode
        self.backend = backend
        self.progress = progress
        self._weights_cache = None  # (tensor versions, digest): see fingerprint()
        for marker, attr in ((SOURCE_MARKER, "source_prefix_id"), (CANDIDATE1_MARKER, "cand1_prefix_id"),
                             (CANDIDATE2_MARKER, "cand2_prefix_id"), (CANDIDATE_MARKER, "cand_prefix_id")):
            if self.builder.ids[marker] != getattr(model, attr):
                raise ValueError(f"tokenizer's {marker} id {self.builder.ids[marker]} differs from the "
                                 f"model's {attr} {getattr(model, attr)}: wrong tokenizer?")

    @classmethod
    def from_pretrained(cls, name_or_path: str = "llm-blender/PairRM-hf", *, device="cpu",
                        backbone: Optional[str] = None, **kwargs):
        """Load a released PairRM (:func:`load_pairrm`) and wrap it."""
        model, tokenizer = load_pairrm(name_or_path, device=device, backbone=backbone)
        return cls(model, tokenizer, **kwargs)

    # -- pair building --------------------------------------------------------------------------
    def _buckets(self, lengths: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(-lengths, kind="stable")
        out, start = [], 0
        while start < len(order):
            L = int(lengths[order[start]])
            n = max(1, min(self.max_rows, self.budget // (L * L)))
            out.append(order[start: start + n])
            start += n
        return out

    def _run_pairs(self, enc: list[EncodedPrompt], pairs: list[tuple[int, int, int]]) -> np.ndarray:
        """PairRM logits of ``(b, i, j)``: prompt ``enc[b]``, candidate ``i`` in the first slot and
        ``j`` in the second; float32 ``[len(pairs)]``.

        Candidates with identical token ids are one candidate (:meth:`EncodedPrompt.canonical`):
        each distinct ``(b, canonical i, canonical j)`` runs once, and every pair mapping to it
        gets that value, so duplicates get bit-identical logits (as LLM-Blender's batch-size-1
        forwards compute an identical input identically), identical candidates tie exactly, and
        a prompt with K copies of one text costs one row instead of K(K-1). A pair of two copies
        runs as the row ``(c, c)``: the text against itself.
        """
        canon = [e.canonical() for e in enc]
        keys = [(b, canon[b][i], canon[b][j]) for b, i, j in pairs]
        slot = {k: n for n, k in enumerate(dict.fromkeys(keys))}
        vals = self._run_rows([(enc[b], i, j) for b, i, j in slot])
        return vals[np.fromiter((slot[k] for k in keys), dtype=np.int64, count=len(keys))]

    def _run_rows(self, rows: list[tuple[EncodedPrompt, int, int]]) -> np.ndarray:
        """PairRM logits of ``(prompt, i, j)`` rows, bucketed; returns float32 ``[len(rows)]``."""
        ids1, ids2 = self.builder.ids[CANDIDATE1_MARKER], self.builder.ids[CANDIDATE2_MARKER]
        pad = self.builder.tokenizer.pad_token_id or 0
        lengths = np.array([len(e.source) + len(e.candidates[i]) + len(e.candidates[j]) for e, i, j in rows])
        out = np.empty(len(rows), dtype=np.float32)
        pending = []  # (rows, logits on the device): one host sync at the end, not one per bucket,
        # so that on a GPU the next bucket is assembled while the last one runs
        for bucket in self._buckets(lengths):
            L = int(lengths[bucket[0]])
            ids = np.full((len(bucket), L), pad, dtype=np.int64)
            mask = np.zeros((len(bucket), L), dtype=np.int64)
            pos = np.empty((len(bucket), 3), dtype=np.int64)
            for r, k in enumerate(bucket):
                e, i, j = rows[k]
                s, a, b = len(e.source), len(e.candidates[i]), len(e.candidates[j])
                ids[r, :s] = e.source
                ids[r, s: s + a] = e.candidates[i]
                ids[r, s + a: s + a + b] = e.candidates[j]
                ids[r, s + 1], ids[r, s + a + 1] = ids1, ids2
                mask[r, : s + a + b] = 1
                pos[r] = (1, s + 1, s + a + 1)
            pending.append((bucket, self._forward(ids, mask, pos)))
        if pending:
            out[np.concatenate([b for b, _ in pending])] = torch.cat([t for _, t in pending]).cpu().numpy()
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> Tensor:
        """float32 logits ``[rows]``, left on the device (no host sync)."""
        dev = self.device
        # known here on the host, no device sync: every row is right-padded (see _run_rows)
        padded = "right" if not mask.all() else False
        t = [torch.from_numpy(x).to(dev, non_blocking=True) for x in (ids, mask, pos)]
        with torch.inference_mode(), torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                                                    enabled=self.autocast_dtype is not None):
            logits = self.model.pair_logits(*t, attn_impl=self.attn_impl, padded=padded)
        return logits.float()

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress, dynamic_ncols=True)

    # -- public API -----------------------------------------------------------------------------
    def pair_matrix(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        """``cmp[B, K, K]`` float32: PairRM's logit that candidate ``i`` (first slot) beats ``j``,
        for every ordered pair ``i != j``; the diagonal is 0 (never computed, as in LLM-Blender).
        Candidates with identical token ids get bit-identical logits (each distinct pair runs
        once), so a prompt whose K candidates are all the same is exactly tied."""
        K = _check_candidates(prompts, candidates)
        cmp = torch.zeros(len(prompts), K, K, dtype=torch.float32)
        with self._progress(len(prompts), "PairRM") as bar:
            for g in range(0, len(prompts), self.prompts_per_step):
                enc = self.builder.encode(prompts[g: g + self.prompts_per_step],
                                          candidates[g: g + self.prompts_per_step],
                                          names=(lambda b: f"prompts[{g + b}]",
                                                 lambda b, i: f"candidates[{g + b}][{i}]"))
                pairs = [(b, i, j) for b in range(len(enc)) for i in range(K) for j in range(K) if i != j]
                vals = torch.from_numpy(self._run_pairs(enc, pairs)).view(len(enc), K * (K - 1))
                off = ~torch.eye(K, dtype=torch.bool)
                cmp[g: g + len(enc)][:, off] = vals
                bar.update(len(enc))
        return cmp

    def rank(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
             mode: Optional[str] = None) -> RankResult:
        """Rank K candidates per prompt: ``cmp`` plus scores, probabilities, win rates, chosen /
        rejected and SPPO's probability fields (:func:`sppo_fast.pairrm_aggregate`)."""
        cmp = self.pair_matrix(prompts, candidates)
        agg: PairwiseResult = ops.pairrm_aggregate(cmp, mode or self.mode, backend=self.backend)
        return RankResult(cmp, *agg)

    def compare(self, prompts: Sequence[str], candidates_a: Sequence[str], candidates_b: Sequence[str], *,
                mode: str = "[A,B]+[B,A]", return_logits: bool = False):
        """Is A better than B? LLM-Blender's ``Blender.compare``.

        ``"[A,B]+[B,A]"`` (default, both orders, cancelling PairRM's position bias) gives
        ``M[A, B] - M[B, A]``; ``"[A,B]"`` gives ``M[A, B]``; ``"[B,A]"`` gives ``-M[B, A]``, so that
        a positive logit means "A is better" in every mode, as LLM-Blender's docstring says (its
        code returns ``M[B, A]`` unnegated in that mode). Returns a float32 tensor of logits with
        ``return_logits``, else a bool tensor ``logit > 0``. A and B with identical token ids run
        as one row, so the default mode gives exactly 0 (not better) for them.
        """
        if mode not in COMPARE_MODES:
            raise ValueError(f"mode: expected one of {COMPARE_MODES}, got {mode!r}")
        for texts, name in ((prompts, "prompts"), (candidates_a, "candidates_a"), (candidates_b, "candidates_b")):
            _check_texts(texts, name)
        if not len(prompts) == len(candidates_a) == len(candidates_b):
            raise ValueError(f"got {len(prompts)} prompts, {len(candidates_a)} A and {len(candidates_b)} B")
        enc = self.builder.encode(prompts, [[a, b] for a, b in zip(candidates_a, candidates_b)],
                                  names=(lambda b: f"prompts[{b}]", lambda b, i: f"candidates_{'ab'[i]}[{b}]"))
        n = len(enc)
        pairs = []
        if mode != "[B,A]":
            pairs += [(b, 0, 1) for b in range(n)]
        if mode != "[A,B]":
            pairs += [(b, 1, 0) for b in range(n)]
        vals = torch.from_numpy(self._run_pairs(enc, pairs))
        if mode == "[A,B]+[B,A]":
            logits = vals[:n] - vals[n:]
        else:
            logits = vals if mode == "[A,B]" else -vals
        return logits if return_logits else logits > 0

    def rank_dataset(self, dataset, output: str | os.PathLike, *, prompt_column: str = "prompt",
                     candidates_column: str = "candidates", shard_size: int = 256,
                     mode: Optional[str] = None) -> Path:
        """Rank a ``datasets.Dataset`` (or any sequence of dicts) and write ``output`` (Parquet).

        Rows need ``prompt_column`` (str) and ``candidates_column`` (list of K str). Work is done
        in shards of ``shard_size`` prompts; each finished shard is written atomically under
        ``<output>.parts/``, so a rerun after an interruption skips finished shards (after checking
        that they hold the same prompts). The output is written to a temporary name and renamed
        when complete; the parts are then removed. Returns the output path.

        An existing ``output`` is returned as it is only if it was written with the same settings
        and model and for the same inputs (row count, column names and a SHA-256 over every row's
        prompt and candidates, kept in its metadata); otherwise this raises. Checking it reads the
        whole dataset once (no ranking).
        """
        import pyarrow as pa

        output = Path(output)
        group = self.builder.truncation_group
        if shard_size < 1 or shard_size % group:
            raise ValueError(f"shard_size must be a positive multiple of truncation_group ({group}), "
                             f"got {shard_size}")
        columns = getattr(dataset, "column_names", None)
        if columns is not None:
            for c in (prompt_column, candidates_column):
                if c not in columns:
                    raise ValueError(f"dataset has no column {c!r}; columns: {columns}")
        settings = self._fingerprint(mode or self.mode)
        n = len(dataset)

        def shards():
            for start in range(0, n, shard_size):
                batch = _rows(dataset, start, min(n, start + shard_size))
                # list() only of sequences: a str or None stays what it is and is refused by rank()
                yield start, [r[prompt_column] for r in batch], [
                    c if isinstance(c, (str, dict)) or not hasattr(c, "__iter__") else list(c)
                    for c in (r[candidates_column] for r in batch)]

        def inputs_record(data_hash) -> dict:
            return {"rows": n, "prompt_column": prompt_column, "candidates_column": candidates_column,
                    "sha256": data_hash.hexdigest()}

        if output.exists():
            meta = _io.parquet_metadata(output)
            if meta.get(b"sppo_fast.settings") != settings.encode():
                raise ValueError(f"{output} exists but was written with other settings or another model; "
                                 "remove it to rank again")
            data_hash = hashlib.sha256()
            for _, prompts, cands in shards():
                _hash_rows(data_hash, prompts, cands)
            want = inputs_record(data_hash)
            have = json.loads(meta.get(b"sppo_fast.dataset", b"{}"))
            if have != want:
                what = ", ".join(k for k in want if have.get(k) != want[k])
                raise ValueError(f"{output} exists but holds the ranking of another dataset (differs in: {what}); "
                                 f"remove it or choose another output path to rank this one")
            return output
        parts = output.with_name(output.name + ".parts")  # (made with its first shard: a failure
        tables = []                                        # before that leaves no empty folder)
        data_hash = hashlib.sha256()
        with self._progress(n, "PairRM ranking") as bar:
            for s, (start, prompts, cands) in enumerate(shards()):
                _hash_rows(data_hash, prompts, cands)
                digest = hashlib.sha256(json.dumps([settings, shard_size, prompts, cands]).encode()).hexdigest()
                path = parts / f"shard-{s:06d}.parquet"
                if path.exists():
                    table = _io.read_parquet(path)
                    if (table.schema.metadata or {}).get(b"sppo_fast.inputs") != digest.encode():
                        raise ValueError(f"{path} was written for different prompts, candidates, settings "
                                         f"(mode, truncation, shard_size={shard_size}) or model; remove "
                                         f"{parts} to start over")
                    bar.update(len(prompts))
                else:
                    records = []
                    # prompts_per_step at a time (a multiple of the truncation group, as the shard is):
                    # the same steps pair_matrix takes, so the bar moves without changing a number
                    for a in range(0, len(prompts), self.prompts_per_step):
                        p, c = prompts[a: a + self.prompts_per_step], cands[a: a + self.prompts_per_step]
                        records += self._rank_quietly(p, c, mode, start + a).records(p, c)
                        bar.update(len(p))
                    table = pa.Table.from_pylist(records, schema=record_schema())
                    table = table.replace_schema_metadata({"sppo_fast.inputs": digest})
                    parts.mkdir(parents=True, exist_ok=True)
                    _io.write_parquet(table, path)
                tables.append(table.replace_schema_metadata(None))
        table = pa.concat_tables(tables) if tables else record_schema().empty_table()
        meta = {"sppo_fast.settings": settings, "sppo_fast.dataset": json.dumps(inputs_record(data_hash))}
        _io.write_parquet(table.replace_schema_metadata(meta), output)
        shutil.rmtree(parts, ignore_errors=True)
        return output

    def _rank_quietly(self, prompts: list[str], cands: list[list[str]], mode: Optional[str], first: int) -> RankResult:
        """:meth:`rank` without its own bar; errors say which dataset rows (``first`` onwards)."""
        progress, self.progress = self.progress, False
        try:
            return self.rank(prompts, cands, mode=mode)
        except (TypeError, ValueError) as err:
            if type(err) not in (TypeError, ValueError):
                raise
            # rank() names prompts[b] of its own list: say where that list starts in the dataset
            raise type(err)(f"dataset rows {first}..{first + len(prompts) - 1} (indices below count from "
                            f"{first}): {err}") from err
        finally:
            self.progress = progress

    def fingerprint(self) -> str:
        """SHA-256 of what :meth:`pair_matrix`'s numbers depend on besides its inputs: truncation,
        autocast dtype, the model's config and every byte of its parameters and buffers, and the
        tokenizer (vocabulary, added tokens, normaliser). The weights are hashed once (~1 s per GB;
        ranking takes far longer) and the digest is cached until a tensor is replaced or changed in
        place (its storage and version counter are checked on every call)."""
        b = self.builder
        h = hashlib.sha256()
        h.update(json.dumps([b.source_max_length, b.candidate_max_length, b.truncation_group,
                             str(self.autocast_dtype), self.model.config.to_json_string()]).encode())
        h.update(self._weights_digest().encode())
        h.update(_tokenizer_digest(b.tokenizer).encode())
        return h.hexdigest()

    def _weights_digest(self) -> str:
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)) for name, t in tensors)
        cached = self._weights_cache
        if cached is None or cached[0] != key:
            h = hashlib.sha256()
            with torch.no_grad():
                for name, t in tensors:
                    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
                    # raw bytes (a bfloat16 tensor has no numpy dtype): one host copy per tensor
                    h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
            self._weights_cache = cached = (key, h.hexdigest())
        return cached[1]

    def _fingerprint(self, mode: str) -> str:
        """:meth:`fingerprint` plus the aggregation mode: what a ``rank_dataset`` output depends on
        besides its inputs."""
        return hashlib.sha256(json.dumps([mode, self.fingerprint()]).encode()).hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary, added tokens and (fast tokenizers) normaliser and
    pre/post-processing, as its serialised form holds them."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items())).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    return h.hexdigest()


def _cpp_attention_problem(device: torch.device, dtype: torch.dtype, autocast_dtype) -> Optional[str]:
    """Why the CPU attention kernel (``attn_impl="cpp"``) cannot run this model, or None."""
    from . import _native

    if device.type != "cpu":
        return f"runs on the CPU, the model is on {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"runs float32 or float64 models, this one is {dtype}"
    if autocast_dtype is not None:
        return f"runs float32 or float64, not under {autocast_dtype} autocast"
    if not _native.available():
        return _native.unavailable_reason()
    if not hasattr(_native._C, "deberta_attention"):
        return "needs a rebuild of sppo_fast._C (pip install -e .): this build predates the kernel"
    return None


def _check_texts(texts: Sequence[str], name: str) -> None:
    """``texts`` must be a list (any sequence) of str: a str itself would be read as its characters."""
    if isinstance(texts, str):
        raise TypeError(f"{name} is a str; expected a list of str")
    if isinstance(texts, dict) or not hasattr(texts, "__len__") or not hasattr(texts, "__getitem__"):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{k}] is {type(t).__name__}; PairRM texts must be str")


def _check_candidates(prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> int:
    """K, after checking that ``prompts`` is a list of str and ``candidates`` a list of as many
    lists of K >= 2 str (any sequences: numpy arrays too; never a str or dict)."""
    if isinstance(prompts, str):
        raise TypeError("prompts is a str; expected a list of prompts (one per candidate list)")
    _check_texts(prompts, "prompts")
    if isinstance(candidates, (str, dict)) or not hasattr(candidates, "__len__"):
        raise TypeError(f"candidates must be a list of candidate lists (one per prompt), got "
                        f"{type(candidates).__name__}")
    if len(prompts) != len(candidates):
        raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists")
    if len(candidates) == 0:  # (not `not candidates`: ambiguous for a numpy array)
        return 2
    K = None
    for b, cs in enumerate(candidates):
        if isinstance(cs, str):
            raise TypeError(f"candidates[{b}] is a str; expected a list of K candidate strings")
        _check_texts(cs, f"candidates[{b}]")
        K = len(cs) if K is None else K
        if len(cs) != K:
            raise ValueError(f"every prompt needs the same number of candidates: candidates[0] has {K}, "
                             f"candidates[{b}] has {len(cs)}")
    if K < 2:
        raise ValueError(f"PairRM ranking needs K >= 2 candidates per prompt, got {K}")
    return K


def _hash_rows(h, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> None:
    """Add each row's prompt and candidates to the hash ``h`` (one JSON line per row, so the result
    does not depend on how the rows were split into shards)."""
    for p, cs in zip(prompts, candidates):
        h.update(json.dumps([p, cs]).encode() + b"\n")


def _rows(dataset, start: int, stop: int) -> list[dict[str, Any]]:
    if hasattr(dataset, "select"):  # datasets.Dataset: one Arrow slice, not row by row
        sl = dataset[start:stop]
        keys = list(sl)
        return [dict(zip(keys, vals)) for vals in zip(*(sl[k] for k in keys))]
    return [dataset[i] for i in range(start, stop)]


def tiny_pairrm(*, seed: int = 0, tokenizer=None, **overrides):
    """``(model, tokenizer)``: a randomly initialised PairRM of the released architecture at tiny size
    (hidden 128, 2 layers, 4 heads; override any DeBERTa field) and an in-process trained tokenizer
    with the markers. Deterministic for a given ``seed``."""
    from .tiny import tiny_tokenizer

    if tokenizer is None:
        tokenizer = tiny_tokenizer(seed=seed)
        add_marker_tokens(tokenizer)
    config = pairrm_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PairRM(config)
    return model.eval(), tokenizer


def redraw_weights_(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Re-draw every weight at O(1) output scale, in place (for tests and demos).

    The default initialisation (std 0.02) gives PairRM logits near 1e-5, which would make any
    tolerance check pass vacuously. Linear weights get std ``1/sqrt(fan_in)``, embeddings std 1,
    LayerNorm gains ``1 + N(0, 0.1)``, biases ``N(0, 0.1)``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model
