"""The Triton backend against the float64 reference. Without a GPU the kernels run in Triton's
interpreter on small uneven shapes; on a CUDA device the same tests run, plus full-size ones."""

import importlib.util

import numpy as np
import pytest
import torch

import sppo_fast

from _data import make_batch
from conftest import (DTYPES, TRITON_DEVICE, check_all_neg_inf_row, check_full_size, check_fused_loss_backend,
                      check_ignore_index_values, check_pairwise_backend, check_sequence_logps, check_token_logprobs, gpu)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEV = TRITON_DEVICE


def _check(logits, labels, gen, *, inplace=False):
    return check_sequence_logps(logits, labels, gen, "triton", inplace=inplace)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_sequence_logps_uneven(dtype, gen):
    logits, labels = make_batch(3, 17, 1271, dtype, gen, fully_masked=(1,))
    logits, labels = logits.to(DEV), labels.to(DEV)
    out, grad = _check(logits, labels, gen)
    assert out[1].item() == 0.0 and (grad[1] == 0).all()


def test_shifted_view_and_inplace(gen):
    logits, labels = make_batch(3, 11, 777, torch.bfloat16, gen, extra_time=1)
    logits, labels = logits.to(DEV), labels.to(DEV)
    assert not logits[:, :-1].is_contiguous()  # the kernels get the view's strides (check_sequence_logps)
    _check(logits[:, :-1], labels[:, 1:], gen)
    _check(logits, labels, gen, inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(dtype, gen):
    logits, labels = make_batch(2, 7, 515, dtype, gen, huge=True)
    _check(logits.to(DEV), labels.to(DEV), gen)


def test_row_split_across_programs(gen, monkeypatch):
    """A row longer than one program's share is cut across programs and recombined."""
    lp = pytest.importorskip("sppo_fast.kernels.logprobs")
    monkeypatch.setattr(lp, "DEFAULT_CONFIG", lp.LogprobConfig(block_v=128, split=256, num_warps=4))
    logits, labels = make_batch(2, 5, 1000, torch.float32, gen)  # 4 programs per row
    _check(logits.to(DEV), labels.to(DEV), gen)


@gpu
def test_autotuned_inplace_backward_keeps_its_input(gen, monkeypatch):
    """SPPO_FAST_AUTOTUNE=1 times the candidates on a scratch copy: an in-place backward still
    reads the logits it was given (timing runs on them would have overwritten them first)."""
    lp = pytest.importorskip("sppo_fast.kernels.logprobs")
    logits, labels = make_batch(3, 4, 3001, torch.bfloat16, gen)
    logits, labels = logits.to(DEV), labels.to(DEV)
    _, lse, _ = lp.logprob_fwd(logits, labels, -100)
    coef = torch.randn(3, 4, generator=gen).to(DEV)
    expect = lp.logprob_bwd(logits, labels, lse, coef, -100, torch.empty_like(logits))
    monkeypatch.setenv("SPPO_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(lp, "_TUNED", {})
    work = logits.clone()
    lp.logprob_bwd(work, labels, lse, coef, -100, work)
    assert lp._TUNED, "the autotuner did not run"
    torch.testing.assert_close(work, expect, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs(dtype, gen):
    """Per-token outputs and a per-token upstream gradient (the backward's coefficient varies along
    T, unlike a sequence sum's), on a logits[:, :-1] view with a fully masked row."""
    logits, labels = make_batch(3, 13, 1271, dtype, gen, fully_masked=(1,), extra_time=1)
    logits, labels = logits.to(DEV), labels.to(DEV)
    out, grad = check_token_logprobs(logits[:, :-1], labels[:, 1:], gen, "triton")
    assert (out[1] == 0).all() and (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_logprobs_2d(dtype, gen):
    x = (torch.randn(9, 301, generator=gen) * 3).to(dtype).to(DEV)
    labels = torch.randint(0, 301, (9,), generator=gen).to(DEV)
    labels[2] = -100
    check_token_logprobs(x, labels, gen, "triton")


def test_token_logprobs_huge(gen):
    logits, labels = make_batch(2, 7, 515, torch.float32, gen, huge=True)
    check_token_logprobs(logits.to(DEV), labels.to(DEV), gen, "triton")


@pytest.mark.parametrize("loss_type", sppo_fast.LOSS_TYPES)
def test_fused_loss(loss_type, gen):
    check_fused_loss_backend("triton", DEV, loss_type, gen)


@pytest.mark.parametrize("K", [2, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("mode", sppo_fast.PAIRWISE_MODES)
def test_pairwise(K, mode, gen):
    cmp = torch.randn(6, K, K, generator=gen, dtype=torch.float64) * 4
    check_pairwise_backend(cmp, mode, "triton", DEV)


@pytest.mark.parametrize("K", [5, 17])
@pytest.mark.parametrize("mode", sppo_fast.PAIRWISE_MODES)
def test_pairwise_float32_strided(K, mode, gen):
    """float32 scores of a transposed (strided) view, bit for bit the reference's."""
    cmp = (torch.randn(4, K, K, generator=gen) * 4).transpose(1, 2)
    check_pairwise_backend(cmp, mode, "triton", DEV)


def test_pairwise_float32_and_ties():
    cmp = torch.zeros(2, 4, 4)
    cmp[1, 2, 0] = 1.0
    res = sppo_fast.pairrm_aggregate(cmp.to(DEV), backend="triton")
    assert res.tied.tolist() == [True, False]
    assert res.chosen.tolist() == [0, 2] and res.rejected.tolist() == [0, 0]


def test_pairwise_too_many_candidates():
    with pytest.raises(ValueError, match="K <= 64"):
        sppo_fast.pairrm_aggregate(torch.zeros(1, 65, 65, device=DEV), backend="triton")


# ---- full sizes, GPU only ---------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("V", [32000, 128256])
def test_full_size_gpu(V, gen):
    """N = 16384 tokens against float64 truth computed 256 tokens at a time."""
    logits, labels = make_batch(8, 2048, V, torch.bfloat16, gen)
    check_full_size(logits.cuda(), labels.cuda(), "triton")


@gpu
def test_pairwise_gpu_matches_numpy(gen):
    cmp = torch.randn(4096, 5, 5, generator=gen, dtype=torch.float64)
    res = sppo_fast.pairrm_aggregate(cmp.cuda(), backend="triton")
    ref = sppo_fast.pairrm_aggregate(cmp, backend="reference")
    assert np.array_equal(res.scores.cpu().numpy(), ref.scores.numpy())
    assert torch.equal(res.chosen.cpu(), ref.chosen)


def test_kernels_compile_for_sm90():
    """Every kernel variant compiles for an H100 (sm_90), no GPU needed, as Triton's launcher
    specialises them at run time; the fused attention's launches keep everything in registers, and its
    key loop stays lean: the kernel timed on the H100 issued 65 instructions a score (Triton laid its
    gathers out against the dot's layout, moved 64-bit pointers through shared memory and computed
    the softmax twice, once in each layout); now 21 (uniform tiles) to 27."""
    import re

    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py"))],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 41 kernel variants for sm_90" in r.stdout  # 20 log-prob/pairwise + 21 attention
    print(r.stdout)  # (the census: registers, spills and instructions a score, by Triton version)
    if "stack bytes" in r.stdout:  # Triton's bundled cuobjdump read the cubins
        assert "attention launches that spill: none" in r.stdout, r.stdout
        for dt in ("bf16", "fp16"):
            for mask, most in (("len", 30), ("True", 32)):
                line = next(x for x in r.stdout.splitlines()
                            if x.startswith(f"attention {dt} rel=True qpos=False mask={mask}"))
                found = re.search(r"([\d.]+) / ([\d.]+) instructions", line)
                assert found, f"no uniform-tile branch found in the key loop: {line}"
                uniform, general = map(float, found.groups())
                assert uniform < general < most, line


def test_sass_census_of_the_attention(tmp_path):
    """benchmarks/sass_attention.py, the static sweep behind the attention's launch: one launch, its
    rows written, the census consistent with the compile test's (no spill, a uniform-tile branch)."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.csv"
    script = Path(__file__).parents[1] / "benchmarks" / "sass_attention.py"
    r = subprocess.run([sys.executable, str(script), "--launches", "64x64w4", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "could not read the cubin" in r.stderr + r.stdout:
        pytest.skip("Triton's bundled cuobjdump cannot read the cubin here")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(x["mode"], x["metric"]): float(x["value"]) for x in csv.DictReader(out.open())}
    assert rows[("rel", "stack")] == 0 and rows[("no-rel", "stack")] == 0
    assert 0 < rows[("rel", "instructions_uniform_tile")] < rows[("rel", "instructions_general_tile")]
    assert rows[("no-rel", "instructions")] < rows[("rel", "instructions_uniform_tile")]
    assert rows[("rel", "programs_per_sm")] >= 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on log(0), -inf - -inf
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_ignore_index_values_and_all_neg_inf_rows(dtype, gen):
    """ignore_index inside the vocabulary and past its end; a token whose logits are all -inf
    gives NaN (log-prob and gradient), as the reference does, and leaves the others alone."""
    check_ignore_index_values("triton", DEV, dtype, gen)
    check_all_neg_inf_row("triton", DEV, dtype, gen)
