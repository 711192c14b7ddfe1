"""pairrm_aggregate: the official formulas bit for bit, invariants, ties, and the cpp backend."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sppo_fast
from sppo_fast import reference as R


def official_numpy(cmp: np.ndarray):
    """The official NumPy pipeline, transcribed: LLM-Blender get_scores_from_cmps (float32 scores),
    SPPO compute_prob.py (P[i][j] = 1 / (1 + exp(s_j - s_i)), here in float64) and prepare_score
    (row sums / K, argmax / argmin)."""
    bz, c, _ = cmp.shape
    scores = np.zeros((bz, c), dtype=np.float32)
    for i in range(bz):
        scores[i] = (cmp[i] - cmp[i].T).mean(axis=-1)
    probs = np.zeros((bz, c, c))
    for b in range(bz):
        for i in range(c):
            for j in range(c):
                probs[b][i][j] = 1 / (1 + np.exp(np.float64(scores[b][j]) - np.float64(scores[b][i])))
    win = np.stack([np.stack(p.tolist()).sum(axis=1) for p in probs]) / c
    chosen, rejected = scores.argmax(-1), scores.argmin(-1)
    return scores, probs, win, chosen, rejected


def _cmp(B, K, gen, dtype=torch.float64, scale=4.0):
    m = torch.randn(B, K, K, generator=gen, dtype=torch.float64) * scale
    m[:, torch.arange(K), torch.arange(K)] = 0
    return m.to(dtype)


@pytest.mark.parametrize("K", [2, 3, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_official_bit_for_bit(K, dtype, backend, gen):
    cmp = _cmp(31, K, gen, dtype)
    s, p, w, c, r = official_numpy(cmp.numpy())
    res = sppo_fast.pairrm_aggregate(cmp, backend=backend)
    assert res.scores.dtype == torch.float32 and res.probs.dtype == torch.float64
    # Scores and the selection are bit for bit in every backend. The probabilities go through exp:
    # the reference uses torch's exp, which agrees with NumPy's; the C++ backend uses the C
    # library's exp, which can differ from it in the last bit.
    assert np.array_equal(res.scores.numpy(), s)
    assert np.array_equal(res.chosen.numpy(), c) and np.array_equal(res.rejected.numpy(), r)
    assert not res.tied.any()
    rows = np.arange(31)
    got = (res.probs, res.win_rates, res.chosen_probs, res.chosen_probs_win, res.chosen_probs_lose)
    want = (p, w, p[rows, c, r], w[rows, c], w[rows, r])
    for x, y in zip(got, want):
        if backend == "reference":
            assert np.array_equal(x.numpy(), y)
        else:
            np.testing.assert_allclose(x.numpy(), y, rtol=5e-16, atol=0)


@pytest.mark.parametrize("mode", sppo_fast.PAIRWISE_MODES)
@pytest.mark.parametrize("K", [2, 5, 13, 64, 130])
def test_cpp_matches_reference(mode, K, gen):
    cmp = _cmp(17, K, gen, torch.float32)
    a = sppo_fast.pairrm_aggregate(cmp, mode, backend="cpp")
    b = sppo_fast.pairrm_aggregate(cmp, mode, backend="reference")
    for name, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype, name
        if name in ("probs", "win_rates") or name.startswith("chosen_probs"):
            assert torch.allclose(x, y, rtol=1e-14, atol=0), name  # exp may differ in the last bit
        else:
            assert torch.equal(x, y), name


def test_direct_mode_formula(gen):
    cmp = _cmp(4, 5, gen)
    res = sppo_fast.pairrm_aggregate(cmp, "direct")
    expect = torch.sigmoid((cmp - cmp.transpose(1, 2)) / 2)
    torch.testing.assert_close(res.probs, expect, rtol=1e-15, atol=1e-15)
    # selection still follows the official scores
    off = sppo_fast.pairrm_aggregate(cmp, "official")
    assert torch.equal(res.chosen, off.chosen) and torch.equal(res.scores, off.scores)


def test_direct_mode_ignores_other_candidates(gen):
    """Changing how candidate 4 compares with candidate 0 leaves P[0, 1] unchanged in direct mode
    only (in the official mode it moves score 0 and with it every probability of candidate 0)."""
    cmp = _cmp(1, 5, gen)
    other = cmp.clone()
    other[0, 4, 0] += 7.0
    for mode, same in (("direct", True), ("official", False)):
        p1 = sppo_fast.pairrm_aggregate(cmp, mode).probs[0, 0, 1]
        p2 = sppo_fast.pairrm_aggregate(other, mode).probs[0, 0, 1]
        assert (p1 == p2).item() is same, mode


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ties_and_first_index(backend):
    cmp = torch.zeros(3, 4, 4)
    cmp[1, 2, 0] = 1.0  # candidate 2 beats 0 in one order only
    cmp[2, 0, 1] = cmp[2, 1, 0] = 2.0  # symmetric: all scores 0 again
    res = sppo_fast.pairrm_aggregate(cmp, backend=backend)
    assert res.tied.tolist() == [True, False, True]
    assert res.chosen[0].item() == res.rejected[0].item() == 0  # first index on ties
    assert res.chosen[1].item() == 2 and res.rejected[1].item() == 0
    assert (res.probs[0] == 0.5).all()


def test_diagonal_ignored(gen):
    cmp = _cmp(3, 6, gen)
    noisy = cmp.clone()
    noisy[:, torch.arange(6), torch.arange(6)] = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 100
    for be in ("reference", "cpp"):
        a, b = sppo_fast.pairrm_aggregate(cmp, backend=be), sppo_fast.pairrm_aggregate(noisy, backend=be)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_strided_and_half_input(gen):
    base = _cmp(5, 6, gen, torch.float32)
    t = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major strides
    assert not t.is_contiguous()
    a, b = sppo_fast.pairrm_aggregate(t, backend="cpp"), sppo_fast.pairrm_aggregate(base, backend="cpp")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    h = base.half()
    a, b = sppo_fast.pairrm_aggregate(h, backend="cpp"), sppo_fast.pairrm_aggregate(h, backend="reference")
    assert torch.equal(a.scores, b.scores) and torch.allclose(a.probs, b.probs, rtol=4e-16, atol=0)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), K=st.integers(2, 64), scale=st.floats(1e-3, 50.0),
       seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(sppo_fast.PAIRWISE_MODES),
       backend=st.sampled_from(["reference", "cpp"]))
def test_invariants(B, K, scale, seed, mode, backend):
    cmp = _cmp(B, K, torch.Generator().manual_seed(seed), scale=scale)
    res = sppo_fast.pairrm_aggregate(cmp, mode, backend=backend)
    P = res.probs
    eye = torch.eye(K, dtype=torch.bool)
    assert torch.allclose(P + P.transpose(1, 2), torch.ones_like(P), rtol=0, atol=1e-12)
    assert (P[:, eye] == 0.5).all()
    assert ((res.win_rates >= 0) & (res.win_rates <= 1)).all()
    assert torch.allclose(res.win_rates.mean(-1), torch.full((B,), 0.5, dtype=torch.float64), atol=1e-12)
    rows = torch.arange(B)
    assert (res.scores[rows, res.chosen] == res.scores.amax(-1)).all()
    assert (res.scores[rows, res.rejected] == res.scores.amin(-1)).all()
    assert torch.equal(res.tied, res.chosen == res.rejected)
    if mode == "official":  # in direct mode the best-scored candidate can still lose its pair to the worst
        assert (res.chosen_probs[~res.tied] >= 0.5).all()


def test_empty_batch():
    res = sppo_fast.pairrm_aggregate(torch.zeros(0, 5, 5), backend="cpp")
    assert res.scores.shape == (0, 5) and res.probs.shape == (0, 5, 5)


def test_numpy_order_sum_matches_numpy(gen):
    for n in (1, 3, 7, 8, 9, 16, 23, 128, 129, 300):
        x = torch.randn(4, n, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, n, dtype=torch.float64)
        assert np.array_equal(R.numpy_order_sum(x).numpy(), x.numpy().sum(axis=-1))
