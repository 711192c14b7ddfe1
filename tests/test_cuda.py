"""The CUDA backend (kernels compiled into sppo_fast._C) against the float64 reference.

GPU-only: skipped without a CUDA device. benchmarks/gpu_check.sh runs this file on the lent GPU
machine, once plainly and once under compute-sanitizer's memcheck.
"""

import pytest
import torch

import sppo_fast
from sppo_fast import _native

from _data import make_batch
from conftest import (DTYPES, HAS_CUDA, check_all_neg_inf_row, check_full_size, check_fused_loss_backend,
                      check_ignore_index_values, check_pairwise_backend, check_sequence_logps, check_token_logprobs)

pytestmark = pytest.mark.skipif(not HAS_CUDA or not _native.cuda_status()[0],
                                reason="needs a CUDA device and a CUDA build")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("V", [1271, 1272, 32000])  # odd and even rows: unaligned and aligned 16-byte loads
def test_sequence_logps(dtype, V, gen):
    logits, labels = make_batch(3, 33, V, dtype, gen, fully_masked=(1,))
    out, grad = check_sequence_logps(logits.cuda(), labels.cuda(), gen, "cuda")
    assert out[1].item() == 0.0 and (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("V", [1271, 32000])
def test_token_logprobs(dtype, V, gen):
    """Per-token outputs and a per-token upstream gradient (the backward's coefficient varies along
    T), on a logits[:, :-1] view with a fully masked row, and on [N, V] logits."""
    logits, labels = make_batch(3, 33, V, dtype, gen, fully_masked=(1,), extra_time=1)
    logits, labels = logits.cuda(), labels.cuda()
    out, grad = check_token_logprobs(logits[:, :-1], labels[:, 1:], gen, "cuda")
    assert (out[1] == 0).all() and (grad[1] == 0).all()
    check_token_logprobs(logits[0], labels[0], gen, "cuda")


def test_token_logprobs_huge(gen):
    big, big_labels = make_batch(2, 9, 515, torch.float32, gen, huge=True)
    check_token_logprobs(big.cuda(), big_labels.cuda(), gen, "cuda")


def test_views_inplace_huge(gen):
    logits, labels = make_batch(3, 17, 777, torch.bfloat16, gen, extra_time=1)
    logits, labels = logits.cuda(), labels.cuda()
    assert not logits[:, :-1].is_contiguous()  # the kernels get the view's strides (check_sequence_logps)
    check_sequence_logps(logits[:, :-1], labels[:, 1:], gen, "cuda")
    check_sequence_logps(logits, labels, gen, "cuda", inplace=True)
    big, big_labels = make_batch(2, 9, 515, torch.float32, gen, huge=True)
    check_sequence_logps(big.cuda(), big_labels.cuda(), gen, "cuda")


@pytest.mark.parametrize("loss_type", sppo_fast.LOSS_TYPES)
def test_fused_loss(loss_type, gen):
    check_fused_loss_backend("cuda", "cuda", loss_type, gen)


@pytest.mark.parametrize("K", [2, 5, 9, 64, 130])
@pytest.mark.parametrize("mode", sppo_fast.PAIRWISE_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
def test_pairwise(K, mode, dtype, strided, gen):
    cmp = torch.randn(33, K, K, generator=gen, dtype=dtype) * 4
    if strided:
        cmp = cmp.transpose(1, 2)
    check_pairwise_backend(cmp, mode, "cuda", "cuda")


@pytest.mark.parametrize("V", [32000, 128256])
def test_full_size(V, gen):
    """N = 16384 tokens, against float64 truth computed 256 tokens at a time (a float64 copy of all
    the logits would take 17 GB at V = 128256)."""
    logits, labels = make_batch(8, 2048, V, torch.bfloat16, gen)
    check_full_size(logits.cuda(), labels.cuda(), "cuda")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_ignore_index_values_and_all_neg_inf_rows(dtype, gen):
    """ignore_index inside the vocabulary and past its end; a token whose logits are all -inf
    gives NaN (log-prob and gradient), as the reference does, and leaves the others alone."""
    check_ignore_index_values("cuda", "cuda", dtype, gen)
    check_all_neg_inf_row("cuda", "cuda", dtype, gen)
