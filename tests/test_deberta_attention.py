"""The fused DeBERTa attention kernel (``sppo_fast.kernels.deberta_attention``) against float64 truth.

On CUDA it runs on the GPU; elsewhere in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay small. Truth: Hugging Face's eager DeBERTa in float64, or a dense float64 evaluation
of the same formula for the kernel on its own.
"""

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_as_accurate

from sppo_fast import deberta
from sppo_fast import pairrm as prm

from _data import ATTENTION_CONFIGS, attention_case as random_case, dense_attention as dense, deberta_case

pytest.importorskip("triton")
from sppo_fast.kernels.deberta_attention import deberta_attention  # noqa: E402


ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _assert_real_rows(out, ref, truth, mask, *, atol, what):
    """The kernel's output against float64 truth, no further off than the same-dtype reference plus
    ``atol``, on the rows of real queries only (padded ones are never read)."""
    out = out.cpu()
    if mask is not None:
        keep = mask.bool()[:, None, :, None].expand_as(truth)
        out, ref, truth = out[keep], ref[keep], truth[keep]
    assert_as_accurate(out, ref, truth, atol=atol, what=what)


@pytest.fixture(scope="module")
def tiny():
    model, tok = prm.tiny_pairrm(seed=0)
    prm.redraw_weights_(model, seed=1)
    return model, tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["square", "subset", "padded", "huge", "uneven"])
def test_kernel_against_dense_truth(dtype, case):
    shapes = {"square": (2, 2, 70, 70, 32, 16), "subset": (3, 2, 3, 97, 32, 16),
              "padded": (3, 2, 81, 81, 32, 8), "huge": (1, 2, 40, 40, 32, 16),
              "uneven": (1, 3, 131, 131, 48, 64)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(
        *shapes, subset=case == "subset", padded=case == "padded", scale=300.0 if case == "huge" else 1.0)
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
    dev = TRITON_DEVICE
    out = deberta_attention(*(t.to(dev, dtype) for t in (q, k, v, c2p, p2c)), idx.to(dev),
                            qpos.to(dev) if qpos is not None else None, mask.to(dev) if mask is not None else None)
    atol = ATOL[dtype]
    if case == "huge" and dtype != torch.float32:
        # scores ~1e3, where a 16-bit ulp is 0.5-4: the softmax is near one-hot and which input
        # rounding wins decides the output; the point here is that nothing overflows
        atol = 0.05
    elif case == "huge":
        # scores ~5e2, where a float32 ulp is 3e-5-6e-5: another summation order of q.k (the GPU's
        # FMA chain, against the CPU BLAS of the reference) moves a near-tie softmax by a few ulp of
        # the scores; an H100 gave 3.9e-5 against the reference's 4.1e-6 (a wrong bucket or a lost
        # term errs by O(1))
        atol = 1e-4
    _assert_real_rows(out, ref, truth, mask, atol=atol, what=f"{case} {dtype}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the interpreter does not autotune)")
@pytest.mark.parametrize("dtype,case", [(torch.bfloat16, "padded"), (torch.float32, "subset")])
def test_autotuned_launch_matches_float64_truth(dtype, case):
    """The opt-in autotuned launch (set_autotune(True)) is held to the same float64 truth as the fixed
    launch, with padding and with query subsets (one case each: every new case tunes all 8 configs)."""
    from sppo_fast.kernels import deberta_attention as kda

    shapes = {"subset": (3, 2, 3, 97, 32, 16), "padded": (3, 2, 81, 81, 32, 8)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(
        *shapes, subset=case == "subset", padded=case == "padded")
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
    args = ([t.to("cuda", dtype) for t in (q, k, v, c2p, p2c)] + [idx.cuda()]
            + [qpos.cuda() if qpos is not None else None, mask.cuda() if mask is not None else None])
    kda.set_autotune(True)
    try:
        out = deberta_attention(*args).cpu()
    finally:
        kda.set_autotune(False)
    _assert_real_rows(out, ref, truth, mask, atol=ATOL[dtype], what=f"autotuned {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["padded", "subset", "uneven"])
def test_column_major_tables(dtype, case):
    """The position tables as transposed views of [2S, L] tensors (TRANSPOSED_TABLES): the same
    function, held to the same float64 truth; the kernel reads them through their strides."""
    shapes = {"subset": (3, 2, 3, 97, 32, 16), "padded": (3, 2, 81, 81, 32, 8),
              "uneven": (1, 3, 131, 131, 48, 64)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(*shapes, subset=case == "subset", padded=case == "padded")
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
    dev = TRITON_DEVICE
    c_t, p_t = (t.to(dev, dtype).transpose(-1, -2).contiguous().transpose(-1, -2) for t in (c2p, p2c))
    assert c_t.stride(-2) == 1 and c_t.stride(-1) == c_t.shape[-2]  # column-major, as deberta.py makes them
    out = deberta_attention(q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), c_t, p_t, idx.to(dev),
                            qpos.to(dev) if qpos is not None else None, mask.to(dev) if mask is not None else None)
    _assert_real_rows(out, ref, truth, mask, atol=ATOL[dtype], what=f"column-major {case} {dtype}")


def test_backbone_with_column_major_tables(tiny):
    """A whole forward with sppo_fast.deberta building the tables as [2S, L] (set_transposed_tables)."""
    from sppo_fast.kernels import deberta_attention as kda

    kda.set_transposed_tables(True)
    try:
        test_backbone_with_fused_attention(tiny, "pairrm")
    finally:
        kda.set_transposed_tables(False)


def _tiles_by_bucket(idx, LQ, LK, qpos, dtype):
    """How many of the kernel's tiles (its launch for ``dtype``) take the uniform-tile shortcut, by
    the kernel's own rule (the padded, reversed table at the tile's two corner distances, with rows
    past LQ and masked query rows counted as the kernel counts them), and how many do not."""
    from sppo_fast.kernels.deberta_attention import LAUNCH, REL_PAD, _kernel_rel_table

    table, monotone, _, _ = _kernel_rel_table(idx)
    assert monotone  # DeBERTa's bucketing: the shortcut is on
    bm, bn = LAUNCH[dtype][:2]
    zero = LK - 1 + REL_PAD
    one = several = 0
    for b in range(1 if qpos is None else qpos.shape[0]):
        for m0 in range(0, LQ, bm):
            rows = torch.arange(m0, m0 + bm)
            if qpos is None:
                pos = rows
            else:  # (the kernel clamps positions into [0, LK); rows past LQ count as position 0)
                pos = torch.where(rows < LQ, qpos[b, rows.clamp(max=LQ - 1)].long(), 0).clamp(0, LK - 1)
            for n0 in range(0, LK, bn):
                same = table[n0 + bn - 1 - int(pos.min()) + zero] == table[n0 - int(pos.max()) + zero]
                one, several = one + int(same), several + int(not same)
    return one, several


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["square", "subset", "padded"])
def test_uniform_tiles_shortcut(dtype, case):
    """Far from the diagonal every distance falls in the last bucket, so the kernel reads one column of
    each table for the whole tile; held to float64 truth on lengths where both kinds of tile occur
    (few buckets, so the clamp starts at |i - j| ~ 16), with padded keys and query subsets."""
    shapes = {"square": (1, 2, 200, 200, 16, 4), "subset": (1, 2, 20, 190, 16, 4),
              "padded": (2, 1, 150, 150, 16, 4)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(*shapes, subset=case == "subset", padded=case == "padded",
                                                     seed=3)
    if qpos is not None:  # queries among the first 40 positions, in no order: far from the last keys
        qpos = torch.randperm(40, generator=torch.Generator().manual_seed(6))[None, :20].int()
    one, several = _tiles_by_bucket(idx, shapes[2], shapes[3], qpos, dtype)
    assert one > 0 and several > 0, (one, several)
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
    dev = TRITON_DEVICE
    out = deberta_attention(*(t.to(dev, dtype) for t in (q, k, v, c2p, p2c)), idx.to(dev),
                            qpos.to(dev) if qpos is not None else None, mask.to(dev) if mask is not None else None)
    _assert_real_rows(out, ref, truth, mask, atol=ATOL[dtype], what=f"uniform tiles {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["subset", "padded"])
def test_wide_table_offsets(monkeypatch, case, dtype):
    """Tables whose offsets within one (batch, head) could pass 2^31 (a [L, B, H, 2S] layout seen as
    [B, H, L, 2S] at large B H) take 64-bit offsets; 32-bit ones wrapped there. Such a table does not
    fit a test, so the threshold is lowered: the wrapper must choose the wide path exactly when a
    table's last offset reaches it (row-major tables and transposed views alike), and the wide path
    must agree with float64 truth."""
    from sppo_fast.kernels import deberta_attention as kda

    chosen = []
    launch = kda._launch
    monkeypatch.setattr(kda, "_launch", lambda *a: (chosen.append(a[-1]), launch(*a))[1])
    shapes = {"subset": (1, 2, 20, 190, 16, 4), "padded": (2, 1, 150, 150, 16, 4)}[case]
    B, H, LQ, LK, D, S = shapes
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(*shapes, subset=case == "subset", padded=case == "padded")
    dev = TRITON_DEVICE
    last = LK * 2 * S - 1  # the largest offset in one (batch, head) of the larger table, P2C [LK, 2S]
    for columns in (False, True):
        c, p = (t.to(dev, dtype) for t in (c2p, p2c))
        if columns:
            c, p = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (c, p))
        args = (q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), c, p, idx.to(dev),
                qpos.to(dev) if qpos is not None else None, mask.to(dev) if mask is not None else None)
        for threshold, wide in ((last + 1, False), (last, True)):
            monkeypatch.setattr(kda, "WIDE_OFFSETS", threshold)
            out = deberta_attention(*args)
            assert chosen[-1] is wide, (columns, threshold)
        truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
        ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
        _assert_real_rows(out, ref, truth, mask, atol=ATOL[dtype], what=f"wide offsets {case} {dtype} columns={columns}")


def test_launch_from_the_environment():
    """SPPO_FAST_ATTN_LAUNCH sets the 16-bit launch (for timing one without editing LAUNCH); a
    malformed one is refused at import, naming the format."""
    import os
    import subprocess
    import sys

    from sppo_fast.kernels.deberta_attention import parse_launch

    assert parse_launch("64x32w4") == (64, 32, 4) and parse_launch(" 64x64w4s1 ") == (64, 64, 4, 1)
    code = ("import torch; from sppo_fast.kernels import deberta_attention as k; "
            "print(k.LAUNCH[torch.bfloat16], k.LAUNCH[torch.float16], k.LAUNCH[torch.float32])")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPPO_FAST_ATTN_LAUNCH": "64x32w4s1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[0] == "(64, 32, 4, 1) (64, 32, 4, 1) (32, 16, 4)"
    env["SPPO_FAST_ATTN_LAUNCH"] = "64by32"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "BLOCK_MxBLOCK_NwWARPS" in r.stderr


def test_index_table_cache_sees_in_place_changes_and_inference_tensors():
    """The kernel's reversed, padded copy of rel_index is cached per tensor: an in-place change to the
    index must reach the kernel, and an index made under torch.inference_mode (no version counter)
    must work."""
    q, k, v, c2p, p2c, idx, _, _ = random_case(1, 2, 40, 40, 16, 4, seed=7)
    dev = TRITON_DEVICE
    args = [t.to(dev, torch.float32) for t in (q, k, v, c2p, p2c)]
    rel = idx.to(dev).clone()
    deberta_attention(*args, rel)
    rel.fill_(3)  # every distance in bucket 3, in place
    out = deberta_attention(*args, rel)
    truth = dense(q, k, v, c2p, p2c, torch.full_like(idx, 3), None, None, torch.float64)
    torch.testing.assert_close(out.cpu().double(), truth, atol=1e-5, rtol=0)
    with torch.inference_mode():
        rel_inf = idx.to(dev).clone()
        out = deberta_attention(*args, rel_inf)
    truth = dense(q, k, v, c2p, p2c, idx, None, None, torch.float64)
    torch.testing.assert_close(out.cpu().double(), truth, atol=1e-5, rtol=0)


def test_non_monotone_index_takes_the_general_path():
    """An index table that is not monotone (not DeBERTa's bucketing, but allowed) may have equal values
    at a tile's corners and others inside: the shortcut must not fire, and the result stays exact."""
    from sppo_fast.kernels.deberta_attention import _kernel_rel_table

    q, k, v, c2p, p2c, idx, _, _ = random_case(1, 2, 150, 150, 16, 4, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 8, idx.shape, generator=g, dtype=torch.int32)
    idx[:100] = 0  # long equal runs at both ends, different values between
    idx[-100:] = 0
    assert not _kernel_rel_table(idx.to(TRITON_DEVICE))[1]
    truth = dense(q, k, v, c2p, p2c, idx, None, None, torch.float64)
    dev = TRITON_DEVICE
    out = deberta_attention(*(t.to(dev, torch.float32) for t in (q, k, v, c2p, p2c)), idx.to(dev))
    torch.testing.assert_close(out.cpu().double(), truth, atol=1e-5, rtol=0)


def test_kernel_without_relative_terms_and_all_masked_keys():
    q, k, v, _, _, idx, _, _ = random_case(2, 2, 33, 33, 32, 16)
    mask = torch.ones(2, 33, dtype=torch.int8)
    mask[1] = 0  # a batch row with no real key: finite (zeros), never NaN
    dev = TRITON_DEVICE
    out = deberta_attention(*(t.to(dev, torch.float32) for t in (q, k, v)), key_mask=mask.to(dev)).cpu()
    truth = dense(q, k, v, None, None, idx, None, None, torch.float64)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[0].double(), truth[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subset,last_block", [(False, "partial"), (True, "partial"), (False, "full")])
def test_key_lengths_equal_the_right_padding_mask(dtype, subset, last_block):
    """``key_len`` (a right-padded batch, the ranker's: masked by a compare, in the key blocks past a
    row's end only) gives the key mask's result bit for bit, held to float64 truth too: lengths on a
    block's first and last key, one key, every key, past LK (counts as LK, also past 2^31) and none
    (zeros, finite); keys a whole number of blocks, or not."""
    from sppo_fast.kernels import deberta_attention as kda

    bn = kda._launch_config(dtype)[1]
    L = 2 * bn + (22 if last_block == "partial" else bn)  # ("partial": 150 keys in 64s, 54 in 16s)
    lengths = torch.tensor([L, bn, bn + 1, 1, 2 * bn - 1, L + 5, 0])
    B = len(lengths)
    q, k, v, c2p, p2c, idx, qpos, _ = random_case(B, 2, 5 if subset else L, L, 32, 16, subset=subset, seed=3)
    mask = (torch.arange(L)[None] < lengths[:, None]).to(torch.int8)
    dev = TRITON_DEVICE
    args = [t.to(dev, dtype) for t in (q, k, v, c2p, p2c)] + [idx.to(dev), qpos.to(dev) if subset else None]
    by_len = deberta_attention(*args, key_len=lengths.to(dev, torch.int32)).cpu()
    by_mask = deberta_attention(*args, key_mask=mask.to(dev)).cpu()
    assert torch.equal(by_len, by_mask)
    assert torch.equal(deberta_attention(*args, key_len=lengths.to(dev)).cpu(), by_len)  # int64 lengths
    huge = lengths.clone()
    huge[-2] = 2 ** 32 + 1  # (an int64 length that int32 would wrap to 1)
    assert torch.equal(deberta_attention(*args, key_len=huge.to(dev)).cpu(), by_len)
    assert torch.isfinite(by_len).all() and (by_len[-1] == 0).all()  # no key at all
    live = slice(0, B - 1)
    truth = dense(q[live], k[live], v[live], c2p[live], p2c[live], idx, qpos[live] if subset else None,
                  mask[live], torch.float64)
    ref = dense(q[live], k[live], v[live], c2p[live], p2c[live], idx, qpos[live] if subset else None,
                mask[live], dtype)
    assert_as_accurate(by_len[live], ref, truth, atol=ATOL[dtype], what=f"key_len {dtype}")


def test_kernel_names_inputs_it_cannot_read():
    """Strides, shapes and dtypes the kernel would misread raise, naming the input (a stride-2
    key mask used to give a silently wrong output)."""
    q, k, v, c2p, p2c, idx, _, _ = random_case(2, 2, 17, 17, 32, 8)
    dev = TRITON_DEVICE
    q, k, v, c2p, p2c = (t.to(dev, torch.float32) for t in (q, k, v, c2p, p2c))
    idx = idx.to(dev)
    mask = torch.ones(2, 34, dtype=torch.int8, device=dev)
    with pytest.raises(ValueError, match="key_mask: the last dimension must be contiguous"):
        deberta_attention(q, k, v, c2p, p2c, idx, key_mask=mask[:, ::2])
    with pytest.raises(ValueError, match=r"key_mask: expected shape \(2, 17\)"):
        deberta_attention(q, k, v, c2p, p2c, idx, key_mask=mask)
    with pytest.raises(ValueError, match="rel_index: expected shape"):
        deberta_attention(q, k, v, c2p, p2c, idx[:-1])
    with pytest.raises(ValueError, match="rel_index: the last dimension must be contiguous"):
        deberta_attention(q, k, v, c2p, p2c, torch.stack([idx, idx], 1).reshape(-1)[::2])
    with pytest.raises(ValueError, match="qpos: expected int32 or int64"):
        deberta_attention(q, k, v, c2p, p2c, idx, qpos=torch.zeros(2, 17, device=dev))
    with pytest.raises(ValueError, match="v: expected q's dtype"):
        deberta_attention(q, k, v.double(), c2p, p2c, idx)
    with pytest.raises(ValueError, match="p2c: expected shape"):
        deberta_attention(q, k, v, c2p, p2c[:, :1], idx)
    with pytest.raises(ValueError, match="rel_index is needed"):
        deberta_attention(q, k, v, c2p)
    with pytest.raises(ValueError, match="c2p: the last dimension must be contiguous .* transposed view"):
        deberta_attention(q, k, v, torch.cat([c2p, c2p], -1)[..., ::2], p2c, idx)  # neither dim unit-stride
    bad = idx.clone()
    bad[3] = 50  # past the 2S = 16 columns: the gathers would read outside the tables
    with pytest.raises(ValueError, match=r"rel_index: buckets must lie in \[0, 16\).*got \d+..50"):
        deberta_attention(q, k, v, c2p, p2c, bad)
    with pytest.raises(TypeError, match="Triton kernel runs float32, bfloat16 or float16; for float64"):
        deberta_attention(q.double(), k.double(), v.double(), c2p.double(), p2c.double(), idx)
    with pytest.raises(ValueError, match="key_mask and key_len: pass one of them"):
        deberta_attention(q, k, v, c2p, p2c, idx, key_mask=mask[:, :17], key_len=torch.ones(2, device=dev))
    with pytest.raises(ValueError, match=r"key_len: expected shape \(2,\)"):
        deberta_attention(q, k, v, c2p, p2c, idx, key_len=torch.ones(3, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="key_len: expected int32 or int64"):
        deberta_attention(q, k, v, c2p, p2c, idx, key_len=torch.ones(2, device=dev))
    assert deberta_attention(q[:0], k[:0], v[:0], c2p[:0], p2c[:0], idx).shape == (0, 2, 17, 32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_their_tensors_device_not_the_current_one():  # pragma: no cover - 2 GPUs
    import sppo_fast

    q, k, v, c2p, p2c, idx, qpos, mask = random_case(2, 2, 40, 40, 32, 16, padded=True)
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    with torch.cuda.device(0):
        out = deberta_attention(*(t.to("cuda:1", torch.float32) for t in (q, k, v, c2p, p2c)), idx.to("cuda:1"),
                                None, mask.to("cuda:1"))
        logits = torch.randn(3, 7, 1000, device="cuda:1", requires_grad=True)
        labels = torch.randint(0, 1000, (3, 7), device="cuda:1")
        seq = sppo_fast.sequence_logps(logits, labels, backend="triton")
        seq.sum().backward()
    keep = mask.bool()[:, None, :, None].expand_as(truth)
    torch.testing.assert_close(out.cpu().double()[keep], truth[keep], atol=1e-4, rtol=0)
    ref = torch.log_softmax(logits.detach().double(), -1).gather(-1, labels[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(seq.double(), ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("config", list(ATTENTION_CONFIGS))
def test_backbone_with_fused_attention(tiny, config, impl="triton"):
    """Whole DeBERTa forwards with a fused attention (Triton's, or the CPU kernel) against Hugging
    Face's in float64: padded batches, distances across the log-bucket boundary and past
    max_relative_positions."""
    lengths = (300, 150, 5) if config in ("pairrm", "16-buckets") else (90, 41)
    model, m64, ids, mask, pos = deberta_case(tiny, config, lengths)
    valid = mask.bool()
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    model_dev = prm.PairRM(model.config).eval()
    model_dev.load_state_dict(model.state_dict())
    model_dev.to(dev)
    with torch.no_grad():
        truth = m64.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state
        hf32 = model.pretrained_model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        fused = deberta.encode(model_dev.pretrained_model, ids.to(dev), mask.to(dev), impl=impl).cpu().double()
        pooled = deberta.encode(model_dev.pretrained_model, ids.to(dev), mask.to(dev), pos.to(dev),
                                impl=impl).cpu().double()
    assert truth.std() > 0.5
    rows = torch.arange(len(lengths))[:, None]
    assert_as_accurate(fused[valid], hf32[valid], truth[valid], atol=2e-5, what=config)
    assert_as_accurate(pooled, hf32[rows, pos], truth[rows, pos], atol=2e-5, what=f"{config} pooled")


def test_encode_masks_right_padding_by_length(tiny, monkeypatch):
    """``encode`` hands Triton's kernel the lengths of a right-padded mask (found out, or told
    ``padded="right"``) and the mask itself otherwise (told ``padded=True``, or a mask with a hole,
    as Hugging Face allows): the same hidden states either way, held to float64 truth."""
    from sppo_fast.kernels import deberta_attention as kda

    model, m64, ids, mask, _ = deberta_case(tiny, "pairrm", (90, 41, 70))
    seen = []
    real = kda.deberta_attention

    def spy(*args, key_mask=None, key_len=None, **kw):
        if len(args) > 7:  # (the mask, passed positionally)
            args, key_mask = args[:7], args[7]
        seen.append("len" if key_len is not None else "mask" if key_mask is not None else "none")
        return real(*args, key_mask=key_mask, key_len=key_len, **kw)

    monkeypatch.setattr(kda, "deberta_attention", spy)
    dev = TRITON_DEVICE
    enc = model.pretrained_model.to(dev)
    holed = mask.clone()
    holed[1, 10] = 0  # a key masked inside the row: not right padding
    out = {}
    with torch.no_grad():
        for name, m, padded in (("found", mask, None), ("told", mask, "right"), ("mask", mask, True),
                                ("holed", holed, None)):
            seen.clear()
            out[name] = deberta.encode(enc, ids.to(dev), m.to(dev), impl="triton", padded=padded).cpu().double()
            assert set(seen) == {"len" if name in ("found", "told") else "mask"}, (name, seen)
        truth = m64.pretrained_model(input_ids=ids, attention_mask=holed).last_hidden_state
        hf32 = model.pretrained_model.cpu()(input_ids=ids, attention_mask=holed).last_hidden_state.double()
    assert torch.equal(out["found"], out["told"]) and torch.equal(out["found"], out["mask"])
    valid = holed.bool()  # (the masked query's own row is never read: Hugging Face zeroes its attention)
    assert_as_accurate(out["holed"][valid], hf32[valid], truth[valid], atol=2e-5, what="mask with a hole")
    assert (out["holed"][valid] - out["mask"][valid]).abs().max() > 1e-3  # the hole did change the result
    with pytest.raises(ValueError, match="padded: expected None, True, False or 'right'"):
        deberta.encode(enc, ids.to(dev), mask.to(dev), impl="triton", padded="left")
    h = torch.randn(3, 90, model.config.hidden_size, device=dev)
    with pytest.raises(ValueError, match="key_len without key_mask"):  # (it would mask nothing)
        with torch.no_grad():
            deberta.attention(enc.encoder.layer[0].attention.self, h, enc.encoder.get_rel_embedding(), None,
                              impl="triton", key_len=mask.sum(1).to(dev))


def test_ranker_with_fused_attention_matches(tiny, monkeypatch):
    """The ranker's padded buckets reach Triton's kernel as key lengths (no host sync to find out),
    and its result matches the lean torch path."""
    from sppo_fast.kernels import deberta_attention as kda

    model, tok = tiny
    p = ["a short question", "another prompt, a little longer than the first one"]
    c = [["yes", "no", "it depends on the weather"], ["first answer", "", "a third, longer answer here"]]
    dev = TRITON_DEVICE
    m = prm.PairRM(model.config).eval()
    m.load_state_dict(model.state_dict())
    m.to(dev)
    seen = []
    real = kda.deberta_attention

    def spy(*args, key_mask=None, key_len=None, **kw):
        seen.append("len" if key_len is not None else "mask" if key_mask is not None or len(args) > 7 else "none")
        return real(*args, key_mask=key_mask, key_len=key_len, **kw)

    monkeypatch.setattr(kda, "deberta_attention", spy)
    fused = prm.PairRMRanker(m, tok, progress=False, attn_impl="triton", autocast_dtype=None).pair_matrix(p, c)
    assert "len" in seen and "mask" not in seen, set(seen)
    ref = prm.PairRMRanker(model, tok, progress=False, attn_impl="torch").pair_matrix(p, c)
    assert ref.abs().max() > 0.05  # O(1) weights: not vacuous
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA or the interpreter")
def test_fused_attention_needs_cuda_or_interpreter(tiny, monkeypatch):
    import sppo_fast

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(sppo_fast.BackendUnavailableError, match="attn_impl='triton'"):
        prm.PairRMRanker(*tiny, attn_impl="triton")
