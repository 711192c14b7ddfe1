"""PairRM model, input builder and ranking engine, held to LLM-Blender's own code on the same weights.

The tiny model's weights are re-drawn at O(1) scale: with the default initialisation PairRM's
logits are ~1e-5 and any tolerance check would pass vacuously (``test_weights_are_not_vacuous``).
"""

import json
import random

import numpy as np
import pytest
import torch

import sppo_fast
from sppo_fast import deberta
from sppo_fast import pairrm as prm
from sppo_fast import reference as R
from sppo_fast.tiny import synthetic_text

from _data import ATTENTION_CONFIGS, deberta_case
from conftest import assert_as_accurate, max_err

from sppo_fast import llm_blender_compat

try:
    llm_blender_compat.import_llm_blender()
    HAVE_LLM_BLENDER = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_LLM_BLENDER = False
needs_llm_blender = pytest.mark.skipif(not HAVE_LLM_BLENDER, reason="llm-blender is not installed "
                                       "(pip install -e '.[test]')")

ATOL = 2e-5  # float32 noise on logits of O(1) (different GEMM shapes and op orders)


@pytest.fixture(scope="module")
def tiny():
    model, tok = prm.tiny_pairrm(seed=0)
    prm.redraw_weights_(model, seed=1)
    return model, tok


@pytest.fixture(scope="module")
def blender(tiny):
    if not HAVE_LLM_BLENDER:
        pytest.skip("llm-blender is not installed (pip install -e '.[test]')")
    return llm_blender_compat.llm_blender_ranker(*tiny)


def texts(seed, n, lo, hi):
    rng = random.Random(seed)
    return [synthetic_text(rng, rng.randint(lo, hi)) for _ in range(n)]


def prompts_and_candidates(seed, B, K, lo=3, hi=40):
    return texts(seed, B, lo, hi), [texts(seed * 100 + b, K, lo, hi) for b in range(B)]


def blender_matrix(blender, prompts, candidates):
    """LLM-Blender's ``_full_predict`` one prompt at a time (batch size 1, as SPPO runs it)."""
    from llm_blender.blender.blender_utils import RankerDataset

    ds = RankerDataset(prompts, candidates)
    out = []
    with torch.no_grad():
        for b in range(len(prompts)):
            batch = blender.ranker_collator([ds[b]])
            out.append(blender.ranker._full_predict(**{k: v for k, v in batch.items() if v is not None})["logits"])
    return torch.cat(out)


def test_weights_are_not_vacuous(tiny):
    p, c = prompts_and_candidates(1, 2, 4)
    cmp = prm.PairRMRanker(*tiny, progress=False).pair_matrix(p, c)
    off = cmp[:, ~torch.eye(4, dtype=torch.bool)]
    assert off.abs().mean() > 0.05 and off.std() > 0.02


@needs_llm_blender
def test_state_dict_loads_into_llm_blender_and_back(tiny):
    from llm_blender.pair_ranker.pairrm import DebertaV2PairRM

    model, tok = tiny
    theirs = DebertaV2PairRM(model.config).eval()
    assert list(theirs.state_dict()) == list(model.state_dict())
    theirs.load_state_dict(model.state_dict(), strict=True)
    ours = prm.PairRM(model.config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    builder = prm.PairInputBuilder(tok)
    e = builder.encode(["a question"], [["first answer", "second one"]])[0]
    ids = torch.tensor(np.concatenate([e.source, e.candidates[0], e.candidates[1]]))[None]
    ids[0, len(e.source) + 1] = model.cand1_prefix_id
    ids[0, len(e.source) + len(e.candidates[0]) + 1] = model.cand2_prefix_id
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = ours(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_llm_blender_ranker_shares_our_names(tiny, blender):
    assert set(blender.ranker.state_dict()) == set(tiny[0].state_dict()) - {
        k for k in tiny[0].state_dict() if k.endswith("position_ids")}


@pytest.mark.parametrize("B,K", [(3, 5), (2, 2), (1, 7)])
def test_matrix_scores_selection_match_llm_blender(tiny, blender, B, K):
    from llm_blender.gpt_eval.utils import get_scores_from_cmps

    p, c = prompts_and_candidates(B * 10 + K, B, K)
    res = prm.PairRMRanker(*tiny, progress=False).rank(p, c)
    ref = blender_matrix(blender, p, c)
    torch.testing.assert_close(res.cmp, ref, atol=ATOL, rtol=0)
    ref_scores = get_scores_from_cmps(ref.numpy())
    np.testing.assert_allclose(res.scores.numpy(), ref_scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.scores, torch.from_numpy(blender.rank(p, c, return_scores=True, batch_size=1)),
                               atol=ATOL, rtol=0)
    # selection: the same wherever the decision is not within float noise
    s = np.sort(ref_scores, -1)
    clear = (s[:, -1] - s[:, -2] > 10 * ATOL) & (s[:, 1] - s[:, 0] > 10 * ATOL)
    assert clear.any()
    np.testing.assert_array_equal(res.chosen.numpy()[clear], ref_scores.argmax(-1)[clear])
    np.testing.assert_array_equal(res.rejected.numpy()[clear], ref_scores.argmin(-1)[clear])
    # the probability fields are pairrm_aggregate of the matrix
    agg = sppo_fast.pairrm_aggregate(res.cmp, backend="reference")
    for name, v in agg._asdict().items():
        torch.testing.assert_close(getattr(res, name), v)


@needs_llm_blender
@pytest.mark.parametrize("group", [1, 3])
def test_truncation_matches_llm_blender(tiny, blender, group):
    """Short limits so that every text is cut; ``truncation_group=B`` is LLM-Blender at batch size B."""
    model, tok = tiny
    src_max, cand_max = 24, 12
    p = texts(7, 5, 1, 40)  # some sources cut, some not: budgets differ from prompt to prompt
    c = [texts(70 + b, 4, 15, 60) for b in range(5)]
    ranker = prm.PairRMRanker(model, tok, progress=False, source_max_length=src_max,
                              candidate_max_length=cand_max, truncation_group=group)
    bl = llm_blender_compat.llm_blender_ranker(model, tok, source_max_length=src_max, candidate_max_length=cand_max)
    ours = ranker.rank(p, c).scores
    theirs = torch.from_numpy(bl.rank(p, c, return_scores=True, batch_size=group))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # steps of 2 prompts must not split a group of 3 sharing one budget
    stepped = prm.PairRMRanker(model, tok, progress=False, source_max_length=src_max, candidate_max_length=cand_max,
                               truncation_group=group, prompts_per_step=2)
    torch.testing.assert_close(stepped.rank(p, c).scores, theirs, atol=ATOL, rtol=0)
    enc = ranker.builder.encode(p, c)
    assert max(len(e.source) for e in enc) == src_max  # the cut happened
    per_prompt = prm.PairInputBuilder(tok, source_max_length=src_max, candidate_max_length=cand_max).encode(p, c)
    differs = any(len(a) != len(b) for e, f in zip(enc, per_prompt) for a, b in zip(e.candidates, f.candidates))
    assert differs == (group > 1)  # the shared budget of a group is in force


def test_ids_match_llm_blender_collator_at_official_lengths(tiny, blender):
    """Token ids of every ordered pair, texts longer than the official 1224 / 412 budgets."""
    model, tok = tiny
    p = [texts(3, 1, 1500, 1600)[0], texts(4, 1, 20, 30)[0]]
    c = [texts(5, 3, 10, 700), texts(6, 3, 400, 600)]
    from llm_blender.blender.blender_utils import RankerDataset

    builder = prm.PairInputBuilder(tok)
    enc = builder.encode(p, c)
    assert len(enc[0].source) == prm.SOURCE_MAX_LENGTH
    for b in range(2):
        batch = blender.ranker_collator([RankerDataset(p, c)[b]])
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                c1, c2 = batch["candidate_ids"][:, i].clone(), batch["candidate_ids"][:, j].clone()
                c1[c1 == model.cand_prefix_id] = model.cand1_prefix_id
                c2[c2 == model.cand_prefix_id] = model.cand2_prefix_id
                ids, mask = blender.ranker.cat_ids(batch["source_ids"], batch["source_attention_mask"],
                                                   c1, batch["candidate_attention_mask"][:, i],
                                                   c2, batch["candidate_attention_mask"][:, j])
                theirs = ids[0][mask[0].bool()].tolist()
                e = enc[b]
                ours = np.concatenate([e.source, e.candidates[i], e.candidates[j]])
                ours[len(e.source) + 1] = model.cand1_prefix_id
                ours[len(e.source) + len(e.candidates[i]) + 1] = model.cand2_prefix_id
                assert ours.tolist() == theirs


def test_candidate_budget_is_the_hf_ports_per_example_budget(tiny):
    """At truncation_group=1 the official budget 412 + (1224 - S) // 2 is the Hugging Face port's
    (1224 + 2 * 412 - S) // 2, S the source's token count: checked on sources of many lengths."""
    builder = prm.PairInputBuilder(tiny[1])
    long = texts(81, 1, 2500, 2500)[0]
    words = long.split()
    sources = [" ".join(words[:n]) for n in (0, 1, 7, 100, 333, 640, 1000, 2000)]
    for e in builder.encode(sources, [[long, long[:50]]] * len(sources)):
        S = len(e.source)
        assert len(e.candidates[0]) == (prm.SOURCE_MAX_LENGTH + 2 * prm.CANDIDATE_MAX_LENGTH - S) // 2
        assert len(e.candidates[1]) < len(e.candidates[0])
    assert {len(e.source) for e in builder.encode(sources, [["a", "b"]] * len(sources))} >= {3, prm.SOURCE_MAX_LENGTH}


def test_result_independent_of_buckets_and_order(tiny):
    p, c = prompts_and_candidates(11, 6, 4, lo=3, hi=80)
    base = prm.PairRMRanker(*tiny, progress=False).pair_matrix(p, c)
    for kw in (dict(budget=1), dict(budget=10 ** 9, max_rows=1000), dict(max_rows=3, prompts_per_step=2),
               dict(prompts_per_step=1)):
        torch.testing.assert_close(prm.PairRMRanker(*tiny, progress=False, **kw).pair_matrix(p, c), base,
                                   atol=ATOL, rtol=0)
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = prm.PairRMRanker(*tiny, progress=False).pair_matrix([p[i] for i in perm], [c[i] for i in perm])
    torch.testing.assert_close(shuffled, base[perm], atol=ATOL, rtol=0)


def test_duplicate_candidates_tie_exactly_and_run_once(tiny, blender, monkeypatch):
    """Copies of a candidate (same token ids) get bit-identical logits whatever the bucketing, so a
    prompt with K copies of one text is tied and copies score exactly alike; each distinct pair runs
    once; everything else is LLM-Blender's matrix."""
    p, c = prompts_and_candidates(91, 6, 5, lo=5, hi=120)
    c[1] = [c[1][0]] * 5  # all identical (greedy-like sampling)
    c[3] = [c[3][0], c[3][1], c[3][0], c[3][2], c[3][0]]  # three copies among others
    c[4] = [c[4][0], c[4][1], c[4][0], c[4][1], c[4][2]]  # two texts with a copy each
    ref = blender_matrix(blender, p, c)
    off = ~torch.eye(5, dtype=torch.bool)
    groups = {3: [[0, 2, 4]], 4: [[0, 2], [1, 3]]}
    for kw in (dict(), dict(budget=1), dict(budget=300_000), dict(max_rows=7), dict(max_rows=3, prompts_per_step=2),
               dict(budget=10 ** 9, max_rows=1000)):
        ranker = prm.PairRMRanker(*tiny, progress=False, **kw)
        rows = []
        real = ranker._run_rows
        monkeypatch.setattr(ranker, "_run_rows", lambda r: rows.append(len(r)) or real(r))
        res = ranker.rank(p, c)
        torch.testing.assert_close(res.cmp, ref, atol=ATOL, rtol=0)
        assert res.tied.tolist() == [False, True, False, False, False, False], kw
        assert (res.cmp[1][off] == res.cmp[1, 0, 1]).all() and (res.scores[1] == 0).all()
        for b, gs in groups.items():
            for g in gs:
                assert len(set(res.scores[b, g].tolist())) == 1, (kw, b, g)
                others = [k for k in range(5) if k not in g]
                for i in g[1:]:  # rows and columns of copies are bit-identical (outside the copies)
                    assert torch.equal(res.cmp[b, i, others], res.cmp[b, g[0], others])
                    assert torch.equal(res.cmp[b, others, i], res.cmp[b, others, g[0]])
        assert all(c[b][int(res.chosen[b])] != c[b][int(res.rejected[b])] for b in range(6) if b != 1)
        # distinct pairs only: 4 prompts x 20, 1 (all copies), 3*2 + 1 (c[3]), 3*2 + 2 (c[4])
        assert sum(rows) == 3 * 20 + 1 + 7 + 8
    a = [x[0] for x in c]
    for kw in (dict(), dict(max_rows=1), dict(max_rows=3)):
        logits = prm.PairRMRanker(*tiny, progress=False, **kw).compare(p, a, a, return_logits=True)
        assert (logits == 0).all()


@pytest.mark.parametrize("config", list(ATTENTION_CONFIGS))
@pytest.mark.parametrize("lengths", [(700,), (300, 130, 129, 5)])
def test_attention_against_float64(tiny, config, lengths):
    """Our DeBERTa path vs Hugging Face's eager one in float64 and float32: padded batches,
    distances on both sides of the linear/log bucket boundary and beyond max_relative_positions,
    shared and separate position projections, each relative term alone, several head sizes."""
    model, m64, ids, mask, pos = deberta_case(tiny, config, lengths)
    valid = mask.bool()
    with torch.no_grad():
        truth = m64.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
        got64 = deberta.encode(m64.pretrained_model, ids, mask)[valid]
        hf32 = model.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state[valid].double()
        ours32 = deberta.encode(model.pretrained_model, ids, mask)[valid].double()
        pooled = deberta.encode(model.pretrained_model, ids, mask, pos)
        full = deberta.encode(model.pretrained_model, ids, mask)
        logits = {impl: m64.pair_logits(ids, mask, pos, attn_impl=impl) for impl in ("torch", "cpp", "hf")}
    assert truth.std() > 0.5  # O(1) hidden states: the tolerances below are not vacuous
    # HF computes the 1/sqrt(3d) scale and the log buckets in float32 even in float64 models
    torch.testing.assert_close(got64, truth, atol=1e-6, rtol=0)
    assert (ours32 - truth).abs().max() <= 2 * (hf32 - truth).abs().max() + 1e-6
    torch.testing.assert_close(pooled, full[torch.arange(len(lengths))[:, None], pos], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["torch"], logits["hf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits["cpp"], logits["hf"], atol=1e-6, rtol=0)


def test_training_mode_uses_hugging_face_attention(tiny):
    model, _ = tiny
    ids = torch.tensor([[1, model.source_prefix_id, 7, 2, 1, model.cand1_prefix_id, 8, 2, 1,
                         model.cand2_prefix_id, 9, 2]])
    train = prm.PairRM(model.config)
    train.load_state_dict(model.state_dict())
    train.train()
    torch.manual_seed(0)
    a = train(input_ids=ids).logits
    torch.manual_seed(0)
    b = train.pair_logits(ids, torch.ones_like(ids), train.marker_positions(ids), attn_impl="hf")
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same dropout draws: the same (HF) path


def test_backward_through_the_lean_path_after_ranking(tiny, monkeypatch):
    """Ranking runs under inference_mode and fills deberta's index caches; the cached tensors must
    still serve a later autograd use of pair_logits(attn_impl="torch") (an inference tensor there
    raised "Inference tensors cannot be saved for backward")."""
    monkeypatch.setattr(deberta, "_INDEX_CACHE", {})
    monkeypatch.setattr(deberta, "_INDEX_1D_CACHE", {})
    model, tok = tiny
    mine = prm.PairRM(model.config).eval()
    mine.load_state_dict(model.state_dict())
    prm.PairRMRanker(mine, tok, progress=False, attn_impl="torch").rank(["hello there"], [["a b", "c d e"]])
    with torch.inference_mode():
        deberta._bucket_index_1d(12, 256, 512, torch.device("cpu"))
    assert deberta._INDEX_CACHE and deberta._INDEX_1D_CACHE
    assert not any(t.is_inference() for t in (*deberta._INDEX_CACHE.values(), *deberta._INDEX_1D_CACHE.values()))
    ids = torch.tensor([[1, mine.source_prefix_id, 7, 2, 1, mine.cand1_prefix_id, 8, 2, 1, mine.cand2_prefix_id, 9, 2]])
    pos = mine.marker_positions(ids)
    grads = {}
    for impl in ("torch", "hf"):
        mine.zero_grad()
        (0.7 * mine.pair_logits(ids, torch.ones_like(ids), pos, attn_impl=impl)).sum().backward()
        grads[impl] = mine.head_layer[1].weight.grad.clone()
    assert grads["torch"].abs().max() > 0
    torch.testing.assert_close(grads["torch"], grads["hf"], atol=1e-5, rtol=1e-4)


def test_marker_strings_in_text(tiny):
    model, tok = tiny
    ranker = prm.PairRMRanker(model, tok, progress=False)
    good = prompts_and_candidates(21, 2, 3)
    bad_p = "Explain <|source|> and <|candidate1|>[SEP]<|candidate2|> please <|candidate|>"
    bad_c = ["<|candidate|> hi <|candidate1|>", "[SEP]", "<|source|><|source|>"]
    p = [good[0][0], bad_p, good[0][1]]
    c = [good[1][0], bad_c, good[1][1]]
    res = ranker.rank(p, c)
    alone = ranker.rank(*good)
    torch.testing.assert_close(res.cmp[[0, 2]], alone.cmp, atol=ATOL, rtol=0)
    # the neutralised row is what the user text reads like with the markers broken
    manual = ranker.rank([prm.neutralise_markers(bad_p)], [[prm.neutralise_markers(x) for x in bad_c]])
    torch.testing.assert_close(res.cmp[1], manual.cmp[0], atol=ATOL, rtol=0)
    for e in ranker.builder.encode([bad_p], [bad_c]):
        for piece in (e.source, *e.candidates):
            assert sum(int(t) in ranker.builder.ids.values() for t in piece) == 1
    assert prm.neutralise_markers("no markers [SEP] here") == "no markers [SEP] here"


def test_marker_forms_the_normaliser_maps_onto_markers(tiny):
    """The tokenizer's NFKC normaliser reads full-width "＜｜candidate2｜＞" as the marker token: such
    text is neutralised exactly like the ASCII marker (same token ids), in rank and compare."""
    model, tok = tiny
    ranker = prm.PairRMRanker(model, tok, progress=False)
    wide = {"<": "\uff1c", "|": "\uff5c", ">": "\uff1e"}

    def widen(text, chars="<|>"):
        return "".join(wide.get(ch, ch) if ch in chars else ch for ch in text)
    ascii_p = "Explain <|source|> and <|candidate1|>x"
    ascii_c = ["see <|candidate2|> here", "b <|candidate|> c <|source|>"]
    wide_p = widen(ascii_p)
    wide_c = [widen(ascii_c[0]), widen(ascii_c[1], "<>")]  # full-width brackets around ASCII bars
    assert not any(m in x for m in prm.MARKERS for x in (wide_p, *wide_c))  # invisible to a raw-text search
    e_wide = ranker.builder.encode([wide_p], [wide_c])[0]
    e_ascii = ranker.builder.encode([ascii_p], [ascii_c])[0]
    for w, a in zip((e_wide.source, *e_wide.candidates), (e_ascii.source, *e_ascii.candidates)):
        assert w.tolist() == a.tolist()
        assert sum(int(t) in ranker.builder.ids.values() for t in w) == 1
    torch.testing.assert_close(ranker.rank([wide_p], [wide_c]).cmp, ranker.rank([ascii_p], [ascii_c]).cmp,
                               atol=0, rtol=0)
    got = ranker.compare([wide_p, "q"], [wide_c[0], "a"], ["b", wide_c[1]], return_logits=True)
    want = ranker.compare([ascii_p, "q"], [ascii_c[0], "a"], ["b", ascii_c[1]], return_logits=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_and_very_long_texts(tiny):
    ranker = prm.PairRMRanker(*tiny, progress=False)
    long = texts(31, 1, 3000, 3000)[0]
    res = ranker.rank(["", long], [["", "x", long], [long, "", "short answer"]])
    assert torch.isfinite(res.cmp).all()
    enc = ranker.builder.encode([long], [[long, ""]])[0]
    assert len(enc.source) == prm.SOURCE_MAX_LENGTH
    assert len(enc.candidates[0]) == prm.CANDIDATE_MAX_LENGTH and len(enc.candidates[1]) == 3


@pytest.mark.parametrize("mode", prm.COMPARE_MODES)
def test_compare_matches_llm_blender(tiny, blender, mode):
    p, c = prompts_and_candidates(41, 4, 2)
    a, b = [x[0] for x in c], [x[1] for x in c]
    ours = prm.PairRMRanker(*tiny, progress=False).compare(p, a, b, mode=mode, return_logits=True)
    theirs = torch.from_numpy(np.asarray(blender.compare(p, a, b, mode=mode, return_logits=True, batch_size=1)))
    if mode == "[B,A]":
        theirs = -theirs  # LLM-Blender returns M[B, A] there; positive means "A better" in ours
    torch.testing.assert_close(ours, theirs.float(), atol=ATOL, rtol=0)
    assert prm.PairRMRanker(*tiny, progress=False).compare(p, a, b, mode=mode).dtype == torch.bool


@needs_llm_blender
def test_benchmark_gives_llm_blender_its_own_weights(tiny):
    """bench_pairrm's LLM-Blender provider runs fp16 on CUDA: its .half() must not round the
    weights that sppo_fast's providers then use (it shared the backbone module)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_pairrm
    finally:
        sys.path.pop(0)
    model, tok = tiny
    mine = prm.PairRM(model.config).eval()
    mine.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    blender = bench_pairrm.llm_blender_provider(mine, tok, "cpu", fp16=True)
    assert next(blender.ranker.parameters()).dtype == torch.float16
    for k, v in mine.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_rank_dataset_resumes_and_writes_atomically(tiny, tmp_path, monkeypatch):
    import datasets

    p, c = prompts_and_candidates(51, 7, 3)
    ds = datasets.Dataset.from_dict({"prompt": p, "candidates": c})
    out = tmp_path / "ranked.parquet"
    ranker = prm.PairRMRanker(*tiny, progress=False)
    calls = []
    real_rank = ranker.rank

    def flaky(prompts, cands, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while ranking the second shard
        return real_rank(prompts, cands, **kw)

    monkeypatch.setattr(ranker, "rank", flaky)
    with pytest.raises(KeyboardInterrupt):
        ranker.rank_dataset(ds, out, shard_size=3)
    assert not out.exists()
    assert sorted(x.name for x in (tmp_path / "ranked.parquet.parts").iterdir()) == ["shard-000000.parquet"]
    ranker.rank_dataset(ds, out, shard_size=3)
    assert calls == [3, 3, 3, 1]  # the finished shard was not redone
    assert not (tmp_path / "ranked.parquet.parts").exists()
    got = datasets.Dataset.from_parquet(str(out))
    want = real_rank(p, c)
    assert got["prompt"] == p
    np.testing.assert_allclose(np.array(got["cmp"]), want.cmp.numpy(), atol=ATOL)
    np.testing.assert_allclose(got["chosen_probs_win"], want.chosen_probs_win.numpy(), atol=1e-5)
    for row, w, l, cs in zip(got, want.chosen.tolist(), want.rejected.tolist(), c):
        assert row["chosen"][1]["content"] == cs[row["chosen_index"]]
        assert row["rejected"][0] == {"role": "user", "content": row["prompt"]}
        # each record's fields are the reference aggregation of its own (stored) matrix
        agg = R.pairrm_aggregate(torch.tensor([row["cmp"]], dtype=torch.float32))
        w, l = int(agg.chosen[0]), int(agg.rejected[0])
        assert (row["chosen_index"], row["rejected_index"], row["tied"]) == (w, l, bool(agg.tied[0]))
        assert row["rejected"][1]["content"] == cs[l]
        assert row["chosen_probs"] == pytest.approx(agg.probs[0, w, l].item(), rel=0, abs=1e-9)
        assert row["chosen_probs_win"] == pytest.approx(agg.win_rates[0, w].item(), rel=0, abs=1e-9)
        assert row["chosen_probs_lose"] == pytest.approx(agg.win_rates[0, l].item(), rel=0, abs=1e-9)
        np.testing.assert_allclose(row["win_rates"], agg.win_rates[0].numpy(), rtol=0, atol=1e-9)
    assert {"prompt", "chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose",
            "candidates", "scores", "cmp", "tied"} <= set(got.column_names)
    # a finished output is not recomputed; parts written for other inputs are refused
    assert ranker.rank_dataset(ds, out) == out
    ranker.rank_dataset(ds.select(range(3)), tmp_path / "b.parquet", shard_size=3)
    (tmp_path / "c.parquet.parts").mkdir()
    (tmp_path / "b.parquet").rename(tmp_path / "c.parquet.parts" / "shard-000000.parquet")
    other = datasets.Dataset.from_dict({"prompt": p[3:6], "candidates": c[3:6]})
    with pytest.raises(ValueError, match="different prompts"):
        ranker.rank_dataset(other, tmp_path / "c.parquet", shard_size=3)
    # other settings never mix with finished work
    with pytest.raises(ValueError, match="other settings"):
        ranker.rank_dataset(ds, out, mode="direct")
    ranker.rank_dataset(ds.select(range(3)), tmp_path / "d.parquet", shard_size=3, mode="direct")
    (tmp_path / "e.parquet.parts").mkdir()
    (tmp_path / "d.parquet").rename(tmp_path / "e.parquet.parts" / "shard-000000.parquet")
    with pytest.raises(ValueError, match="settings"):
        ranker.rank_dataset(ds.select(range(3)), tmp_path / "e.parquet", shard_size=3)
    # an empty dataset gives an empty file with the same columns
    empty = ranker.rank_dataset(ds.select([]), tmp_path / "empty.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(empty).num_rows == 0 and pq.read_schema(empty).names == got.column_names
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_rank_dataset_progress_moves_every_step(tiny, tmp_path, monkeypatch):
    """The bar moves after every prompts_per_step prompts, not once per shard; same numbers."""
    import pyarrow.parquet as pq

    p, c = prompts_and_candidates(54, 7, 2)
    rows = [{"prompt": x, "candidates": y} for x, y in zip(p, c)]
    ranker = prm.PairRMRanker(*tiny, progress=False, prompts_per_step=2)
    want = ranker.rank(p, c).records(p, c)  # (pair_matrix takes the same steps of 2 prompts)
    steps = []

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            steps.append(n)
    real = ranker._progress  # (pair_matrix's own bar, disabled inside rank_dataset, stays real)
    monkeypatch.setattr(ranker, "_progress",
                        lambda total, desc: Bar() if desc == "PairRM ranking" else real(total, desc))
    stepped = ranker.rank_dataset(rows, tmp_path / "stepped.parquet", shard_size=6)
    assert steps == [2, 2, 2, 1]
    assert pq.read_table(stepped).to_pylist() == want


def test_rank_dataset_refuses_an_output_of_other_inputs(tiny, tmp_path):
    """A finished output is reused only for the same rows (however they are sharded); another dataset
    ranked into the same path is refused, naming the path, not answered with the old rows."""
    import datasets
    import pyarrow.parquet as pq

    ranker = prm.PairRMRanker(*tiny, progress=False)
    p, c = prompts_and_candidates(52, 3, 2)
    ds = datasets.Dataset.from_dict({"prompt": p, "candidates": c})
    out = tmp_path / "ranked.parquet"
    ranker.rank_dataset(ds, out, shard_size=2)
    want = pq.read_table(out).to_pylist()
    assert ranker.rank_dataset(ds, out, shard_size=1) == out  # same rows, other sharding: reused
    assert pq.read_table(out).to_pylist() == want
    edited = [list(x) for x in c]
    edited[1][0] += " !"
    others = {"another dataset": datasets.Dataset.from_dict({"prompt": ["other", "prompts"], "candidates": c[:2]}),
              "one candidate edited": datasets.Dataset.from_dict({"prompt": p, "candidates": edited}),
              "a row more": datasets.Dataset.from_dict({"prompt": p + p[:1], "candidates": c + c[:1]})}
    for why, other in others.items():
        with pytest.raises(ValueError, match=f"{out}.*another dataset"):
            ranker.rank_dataset(other, out)
    renamed = datasets.Dataset.from_dict({"question": p, "candidates": c})
    with pytest.raises(ValueError, match="prompt_column"):
        ranker.rank_dataset(renamed, out, prompt_column="question")
    assert pq.read_table(out).to_pylist() == want


def test_rank_dataset_refuses_an_output_of_other_weights_or_tokenizer(tiny, tmp_path):
    """One weight in the middle of a tensor moved by one float32 ulp (the parameter's sum does not
    see it), or one token added to the tokenizer: the finished output is refused, not reused."""
    import copy

    import datasets

    model, tok = tiny
    mine = prm.PairRM(model.config).eval()
    mine.load_state_dict(model.state_dict())
    ranker = prm.PairRMRanker(mine, tok, progress=False)
    p, c = prompts_and_candidates(53, 2, 2)
    ds = datasets.Dataset.from_dict({"prompt": p, "candidates": c})
    out = tmp_path / "ranked.parquet"
    ranker.rank_dataset(ds, out)
    w = mine.pretrained_model.embeddings.word_embeddings.weight.view(-1)
    mid = len(w) // 2 + int(w[len(w) // 2:].abs().argmin())  # a small weight: its ulp is below the sum's
    old = w[mid].clone()
    with torch.no_grad():
        w[mid] = torch.nextafter(old, torch.tensor(1.0))
    assert w[mid] != old
    with pytest.raises(ValueError, match="other settings or another model"):
        ranker.rank_dataset(ds, out)  # the same ranker: its cached weight digest sees the change
    with pytest.raises(ValueError, match="other settings or another model"):
        prm.PairRMRanker(mine, tok, progress=False).rank_dataset(ds, out)
    with torch.no_grad():
        w[mid] = old
    assert ranker.rank_dataset(ds, out) == out
    more = copy.deepcopy(tok)
    more.add_tokens(["zebra-crossing"])
    with pytest.raises(ValueError, match="other settings or another model"):
        prm.PairRMRanker(mine, more, progress=False).rank_dataset(ds, out)


def test_save_and_load_both_checkpoint_layouts(tiny, tmp_path):
    model, tok = tiny
    p, c = prompts_and_candidates(61, 2, 3)
    want = prm.PairRMRanker(model, tok, progress=False).pair_matrix(p, c)
    # the Hugging Face port: save_pretrained folder with the tokenizer
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    got = prm.PairRMRanker.from_pretrained(str(tmp_path / "hf"), progress=False).pair_matrix(p, c)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # LLM-Blender's original: RankerConfig json + state dict; backbone config and marker-less tokenizer
    from sppo_fast.tiny import tiny_tokenizer

    bb = tmp_path / "backbone"
    tiny_tokenizer(seed=0).save_pretrained(bb)
    cfg = model.config.to_dict()
    from transformers import DebertaV2Config

    DebertaV2Config(**{k: v for k, v in cfg.items() if k in prm.DEBERTA_V3_LARGE}).save_pretrained(bb)
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"ranker_type": "pairranker", "model_type": "deberta",
                                                  "model_name": str(bb), "n_tasks": 1, "drop_out": 0.05}))
    torch.save(model.state_dict(), orig / "pytorch_model.bin")
    got = prm.PairRMRanker.from_pretrained(str(orig), progress=False).pair_matrix(p, c)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bad_inputs_have_clear_errors(tiny, tmp_path):
    model, tok = tiny
    ranker = prm.PairRMRanker(model, tok, progress=False)
    with pytest.raises(ValueError, match="same number of candidates"):
        ranker.rank(["a", "b"], [["x", "y"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="K >= 2"):
        ranker.rank(["a"], [["x"]])
    with pytest.raises(TypeError, match="list of K candidate"):
        ranker.rank(["a"], ["xy"])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        ranker.rank(["a", "b"], [["x", "y"]])
    with pytest.raises(TypeError, match="must be str"):
        ranker.rank(["a"], [["x", None]])
    # numpy arrays are lists of str; a dict, an int or a generator is not; a bad text is named by its row
    assert ranker.rank(np.array(["a", "b"]), np.array([["x", "y"], ["z", "w"]])).cmp.shape == (2, 2, 2)
    with pytest.raises(TypeError, match="candidates\\[0\\] must be a list of str, got dict"):
        ranker.rank(["a"], [{"x": 1, "y": 2}])
    with pytest.raises(TypeError, match="candidates must be a list of candidate lists .* got dict"):
        ranker.rank(["a"], {"a": ["x", "y"]})
    with pytest.raises(TypeError, match="candidates\\[0\\] must be a list of str, got int"):
        ranker.rank(["a"], [5])
    with pytest.raises(TypeError, match="prompts must be a list of str, got generator"):
        ranker.rank((p for p in ["a"]), [["x", "y"]])
    with pytest.raises(TypeError, match="candidates\\[1\\]\\[1\\] is float; PairRM texts must be str"):
        ranker.rank(["a", "b"], [["x", "y"], ["z", float("nan")]])
    with pytest.raises(ValueError, match="prompts\\[1\\] cannot be tokenized: surrogates not allowed .* character 1"):
        ranker.rank(["a", "b\ud800c"], [["x", "y"], ["z", "w"]])
    stepped = prm.PairRMRanker(model, tok, progress=False, prompts_per_step=1)  # named from the caller's start
    with pytest.raises(ValueError, match="candidates\\[2\\]\\[1\\] cannot be tokenized"):
        stepped.rank(["a", "b", "c"], [["x", "y"], ["z", "w"], ["u", "v\udfff"]])
    with pytest.raises(ValueError, match="candidates_b\\[0\\] cannot be tokenized"):
        ranker.compare(["a"], ["x"], ["\ud800"])
    rows = [{"prompt": "a", "candidates": ["x", "y"]}] * 3 + [{"prompt": "b", "candidates": ["x", None]}]
    with pytest.raises(TypeError, match="dataset rows 2..3 .*: candidates\\[1\\]\\[1\\] is NoneType"):
        ranker.rank_dataset(rows, tmp_path / "bad.parquet", shard_size=2)
    with pytest.raises(TypeError, match="dataset rows 0..0 .*: candidates\\[0\\] is a str"):
        ranker.rank_dataset([{"prompt": "a", "candidates": "xy"}], tmp_path / "bad2.parquet")
    with pytest.raises(ValueError, match="attn_impl"):
        prm.PairRMRanker(model, tok, attn_impl="flash")
    with pytest.raises(ValueError, match="mode"):
        ranker.compare(["a"], ["x"], ["y"], mode="A>B")
    # compare: a str is not a list of prompts (it would be read as one prompt per character)
    with pytest.raises(TypeError, match="prompts is a str"):
        ranker.compare("ab", ["x", "y"], ["z", "w"])
    with pytest.raises(TypeError, match="candidates_b is a str"):
        ranker.compare(["a", "b"], ["x", "y"], "zw")
    with pytest.raises(TypeError, match="candidates_a\\[1\\] is NoneType; PairRM texts must be str"):
        ranker.compare(["a", "b"], ["x", None], ["z", "w"])
    with pytest.raises(TypeError, match="prompts must be a list of str, got dict"):
        ranker.compare({"a": 1}, ["x"], ["z"])
    from sppo_fast.tiny import tiny_tokenizer

    with pytest.raises(ValueError, match="marker tokens"):
        prm.PairInputBuilder(tiny_tokenizer(seed=0))
    with pytest.raises(ValueError, match="exactly one <\\|candidate1\\|>"):
        model(input_ids=torch.tensor([[1, model.source_prefix_id, 2]]))
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a"]})
    with pytest.raises(ValueError, match="no column 'responses'"):
        ranker.rank_dataset(ds, tmp_path / "x.parquet", candidates_column="responses")
    grouped = prm.PairRMRanker(model, tok, progress=False, truncation_group=4)
    assert grouped.prompts_per_step == 64 and prm.PairRMRanker(model, tok, truncation_group=5).prompts_per_step == 65
    with pytest.raises(ValueError, match="multiple of truncation_group"):
        grouped.rank_dataset(ds, tmp_path / "x.parquet", shard_size=6)
    assert not (tmp_path / "x.parquet").exists()


# beyond the eager forward's own error under the same autocast: the pair logits are ~-0.57 +- 0.07
# and the scores ~+-0.05 (a 16-bit tolerance of 0.1 would hide a reversed ranking); measured with
# CPU autocast, the lean path's excess over the eager one was 2e-5 (fp16) and 2e-3 (bf16)
CUDA_ATOL = {None: ATOL, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.gpu
def test_cuda_autocast_matches_cpu(tiny):
    """The CUDA ranker (default attention: Triton) in float32 and under fp16 / bf16 autocast against
    float64 truth (the same weights in float64 on the CPU): pair logits and scores no less accurate
    than Hugging Face's eager forward (``attn_impl="hf"``) under the same autocast, plus a small
    atol; chosen and rejected as in the truth wherever the truth's choice is clearer than that."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = tiny
    B, K = 4, 5
    p, c = prompts_and_candidates(71, B, K, lo=50, hi=300)
    m64 = prm.PairRM(model.config).eval()
    m64.load_state_dict(model.state_dict())
    truth = prm.PairRMRanker(m64.double(), tok, progress=False).pair_matrix(p, c).double()
    agg = R.pairrm_aggregate(truth)
    off = ~torch.eye(K, dtype=torch.bool)
    gpu_model = prm.PairRM(model.config).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    for dtype, atol in CUDA_ATOL.items():
        ranker = prm.PairRMRanker(gpu_model, tok, progress=False, autocast_dtype=dtype)
        eager = prm.PairRMRanker(gpu_model, tok, progress=False, autocast_dtype=dtype, attn_impl="hf")
        got, same = ranker.rank(p, c), eager.rank(p, c)
        what = f"{dtype or torch.float32} {ranker.attn_impl}"
        assert_as_accurate(got.cmp[:, off], same.cmp[:, off], truth[:, off], atol=atol, what=f"logits {what}")
        assert_as_accurate(got.scores, same.scores, agg.scores, atol=atol, what=f"scores {what}")
        # selection: where the truth's best (worst) leads by more than twice the scores' bound
        bound = max_err(same.scores, agg.scores) + atol
        s = agg.scores.sort(-1).values
        top, bottom = s[:, -1] - s[:, -2] > 2 * bound, s[:, 1] - s[:, 0] > 2 * bound
        if dtype is None:
            assert top.all() and bottom.all(), (what, s)  # float32: every choice is clear
        assert torch.equal(got.chosen[top], agg.chosen[top]), (what, got.scores, agg.scores)
        assert torch.equal(got.rejected[bottom], agg.rejected[bottom]), (what, got.scores, agg.scores)


def test_long_texts_raise_no_tokenizer_length_warning():
    """Texts longer than the tokenizer's model_max_length are truncated by the builder itself, so
    transformers' "Token indices sequence length is longer than ..." warning (which says they
    would cause indexing errors) is not shown; the tokenizer itself would show it."""
    import logging

    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())
    _, tok = prm.tiny_pairrm(seed=0)
    tok.model_max_length = 32
    tok.deprecation_warnings.clear()  # the warning is shown once per tokenizer
    long = texts(7, 3, 300, 400)
    keep, log = Keep(), logging.getLogger("transformers")
    log.addHandler(keep)
    try:
        enc = prm.PairInputBuilder(tok).encode([long[0]], [long])
        assert len(enc[0].source) <= prm.SOURCE_MAX_LENGTH
        assert not [m for m in said if "Token indices sequence length" in m], said
        tok(long[:1])  # the control: the tokenizer on its own warns
        assert [m for m in said if "Token indices sequence length" in m], said
    finally:
        log.removeHandler(keep)


def test_rank_dataset_failing_on_its_first_shard_leaves_no_folder(tiny, tmp_path):
    ranker = prm.PairRMRanker(*tiny, progress=False)
    with pytest.raises(TypeError, match=r"dataset rows 0..0 .*candidates\[0\] must be a list of str"):
        ranker.rank_dataset([{"prompt": "p", "candidates": None}], tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []  # (an empty out.parquet.parts/ was left behind)
