"""fused_linear_sppo_loss and linear_sequence_logps against hidden @ W.T + b -> the reference."""

import pytest
import torch

import sppo_fast
from sppo_fast import linear
from sppo_fast import reference as R

from conftest import assert_as_accurate, gpu

S, T, H, V = 6, 33, 97, 1271  # 2B = 6: B = 3 pairs (odd)


def _inputs(gen, *, bias, fully_masked=()):
    f64 = torch.float64
    h = torch.randn(S, T, H, generator=gen, dtype=f64)
    w = torch.randn(V, H, generator=gen, dtype=f64) / 5
    b = torch.randn(V, generator=gen, dtype=f64) if bias else None
    labels = torch.randint(0, V, (S, T), generator=gen)
    labels[:, : int(torch.randint(1, 9, (1,), generator=gen))] = -100
    for s in fully_masked:
        labels[s] = -100
    ref = torch.randn(S, generator=gen, dtype=f64) * 5 - 150
    probs = {"chosen_probs_win": torch.rand(S // 2, generator=gen, dtype=f64) / 2 + 0.5,
             "chosen_probs_lose": torch.rand(S // 2, generator=gen, dtype=f64) / 2,
             "chosen_probs": torch.rand(S // 2, generator=gen, dtype=f64)}
    return h, w, b, labels, ref, probs


def _run(fn, h, w, b, dtype, up=0.7):
    hh = h.to(dtype).clone().requires_grad_()
    ww = w.to(dtype).clone().requires_grad_()
    bb = None if b is None else b.to(dtype).clone().requires_grad_()
    loss, pol, metrics = fn(hh, ww, bb)
    (loss * up).backward()  # upstream gradient other than 1
    return {"loss": loss, "policy": pol, "d_hidden": hh.grad, "d_weight": ww.grad,
            **({} if bb is None else {"d_bias": bb.grad})}, metrics


def _tol(k: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for output ``k`` beyond the same-dtype reference's error. Gradients in 16 bits:
    two ulps of their largest entry. The loss and log-probs are float32 and much tighter (a 16-bit
    tolerance there would allow whole nats). With the truth on the same rounded inputs (ref_logps
    included), measured excess over the reference, 12 seeds x 3 loss types x 2 modes x 2 chunk
    sizes x bias or not, bf16 (16-bit and float32 GEMMs) and fp16 (16-bit GEMMs): log-probs and
    loss (~1e4..4e4) at most 2.2e-7 relative; with float32 GEMMs the kernel's error is below the
    reference's. rtol 1e-5 on the loss: a 1.0005 loss scale fails."""
    if dtype in (torch.bfloat16, torch.float16) and k in ("loss", "policy"):
        return 1e-3, 1e-5
    if dtype == torch.float32 and k.startswith("d_"):
        # float32 gradients: sums of ~1000 products in another order than the reference's. Their
        # excess over the reference's own error, as a share of the largest entry: at most 8.7e-7 over
        # 2160 runs (60 seeds x every case here), and 1.2e-6 for seed 3127311254 (d_hidden,
        # accumulate, sppo_single, bias), which failed CI at a bound of 1e-6: 16 ulps of the largest
        # entry leaves room for that tail
        return 1e-6, 2e-6
    t = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    return t, t


def _reference(labels, ref, probs, beta, loss_type):
    return lambda hh, ww, bb: sppo_fast.fused_sppo_loss(
        torch.nn.functional.linear(hh, ww, bb), labels, ref.to(hh.dtype), beta=beta,
        loss_type=loss_type, backend="reference", **probs)


# the recompute mode with half the vocabulary's d_weight summed by the chunk pass (accumulate_fraction)
HALF = "recompute+acc"
MODES = ["accumulate", "recompute", HALF]


def _mode(weight_grad: str) -> dict:
    """fused_linear_sppo_loss's keywords for a mode of MODES."""
    if weight_grad == HALF:
        return {"weight_grad": "recompute", "accumulate_fraction": 0.5}
    return {"weight_grad": weight_grad}


def _fused(labels, ref, probs, beta, loss_type, chunk=None, weight_grad="auto", backend="cpp"):
    return lambda hh, ww, bb: sppo_fast.fused_linear_sppo_loss(
        hh, ww, labels, ref.to(hh.dtype), bias=bb, beta=beta, loss_type=loss_type,
        backend=backend, chunk_tokens=chunk, **_mode(weight_grad), **probs)


@pytest.mark.parametrize("loss_type", sppo_fast.LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 8, 40])  # 8 and 40 < T: sequences longer than a chunk
@pytest.mark.parametrize("weight_grad", MODES)
def test_matches_reference(loss_type, dtype, bias, chunk, weight_grad, gen):
    _check_matches_reference(loss_type, dtype, bias, chunk, weight_grad, gen)


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_hard"])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("weight_grad", MODES)
def test_bf16_with_float32_gemms_matches_reference(loss_type, chunk, weight_grad, gen, monkeypatch):
    """bf16 on a CPU without AMX: float32 GEMMs on copies (this machine has AMX, so forced)."""
    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", "0")
    _check_matches_reference(loss_type, torch.bfloat16, True, chunk, weight_grad, gen)


def _check_matches_reference(loss_type, dtype, bias, chunk, weight_grad, gen):
    h, w, b, labels, ref, probs = _inputs(gen, bias=bias, fully_masked=(4,))
    beta = 0.1
    # truth: float64 on exactly the inputs the kernel sees (rounded to dtype, ref_logps included:
    # _reference and _fused pass it on as ref.to(dtype), which then rounds nothing)
    h, w, b, ref = (None if t is None else t.to(dtype).double() for t in (h, w, b, ref))
    truth, _ = _run(_reference(labels, ref, probs, beta, loss_type), h, w, b, torch.float64)
    same, _ = _run(_reference(labels, ref, probs, beta, loss_type), h, w, b, dtype)
    out, metrics = _run(_fused(labels, ref, probs, beta, loss_type, chunk, weight_grad), h, w, b, dtype)
    assert out["d_hidden"].dtype == dtype and out["d_weight"].dtype == dtype
    for k in truth:
        atol, rtol = _tol(k, dtype)
        assert_as_accurate(out[k], same[k], truth[k], atol=atol, rtol=rtol, what=f"{k} {dtype}")
    assert (out["d_hidden"][4] == 0).all()
    assert (out["d_hidden"][labels == -100] == 0).all()
    assert metrics["rewards/chosen"].requires_grad is False


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_hard"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("weight_grad", MODES)
def test_low_precision_gemms_match_reference(loss_type, dtype, bias, chunk, weight_grad, gen, monkeypatch):
    """The GPU's mode for 16-bit inputs (16-bit GEMMs, logits and d_hidden; d_weight summed in
    float32, over the chunks or inside the vocabulary pass's GEMM), forced on here: as accurate
    as the eager reference in the same dtype."""
    from sppo_fast import linear

    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: hidden.dtype == dtype)
    h, w, b, labels, ref, probs = _inputs(gen, bias=bias, fully_masked=(1,))
    # rounded once to dtype (ref_logps too): truth, reference and kernel see the same inputs
    h, w, b, ref = (None if t is None else t.to(dtype).double() for t in (h, w, b, ref))
    truth, _ = _run(_reference(labels, ref, probs, 0.1, loss_type), h, w, b, torch.float64)
    same, _ = _run(_reference(labels, ref, probs, 0.1, loss_type), h, w, b, dtype)
    out, _ = _run(_fused(labels, ref, probs, 0.1, loss_type, chunk, weight_grad), h, w, b, dtype)
    for k in truth:
        assert out[k].dtype == (dtype if k.startswith("d_") else torch.float32), k
        atol, rtol = _tol(k, dtype)
        assert_as_accurate(out[k], same[k], truth[k], atol=atol, rtol=rtol, what=f"{k} {dtype}")
    assert (out["d_hidden"][1] == 0).all()
    # the mode did run: its policy log-probs come from 16-bit logits, not float32 ones
    with torch.no_grad():
        lp16 = sppo_fast.linear_sequence_logps(h.to(dtype), w.to(dtype), labels, backend="cpp",
                                               bias=None if b is None else b.to(dtype))
    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: False)
    with torch.no_grad():
        lp32 = sppo_fast.linear_sequence_logps(h.to(dtype), w.to(dtype), labels, backend="cpp",
                                               bias=None if b is None else b.to(dtype))
    assert not torch.equal(lp16, lp32)


@pytest.mark.parametrize("lowp", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_under_autocast(dtype, lowp, gen, monkeypatch):
    """Under bf16 autocast (how train() runs on a GPU) the fused path computes what F.linear would
    there: bf16 GEMMs, gradients back in the parameters' dtype; with either chunk mode."""
    from sppo_fast import linear

    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: lowp and hidden.dtype == torch.bfloat16)
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    h, w, b = (t.to(dtype) for t in (h, w, b))
    ref = ref.to(dtype).double()  # as _reference and _fused pass it on (ref.to(dtype)): exact
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), *(t.to(torch.bfloat16).double() for t in (h, w, b)),
                    torch.float64)

    def under_autocast(fn):
        def f(hh, ww, bb):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(hh, ww, bb)
        return f
    same, _ = _run(under_autocast(_reference(labels, ref, probs, 0.1, "sppo")), h, w, b, dtype)
    out, _ = _run(under_autocast(_fused(labels, ref, probs, 0.1, "sppo", 8)), h, w, b, dtype)
    for k in truth:
        assert out[k].dtype == same[k].dtype, (k, out[k].dtype, same[k].dtype)
        # bf16 GEMMs: the bf16 tolerances (float32 loss and log-probs held as tightly as there)
        atol, rtol = _tol(k, torch.bfloat16)
        assert_as_accurate(out[k], same[k], truth[k], atol=atol, rtol=rtol, what=f"{k} autocast {dtype}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = sppo_fast.linear_sequence_logps(h, w, labels, bias=b, chunk_tokens=8)
    assert_as_accurate(lp, same["policy"], truth["policy"], atol=1e-3, rtol=1e-5, what="logps autocast")
    # the GEMMs did run in bf16 (as F.linear's would), not in the inputs' own precision
    assert not torch.equal(lp, sppo_fast.linear_sequence_logps(h, w, labels, bias=b, chunk_tokens=8))


def test_same_result_whatever_the_chunk_size(gen):
    """... and whichever way d_weight is summed (the vocabulary pass's row blocks and slabs follow
    from the chunk size: from 4 rows x 317 columns up to all rows x all columns)."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    runs = [_run(_fused(labels, ref, probs, 0.05, "sppo", chunk, mode), h, w, b, torch.float64)[0]
            for mode in ("accumulate", "recompute") for chunk in (1, 5, 33, 34, 100, 10_000)]
    for r in runs[1:]:
        for k in r:
            torch.testing.assert_close(r[k], runs[0][k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_grad", MODES)
def test_policy_logps_used_downstream(weight_grad, gen):
    """A gradient through policy_logps (not only the loss) takes the extra pass and stays exact."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    coef = torch.randn(S, generator=gen, dtype=torch.float64)

    def total(fn):
        def f(hh, ww, bb):
            loss, pol, m = fn(hh, ww, bb)
            return loss + (pol * coef).sum() / 100, pol, m
        return f

    truth, _ = _run(total(_reference(labels, ref, probs, 0.1, "sppo")), h, w, b, torch.float64)
    out, _ = _run(total(_fused(labels, ref, probs, 0.1, "sppo", 16, weight_grad)), h, w, b, torch.float64)
    for k in truth:
        torch.testing.assert_close(out[k], truth[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_grad", MODES)
def test_gradcheck(weight_grad, gen):
    f64 = torch.float64
    h = torch.randn(4, 5, 6, generator=gen, dtype=f64, requires_grad=True)
    w = torch.randn(11, 6, generator=gen, dtype=f64, requires_grad=True)
    b = torch.randn(11, generator=gen, dtype=f64, requires_grad=True)
    labels = torch.randint(0, 11, (4, 5), generator=gen)
    labels[:, 0] = -100
    ref = torch.randn(4, generator=gen, dtype=f64, requires_grad=True)
    pw, pl = torch.tensor([0.7, 0.9], dtype=f64), torch.tensor([0.2, 0.4], dtype=f64)
    fn = lambda hh, ww, bb, rr: sppo_fast.fused_linear_sppo_loss(  # noqa: E731
        hh, ww, labels, rr, bias=bb, chosen_probs_win=pw, chosen_probs_lose=pl, beta=2.0,
        chunk_tokens=chunk, backend="cpp", **_mode(weight_grad))[:2]
    for chunk in (2, 100):
        assert torch.autograd.gradcheck(fn, (h, w, b, ref))
    # ref_logps alone wanting a gradient (the others are data)
    hd, wd, bd = h.detach(), w.detach(), b.detach()
    assert torch.autograd.gradcheck(lambda rr: fn(hd, wd, bd, rr)[0], (ref,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_sequence_logps(dtype, gen):
    h, w, b, labels, _, _ = _inputs(gen, bias=True, fully_masked=(1,))
    h, w, b = (t.to(dtype).double() for t in (h, w, b))  # truth on the inputs the kernel sees
    truth = R.sequence_logps(torch.nn.functional.linear(h, w, b), labels)
    same = R.sequence_logps(torch.nn.functional.linear(h.to(dtype), w.to(dtype), b.to(dtype)), labels)
    for chunk in (None, 7):
        out = sppo_fast.linear_sequence_logps(h.to(dtype), w.to(dtype), labels, bias=b.to(dtype),
                                              chunk_tokens=chunk)
        assert not out.requires_grad and out[1].item() == 0.0
        assert_as_accurate(out, same, truth, atol=1e-3, rtol=1e-5, what="linear_sequence_logps")


def test_no_grad_forward_matches(gen):
    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    with torch.no_grad():
        loss, pol, _ = sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, beta=0.1, **probs)
    truth = _reference(labels, ref, probs, 0.1, "sppo")(h, w, None)
    torch.testing.assert_close(loss, truth[0], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(pol, truth[1], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(h=a["h"][0]), ValueError, r"hidden: expected \[B, T, H\]"),
    (lambda a: a.update(h=a["h"][:5], labels=a["labels"][:5]), ValueError, "hidden: expected an even batch"),
    (lambda a: a.update(w=a["w"][:, :5]), ValueError, r"weight: expected \[V, H\] with H = 97"),
    (lambda a: a.update(w=a["w"].float()), TypeError, "weight: dtype torch.float32 differs"),
    (lambda a: a.update(b=torch.zeros(7, dtype=torch.float64)), ValueError, r"bias: expected shape \(1271,\)"),
    (lambda a: a["labels"].__setitem__((0, 20), V), ValueError, r"labels: 1 label\(s\) outside \[0, 1271\)"),
    (lambda a: a.update(labels=a["labels"][:, :4]), ValueError, "labels: shape"),
    (lambda a: a.update(chunk=0), ValueError, "chunk_tokens: expected a positive int"),
    (lambda a: a.update(weight_grad="sum"), ValueError, "weight_grad: expected one of"),
    (lambda a: a.update(beta=-1.0), ValueError, "beta: must be a finite number > 0"),
])
def test_bad_input(mutate, exc, match, gen):
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    a = {"h": h, "w": w, "b": b, "labels": labels, "chunk": None, "beta": 0.1, "weight_grad": "auto"}
    mutate(a)
    with pytest.raises(exc, match=match):
        sppo_fast.fused_linear_sppo_loss(a["h"], a["w"], a["labels"], ref, bias=a["b"], beta=a["beta"],
                                         chunk_tokens=a["chunk"], backend="cpp",
                                         weight_grad=a["weight_grad"], **probs)


@pytest.mark.parametrize("weight_grad", MODES)
def test_backward_twice_with_retain_graph(weight_grad, gen):
    """The first backward hands its precomputed buffers to autograd; a second one recomputes."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, pol, _ = sppo_fast.fused_linear_sppo_loss(hh, ww, labels, ref, bias=b, beta=0.1,
                                                    **_mode(weight_grad), chunk_tokens=20, **probs)
    g1 = torch.autograd.grad(loss * 0.5, (hh, ww), retain_graph=True)
    g2 = torch.autograd.grad(loss * 0.5, (hh, ww))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_grad", MODES)
def test_chunks_through_triton_kernels(weight_grad, gen):
    """The same chunk loop with the Triton kernels doing the per-chunk work (interpreter on CPU)."""
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    h, w, b, labels, ref = (t.float().to(TRITON_DEVICE) if t.is_floating_point() else t.to(TRITON_DEVICE)
                            for t in (h[:2, :9], w[:300], b[:300], labels[:2, :9].clamp(max=299), ref[:2]))
    probs = {k: v[:1].to(TRITON_DEVICE) for k, v in probs.items()}
    out = {}
    for be in ("triton", "reference"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, pol, _ = sppo_fast.fused_linear_sppo_loss(hh, ww, labels, ref, bias=b, beta=0.1, backend=be,
                                                        chunk_tokens=4, **_mode(weight_grad), **probs)
        (loss * 0.3).backward()
        out[be] = (loss, pol, hh.grad, ww.grad)
    for x, y in zip(out["triton"], out["reference"]):  # both float32: a tolerance on the tensor's scale
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * max(1.0, y.abs().max().item()))


@pytest.mark.parametrize("weight_grad", MODES)
def test_low_precision_chunks_through_triton_kernels(weight_grad, gen, monkeypatch):
    """The GPU's 16-bit mode with the Triton kernels reading and writing the bf16 buffer in place
    (interpreter on CPU): as accurate as the bf16 reference."""
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE
    from sppo_fast import linear

    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: hidden.dtype == torch.bfloat16)
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    h, w, b = (t.to(torch.bfloat16).double().to(TRITON_DEVICE) for t in (h[:2, :9], w[:300], b[:300]))
    labels, ref = labels[:2, :9].clamp(max=299).to(TRITON_DEVICE), ref[:2].to(TRITON_DEVICE)
    probs = {k: v[:1].to(TRITON_DEVICE) for k, v in probs.items()}
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    same, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.bfloat16)
    out, _ = _run(lambda hh, ww, bb: sppo_fast.fused_linear_sppo_loss(
        hh, ww, labels, ref.to(hh.dtype), bias=bb, beta=0.1, backend="triton", chunk_tokens=4,
        **_mode(weight_grad), **probs),
        h, w, b, torch.bfloat16)
    for k in truth:
        assert_as_accurate(out[k], same[k], truth[k], atol=8e-3, rtol=8e-3, what=f"{k} triton bf16")


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("weight_grad", MODES)
def test_on_gpu(backend, dtype, chunk, weight_grad, gen):
    """On a GPU: 16-bit inputs take the 16-bit GEMM mode (and the vocabulary pass) by default;
    every backend's chunks."""
    from sppo_fast import _native, linear

    if backend == "cuda" and not _native.cuda_status()[0]:
        pytest.skip("the extension was built without CUDA")
    h, w, b, labels, ref, probs = _inputs(gen, bias=True, fully_masked=(4,))
    h, w, b = (t.to(dtype).double().cuda() for t in (h, w, b))
    labels, ref = labels.cuda(), ref.cuda()
    probs = {k: v.cuda() for k, v in probs.items()}
    assert linear._lowp_gemms(h.to(dtype)) == (dtype != torch.float32)
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    same, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, dtype)
    fused = lambda hh, ww, bb: sppo_fast.fused_linear_sppo_loss(  # noqa: E731
        hh, ww, labels, ref.to(hh.dtype), bias=bb, beta=0.1, backend=backend, chunk_tokens=chunk,
        **_mode(weight_grad), **probs)
    out, _ = _run(fused, h, w, b, dtype)
    for k in truth:
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else _tol(k, dtype)
        assert_as_accurate(out[k], same[k], truth[k], atol=atol, rtol=rtol, what=f"{k} {dtype} {backend}")
    assert (out["d_hidden"][4] == 0).all()
    with torch.no_grad():
        lp = sppo_fast.linear_sequence_logps(h.to(dtype), w.to(dtype), labels, bias=b.to(dtype),
                                             backend=backend, chunk_tokens=chunk)
    assert_as_accurate(lp, same["policy"], truth["policy"], atol=1e-3, rtol=1e-5, what="logps")


@pytest.mark.parametrize("weight_grad", MODES)
def test_every_token_ignored(weight_grad, gen):
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    labels[:] = -100
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    out, _ = _run(_fused(labels, ref, probs, 0.1, "sppo", 8, weight_grad), h, w, b, torch.float32)
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert (out[k] == 0).all(), k
    torch.testing.assert_close(out["loss"].double(), truth["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight_grad", ["accumulate", "recompute"])
def test_empty_batch_is_the_references_nan_not_a_crash(weight_grad):
    """B = 0 divided by zero (ZeroDivisionError); the reference's loss is the mean of nothing."""
    out = {}
    for backend in ("reference", "cpp"):
        h, w = torch.randn(0, 5, 8, requires_grad=True), torch.randn(29, 8, requires_grad=True)
        loss, logps, _ = sppo_fast.fused_linear_sppo_loss(h, w, torch.zeros(0, 5, dtype=torch.long), torch.zeros(0),
                                                          loss_type="sppo_hard", backend=backend,
                                                          **({} if backend == "reference" else {"weight_grad": weight_grad}))
        loss.backward()
        out[backend] = (loss.detach(), logps.shape, h.grad.shape, w.grad)
    assert torch.isnan(out["cpp"][0]) and torch.isnan(out["reference"][0])
    assert out["cpp"][1:3] == out["reference"][1:3] == ((0,), (0, 5, 8))
    assert (out["cpp"][3] == 0).all()


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_single"])
@pytest.mark.parametrize("with_weights", [True, False])
def test_probabilities_and_ref_logps_get_the_references_gradients(loss_type, with_weights, gen):
    """Probabilities and ref_logps that require a gradient get the reference's (the cpp backend gave
    the probabilities none while fused_sppo_loss and the reference gave one), with and without the
    hidden states and weight wanting theirs; upstream gradient 1.7."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    keys = ["chosen_probs_win", "chosen_probs_lose"] if loss_type == "sppo" else ["chosen_probs"]
    grads = {}
    for backend in ("reference", "cpp"):
        p = {k: probs[k].clone().requires_grad_() for k in keys}
        r = ref.clone().requires_grad_()
        hh, ww = (h.clone().requires_grad_(with_weights), w.clone().requires_grad_(with_weights))
        loss, _, _ = sppo_fast.fused_linear_sppo_loss(hh, ww, labels, r, beta=0.1, loss_type=loss_type,
                                                      backend=backend, chunk_tokens=8, **p)
        (1.7 * loss).backward()
        grads[backend] = [r.grad, *(p[k].grad for k in keys)]
    assert all(g is not None and g.abs().max() > 1 for g in grads["reference"])  # (not vacuous)
    for got, want in zip(grads["cpp"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("chunk", [None, 8])  # one block of rows (the GEMM writes d_weight), several
def test_recompute_keeps_no_float32_weight_gradient(chunk, gen, monkeypatch):
    """The vocabulary pass writes a 16-bit d_weight directly: no [V, H] float32 tensor is made
    (the accumulate mode, for contrast, makes one)."""
    from sppo_fast import linear

    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: hidden.dtype == torch.bfloat16)
    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    made = []
    real = {name: getattr(torch, name) for name in ("zeros", "empty")}

    def spy(name):
        def f(*shape, dtype=None, **kw):
            t = real[name](*shape, dtype=dtype, **kw)
            made.append((tuple(t.shape), t.dtype))
            return t
        return f
    for name in real:
        monkeypatch.setattr(linear.torch, name, spy(name))
    for mode, expect in (("recompute", False), ("accumulate", True)):
        made.clear()
        out, _ = _run(_fused(labels, ref, probs, 0.1, "sppo", chunk, mode), h, w, None, torch.bfloat16)
        assert out["d_weight"].dtype == torch.bfloat16
        assert ((V, H), torch.float32) in made if expect else ((V, H), torch.float32) not in made, (mode, made)


@pytest.mark.parametrize("weight_grad", MODES)
@pytest.mark.parametrize("chunk", [None, 5, 40])
def test_every_token_labelled(weight_grad, chunk, gen):
    """No ignored token: the rows' hidden states are read in place instead of gathered."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    labels = torch.randint(0, V, (S, T), generator=gen)
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    out, _ = _run(_fused(labels, ref, probs, 0.1, "sppo", chunk, weight_grad), h, w, b, torch.float64)
    for k in truth:
        torch.testing.assert_close(out[k], truth[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", MODES)
def test_low_precision_policy_gradient_and_second_backward(dtype, weight_grad, gen, monkeypatch):
    """16-bit GEMM mode, policy_logps used too, then a second backward through the same graph:
    each as accurate as the same-dtype reference."""
    from sppo_fast import linear

    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: hidden.dtype == dtype)
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    h, w, b = (t.to(dtype).double() for t in (h, w, b))
    coef = torch.randn(S, generator=gen, dtype=torch.float64)

    def grads(fn, dt):
        hh, ww, bb = (t.to(dt).clone().requires_grad_() for t in (h, w, b))
        loss, pol, _ = fn(hh, ww, bb)
        total = loss * 0.7 + (pol.double() * coef).sum() / 100
        first = torch.autograd.grad(total, (hh, ww, bb), retain_graph=True)
        return first, torch.autograd.grad(total, (hh, ww, bb))

    truth, _ = grads(_reference(labels, ref, probs, 0.1, "sppo"), torch.float64)
    same, _ = grads(_reference(labels, ref, probs, 0.1, "sppo"), dtype)
    first, second = grads(_fused(labels, ref, probs, 0.1, "sppo", 8, weight_grad), dtype)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for name, t, s_, o1, o2 in zip(("d_hidden", "d_weight", "d_bias"), truth, same, first, second):
        for o, which in ((o1, "first"), (o2, "second")):
            assert o.dtype == dtype, (name, o.dtype)
            assert_as_accurate(o, s_, t, atol=tol, rtol=tol, what=f"{name} {which} {dtype}")


def test_fp16_weight_gradient_under_a_loss_scale(gen, monkeypatch):
    """fp16 under a GradScaler-sized loss scale (65536), with a large vocabulary: most softmax
    entries are ~1e-5, so their logit gradients at scale 1 would be fp16 subnormals. The recompute
    mode's vocabulary pass runs in backward with the true upstream gradient, so every entry of
    d_weight is as accurate as the fp16 reference's (per entry, not only the largest)."""
    from sppo_fast import linear

    dtype, f64 = torch.float16, torch.float64
    monkeypatch.setattr(linear, "_lowp_gemms", lambda hidden: hidden.dtype == dtype)
    S_, T_, H_, V_ = 4, 6, 32, 16384
    h = torch.randn(S_, T_, H_, generator=gen, dtype=f64).to(dtype).double()
    w = (torch.randn(V_, H_, generator=gen, dtype=f64) / 5).to(dtype).double()
    labels = torch.randint(0, V_, (S_, T_), generator=gen)
    probs = {"chosen_probs_win": torch.tensor([0.7, 0.9], dtype=f64),
             "chosen_probs_lose": torch.tensor([0.2, 0.4], dtype=f64)}
    pol = R.sequence_logps(torch.nn.functional.linear(h, w), labels)
    t_w, t_l = R.sppo_targets(beta=0.1, loss_type="sppo", **probs)
    ref = pol - torch.cat([t_w, t_l]) + torch.randn(S_, generator=gen, dtype=f64) * 5

    def d_weight(fn, dt):
        hh, ww = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        return torch.autograd.grad(fn(hh, ww)[0] * 65536.0, ww)[0].double()

    def reference(hh, ww):
        return sppo_fast.fused_sppo_loss(torch.nn.functional.linear(hh, ww), labels, ref, beta=0.1,
                                         backend="reference", **probs)

    def fused(hh, ww):
        return sppo_fast.fused_linear_sppo_loss(hh, ww, labels, ref, beta=0.1, backend="cpp",
                                                chunk_tokens=8, weight_grad="recompute", **probs)

    truth = d_weight(reference, f64)
    got = {k: d_weight(f, dtype) for k, f in (("reference", reference), ("fused", fused))}
    # at a loss scale of 65536 the label rows can overflow fp16 in both (seed 3260529895: 559
    # infinite entries and 13 NaN, the same in each): compare where the fp16 reference is finite,
    # and be finite there too
    finite = torch.isfinite(got["reference"])
    assert torch.isfinite(got["fused"][finite]).all()
    rel = {k: ((g - truth).abs() / truth.abs())[finite] for k, g in got.items()}
    for q in (0.5, 0.9):
        ours, theirs = (torch.quantile(rel[k], q).item() for k in ("fused", "reference"))
        assert ours <= theirs * 1.01 + 1e-6, f"quantile {q} of the relative error: {ours:.3g} vs {theirs:.3g}"


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's mkldnn.flags()
@pytest.mark.parametrize("flag", ["0", "1"])
def test_cpu_bf16_gemms_follow_the_hardware_or_the_override(flag, monkeypatch):
    """bf16 on a CPU runs 16-bit GEMMs (and the vocabulary pass) only where the CPU multiplies
    bf16 in hardware; SPPO_FAST_CPU_BF16_GEMMS overrides the probe. fp16 and fp32 never do."""
    from sppo_fast import linear

    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", flag)
    x = torch.zeros(2, 3, 4)
    assert linear._lowp_gemms(x.bfloat16()) == (flag == "1")
    assert not linear._lowp_gemms(x.half()) and not linear._lowp_gemms(x)
    opts = linear._options(x.bfloat16(), torch.zeros(5, 4, dtype=torch.bfloat16), -100, None, 0.5, True, "cpp")
    assert opts.weight_grad == ("recompute" if flag == "1" else "accumulate")
    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", "yes")
    with pytest.raises(ValueError, match="SPPO_FAST_CPU_BF16_GEMMS: expected 0 or 1"):
        linear._lowp_gemms(x.bfloat16())
    # without the override: AMX and oneDNN enabled, asked at each call
    monkeypatch.delenv("SPPO_FAST_CPU_BF16_GEMMS")
    monkeypatch.setattr(linear, "_cpu_has_amx", lambda: True)
    assert linear._lowp_gemms(x.bfloat16())
    with torch.backends.mkldnn.flags(enabled=False):
        assert not linear._lowp_gemms(x.bfloat16())
    monkeypatch.setattr(linear, "_cpu_has_amx", lambda: False)
    assert not linear._lowp_gemms(x.bfloat16())


@pytest.mark.parametrize("vocab_elems", [1, 300, 5000, 10**7])
def test_vocabulary_pass_buffer_of_its_own(vocab_elems, gen, monkeypatch):
    """The GPU default gives the vocabulary pass a buffer of its own size (vocab_elems), smaller than
    the chunks': any size gives the same gradients (slabs of 1 column up to the whole vocabulary)."""
    import dataclasses

    from sppo_fast import linear

    real = linear._options
    monkeypatch.setattr(linear, "_options", lambda *a, **k: dataclasses.replace(real(*a, **k), vocab_elems=vocab_elems))
    h, w, b, labels, ref, probs = _inputs(gen, bias=True)
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    out, _ = _run(_fused(labels, ref, probs, 0.1, "sppo", None, "recompute"), h, w, b, torch.float64)
    for k in truth:
        torch.testing.assert_close(out[k], truth[k], rtol=1e-10, atol=1e-12)


def test_create_graph_backward_is_first_order(gen):
    """create_graph=True (e.g. a gradient penalty elsewhere in the graph) works in both modes: the
    fused op's gradient is first order (once_differentiable): it carries no graph, so a second
    derivative through it raises instead of silently coming out zero."""
    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    for mode in ("accumulate", "recompute"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = _fused(labels, ref, probs, 0.1, "sppo", 8, mode)(hh, ww, None)[0]
        gh, gw = torch.autograd.grad(loss, (hh, ww), create_graph=True)
        rh, rw = h.clone().requires_grad_(), w.clone().requires_grad_()
        truth = torch.autograd.grad(_reference(labels, ref, probs, 0.1, "sppo")(rh, rw, None)[0], (rh, rw))
        torch.testing.assert_close(gh, truth[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw, truth[1], rtol=1e-10, atol=1e-12)
        with pytest.raises(RuntimeError, match="does not require grad|differentiable"):
            gw.sum().backward()


def _min_slab(monkeypatch, min_slab: int) -> None:
    """The vocabulary pass's slabs shrink in d_weight's memory down to ``min_slab`` columns (instead
    of MIN_SLAB: more of the narrow ones, a smaller buffer, at these small shapes)."""
    import dataclasses

    from sppo_fast import linear

    real = linear._options
    monkeypatch.setattr(linear, "_options",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), min_slab=min_slab))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("every_row", [False, True])
@pytest.mark.parametrize("min_slab", [16, 64])
@pytest.mark.parametrize("weight_grad", ["recompute", HALF])
def test_vocabulary_pass_in_d_weight_memory(dtype, bias, chunk, every_row, min_slab, weight_grad, gen, monkeypatch):
    """The vocabulary pass: slabs whose gradient lives in d_weight's rows after them, shrinking to
    min_slab columns, then a buffer for the last ones; with ignored tokens the labelled rows first,
    gathered into d_weight, then every row. Exact whatever the layout."""
    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", "1")
    _min_slab(monkeypatch, min_slab)
    h, w, b, labels, ref, probs = _inputs(gen, bias=bias, fully_masked=(4,))
    if every_row:
        labels = torch.randint(0, V, (S, T), generator=gen)
    h, w, b = (None if t is None else t.to(dtype).double() for t in (h, w, b))
    truth, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, torch.float64)
    same, _ = _run(_reference(labels, ref, probs, 0.1, "sppo"), h, w, b, dtype)
    out, _ = _run(_fused(labels, ref, probs, 0.1, "sppo", chunk, weight_grad), h, w, b, dtype)
    for k in truth:
        atol, rtol = _tol(k, dtype)
        assert_as_accurate(out[k], same[k], truth[k], atol=atol, rtol=rtol, what=f"{k} {dtype}")


def _cpu_peak_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory allocated while ``fn()`` ran and still held: from the
    profiler's memory events (each op's allocations counted at its start, its frees at its end)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
                     e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _sized_inputs(gen, dtype, V_, H_, every_row):
    h = torch.randn(S, T, H_, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V_, H_, generator=gen) / 5).to(dtype).requires_grad_()
    labels = torch.randint(0, V_, (S, T), generator=gen)
    if not every_row:
        labels[:, :5] = -100
    ref = torch.randn(S, generator=gen) - 150
    p = torch.rand(S // 2, generator=gen)
    return h, w, labels, ref, {"chosen_probs_win": p / 2 + 0.5, "chosen_probs_lose": p / 2}


@pytest.mark.parametrize("VH", [(8000, 64), (4000, 512)])  # (the second: chunks' hidden rows of note)
@pytest.mark.parametrize("through_policy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every_row", [False, True])
def test_recompute_holds_only_the_gradients(dtype, every_row, through_policy, VH, gen, monkeypatch):
    """The recompute mode's d_weight is made in forward and its memory, until written, is the chunk
    pass's buffer and then the vocabulary pass's scratch (with ignored tokens, also the gathered
    hidden rows, and in the chunk pass each chunk's gathered hidden rows and their d_hidden):
    forward + backward hold the two gradients, a tail buffer of N x min_slab and O(N) more. (A
    chunk buffer and a vocabulary-pass buffer of their own made this 3.5x larger.)"""
    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", "1")  # bf16: the 16-bit mode, as on a GPU
    _min_slab(monkeypatch, 64)
    h, w, labels, ref, probs = _sized_inputs(gen, dtype, *VH, every_row)

    pc = torch.randn(h.shape[0], generator=gen)

    def step():
        loss, pol, _ = sppo_fast.fused_linear_sppo_loss(h, w, labels, ref.to(dtype), beta=0.1,
                                                        weight_grad="recompute", backend="cpp", **probs)
        (loss * 0.7 + ((pol * pc).sum() if through_policy else 0)).backward()
    peak = _cpu_peak_bytes(step)
    e = h.element_size()
    grads = (w.numel() + h.numel()) * e
    tail = h.shape[0] * h.shape[1] * 64 * e
    # a gradient through policy_logps too: one more d_hidden-sized pass (its logits in d_weight's
    # unwritten memory; they used to take a buffer as large as d_weight)
    extra = h.numel() * e if through_policy else 0
    assert grads <= peak <= grads + tail + extra + (128 << 10), (peak, grads, tail)
    # and the gradients are right at this shape too (long slabs, then shrinking ones, then the tail)
    if through_policy:
        return  # (the accuracy of that path: test_policy_logps_used_downstream)
    got = {"d_hidden": h.grad, "d_weight": w.grad}
    ref_fn = _reference(labels, ref, probs, 0.1, "sppo")
    truth, _ = _run(ref_fn, h.detach().double(), w.detach().double(), None, torch.float64)
    same, _ = _run(ref_fn, h.detach().double(), w.detach().double(), None, dtype)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    for k in got:
        assert_as_accurate(got[k], same[k], truth[k], atol=tol, rtol=tol, what=k)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every_row", [False, True])
@pytest.mark.parametrize("through_policy", [False, True])
def test_accumulate_fraction_memory(fraction, dtype, every_row, through_policy, gen, monkeypatch):
    """accumulate_fraction: the chunk pass sums d_weight's first k rows in a float32 [k, H], and
    the vocabulary pass does the rest; until they are copied in last, those k rows of d_weight hold
    its last slabs, so there is no tail buffer where they are large enough (k H >= N x min_slab:
    at 0.5 here, not at 0.02; at 1.0 no vocabulary pass at all). Peak memory: the two gradients,
    the float32 rows once (a gradient through policy_logps too adds its part into them, plus one
    d_hidden-sized pass), and that buffer only where needed; and the gradients are right."""
    from sppo_fast import linear

    monkeypatch.setenv("SPPO_FAST_CPU_BF16_GEMMS", "1")
    _min_slab(monkeypatch, 64)
    V_, H_ = 8000, 64
    h, w, labels, ref, probs = _sized_inputs(gen, dtype, V_, H_, every_row)
    k = linear._aligned(round(fraction * V_), below=V_)
    buffers = []
    real_buffer = linear._Chunked._buffer

    def spy(self, n, in_weight_grad=True):
        if not in_weight_grad:
            buffers.append(n)
        return real_buffer(self, n, in_weight_grad)
    monkeypatch.setattr(linear._Chunked, "_buffer", spy)

    pc = torch.randn(h.shape[0], generator=gen)

    def step():
        loss, pol, _ = sppo_fast.fused_linear_sppo_loss(h, w, labels, ref.to(dtype), beta=0.1, weight_grad="recompute",
                                                        accumulate_fraction=fraction, backend="cpp", **probs)
        (loss * 0.7 + ((pol * pc).sum() if through_policy else 0)).backward()
    peak = _cpu_peak_bytes(step)
    e, N = h.element_size(), h.shape[0] * h.shape[1]
    grads = (w.numel() + h.numel()) * e
    rows = k * H_ * 4  # the float32 sums
    roomy = k * H_ >= N * 64
    assert roomy == (fraction >= 0.5)
    assert (not buffers) == roomy, buffers
    tail = 0 if roomy else N * 64 * e
    # bf16 on a CPU: float32 copies of a chunk's first k logit-gradient columns (no float32-output
    # bf16 GEMM), into one scratch; chunks of at most V H / (V + 2H) tokens
    upcast = 0 if dtype == torch.float32 else V_ * H_ // (V_ + 2 * H_) * (k + H_) * 4
    extra = h.numel() * e if through_policy else 0
    assert grads + rows <= peak <= grads + rows + tail + upcast + extra + (128 << 10), (peak, grads, rows, tail,
                                                                                          upcast, extra)
    if through_policy:
        return  # (its accuracy: test_policy_logps_used_downstream and the 16-bit one, over MODES)
    ref_fn = _reference(labels, ref, probs, 0.1, "sppo")
    truth, _ = _run(ref_fn, h.detach().double(), w.detach().double(), None, torch.float64)
    same, _ = _run(ref_fn, h.detach().double(), w.detach().double(), None, dtype)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    for name, got in (("d_hidden", h.grad), ("d_weight", w.grad)):
        assert_as_accurate(got, same[name], truth[name], atol=tol, rtol=tol, what=name)


def test_accumulate_fraction_checked(gen):
    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    for bad in (-0.1, 1.5, "half", True, float("nan")):
        with pytest.raises(ValueError, match="accumulate_fraction"):
            sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, accumulate_fraction=bad, **probs)


@pytest.mark.parametrize("weight_grad", MODES)
def test_frozen_lm_head(weight_grad, gen):
    """A weight without requires_grad: the same d_hidden as with a trainable one, no gradient for
    the weight, and no [V, H] tensor made (no d_weight work at all)."""
    from sppo_fast import linear

    h, w, b, labels, ref, probs = _inputs(gen, bias=False)
    fn = _fused(labels, ref, probs, 0.1, "sppo", None, weight_grad)
    trained, _ = _run(fn, h, w, None, torch.float32)
    made = []
    real = torch.empty

    def spy(*shape, **kw):
        t = real(*shape, **kw)
        made.append(tuple(t.shape))
        return t
    hh = h.float().clone().requires_grad_()
    ww = w.float()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear.torch, "empty", spy)
        mp.setattr(linear.torch, "zeros", lambda *s, **kw: spy(*s, **kw).zero_())
        (fn(hh, ww, None)[0] * 0.7).backward()
    assert ww.grad is None
    assert torch.equal(hh.grad, trained["d_hidden"])
    assert made and (V, H) not in made, made


@gpu
@pytest.mark.parametrize("every_row", [False, True])
def test_recompute_holds_only_the_gradients_on_gpu(every_row, gen):
    """On a GPU, bf16 with the default options: forward + backward raise the allocator's peak by
    the two gradients, the tail buffer and O(N), nothing else (no chunk buffer, no vocabulary-pass
    buffer: d_weight's memory is both until it is written)."""
    from sppo_fast import linear

    h, w, labels, ref, probs = _sized_inputs(gen, torch.bfloat16, 32000, 256, every_row)
    h, w = (t.detach().cuda().requires_grad_() for t in (h, w))
    labels, ref = labels.cuda(), ref.cuda().bfloat16()
    probs = {k: v.cuda() for k, v in probs.items()}

    def step():
        (sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, **probs)[0] * 0.7).backward()
    step()  # compiles the kernels, makes the GEMM workspaces
    h.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = (w.numel() + h.numel()) * 2
    tail = h.shape[0] * h.shape[1] * linear.MIN_SLAB * 2
    assert grads <= peak <= grads + tail + (1 << 20), (peak, grads, tail)


@pytest.mark.parametrize("scale", [10.0, 30.0, 60.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_recompute_label_term_of_a_confident_model(scale, bias, backend, gen, monkeypatch):
    """A confident model that predicts its labels (p ~ 1 on the label, as in training): the
    vocabulary pass recomputes the logits with a GEMM of another shape, and its label term 1 - p
    cancelled those last bits, so recompute's d_weight had twice the eager reference's error. The
    label term now comes from the chunk pass's log-prob: as accurate as the reference.

    This CPU's GEMMs give a slab's logits bit for bit as the whole rows' (a GPU's do not), so the
    recomputed label logits are moved by one ulp here, as another GEMM shape may move them (off
    the label that moves p by an ulp, relative: within the reference's own error)."""
    exact = linear._Chunked._slab_logits

    def one_ulp_off(self, g, h, v0, v1):
        exact(self, g, h, v0, v1)
        assert self.every_row  # (every token labelled: g's rows are the plan's rows)
        lab = self.plan.labels
        rows = torch.nonzero((lab >= v0) & (lab < v1))[:, 0]
        x = g[rows, lab[rows] - v0]
        g[rows, lab[rows] - v0] = torch.nextafter(x, torch.where(rows % 2 == 0, torch.inf, -torch.inf).to(g.dtype))
    monkeypatch.setattr(linear._Chunked, "_slab_logits", one_ulp_off)
    f64 = torch.float64
    S, T, H, V = 2, 65, 64, 50
    h = torch.randn(S, T, H, generator=gen, dtype=f64).float().double()
    w = (torch.randn(V, H, generator=gen, dtype=f64) * scale / 8).float().double()
    b = (torch.randn(V, generator=gen, dtype=f64)).float().double() if bias else None
    labels = torch.nn.functional.linear(h, w, b).argmax(-1)
    ref = torch.tensor([-1.0, -1.0], dtype=f64)
    probs = dict(chosen_probs_win=torch.tensor([0.9], dtype=f64), chosen_probs_lose=torch.tensor([0.1], dtype=f64))
    if backend == "triton":  # (a GPU where there is one, else the interpreter on the CPU)
        from conftest import TRITON_DEVICE
        h, w, labels, ref = (t.to(TRITON_DEVICE) for t in (h, w, labels, ref))
        b = None if b is None else b.to(TRITON_DEVICE)
        probs = {k: v.to(TRITON_DEVICE) for k, v in probs.items()}

    def grads(fn, dt):
        hh, ww = h.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        bb = None if b is None else b.to(dt).clone().requires_grad_()
        (fn(hh, ww, bb)[0] * 1.7).backward()
        return [t.grad.double() for t in (hh, ww, bb) if t is not None]

    def eager(hh, ww, bb):
        return sppo_fast.fused_sppo_loss(torch.nn.functional.linear(hh, ww, bb), labels, ref.to(hh.dtype), beta=0.1,
                                         backend="reference", **probs)
    truth, same = grads(eager, f64), grads(eager, torch.float32)
    got = grads(lambda hh, ww, bb: sppo_fast.fused_linear_sppo_loss(
        hh, ww, labels, ref.to(hh.dtype), bias=bb, beta=0.1, backend=backend, weight_grad="recompute", **probs),
        torch.float32)
    assert torch.nn.functional.softmax(torch.nn.functional.linear(h, w, b), -1).amax(-1).median() > 0.7  # sure of its labels
    for name, o, s, t in zip(("d_hidden", "d_weight", "d_bias"), got, same, truth):
        assert_as_accurate(o, s, t, atol=1e-6, rtol=1e-6, what=f"{name} scale {scale}")
