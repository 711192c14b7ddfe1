"""Shared fixtures and the accuracy rule every backend is held to.

Without a GPU the Triton kernels run in Triton's interpreter, which has to be switched on before
any kernel is defined, so it is set here, first (torch.cuda.is_available() imports no Triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sppo_fast  # noqa: E402
from sppo_fast import _native  # noqa: E402

CPU_ISAS = [isa for isa in ("base", "avx2", "avx512") if _native._C.cpu_set_isa(isa)]
_native._C.cpu_set_isa(_native._C.cpu_best_isa())

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU tensors run in Triton's interpreter
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# the cuda backend also needs the extension built with its CUDA kernels
cuda_backend = pytest.mark.skipif(not HAS_CUDA or not _native.cuda_status()[0],
                                  reason="needs a CUDA device and a CUDA build")


def _uses_gpu(item) -> bool:
    """A test that needs a GPU (a skip mark that names CUDA) or runs a GPU backend (a Triton or
    CUDA parameter or name): what the GPU check runs, since the rest is the CPU suite CI runs."""
    for mark in item.iter_markers("skipif"):
        if "CUDA" in str(mark.kwargs.get("reason", "")):
            return True
    name = item.nodeid.lower()  # file and test name: test_triton.py, test_deberta_attention.py (Triton)
    return any(w in name for w in ("triton", "cuda", "gpu", "deberta_attention"))


def pytest_collection_modifyitems(config, items):
    """SPPO_FAST_GPU_TESTS_ONLY=1 keeps the tests that use a GPU (benchmarks/gpu_check.sh sets it:
    a lent GPU's minutes are too few for the CPU suite)."""
    if os.environ.get("SPPO_FAST_GPU_TESTS_ONLY") != "1":
        return
    keep = [it for it in items if _uses_gpu(it)]
    config.hook.pytest_deselected(items=[it for it in items if not _uses_gpu(it)])
    items[:] = keep


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Run the test once per instruction set this CPU supports, then restore the best one."""
    sppo_fast.set_cpu_isa(request.param)
    assert sppo_fast.cpu_isa() == request.param, (sppo_fast.cpu_isa(), request.param)
    yield request.param
    sppo_fast.set_cpu_isa(_native._C.cpu_best_isa())


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")  # shown with a failure's captured output
    return torch.Generator().manual_seed(seed)


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item() if truth.numel() else 0.0


def assert_as_accurate(out, same_dtype_ref, truth, *, atol, rtol=0.0, what=""):
    """The kernel's error against float64 truth may not exceed the same-dtype reference's error
    by more than atol + rtol * max|truth|."""
    assert out.shape == truth.shape, (what, out.shape, truth.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    e_out, e_ref = max_err(out, truth), max_err(same_dtype_ref, truth)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    bound = e_ref + atol + rtol * scale
    assert e_out <= bound, f"{what}: error {e_out:.3g} > reference's own {e_ref:.3g} + tolerance ({bound:.3g})"


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
                 torch.float64: 2.0**-53}


def assert_elementwise_as_accurate(out, same_dtype_ref, truth, *, atol, rtol=0.0, what=""):
    """Entry by entry: |out - truth| <= max(|same_dtype_ref - truth|, u * |truth|) + atol
    + rtol * max|truth|, u the unit roundoff of out's dtype (its own rounding of the true value).
    Catches wrong small entries that a max-error rule hides behind the largest entries' rounding
    (in bf16 the largest gradient entries round by ~3e-2, so zeroing all entries below 1e-2
    would pass assert_as_accurate)."""
    assert out.shape == truth.shape, (what, out.shape, truth.shape)
    t = truth.double()
    err = (out.double() - t).abs()
    scale = t.abs().max().item() if t.numel() else 0.0
    bound = torch.maximum((same_dtype_ref.double() - t).abs(), UNIT_ROUNDOFF[out.dtype] * t.abs())
    bound = bound + atol + rtol * scale
    bad = err > bound
    if bool(bad.any()):
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} entries beyond their bound; at {i}: "
                             f"{out[i].item():.6g} vs truth {t[i].item():.6g} (bound {bound[i].item():.3g})")


# atol for log-prob sums of ~100 tokens and for gradient entries, per dtype; the same-dtype
# reference's own error is added on top (assert_as_accurate).
FWD_ATOL = {torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4, torch.float64: 1e-9}
OUT_ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}  # relative, of the float32/64 outputs
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float64: 1e-12}


def copy_keeping_layout(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` with x's strides (``clone()`` of a view like ``logits[:, :-1]``
    would be contiguous, and a kernel handed it would never see the view's strides)."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x.detach())
    assert y.stride() == x.stride()
    return y


def check_sequence_logps(logits, labels, gen, backend, *, inplace=False):
    """sequence_logps through ``backend`` against the float64 reference, forward and backward
    (with a random upstream gradient, not 1). The kernel gets the logits in their own layout
    (a strided view stays one). Returns the output and the logits' gradient."""
    from sppo_fast import reference as R

    dtype = logits.dtype
    truth_in = logits.detach().double().requires_grad_()
    truth = R.sequence_logps(truth_in, labels)
    same_in = logits.detach().clone().requires_grad_()
    same = R.sequence_logps(same_in, labels)
    leaf = copy_keeping_layout(logits).requires_grad_()
    assert leaf.stride() == logits.stride() and leaf.is_contiguous() == logits.is_contiguous()
    x = leaf * 1 if inplace else leaf  # in place: a non-leaf buffer the op may consume
    seen = []
    if inplace:
        x.register_hook(seen.append)  # the gradient the op returns for x
    out = sppo_fast.sequence_logps(x, labels, backend=backend, inplace_backward=inplace)
    assert out.device == logits.device
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # rtol: one ulp of the largest sum in the output's dtype (its own rounding). Huge logits
    # (|x| ~ 1e4, sums ~ 5e5) are held to the same-dtype reference's error plus that, not to a
    # scaled absolute tolerance.
    assert_as_accurate(out, same, truth, atol=FWD_ATOL[dtype], rtol=OUT_ULP[out.dtype],
                       what=f"sequence_logps {backend} {dtype}")
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device) * 3
    (truth * g).sum().backward()
    (same * g.to(same.dtype)).sum().backward()
    (out * g.to(out.dtype)).sum().backward()
    assert leaf.grad.dtype == dtype
    if inplace:  # the gradient was written into the logits' own memory
        assert seen[0].data_ptr() == x.data_ptr(), "inplace_backward wrote a fresh buffer"
    # rtol: ~8 float32 ulps of the largest gradient entry (|g| reaches ~10 here)
    assert_as_accurate(leaf.grad, same_in.grad, truth_in.grad, atol=GRAD_ATOL[dtype],
                       rtol=0 if dtype == torch.float64 else 1e-6, what=f"grad {backend} {dtype}")
    assert_elementwise_as_accurate(leaf.grad, same_in.grad, truth_in.grad, atol=GRAD_ATOL[dtype],
                                   rtol=0 if dtype == torch.float64 else 1e-6,
                                   what=f"grad {backend} {dtype} (entrywise)")
    return out, leaf.grad


# atol for single-token log-probs (of ~8 nats), per dtype; the same-dtype reference's error on top
TOK_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


def check_token_logprobs(logits, labels, gen, backend, *, ignore_index=-100):
    """token_logprobs through ``backend`` against the float64 reference, forward and backward with a
    random upstream gradient per token (so each token's coefficient differs, unlike a sequence
    sum's). The kernel gets the logits in their own layout. Returns the output and the gradient."""
    from sppo_fast import reference as R

    dtype = logits.dtype
    truth_in = logits.detach().double().requires_grad_()
    truth = R.token_logprobs(truth_in, labels, ignore_index)
    same_in = logits.detach().clone().requires_grad_()
    same = R.token_logprobs(same_in, labels, ignore_index)
    leaf = copy_keeping_layout(logits).requires_grad_()
    out = sppo_fast.token_logprobs(leaf, labels, ignore_index, backend=backend)
    assert out.device == logits.device and out.shape == labels.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_as_accurate(out, same, truth, atol=TOK_ATOL[dtype], rtol=OUT_ULP[out.dtype],
                       what=f"token_logprobs {backend} {dtype}")
    ignored = labels == ignore_index
    assert (out[ignored] == 0).all()
    g = (torch.randn(out.shape, generator=gen, dtype=torch.float64) * 3).to(out.device)
    (truth * g).sum().backward()
    (same * g.to(same.dtype)).sum().backward()
    (out * g.to(out.dtype)).sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == logits.shape
    assert_as_accurate(leaf.grad, same_in.grad, truth_in.grad, atol=GRAD_ATOL[dtype],
                       rtol=0 if dtype == torch.float64 else 1e-6, what=f"grad {backend} {dtype}")
    assert_elementwise_as_accurate(leaf.grad, same_in.grad, truth_in.grad, atol=GRAD_ATOL[dtype],
                                   rtol=0 if dtype == torch.float64 else 1e-6,
                                   what=f"grad {backend} {dtype} (entrywise)")
    assert (leaf.grad[ignored] == 0).all()  # ignored tokens (and fully masked rows): no gradient
    return out, leaf.grad


def blockwise_token_logprobs(logits, labels, dtype, rows=256):
    """``reference.token_logprobs(logits.to(dtype), labels)`` computed ``rows`` tokens at a time, so
    float64 truth for full-size logits needs one [rows, V] block at a time, not a float64 copy of
    all of them (the log-softmax of one row does not depend on the others)."""
    from sppo_fast import reference as R

    V = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(flat_labels.shape, dtype=acc, device=logits.device)
    for i in range(0, flat.shape[0], rows):
        out[i:i + rows] = R.token_logprobs(flat[i:i + rows].to(dtype), flat_labels[i:i + rows])
    return out.view(labels.shape)


def check_full_size(logits, labels, backend, rows=256):
    """Forward at full size through ``backend``, token and sequence log-probs, against float64 truth
    computed block by block; the same-dtype reference (float32 log-softmax, float32 sums, as
    reference.sequence_logps) sets the allowance."""
    truth_tok = blockwise_token_logprobs(logits, labels, torch.float64, rows)
    same_tok = blockwise_token_logprobs(logits, labels, logits.dtype, rows)
    tok = sppo_fast.token_logprobs(logits, labels, backend=backend)
    assert_as_accurate(tok, same_tok, truth_tok, atol=TOK_ATOL[logits.dtype], rtol=OUT_ULP[tok.dtype],
                       what=f"token_logprobs {backend} full size")
    del tok
    seq = sppo_fast.sequence_logps(logits, labels, backend=backend)
    assert_as_accurate(seq, same_tok.sum(-1), truth_tok.sum(-1), atol=FWD_ATOL[logits.dtype],
                       rtol=OUT_ULP[seq.dtype], what=f"sequence_logps {backend} full size")


def check_fused_loss_backend(backend, device, loss_type, gen):
    """fused_sppo_loss through ``backend`` on ``device`` equals the reference backend's, loss and
    logits gradient (upstream gradient 0.3), for ``loss_type``, with probabilities drawn fresh."""
    from _data import make_batch

    logits, labels = make_batch(4, 21, 1001, torch.float32, gen)
    logits, labels = logits.to(device), labels.to(device)
    u = torch.rand(3, 2, generator=gen)
    probs = {"chosen_probs_win": 0.5 + u[0] / 2, "chosen_probs_lose": u[1] / 2, "chosen_probs": u[2]}
    probs = {k: v.to(device) for k, v in probs.items()}
    ref = torch.randn(4, generator=gen).to(device)
    res = {}
    for be in (backend, "reference"):
        x = logits.clone().requires_grad_()
        loss, _, _ = sppo_fast.fused_sppo_loss(x, labels, ref, beta=0.1, loss_type=loss_type, backend=be, **probs)
        (loss * 0.3).backward()
        res[be] = (loss, x.grad)
    torch.testing.assert_close(res[backend][0], res["reference"][0], rtol=1e-5, atol=1e-4)
    scale = res["reference"][1].abs().max().item()  # both float32: a tolerance on the gradient's scale
    torch.testing.assert_close(res[backend][1], res["reference"][1], rtol=1e-4, atol=1e-6 * max(1.0, scale))


def check_ignore_index_values(backend, device, dtype, gen):
    """token_logprobs with ignore_index values other than -100, forward and backward: one inside
    the vocabulary (7: a real column, still ignored) and one past its end (V + 5)."""
    from _data import make_batch

    V = 523
    for ignore in (7, V + 5):
        logits, labels = make_batch(3, 11, V, dtype, gen)
        labels[labels == ignore] = 8  # only the rows set below are ignored
        labels[labels == -100] = ignore
        labels[1, 4:6] = ignore
        _, grad = check_token_logprobs(logits.to(device), labels.to(device), gen, backend, ignore_index=ignore)
        assert (grad[labels == ignore] == 0).all()
        assert (grad[labels != ignore] != 0).any(-1).all()  # the labelled tokens do get a gradient


def check_all_neg_inf_row(backend, device, dtype, gen):
    """A labelled token whose logits are all -inf has no softmax: its log-prob and every entry of
    its gradient are NaN, as in the float64 reference, and the other tokens are unaffected."""
    from _data import make_batch
    from sppo_fast import reference as R

    logits, labels = make_batch(2, 5, 301, dtype, gen, ignore_frac=0)
    logits[1, 2] = float("-inf")
    truth_in = logits.double().clone().requires_grad_()
    truth = R.token_logprobs(truth_in, labels)
    same_in = logits.clone().requires_grad_()
    same = R.token_logprobs(same_in, labels)
    leaf = logits.clone().to(device).requires_grad_()
    out = sppo_fast.token_logprobs(leaf, labels.to(device), backend=backend)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64) * 3
    for x, y in ((truth, truth_in), (same, same_in), (out, leaf)):
        (x * g.to(x)).sum().backward()
    assert torch.isnan(truth[1, 2]) and torch.isnan(truth_in.grad[1, 2]).all()  # what the truth says
    out, grad = out.detach().cpu(), leaf.grad.cpu()
    assert torch.isnan(out[1, 2]), f"{backend}: a token with all -inf logits gave {out[1, 2].item()}, not NaN"
    assert torch.isnan(grad[1, 2]).all(), f"{backend}: its gradient has non-NaN entries"
    other = torch.ones(2, 5, dtype=torch.bool)
    other[1, 2] = False
    assert_as_accurate(out[other], same.detach()[other], truth.detach()[other], atol=TOK_ATOL[dtype],
                       rtol=OUT_ULP[out.dtype], what=f"other tokens {backend} {dtype}")
    assert_as_accurate(grad[other], same_in.grad[other], truth_in.grad[other], atol=GRAD_ATOL[dtype],
                       rtol=0 if dtype == torch.float64 else 1e-6, what=f"other grads {backend} {dtype}")


def check_pairwise_backend(cmp, mode, backend, device):
    """pairrm_aggregate through ``backend`` on ``device`` against the reference: scores and the
    integer fields bit for bit (NumPy's summation order), probabilities to 1e-14."""
    a = sppo_fast.pairrm_aggregate(cmp.to(device), mode, backend=backend)
    b = sppo_fast.pairrm_aggregate(cmp, mode, backend="reference")
    for name, x, y in zip(a._fields, a, b):
        x = x.cpu()
        if name == "scores" or not x.dtype.is_floating_point:
            assert torch.equal(x, y), name
        else:
            assert torch.allclose(x, y, rtol=1e-14, atol=0), name
