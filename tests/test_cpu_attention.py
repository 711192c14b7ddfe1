"""The CPU DeBERTa attention kernel (``attn_impl="cpp"``, in ``sppo_fast._C``) against float64 truth.

Needs no Triton: these run wherever the extension builds. Truth: the formula evaluated densely in
float64 (``_data.dense_attention``), and Hugging Face's eager DeBERTa in float64 for whole forwards.
"""

import pytest
import torch
from conftest import assert_as_accurate

from sppo_fast import _native, deberta
from sppo_fast import pairrm as prm

from _data import ATTENTION_CONFIGS, attention_case, deberta_case, dense_attention


@pytest.fixture(scope="module")
def tiny():
    model, tok = prm.tiny_pairrm(seed=0)
    prm.redraw_weights_(model, seed=1)
    return model, tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["square", "subset", "padded", "huge", "uneven", "odd-head", "long"])
def test_cpu_kernel_against_dense_truth(isa, dtype, case):
    """The CPU kernel (``sppo_fast._C``, every instruction set): the same cases as the Triton
    kernel's, plus a head size that is not a whole number of vector lines and a longer sequence."""
    shapes = {"square": (2, 2, 70, 70, 32, 16), "subset": (3, 2, 3, 97, 32, 16),
              "padded": (3, 2, 81, 81, 32, 8), "huge": (1, 2, 40, 40, 32, 16),
              "uneven": (1, 3, 131, 131, 48, 64), "odd-head": (2, 2, 37, 37, 20, 8),
              "long": (1, 2, 333, 333, 64, 256)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = attention_case(
        *shapes, subset=case == "subset", padded=case == "padded", scale=300.0 if case == "huge" else 1.0)
    truth = dense_attention(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense_attention(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
    # q and k as the model makes them: [B, L, H, D] views (strided heads)
    q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    out = _native.deberta_attention(*(t.to(dtype) for t in (q, k, v, c2p, p2c)), idx, qpos, mask)
    if mask is not None:
        keep = mask.bool()[:, None, :, None].expand_as(truth)
        out, ref, truth = out[keep], ref[keep], truth[keep]
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_as_accurate(out, ref, truth, atol=atol, what=f"{case} {dtype}")
    assert truth.abs().max() > 0.1  # not vacuous


def test_cpu_kernel_masked_rows_and_relative_terms_alone(isa):
    """A batch row with every key masked gives zeros (never NaN); each relative term alone, and
    neither, match the truth."""
    q, k, v, c2p, p2c, idx, _, _ = attention_case(2, 2, 33, 33, 32, 16)
    mask = torch.ones(2, 33, dtype=torch.int8)
    mask[1] = 0
    out = _native.deberta_attention(q.float(), k.float(), v.float(), key_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    for terms in ((c2p, None), (None, p2c), (None, None)):
        truth = dense_attention(q, k, v, *terms, idx, None, None, torch.float64)
        out = _native.deberta_attention(q, k, v, *terms, idx if any(t is not None for t in terms) else None)
        torch.testing.assert_close(out, truth, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        _native.deberta_attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match=r"qpos: positions must lie in \[0, 33\)"):
        _native.deberta_attention(q[:, :, :2], k, v, c2p[:, :, :2], p2c, idx, torch.tensor([[0, 33], [1, 2]]))
    with pytest.raises(ValueError, match=r"rel_index: buckets must lie in \[0, 32\)"):
        _native.deberta_attention(q, k, v, c2p, p2c, idx + 32)
    # the Triton kernel takes column-major tables ([2S, L] transposed); this one reads rows only
    with pytest.raises(ValueError, match="c2p: the last dimension must be contiguous"):
        _native.deberta_attention(q, k, v, c2p.transpose(-1, -2).contiguous().transpose(-1, -2), p2c, idx)


def test_cpu_kernel_propagates_nan_and_zeroes_masked_rows(isa):
    """A query whose scores are all NaN gives NaN (the max skips NaN, so it looked fully masked);
    a NaN among finite scores gives NaN; a fully masked query gives zeros even where a padded
    key's value is inf."""
    q, k, v, c2p, p2c, idx, _, _ = attention_case(2, 2, 9, 9, 32, 8)
    q, k, v, c2p, p2c = (t.float() for t in (q, k, v, c2p, p2c))
    c2p[0, 1, 3] = float("nan")  # every score of query 3 (batch 0, head 1)
    q[1, 0, 5, 0] = float("nan")
    mask = torch.ones(2, 9, dtype=torch.int8)
    out = _native.deberta_attention(q, k, v, c2p, p2c, idx, key_mask=mask)
    assert torch.isnan(out[0, 1, 3]).all() and torch.isnan(out[1, 0, 5]).all()
    other = torch.ones(2, 2, 9, dtype=torch.bool)
    other[0, 1, 3] = other[1, 0, 5] = False
    assert torch.isfinite(out[other]).all()
    mask[1] = 0
    mask[0, -1] = 0
    v[:, :, -1] = float("inf")  # padded keys' values
    out = _native.deberta_attention(q, k, v, c2p, p2c, idx, key_mask=mask)
    assert (out[1] == 0).all(), "a fully masked query must give zeros"
    # (batch 0 is only partly masked: there 0 * inf is NaN, as in the formula and Hugging Face's)


def test_cpu_kernel_edges(isa):
    """One key; fewer queries than a register group; more threads than work; results do not
    depend on the number of threads."""
    for B, H, LQ, LK, D in ((1, 1, 1, 1, 16), (2, 3, 3, 5, 8), (1, 2, 2, 40, 65)):
        q, k, v, c2p, p2c, idx, _, _ = attention_case(B, H, LQ, LK, D, 4)
        truth = dense_attention(q, k, v, c2p, p2c, idx, None, None, torch.float64)
        torch.testing.assert_close(_native.deberta_attention(q, k, v, c2p, p2c, idx), truth, atol=1e-12, rtol=0)
    q, k, v, c2p, p2c, idx, qpos, mask = attention_case(3, 2, 50, 50, 32, 16, padded=True)
    args = (*(t.float() for t in (q, k, v, c2p, p2c)), idx, None, mask)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_native.deberta_attention(*args))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cpu_kernel_refuses_reads_outside_its_tables():
    q, k, v, c2p, p2c, idx, _, _ = attention_case(1, 2, 8, 8, 16, 4)
    with pytest.raises(ValueError, match="8 queries but there are 2 keys"):
        _native.deberta_attention(q, k[:, :, :2], v[:, :, :2], c2p, p2c[:, :, :2], idx[5:8])
    with pytest.raises(ValueError, match="rel_index: buckets must lie"):
        _native.deberta_attention(q, k, v, c2p, p2c, idx.long() + 2 ** 32)  # (would wrap in int32)


@pytest.mark.parametrize("config", list(ATTENTION_CONFIGS))
def test_backbone_with_cpu_attention(tiny, config):
    """Whole DeBERTa forwards with ``impl="cpp"`` against Hugging Face's in float64: padded
    batches, distances across the log-bucket boundary and past max_relative_positions."""
    lengths = (300, 150, 5) if config in ("pairrm", "16-buckets") else (90, 41)
    model, m64, ids, mask, pos = deberta_case(tiny, config, lengths)
    valid = mask.bool()
    with torch.no_grad():
        truth = m64.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state
        hf32 = model.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        fused = deberta.encode(model.pretrained_model, ids, mask, impl="cpp").double()
        pooled = deberta.encode(model.pretrained_model, ids, mask, pos, impl="cpp").double()
        fused64 = deberta.encode(m64.pretrained_model, ids, mask, impl="cpp")
    assert truth.std() > 0.5
    rows = torch.arange(len(lengths))[:, None]
    assert_as_accurate(fused[valid], hf32[valid], truth[valid], atol=2e-5, what=config)
    assert_as_accurate(pooled, hf32[rows, pos], truth[rows, pos], atol=2e-5, what=f"{config} pooled")
    # float64 end to end (HF computes the scale and log buckets in float32 even there)
    torch.testing.assert_close(fused64[valid], truth[valid], atol=1e-6, rtol=0)


def test_ranker_uses_the_cpu_kernel_by_default(tiny):
    model, tok = tiny
    p = ["a short question", "another prompt, a little longer than the first one"]
    c = [["yes", "no", "it depends on the weather"], ["first answer", "", "a third, longer answer here"]]
    cpu = prm.PairRMRanker(model, tok, progress=False)
    assert cpu.attn_impl == "cpp"  # the default on a CPU for a float32 model
    ref = prm.PairRMRanker(model, tok, progress=False, attn_impl="hf").pair_matrix(p, c)
    assert ref.abs().max() > 0.05  # O(1) weights: not vacuous
    torch.testing.assert_close(cpu.pair_matrix(p, c), ref, atol=2e-5, rtol=0)


def test_fused_attention_refuses_to_drop_gradients(tiny):
    model, _ = tiny
    ids = torch.tensor([[1, model.source_prefix_id, 7, 2, 1, model.cand1_prefix_id, 8, 2, 1,
                         model.cand2_prefix_id, 9, 2]])
    with pytest.raises(RuntimeError, match="inference only"):
        model.pair_logits(ids, torch.ones_like(ids), model.marker_positions(ids), attn_impl="cpp")
    with torch.no_grad():
        assert torch.isfinite(model.pair_logits(ids, torch.ones_like(ids), model.marker_positions(ids),
                                                attn_impl="cpp")).all()


def test_ranker_falls_back_from_a_build_without_the_kernel(tiny, monkeypatch):
    class OldBuild:  # an extension built before the kernel existed (an editable install not rebuilt)
        pass
    monkeypatch.setattr(_native, "_C", OldBuild())
    model, tok = tiny
    assert prm.PairRMRanker(model, tok, progress=False).attn_impl == "torch"
    import sppo_fast
    with pytest.raises(sppo_fast.BackendUnavailableError, match="needs a rebuild"):
        prm.PairRMRanker(model, tok, attn_impl="cpp")


def test_cpu_attention_refuses_what_it_cannot_run(tiny):
    import sppo_fast

    model, tok = tiny
    m = prm.PairRM(model.config).eval().to(torch.bfloat16)
    assert prm.PairRMRanker(m, tok, progress=False).attn_impl == "torch"  # auto falls back
    with pytest.raises(sppo_fast.BackendUnavailableError, match="attn_impl='cpp' runs float32 or float64"):
        prm.PairRMRanker(m, tok, attn_impl="cpp")
    with pytest.raises(sppo_fast.BackendUnavailableError, match="not under torch.bfloat16 autocast"):
        prm.PairRMRanker(model, tok, attn_impl="cpp", autocast_dtype=torch.bfloat16)
