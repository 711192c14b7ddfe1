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

from _data import ATTENTION_CONFIGS, deberta_case

pytest.importorskip("triton")
from sppo_fast.kernels.deberta_attention import deberta_attention  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, tok = prm.tiny_pairrm(seed=0)
    prm.redraw_weights_(model, seed=1)
    return model, tok


def dense(q, k, v, c2p, p2c, idx, qpos, key_mask, dtype):
    """The formula with [LQ, LK] tensors: in float64 (truth) or in ``dtype`` as autocast runs it
    (products in dtype, softmax in float32)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    rows = qpos.long() if qpos is not None else torch.arange(q.shape[2])[None].expand(q.shape[0], -1)
    r = rows[:, None, :, None] - torch.arange(k.shape[2])[None, None, None, :]  # [B, 1, LQ, LK]
    g = idx.long()[r + k.shape[2] - 1].expand(q.shape[0], q.shape[1], -1, -1)
    s = (q @ k.transpose(-1, -2)).float() if dtype != torch.float64 else q @ k.transpose(-1, -2)
    if c2p is not None:
        s = s + torch.gather(c2p.to(dtype), -1, g).to(s.dtype)
    if p2c is not None:
        s = s + torch.gather(p2c.to(dtype).transpose(-1, -2), -2, g).to(s.dtype)
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return (p.to(dtype) @ v).to(dtype)


def random_case(B, H, LQ, LK, D, S, *, subset=False, padded=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g, dtype=torch.float64) * scale / D ** 0.5
    k = torch.randn(B, H, LK, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, LK, D, generator=g, dtype=torch.float64)
    c2p = torch.randn(B, H, LQ, 2 * S, generator=g, dtype=torch.float64) * scale
    p2c = torch.randn(B, H, LK, 2 * S, generator=g, dtype=torch.float64) * scale
    idx = deberta._bucket_index_1d(LK, S, 4 * S, torch.device("cpu"))
    qpos = torch.stack([torch.randperm(LK, generator=g)[:LQ] for _ in range(B)]).int() if subset else None
    mask = None
    if padded:
        lengths = torch.randint(1, LK + 1, (B,), generator=g)
        lengths[0] = LK
        mask = (torch.arange(LK)[None] < lengths[:, None]).to(torch.int8)
    return q, k, v, c2p, p2c, idx, qpos, mask


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
    atol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    if case == "huge" and dtype != torch.float32:
        # scores ~1e3, where a 16-bit ulp is 0.5-4: the softmax is near one-hot and which input
        # rounding wins decides the output; the point here is that nothing overflows
        atol = 0.05
    if mask is not None:  # rows of padded queries are never read; compare real ones
        keep = mask.bool()[:, None, :, None].expand_as(truth)
        out, ref, truth = out.cpu()[keep], ref[keep], truth[keep]
    assert_as_accurate(out.cpu(), ref, truth, atol=atol, what=f"{case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["square", "subset", "padded", "huge", "uneven", "odd-head", "long"])
def test_cpu_kernel_against_dense_truth(isa, dtype, case):
    """The CPU kernel (``sppo_fast._C``, every instruction set): the same cases as the Triton
    kernel's, plus a head size that is not a whole number of vector lines and a longer sequence."""
    from sppo_fast import _native

    shapes = {"square": (2, 2, 70, 70, 32, 16), "subset": (3, 2, 3, 97, 32, 16),
              "padded": (3, 2, 81, 81, 32, 8), "huge": (1, 2, 40, 40, 32, 16),
              "uneven": (1, 3, 131, 131, 48, 64), "odd-head": (2, 2, 37, 37, 20, 8),
              "long": (1, 2, 333, 333, 64, 256)}[case]
    q, k, v, c2p, p2c, idx, qpos, mask = random_case(
        *shapes, subset=case == "subset", padded=case == "padded", scale=300.0 if case == "huge" else 1.0)
    truth = dense(q, k, v, c2p, p2c, idx, qpos, mask, torch.float64)
    ref = dense(q, k, v, c2p, p2c, idx, qpos, mask, dtype)
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
    from sppo_fast import _native

    q, k, v, c2p, p2c, idx, _, _ = random_case(2, 2, 33, 33, 32, 16)
    mask = torch.ones(2, 33, dtype=torch.int8)
    mask[1] = 0
    out = _native.deberta_attention(q.float(), k.float(), v.float(), key_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    for terms in ((c2p, None), (None, p2c), (None, None)):
        truth = dense(q, k, v, *terms, idx, None, None, torch.float64)
        out = _native.deberta_attention(q, k, v, *terms, idx if any(t is not None for t in terms) else None)
        torch.testing.assert_close(out, truth, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        _native.deberta_attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match=r"qpos: positions must lie in \[0, 33\)"):
        _native.deberta_attention(q[:, :, :2], k, v, c2p[:, :, :2], p2c, idx, torch.tensor([[0, 33], [1, 2]]))
    with pytest.raises(ValueError, match=r"rel_index: buckets must lie in \[0, 32\)"):
        _native.deberta_attention(q, k, v, c2p, p2c, idx + 32)


def test_kernel_without_relative_terms_and_all_masked_keys():
    q, k, v, _, _, idx, _, _ = random_case(2, 2, 33, 33, 32, 16)
    mask = torch.ones(2, 33, dtype=torch.int8)
    mask[1] = 0  # a batch row with no real key: finite (zeros), never NaN
    dev = TRITON_DEVICE
    out = deberta_attention(*(t.to(dev, torch.float32) for t in (q, k, v)), key_mask=mask.to(dev)).cpu()
    truth = dense(q, k, v, None, None, idx, None, None, torch.float64)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[0].double(), truth[0], atol=1e-5, rtol=0)


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


@pytest.mark.parametrize("impl", ["triton", "cpp"])
@pytest.mark.parametrize("config", list(ATTENTION_CONFIGS))
def test_backbone_with_fused_attention(tiny, config, impl):
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


def test_ranker_with_fused_attention_matches(tiny):
    model, tok = tiny
    p = ["a short question", "another prompt, a little longer than the first one"]
    c = [["yes", "no", "it depends on the weather"], ["first answer", "", "a third, longer answer here"]]
    dev = TRITON_DEVICE
    m = prm.PairRM(model.config).eval()
    m.load_state_dict(model.state_dict())
    m.to(dev)
    fused = prm.PairRMRanker(m, tok, progress=False, attn_impl="triton", autocast_dtype=None).pair_matrix(p, c)
    ref = prm.PairRMRanker(model, tok, progress=False, attn_impl="torch").pair_matrix(p, c)
    cpu = prm.PairRMRanker(model, tok, progress=False)
    assert cpu.attn_impl == "cpp"  # the default on a CPU for a float32 model
    assert ref.abs().max() > 0.05  # O(1) weights: not vacuous
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(cpu.pair_matrix(p, c), ref, atol=2e-5, rtol=0)


def test_cpu_attention_refuses_what_it_cannot_run(tiny):
    import sppo_fast

    model, tok = tiny
    m = prm.PairRM(model.config).eval().to(torch.bfloat16)
    assert prm.PairRMRanker(m, tok, progress=False).attn_impl == "torch"  # auto falls back
    with pytest.raises(sppo_fast.BackendUnavailableError, match="attn_impl='cpp' runs float32 or float64"):
        prm.PairRMRanker(m, tok, attn_impl="cpp")
    with pytest.raises(sppo_fast.BackendUnavailableError, match="not under torch.bfloat16 autocast"):
        prm.PairRMRanker(model, tok, attn_impl="cpp", autocast_dtype=torch.bfloat16)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA or the interpreter")
def test_fused_attention_needs_cuda_or_interpreter(tiny, monkeypatch):
    import sppo_fast

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(sppo_fast.BackendUnavailableError, match="attn_impl='triton'"):
        prm.PairRMRanker(*tiny, attn_impl="triton")
