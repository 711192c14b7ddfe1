"""Token and sequence log-probs of the cpp backend against the float64 reference, with gradients."""

import pytest
import torch

import sppo_fast
from sppo_fast import reference as R

from _data import make_batch
from conftest import (DTYPES, GRAD_ATOL, assert_as_accurate, check_all_neg_inf_row, check_ignore_index_values,
                      check_sequence_logps, check_token_logprobs, cuda_backend)


def _check_seq(logits, labels, gen, *, inplace=False):
    return check_sequence_logps(logits, labels, gen, "cpp", inplace=inplace)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_sequence_logps_uneven(isa, dtype, gen):
    logits, labels = make_batch(5, 97, 1271, dtype, gen, fully_masked=(3,))
    out, grad = _check_seq(logits, labels, gen)
    assert out[3].item() == 0.0
    assert (grad[3] == 0).all()  # fully masked sequence: zero gradient
    assert (grad[labels == -100] == 0).all()  # ignored positions get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(isa, dtype, gen):
    logits, labels = make_batch(3, 17, 515, dtype, gen, huge=True)
    _check_seq(logits, labels, gen)


def test_float16_large_magnitude(isa, gen):
    """|x| up to ~1e4 also in float16 (its range ends at 65504)."""
    logits, labels = make_batch(3, 17, 515, torch.float16, gen, scale=2000.0)
    _check_seq(logits, labels, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_view_without_copy(dtype, gen):
    """logits[:, :-1] with labels[:, 1:] (Hugging Face shift) equals aligned labels on full logits."""
    logits, labels = make_batch(3, 40, 777, dtype, gen, extra_time=1)
    view = logits[:, :-1]
    assert not view.is_contiguous()
    # forward and backward on the view itself (its strides reach the kernel) against float64
    a, _ = _check_seq(view, labels[:, 1:], gen)
    b = sppo_fast.sequence_logps(logits, sppo_fast.next_token_labels(labels), backend="cpp")
    torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-4)
    # the gradient reaches the original buffer through the view, zero on the dropped position
    g = torch.randn(3, generator=gen, dtype=torch.float64) * 3
    x = logits.clone().requires_grad_()
    (sppo_fast.sequence_logps(x[:, :-1], labels[:, 1:], backend="cpp") * g.float()).sum().backward()
    assert (x.grad[:, -1] == 0).all()
    ref_x = logits.double().requires_grad_()
    (R.sequence_logps(ref_x[:, :-1], labels[:, 1:]) * g).sum().backward()
    same_x = logits.clone().requires_grad_()
    (R.sequence_logps(same_x[:, :-1], labels[:, 1:]) * g.float()).sum().backward()
    assert_as_accurate(x.grad, same_x.grad, ref_x.grad, atol=GRAD_ATOL[dtype], rtol=1e-6, what="grad")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(7, 1271), (2, 3, 1), (4, 11, 1271)])
def test_token_logprobs(isa, shape, dtype, gen):
    """Forward and backward with a per-token upstream gradient; [B, T, V] as a logits[:, :-1] view
    with a fully masked row."""
    V = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, shape[:-1], generator=gen)
    labels.view(-1)[0] = -100
    if len(shape) == 3:
        x = torch.cat([x, x[:, :1]], 1)[:, :-1]  # a strided view
        labels[-1] = -100
    out, grad = check_token_logprobs(x, labels, gen, "cpp")
    assert out.view(-1)[0].item() == 0.0
    if len(shape) == 3:
        assert not x.is_contiguous()
        assert (out[-1] == 0).all() and (grad[-1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_huge(isa, dtype, gen):
    kw = dict(scale=2000.0) if dtype == torch.float16 else dict(huge=True)  # float16 ends at 65504
    logits, labels = make_batch(3, 17, 515, dtype, gen, fully_masked=(0,), **kw)
    out, grad = check_token_logprobs(logits, labels, gen, "cpp")
    assert (out[0] == 0).all() and (grad[0] == 0).all()


def test_token_and_sequence_gradients_combine(gen):
    """A loss that uses both token and sequence outputs of the same logits gets the sum of both."""
    logits, labels = make_batch(3, 11, 301, torch.float64, gen)
    x = logits.clone().requires_grad_()
    xt = logits.clone().requires_grad_()
    tok = sppo_fast.token_logprobs(x, labels, backend="cpp")
    seq = sppo_fast.sequence_logps(x, labels, backend="cpp")
    ((tok ** 2).sum() + (seq * torch.arange(3.0, dtype=torch.float64)).sum()).backward()
    tt = R.token_logprobs(xt, labels)
    st = R.sequence_logps(xt, labels)
    ((tt ** 2).sum() + (st * torch.arange(3.0, dtype=torch.float64)).sum()).backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(isa, gen):
    logits, labels = make_batch(3, 5, 13, torch.float64, gen, fully_masked=(1,))
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: sppo_fast.sequence_logps(t, labels, backend="cpp"), (x,))
    assert torch.autograd.gradcheck(
        lambda t: sppo_fast.token_logprobs(t, labels, backend="cpp"), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward(dtype, gen):
    """inplace_backward: the gradient lands in the logits' memory, as accurate as the float64
    reference's (random upstream gradient), and bit for bit the out-of-place gradient."""
    logits, labels = make_batch(4, 23, 1271, dtype, gen, fully_masked=(2,))
    _, grad = _check_seq(logits, labels, gen, inplace=True)  # asserts the data_ptr too
    assert (grad[2] == 0).all()
    x = logits.clone().requires_grad_()
    out = sppo_fast.sequence_logps(x * 1, labels, backend="cpp", inplace_backward=True)
    ref_x = logits.clone().requires_grad_()
    ref = sppo_fast.sequence_logps(ref_x, labels, backend="cpp")
    g = torch.randn(4, generator=gen)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


def test_inplace_backward_is_seen_by_other_users_of_the_logits(gen):
    """A node that saved the logits before the op overwrote them with their gradient raises
    autograd's in-place error instead of reading the gradient as logits; a second derivative
    through the op raises instead of silently dropping its part."""
    logits, labels = make_batch(2, 5, 11, torch.float32, gen)
    x = logits.clone().requires_grad_()
    buf = x * 1
    reg = (buf ** 2).sum()  # PowBackward saves buf
    out = sppo_fast.sequence_logps(buf, labels, backend="cpp", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + reg).backward()
    x = logits.double().requires_grad_()
    g, = torch.autograd.grad((sppo_fast.sequence_logps(x, labels, backend="cpp") ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_inplace_backward_overwrites_logits(gen):
    """The logits buffer handed to the op holds its own gradient afterwards (same memory), and the
    leaf's gradient through it matches the float64 reference (upstream gradient other than 1)."""
    logits, labels = make_batch(2, 9, 101, torch.float32, gen)
    leaf = logits.clone().requires_grad_()
    hidden = leaf * 2  # the logits buffer the op may consume
    seen = []
    hidden.register_hook(seen.append)
    out = sppo_fast.sequence_logps(hidden, labels, backend="cpp", inplace_backward=True)
    g = torch.randn(2, generator=gen, dtype=torch.float64) * 3
    (out * g.float()).sum().backward()
    assert seen[0].data_ptr() == hidden.data_ptr()
    assert torch.equal(hidden.detach(), seen[0])  # overwritten by its gradient
    assert not torch.equal(hidden.detach(), logits * 2)
    ref_leaf = logits.double().requires_grad_()
    (R.sequence_logps(ref_leaf * 2, labels) * g).sum().backward()
    same_leaf = logits.clone().requires_grad_()
    (R.sequence_logps(same_leaf * 2, labels) * g.float()).sum().backward()
    assert_as_accurate(leaf.grad, same_leaf.grad, ref_leaf.grad, atol=1e-6, rtol=1e-6, what="grad")
    torch.testing.assert_close(seen[0] * 2, leaf.grad, rtol=0, atol=0)


def test_large_vocab(gen):
    logits, labels = make_batch(2, 64, 32000, torch.bfloat16, gen)
    _check_seq(logits, labels, gen)


def test_threads_do_not_change_results(gen):
    logits, labels = make_batch(6, 33, 999, torch.float32, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = sppo_fast.token_logprobs(logits, labels, backend="cpp")
        torch.set_num_threads(max(2, old))
        b = sppo_fast.token_logprobs(logits, labels, backend="cpp")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


def test_next_token_labels():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 1, 2, -100, -100]])
    out = sppo_fast.next_token_labels(labels)
    assert out.tolist() == [[-100, 5, 6, 7, -100], [1, 2, -100, -100, -100]]
    assert sppo_fast.next_token_labels(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_empty_batch():
    x = torch.randn(0, 4, 10, requires_grad=True)
    labels = torch.zeros(0, 4, dtype=torch.long)
    out = sppo_fast.sequence_logps(x, labels, backend="cpp")
    assert out.shape == (0,)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_logits_get_exact_zero_gradient(isa, dtype, gen):
    """-inf logits (a masked vocabulary) get a gradient of exactly 0, as in the reference."""
    logits, labels = make_batch(3, 9, 600, dtype, gen)
    logits[:, :, 100:200] = float("-inf")
    labels[labels.ge(100) & labels.lt(200)] = 5
    x = logits.clone().requires_grad_()
    (sppo_fast.sequence_logps(x, labels, backend="cpp") * 2.5).sum().backward()
    assert (x.grad[:, :, 100:200] == 0).all()
    assert torch.isfinite(x.grad).all()


def test_inplace_backward_on_expanded_logits(gen):
    """Rows that share memory (an expanded tensor) cannot take the gradient in place: the op falls
    back to a fresh buffer and the gradient stays right."""
    base = torch.randn(1, 5, 301, generator=gen)
    labels = torch.randint(0, 301, (4, 5), generator=gen)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        x = (leaf * 1).expand(4, 5, 301)
        assert x.stride(0) == 0
        (sppo_fast.sequence_logps(x, labels, backend="cpp", inplace_backward=inplace)
         * torch.arange(1.0, 5.0)).sum().backward()
        grads.append(leaf.grad)
    leaf = base.double().requires_grad_()
    (R.sequence_logps(leaf.expand(4, 5, 301), labels) * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    for g in grads:
        torch.testing.assert_close(g.double(), leaf.grad, rtol=0, atol=1e-5)


def _slab_backward_matches_full_rows(impl, device, dtype, gen):
    """The backward on columns [c0, c1) of the rows (``col0 = c0``) writes exactly those columns of
    the full rows' gradient: the softmax from the full rows' statistics, the one-hot term only for
    labels inside the slice, ignored rows zero. In place too."""
    V = 301
    logits, labels = make_batch(3, 7, V, dtype, gen)
    labels[0, 2] = -100
    labels[1, :3] = torch.tensor([0, V - 1, 150])  # the first and last columns, and a boundary
    labels[2, 0] = 150 - 100  # label - col0 == ignore_index for the slice that starts at 150
    logits, labels = logits.to(device), labels.to(device)
    _, lse, _ = impl.logprob_fwd(logits, labels, -100)
    acc = lse.dtype
    coef = (torch.randn(3, 7, generator=gen, dtype=acc) * 3).to(device)
    full = impl.logprob_bwd(logits, labels, lse, coef, -100, torch.empty_like(logits))
    for c0, c1 in ((0, 150), (150, 151), (150, V), (37, 300), (300, V)):
        part = logits[..., c0:c1].contiguous()
        out = impl.logprob_bwd(part, labels, lse, coef, -100, torch.empty_like(part), col0=c0)
        torch.testing.assert_close(out, full[..., c0:c1], rtol=0, atol=0, msg=f"slice [{c0}, {c1})")
        impl.logprob_bwd(part, labels, lse, coef, -100, part, col0=c0)  # in place
        torch.testing.assert_close(part, full[..., c0:c1], rtol=0, atol=0, msg=f"in place [{c0}, {c1})")
    assert (full[0, 2] == 0).all()


def _label_logp_sets_the_label_entries(impl, device, dtype, gen):
    """``label_logp`` (linear.py's vocabulary pass): each label entry is ``-coef * expm1(label_logp)``
    to the dtype's rounding, at log-probs from -10 down to -1e-9 (where ``1 - p`` cancels); every other
    entry is what the backward writes without it; ignored rows stay zero (also an ignore_index that
    is a column); on slices (``col0``) and in place."""
    V, B, T = 301, 3, 7
    for ignore in (-100, 5):
        logits, labels = make_batch(B, T, V, dtype, gen)
        labels[labels == -100] = ignore
        labels[1, :3] = torch.tensor([0, V - 1, 150])
        labels[2, 1] = ignore
        logits, labels = logits.to(device), labels.to(device)
        _, lse, _ = impl.logprob_fwd(logits, labels, ignore)
        acc = lse.dtype
        coef = (torch.randn(B, T, generator=gen, dtype=acc) * 3).to(device)
        llp = -torch.logspace(-9, 1, B * T, dtype=torch.float64)[torch.randperm(B * T, generator=gen)]
        llp = llp.view(B, T).to(acc).to(device)
        plain = impl.logprob_bwd(logits, labels, lse, coef, ignore, torch.empty_like(logits))
        expect = (-coef.double() * torch.expm1(llp.double())).to(dtype)
        keep = labels != ignore
        for c0, c1 in ((0, V), (0, 150), (150, 151), (37, 300)):
            part = logits[..., c0:c1].clone()
            outs = [impl.logprob_bwd(part, labels, lse, coef, ignore, torch.empty_like(part), col0=c0,
                                     label_logp=llp)]
            outs.append(impl.logprob_bwd(part, labels, lse, coef, ignore, part, col0=c0, label_logp=llp))
            inside = keep & (labels >= c0) & (labels < c1)
            col = (labels - c0).clamp(0, c1 - c0 - 1)
            for out in outs:
                at_label = out.gather(-1, col[..., None])[..., 0]
                torch.testing.assert_close(at_label[inside].double(), expect[inside].double(),
                                           rtol=2 * torch.finfo(dtype).eps, atol=0)
                # every other entry unchanged, bit for bit
                other = torch.ones_like(out, dtype=torch.bool).scatter_(-1, col[..., None], ~inside[..., None])
                torch.testing.assert_close(out[other], plain[..., c0:c1][other], rtol=0, atol=0)
                assert (out[~keep] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_on_a_vocabulary_slice(isa, dtype, gen):
    _slab_backward_matches_full_rows(sppo_fast._native, "cpu", dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_on_a_vocabulary_slice_triton(dtype, gen):
    from sppo_fast import _triton
    from conftest import TRITON_DEVICE
    _slab_backward_matches_full_rows(_triton, TRITON_DEVICE, dtype, gen)


@cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_on_a_vocabulary_slice_cuda(dtype, gen):
    _slab_backward_matches_full_rows(sppo_fast._native, "cuda", dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_label_logp(isa, dtype, gen):
    _label_logp_sets_the_label_entries(sppo_fast._native, "cpu", dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_label_logp_triton(dtype, gen):
    from sppo_fast import _triton
    from conftest import TRITON_DEVICE
    _label_logp_sets_the_label_entries(_triton, TRITON_DEVICE, dtype, gen)


@cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_label_logp_cuda(dtype, gen):
    _label_logp_sets_the_label_entries(sppo_fast._native, "cuda", dtype, gen)


def test_label_logp_checked(gen):
    logits, labels = make_batch(2, 3, 50, torch.float32, gen)
    _, lse, _ = sppo_fast._native.logprob_fwd(logits, labels, -100)
    coef = torch.ones(2, 3)
    for bad in (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2).t()):
        with pytest.raises(ValueError, match="label_logp"):
            sppo_fast._native.logprob_bwd(logits, labels, lse, coef, -100, logits.clone(), label_logp=bad)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_ignore_index_values_and_all_neg_inf_rows(isa, dtype, gen):
    """ignore_index inside the vocabulary and past its end; a token whose logits are all -inf
    gives NaN (log-prob and gradient), as the reference does, and leaves the others alone."""
    check_ignore_index_values("cpp", "cpu", dtype, gen)
    check_all_neg_inf_row("cpp", "cpu", dtype, gen)
