"""Bad input gets a ValueError or TypeError that names the argument and the problem."""

import pytest
import torch

import sppo_fast


def _ok(B=2, T=5, V=11):
    logits = torch.randn(2 * B, T, V)
    labels = torch.randint(0, V, (2 * B, T))
    ref = torch.randn(2 * B)
    probs = {"chosen_probs_win": torch.full((B,), 0.7), "chosen_probs_lose": torch.full((B,), 0.3)}
    return logits, labels, ref, probs


BACKENDS = ["cpp", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(logits=a["logits"].long()), TypeError, "logits: expected float32"),
    (lambda a: a.update(logits=a["logits"][0]), ValueError, r"logits: expected \[B, T, V\]"),
    (lambda a: a.update(logits=a["logits"][:3]), ValueError, "logits: expected an even batch"),
    (lambda a: a.update(logits=a["logits"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "stride 1"),
    (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels: expected an integer dtype"),
    (lambda a: a.update(labels=a["labels"][:, :3]), ValueError, "labels: shape"),
    (lambda a: a["labels"].__setitem__((1, 2), 11), ValueError, r"labels: 1 label\(s\) outside \[0, 11\)"),
    (lambda a: a["labels"].__setitem__((0, 0), -5), ValueError, r"first at \(0, 0\): -5"),
    (lambda a: a.update(ref=a["ref"][:3]), ValueError, r"ref_logps: expected shape \(4,\)"),
    (lambda a: a["probs"]["chosen_probs_win"].__setitem__(0, float("nan")), ValueError,
     "chosen_probs_win: probabilities must lie in \\[0, 1\\] and not be NaN; got 1 NaN"),
    (lambda a: a["probs"]["chosen_probs_lose"].__setitem__(1, 1.5), ValueError, "chosen_probs_lose:.*max 1.5"),
    (lambda a: a["probs"].pop("chosen_probs_lose"), ValueError, "needs chosen_probs_win and chosen_probs_lose"),
    (lambda a: a.update(beta=0.0), ValueError, "beta: must be a finite number > 0"),
    (lambda a: a.update(beta=-1.0), ValueError, "beta: must be a finite number > 0"),
    (lambda a: a.update(beta=float("inf")), ValueError, "beta"),
    (lambda a: a.update(loss_type="dpo"), ValueError, "loss_type: expected one of"),
    (lambda a: a.update(loss_type="sppo_single"), ValueError, "needs chosen_probs"),
])
def test_fused_bad_input(backend, mutate, exc, match):
    logits, labels, ref, probs = _ok()
    args = {"logits": logits, "labels": labels, "ref": ref, "probs": probs, "beta": 0.001, "loss_type": "sppo"}
    mutate(args)
    with pytest.raises(exc, match=match):
        sppo_fast.fused_sppo_loss(args["logits"], args["labels"], args["ref"], beta=args["beta"],
                                  loss_type=args["loss_type"], backend=backend, **args["probs"])


def test_labels_device_mismatch():
    logits, labels, ref, probs = _ok()
    meta = labels.to("meta")
    with pytest.raises(ValueError, match="labels: on meta but logits on cpu"):
        sppo_fast.sequence_logps(logits, meta)


def test_meta_tensors_are_refused_by_name():
    """Every op checks values before it runs; meta tensors have none (torch's own error was 'Tensor.item()
    cannot be called on meta tensors', from inside a check)."""
    logits, labels, ref, probs = _ok()
    m = {k: v.to("meta") for k, v in probs.items()}
    calls = {
        "logits": lambda: sppo_fast.sequence_logps(logits.to("meta"), labels.to("meta")),
        "hidden": lambda: sppo_fast.linear_sequence_logps(torch.randn(4, 5, 3, device="meta"),
                                                         torch.randn(11, 3), labels),
        "weight": lambda: sppo_fast.linear_sequence_logps(torch.randn(4, 5, 3), torch.randn(11, 3, device="meta"),
                                                          labels),
        "cmp": lambda: sppo_fast.pairrm_aggregate(torch.randn(2, 3, 3, device="meta")),
        "policy_chosen_logps": lambda: sppo_fast.sppo_loss(*[ref[:2].to("meta")] * 4, **m),
        "chosen_probs_win": lambda: sppo_fast.sppo_targets(**m),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"^{name}: tensors on the meta device carry no values"):
            call()
    assert sppo_fast.available_backends("meta") == []
    with pytest.raises(sppo_fast.BackendUnavailableError, match="no backend can run on meta"):
        sppo_fast.resolve_backend("auto", torch.device("meta"))


def test_ignore_index_type():
    logits, labels, _, _ = _ok()
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        sppo_fast.sequence_logps(logits, labels, ignore_index=-100.0)


def test_unknown_backend_and_mode():
    logits, labels, _, _ = _ok()
    with pytest.raises(ValueError, match="backend: expected one of"):
        sppo_fast.sequence_logps(logits, labels, backend="numba")
    with pytest.raises(ValueError, match="mode: expected one of"):
        sppo_fast.pairrm_aggregate(torch.zeros(1, 3, 3), mode="bradley-terry")


def test_unavailable_backends_say_why(monkeypatch):
    logits, labels, _, _ = _ok()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # outside the interpreter: CUDA only
    with pytest.raises(sppo_fast.BackendUnavailableError, match="'triton' runs on CUDA tensors"):
        sppo_fast.sequence_logps(logits, labels, backend="triton")
    with pytest.raises(sppo_fast.BackendUnavailableError, match="backend 'cuda' runs on CUDA tensors"):
        sppo_fast.sequence_logps(logits, labels, backend="cuda")


def test_sppo_loss_bad_input():
    x = torch.randn(3)
    with pytest.raises(ValueError, match=r"ref_rejected_logps: expected shape \(3,\)"):
        sppo_fast.sppo_loss(x, x, x, torch.randn(4), loss_type="sppo_hard")
    with pytest.raises(ValueError, match="policy_chosen_logps: expected a \\[B\\] tensor"):
        sppo_fast.sppo_loss(torch.randn(3, 2), x, x, x, loss_type="sppo_hard")
    with pytest.raises(ValueError, match="chosen_probs: probabilities must lie"):
        sppo_fast.sppo_loss(x, x, x, x, chosen_probs=torch.tensor([0.1, -0.2, 0.3]), loss_type="sppo_single")
    with pytest.raises(TypeError, match="beta: expected a float, got Tensor"):
        sppo_fast.sppo_loss(x, x, x, x, beta=torch.tensor(0.1), loss_type="sppo_hard")
    with pytest.raises(TypeError, match="policy_chosen_logps: expected a torch.Tensor, got list"):
        sppo_fast.sppo_loss([1.0, 2.0, 3.0], x, x, x, loss_type="sppo_hard")
    with pytest.raises(ValueError, match=r"ref_rejected_logps: 1 value\(s\) NaN or infinite"):
        sppo_fast.sppo_loss(x, x, x, torch.tensor([0.0, float("inf"), 1.0]), loss_type="sppo_hard")


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"chosen_probs_win": torch.tensor([float("nan")]), "chosen_probs_lose": torch.tensor([0.3])}, ValueError,
     "chosen_probs_win: probabilities must lie in \\[0, 1\\] and not be NaN; got 1 NaN"),
    ({"chosen_probs_win": torch.tensor([0.2]), "chosen_probs_lose": torch.tensor([1.5])}, ValueError,
     "chosen_probs_lose: probabilities must lie .* max 1.5"),
    ({"chosen_probs_win": torch.tensor([0.2, 0.4]), "chosen_probs_lose": torch.tensor([0.3])}, ValueError,
     r"chosen_probs_lose: expected shape \(2,\), got \(1,\)"),
    ({"chosen_probs_win": torch.tensor([[0.2]]), "chosen_probs_lose": torch.tensor([0.3])}, ValueError,
     r"chosen_probs_win: expected shape \[B\]"),
    ({"chosen_probs_win": [0.2], "chosen_probs_lose": torch.tensor([0.3])}, TypeError,
     "chosen_probs_win: expected a torch.Tensor, got list"),
    ({"loss_type": "sppo_hard", "beta": 0}, ValueError, "beta: must be a finite number > 0, got 0.0"),
    ({"chosen_probs": torch.tensor([0.2])}, ValueError, "loss_type='sppo' needs chosen_probs_win"),
])
def test_sppo_targets_checks_what_the_losses_check(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sppo_fast.sppo_targets(**kwargs)


def test_sppo_targets_values_and_next_token_labels_input():
    w, l = sppo_fast.sppo_targets(chosen_probs_win=torch.tensor([0.7, 0.5]), chosen_probs_lose=torch.tensor([0.3, 0.1]),
                                  beta=0.1)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(l, torch.tensor([-2.0, -4.0]))
    assert sppo_fast.sppo_targets(loss_type="sppo_hard", beta=0.25) == (2.0, -2.0)
    with pytest.raises(TypeError, match="labels: expected a torch.Tensor, got list"):
        sppo_fast.next_token_labels([[1, 2]])
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        sppo_fast.next_token_labels(torch.zeros(2, 3))
    assert sppo_fast.next_token_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]

@pytest.mark.parametrize("backend", BACKENDS + ["triton"])  # (triton: the interpreter; its launcher wants ints)
def test_numpy_scalars_are_numbers_and_ref_logps_must_be_finite(backend):
    """beta, ignore_index and chunk_tokens as NumPy scalars (np.float32 was refused while np.float64,
    a float subclass, passed); a NaN reference log-prob is named (it made the loss NaN silently);
    a bad chunk size fails whatever the backend (the reference accepted -5)."""
    import numpy as np

    logits, labels, ref, probs = _ok()
    want = sppo_fast.fused_sppo_loss(logits, labels, ref, beta=0.1, backend=backend, **probs)[0]
    got = sppo_fast.fused_sppo_loss(logits, labels, ref, beta=np.float32(0.1), ignore_index=np.int64(-100),
                                    backend=backend, **probs)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    bad = ref.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"ref_logps: 1 value\(s\) NaN or infinite"):
        sppo_fast.fused_sppo_loss(logits, labels, bad, backend=backend, **probs)
    h, w = torch.randn(*labels.shape, 8), torch.randn(logits.shape[-1], 8)
    torch.testing.assert_close(
        sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, beta=np.float32(0.1), chunk_tokens=np.int64(3),
                                         backend=backend, **probs)[0],
        sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, beta=0.1, chunk_tokens=3, backend=backend, **probs)[0])
    for call in (lambda: sppo_fast.fused_linear_sppo_loss(h, w, labels, ref, chunk_tokens=-5, backend=backend, **probs),
                 lambda: sppo_fast.linear_sequence_logps(h, w, labels, chunk_tokens=0, backend=backend)):
        with pytest.raises(ValueError, match="chunk_tokens: expected a positive int"):
            call()
    with pytest.raises(ValueError, match=r"ref_logps: 1 value\(s\) NaN or infinite"):
        sppo_fast.fused_linear_sppo_loss(h, w, labels, bad, backend=backend, **probs)


@pytest.mark.parametrize("cmp, exc, match", [
    (torch.zeros(3, 3), ValueError, r"cmp: expected \[B, K, K\]"),
    (torch.zeros(2, 3, 4), ValueError, r"cmp: expected \[B, K, K\]"),
    (torch.zeros(2, 1, 1), ValueError, "K >= 2"),
    (torch.zeros(2, 3, 3, dtype=torch.long), TypeError, "cmp: expected a floating dtype"),
    (torch.tensor([[[0.0, float("nan")], [1.0, 0.0]]]), ValueError, "cmp: contains NaN"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_bad_input(cmp, exc, match, backend):
    with pytest.raises(exc, match=match):
        sppo_fast.pairrm_aggregate(cmp, backend=backend)


def test_nan_on_diagonal_is_ignored():
    cmp = torch.zeros(1, 3, 3)
    cmp[0, 1, 1] = float("nan")
    assert torch.isfinite(sppo_fast.pairrm_aggregate(cmp).probs).all()


def test_a_failing_extension_in_an_installed_tree_is_named_as_it_is(monkeypatch):
    """Where a finder knows the extension (an editable install keeps it in site-packages), a failed
    import is its own error, not "imported from its source tree"."""
    from sppo_fast import _native

    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("undefined symbol: bar"))
    assert _native.unavailable_reason() == "sppo_fast._C failed to import: undefined symbol: bar"


def test_source_tree_without_extension_says_so(tmp_path):
    """Python run inside a checkout imports its ``sppo_fast/`` folder, which holds no built
    extension: the fallback warning and ``cpu_isa()`` name that (not Python's "circular import")."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = Path(sppo_fast.__file__).parent
    shutil.copytree(src, tmp_path / "sppo_fast", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "csrc").mkdir()
    code = """
import sys, warnings
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
import sppo_fast, torch
assert sppo_fast.__file__.startswith(sys.argv[1]), sppo_fast.__file__
try:
    sppo_fast.cpu_isa()
except sppo_fast.BackendUnavailableError as exc:
    print("cpu_isa:", exc)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    sppo_fast.sequence_logps(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))
print("warning:", w[0].message if w else None)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("cpu_isa:", "warning:"):
        out = next(x for x in r.stdout.splitlines() if x.startswith(line))
        assert f"imported from its source tree {tmp_path}" in out and "pip install" in out, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairrm_aggregate_carries_no_gradient_on_any_backend(backend):
    """A ranking: the reference's torch ops kept a graph (scores requiring grad) where cpp's did not."""
    cmp = torch.randn(3, 4, 4, requires_grad=True)
    res = sppo_fast.pairrm_aggregate(cmp, backend=backend)
    assert not any(t.requires_grad for t in res if isinstance(t, torch.Tensor))
