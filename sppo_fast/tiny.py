"""Tiny stand-ins for the real models, built in-process: no hub, no downloads.

Tests, benchmarks and the embedded default run on these. Everything here is deterministic for a
given seed, so two processes build bit-identical tokenizers and models.

- :func:`synthetic_text` / :func:`synthetic_corpus`: English-looking text from a fixed word list.
- :func:`train_unigram_tokenizer`: a SentencePiece-style Unigram tokenizer (DeBERTa-v3's kind:
  Metaspace pre-tokenizer, ``[CLS] x [SEP]`` template) estimated from such a corpus in Python,
  identical in every process; :func:`train_chat_tokenizer`: the same with Mistral's chat format.
"""

from __future__ import annotations

import functools
import random
from typing import Iterable, Sequence

# A fixed vocabulary of common English words. Texts drawn from it tokenize like prose: frequent
# short words become single pieces, rarer long ones split into several.
WORDS = tuple(
    """
    the of and to in is that for it as with was on be by at this are from or have an not which
    but all were when we there can more if will one about up out them so what time would these
    other into has its two then first any way could may after where most over good new use such
    make because only well even back through just long little very how before many same know
    under last right people think still between never another while might each without place
    small world number part point answer question reason result example problem system method
    model data value order state power water light sound change study learn follow begin early
    large simple clear strong careful honest helpful useful correct possible likely important
    different general special common natural human social local public private final total
    explain describe consider compare suggest provide produce improve measure compute predict
    train sample score rank choose prefer reward policy gradient probability estimate expected
    language response prompt candidate assistant user answer reply summary story poem letter
    recipe garden river mountain city country history science music picture market school
    student teacher doctor engineer writer friend family house window kitchen morning evening
    winter summer travel weather energy health money budget plan project meeting report review
    because however therefore although instead perhaps usually quickly slowly carefully often
    always sometimes rarely together already almost enough rather quite really especially
    algorithm function variable matrix vector tensor kernel memory thread cache latency
    throughput benchmark library package version install compile debug error warning message
    """.split()
)


def synthetic_text(rng: random.Random, n_words: int) -> str:
    """About ``n_words`` words of sentence-shaped text drawn from :data:`WORDS` with ``rng``."""
    out: list[str] = []
    while len(out) < n_words:
        n = min(rng.randint(4, 16), n_words - len(out))
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        out.extend(words)
        out[-1] += rng.choice(".....?!,;")
        if rng.random() < 0.1:  # symbols and digits, so that code-like text has pieces too
            out.append(rng.choice(("(x)", "<b>", "a|b", "x = 1;", "f(2, 3)", "[1]", "{k: v}", "#7", "50%")))
    return " ".join(out)


def synthetic_corpus(n_texts: int, *, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """``n_texts`` synthetic texts of ``min_words``..``max_words`` words each."""
    rng = random.Random(seed)
    return [synthetic_text(rng, rng.randint(min_words, max_words)) for _ in range(n_texts)]


def _train_unigram(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], unk: str):
    """A Unigram model whose pieces and log-probabilities are counted from ``texts`` in Python.

    ``tokenizers``' own UnigramTrainer is not reproducible from one process to the next (its hash
    maps are randomly seeded), and the tests, benchmarks and demo need the same tokenizer in every
    process. Pieces: every printable ASCII character alone and after the word marker, then the most
    frequent whole words (``vocab_size`` in all); scores: log relative frequencies, characters
    penalised so that whole words win.
    """
    import collections
    import math
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = collections.Counter()
    chars = collections.Counter()
    for t in texts:
        for w in t.split():
            words["\u2581" + w] += 1
            chars.update(w)
    total_w, total_c = sum(words.values()) or 1, sum(chars.values()) or 1
    vocab = [(tok, 0.0) for tok in special_tokens]
    seen = set(special_tokens)
    for c in string.printable.strip() + "\u2581":
        for piece in (c, "\u2581" + c) if c != "\u2581" else (c,):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, math.log((chars[c] + 1) / total_c) - 12.0))
    for w, n in sorted(words.items(), key=lambda x: (-x[1], x[0])):
        if len(vocab) >= vocab_size:
            break
        if w not in seen:
            seen.add(w)
            vocab.append((w, math.log(n / total_w)))
    tok = Tokenizer(models.Unigram(vocab, unk_id=list(special_tokens).index(unk)))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def train_unigram_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000,
                            special_tokens: Sequence[str] = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"),
                            model_max_length: int = 4096):
    """Train a DeBERTa-v3-style tokenizer (Unigram + Metaspace, ``[CLS] x [SEP]``) on ``texts``.

    Special tokens get ids 0.. in the order given (DeBERTa-v3: ``[PAD]`` 0, ``[CLS]`` 1,
    ``[SEP]`` 2, ``[UNK]`` 3). Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    pad, cls, sep, unk, mask = special_tokens
    tok = _train_unigram(texts, vocab_size, special_tokens, unk)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, cls_token=cls, sep_token=sep, unk_token=unk,
        mask_token=mask, model_max_length=model_max_length)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(seed: int, vocab_size: int):
    return train_unigram_tokenizer(synthetic_corpus(3000, seed=seed), vocab_size=vocab_size)


def tiny_tokenizer(*, seed: int = 0, vocab_size: int = 2000):
    """A fresh copy of the tiny tokenizer for ``seed`` (trained once per process, then cached)."""
    import copy

    return copy.deepcopy(_cached_tokenizer(seed, vocab_size))


# Mistral-Instruct's chat format: the template itself starts with BOS, which is why tokenizing its
# output with add_special_tokens=True gives the double BOS of the official trainer.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def train_chat_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000, model_max_length: int = 4096):
    """A Llama/Mistral-style tokenizer trained on ``texts``: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
    BOS added by the tokenizer, Mistral-Instruct's ``[INST] ... [/INST]`` chat template; padding
    uses ``</s>`` as Mistral's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_unigram(texts, vocab_size, ("<unk>", "<s>", "</s>"), "<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", model_max_length=model_max_length)
    out.chat_template = MISTRAL_CHAT_TEMPLATE
    return out


@functools.lru_cache(maxsize=4)
def _cached_chat_tokenizer(seed: int, vocab_size: int):
    return train_chat_tokenizer(synthetic_corpus(3000, seed=seed) + ["[INST] [/INST]"] * 50, vocab_size=vocab_size)


def tiny_chat_tokenizer(*, seed: int = 0, vocab_size: int = 2000):
    """A fresh copy of the tiny chat tokenizer for ``seed`` (trained once per process, then cached)."""
    import copy

    return copy.deepcopy(_cached_chat_tokenizer(seed, vocab_size))
