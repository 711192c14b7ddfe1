"""Public sppo_fast ops: argument checks, backend dispatch and autograd.

Every op takes ``backend="auto" | "reference" | "cpp" | "triton" | "cuda"``:

- ``reference``: the pure-PyTorch definition in :mod:`sppo_fast.reference` (any device).
- ``cpp``: the native CPU kernels of ``sppo_fast._C`` (CPU tensors).
- ``triton``: the Triton kernels of ``sppo_fast.kernels`` (CUDA tensors; CPU tensors only under
  Triton's interpreter, ``TRITON_INTERPRET=1``).
- ``cuda``: the CUDA kernels compiled into the extension (CUDA tensors; a build without nvcc, or
  a machine without a GPU, raises :class:`BackendUnavailableError` that says why).
- ``auto``: the fastest backend available for the tensors' device (``cpp`` on CPU, ``triton`` on a
  CUDA device when Triton is installed, else the reference).

The checks run once here, so every backend sees valid input: shapes, dtypes, devices, the label
range, probabilities in [0, 1] and not NaN, ``beta > 0``, a known ``loss_type`` or ``mode``.
Checking the label range reads the labels once ([B, T], cheap; on a GPU it is one host sync).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _native, _triton, reference
from ._native import BackendUnavailableError
from .reference import LOSS_TYPES, PAIRWISE_MODES, PairwiseResult

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "token_logprobs",
    "sequence_logps",
    "sppo_loss",
    "fused_sppo_loss",
    "pairrm_aggregate",
]

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)



# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
def _cuda_backend_problem(device: Optional[torch.device] = None) -> Optional[str]:
    if not _native.available():
        return _native.unavailable_reason()
    compiled, count, why = _native.cuda_status()
    if not compiled:
        return why
    if count == 0:
        return f"no CUDA device is available ({why})"
    if device is not None:
        # SASS runs on its own architecture, PTX on it and newer ones: one built arch <= the GPU's
        major, minor = torch.cuda.get_device_capability(device)
        sm = 10 * major + minor
        built = [int(re.match(r"\d+", a).group()) for a in _native._C.cuda_archs.split(",") if a]
        if built and not any(a <= sm for a in built):
            return (f"the CUDA kernels were built for sm_{_native._C.cuda_archs}, this GPU is sm_{sm}: "
                    f"rebuild with SPPO_FAST_CUDA_ARCHS={sm}")
    return None


def _backend_problem(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    if device.type == "meta":
        return _META
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available to this torch"
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got tensors on {device}"
        return None if _native.available() else _native.unavailable_reason()
    if name == "triton":
        return _triton.problem(device)
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        return _cuda_backend_problem(device)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this installation, fastest first (on a CPU,
    ``triton`` only under Triton's interpreter, and last)."""
    device = torch.device(device)
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference", "triton")
    return [b for b in order if _backend_problem(b, device) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend for ``device`` or raise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        choices = available_backends(device)
        if not choices:
            raise BackendUnavailableError(f"no backend can run on {device}: "
                                          f"{_backend_problem('reference', device)}")
        if device.type == "cpu" and choices[0] != "cpp":
            warnings.warn(f"sppo_fast: falling back to the reference backend: "
                          f"{_native.unavailable_reason()}", RuntimeWarning, stacklevel=3)
        return choices[0]
    problem = _backend_problem(backend, device)
    if problem is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {problem}")
    return backend


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


_META = ("tensors on the meta device carry no values, and every op checks values (label range, finite "
         "reference log-probs, probabilities in [0, 1]) before it runs; use real tensors")


def _refuse_meta(name: str, t: Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name}: {_META}")


def _check_logits(logits: Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    _refuse_meta("logits", logits)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits: expected float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in dims:
        want = " or ".join(("[N, V]", "[B, T, V]")[d - 2] for d in dims)
        raise ValueError(f"logits: expected {want}, got shape {_shape(logits)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits: the vocabulary dimension is empty, shape {_shape(logits)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits: the vocabulary (last) dimension must have stride 1, got strides "
                         f"{logits.stride()}; call .contiguous() first (views like logits[:, :-1] "
                         "are fine as they are)")


def _check_labels(labels: Tensor, logits: Tensor, ignore_index: int) -> Tensor:
    """Validate labels against logits; returns them as int64 (a copy only if they were not)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if _shape(labels) != _shape(logits)[:-1]:
        raise ValueError(f"labels: shape {_shape(labels)} does not match logits {_shape(logits)} "
                         f"(expected {_shape(logits)[:-1]})")
    if labels.device != logits.device:
        raise ValueError(f"labels: on {labels.device} but logits on {logits.device}")
    labels = labels.long()
    V = logits.shape[-1]
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):  # one host sync on a GPU
        idx = bad.nonzero()[0].tolist()
        count = int(bad.sum())
        raise ValueError(f"labels: {count} label(s) outside [0, {V}) that are not "
                         f"ignore_index={ignore_index}; first at {tuple(idx)}: "
                         f"{int(labels[tuple(idx)])}")
    return labels


def _check_logps(name: str, t: Tensor, n: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _refuse_meta(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if _shape(t) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device} but the log-probs are on {device}")


def _bad_values(name: str, t: Tensor, kind: str) -> str:
    """The message for a tensor whose values failed its check (``kind``: "probs" or "finite")."""
    if kind == "finite":
        bad = int((~torch.isfinite(t)).sum())
        return f"{name}: {bad} value(s) NaN or infinite; reference log-probs must be finite"
    isnan = t.isnan()
    real = t[~isnan]
    rng = (f", min {float(real.min()):.6g}, max {float(real.max()):.6g} of the others" if real.numel()
           else " (all of them)")
    return f"{name}: probabilities must lie in [0, 1] and not be NaN; got {int(isnan.sum())} NaN{rng}"


def _check_loss_args(loss_type: str, beta: float, n: int, device: torch.device,
                     chosen_probs_win: Optional[Tensor], chosen_probs_lose: Optional[Tensor],
                     chosen_probs: Optional[Tensor], finite: tuple = ()) -> float:
    """loss_type, beta, the [n] probabilities the loss type needs and the ``finite`` (name,
    tensor) pairs (reference log-probs), whose values are checked in one host sync; returns beta
    as a float."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, Tensor) or not isinstance(beta, numbers.Real) or isinstance(beta, bool):
        raise TypeError(f"beta: expected a float, got {type(beta).__name__}")
    beta = float(beta)  # (a NumPy scalar too)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a finite number > 0, got {beta}")
    if loss_type == "sppo" and (chosen_probs_win is None or chosen_probs_lose is None):
        raise ValueError("loss_type='sppo' needs chosen_probs_win and chosen_probs_lose")
    if loss_type == "sppo_single" and chosen_probs is None:
        raise ValueError("loss_type='sppo_single' needs chosen_probs")
    checks = [(name, p, "probs") for name, p in (("chosen_probs_win", chosen_probs_win),
                                                 ("chosen_probs_lose", chosen_probs_lose),
                                                 ("chosen_probs", chosen_probs)) if p is not None]
    for name, p, _ in checks:
        _check_logps(name, p, n, device)
    checks += [(name, t, "finite") for name, t in finite if t.numel()]
    if n and checks:
        flags = torch.stack([(~torch.isfinite(t)).any() if kind == "finite" else (t.isnan() | (t < 0) | (t > 1)).any()
                             for _, t, kind in checks]).tolist()  # one host sync on a GPU for them all
        for (name, t, kind), bad in zip(checks, flags):
            if bad:
                raise ValueError(_bad_values(name, t, kind))
    return beta


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
_IMPLS = {"cpp": _native, "cuda": _native, "triton": _triton}


@dataclass(frozen=True)
class _LogprobOptions:
    ignore_index: int
    inplace_backward: bool
    backend: str  # "cpp", "cuda" or "triton": the module in _IMPLS that runs the kernels


class _KernelLogprobs(torch.autograd.Function):
    """``(token_logp[B, T], seq_logp[B])`` of ``logits[B, T, V]`` through a kernel backend
    (``cpp``, ``cuda`` or ``triton``: the module ``_IMPLS[opts.backend]``).

    Saves only each row's (max, log-sum), i.e. its logsumexp. The backward gets one coefficient per token
    (``g_tok + g_seq[b]``) and writes ``coef * (onehot - softmax)`` in one pass; with
    ``inplace_backward`` the gradient overwrites the logits buffer (no second B*T*V tensor).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, opts: _LogprobOptions):
        tok, lse, seq = _IMPLS[opts.backend].logprob_fwd(logits, labels, opts.ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return tok, seq

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, not silently 0
    def backward(ctx, g_tok: Optional[Tensor], g_seq: Optional[Tensor]):
        logits, labels, lse = ctx.saved_tensors
        if g_tok is None and g_seq is None:
            return None, None, None
        B, T = labels.shape
        acc = lse.dtype
        if g_tok is None:
            coef = g_seq.to(acc)[:, None].expand(B, T)  # stride 0 along T: no [B, T] copy
        elif g_seq is None:
            coef = g_tok.to(acc)
        else:
            coef = g_tok.to(acc) + g_seq.to(acc)[:, None]
        inplace = ctx.opts.inplace_backward and _rows_disjoint(logits)
        impl = _IMPLS[ctx.opts.backend]
        out = logits if inplace else impl.empty_like_fresh(logits)
        impl.logprob_bwd(logits, labels, lse, coef, ctx.opts.ignore_index, out)
        if inplace:  # written through a raw pointer: tell autograd, so that another node that saved
            _increment_version(logits)  # these logits raises instead of reading the gradient
        return out, None, None


def _increment_version(t: Tensor) -> None:
    bump = getattr(torch.autograd.graph, "increment_version", None)  # (torch >= 2.2)
    (bump or torch._C._autograd._increment_version)(t)


def _rows_disjoint(x: Tensor) -> bool:
    """Whether the V-long rows of ``x[B, T, V]`` (unit stride along V) occupy disjoint memory.

    An expanded or overlapping view (stride 0, or rows closer than V apart) cannot take the
    gradient in place: several rows would write the same elements.
    """
    extent = x.shape[-1]
    for size, stride in sorted(((n, abs(s)) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n > 1),
                               key=lambda d: d[1]):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def _native_logprobs(logits3: Tensor, labels2: Tensor, ignore_index: int,
                     inplace_backward: bool, backend: str) -> tuple[Tensor, Tensor]:
    opts = _LogprobOptions(ignore_index, inplace_backward, backend)
    return _KernelLogprobs.apply(logits3, labels2, opts)


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100, *,
                   backend: str = "auto", inplace_backward: bool = False) -> Tensor:
    """``log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]``, 0 where ignored.

    Fused: one pass over each row (online max and sum of exponentials), saving only the row's
    logsumexp for the backward; the [N, V] log-softmax never exists.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``; fp32, bf16, fp16 or fp64; last dimension stride 1.
        labels: ``[N]`` or ``[B, T]`` integers in ``[0, V)`` or ``ignore_index``.
        backend: see :mod:`sppo_fast.ops`.
        inplace_backward: write the gradient into the logits' memory (they are consumed); ignored,
            with a fresh buffer instead, when the logits' rows overlap (e.g. an expanded tensor).
    Returns:
        Log-probabilities shaped like ``labels``; float32 (float64 for fp64 logits).
    """
    _check_logits(logits, (2, 3))
    labels = _check_labels(labels, logits, ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer: Triton's launcher takes Python ints)
    be = resolve_backend(backend, logits.device)
    if be == "reference":
        return reference.token_logprobs(logits, labels, ignore_index)
    if logits.dim() == 2:
        tok, _ = _native_logprobs(logits[:, None], labels[:, None], ignore_index, inplace_backward, be)
        return tok[:, 0]
    tok, _ = _native_logprobs(logits, labels, ignore_index, inplace_backward, be)
    return tok


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, *,
                   backend: str = "auto", inplace_backward: bool = False) -> Tensor:
    """``token_logprobs(logits, labels, ignore_index).sum(-1)``: log p(y | x) per sequence.

    Labels are aligned with the logits (see :func:`sppo_fast.next_token_labels`); a fully ignored
    sequence gets 0 and a zero gradient. The kernel backends accumulate the sums in double precision
    (``backend="reference"`` sums in the log-probs' own float type, as the reference does).

    Args:
        logits: ``[B, T, V]``, last dimension stride 1 (``logits[:, :-1]`` views work, no copy).
        labels: ``[B, T]``.
    Returns:
        ``[B]`` float32 (float64 for fp64 logits).
    """
    _check_logits(logits, (3,))
    labels = _check_labels(labels, logits, ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer: Triton's launcher takes Python ints)
    be = resolve_backend(backend, logits.device)
    if be == "reference":
        return reference.sequence_logps(logits, labels, ignore_index)
    _, seq = _native_logprobs(logits, labels, ignore_index, inplace_backward, be)
    return seq


def sppo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
              chosen_probs_win: Optional[Tensor] = None, chosen_probs_lose: Optional[Tensor] = None,
              chosen_probs: Optional[Tensor] = None, beta: float = 0.001, loss_type: str = "sppo",
              backend: str = "auto") -> Tensor:
    """Per-pair SPPO losses ``[B]``, exactly :func:`sppo_fast.reference.sppo_loss` after checks.

    This is O(B) arithmetic that every backend runs as the same few torch ops (autograd included);
    ``backend`` is accepted for a uniform signature and checked. See the reference for formulas.
    """
    if not isinstance(policy_chosen_logps, Tensor):
        raise TypeError(f"policy_chosen_logps: expected a torch.Tensor, got {type(policy_chosen_logps).__name__}")
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps: expected a [B] tensor, got "
                         f"{getattr(policy_chosen_logps, 'shape', type(policy_chosen_logps))}")
    n, device = policy_chosen_logps.shape[0], policy_chosen_logps.device
    for name, t in (("policy_chosen_logps", policy_chosen_logps),
                    ("policy_rejected_logps", policy_rejected_logps),
                    ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        _check_logps(name, t, n, device)
    beta = _check_loss_args(loss_type, beta, n, device, chosen_probs_win, chosen_probs_lose, chosen_probs,
                            finite=(("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)))
    resolve_backend(backend, device)
    return reference.sppo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_probs_win=chosen_probs_win, chosen_probs_lose=chosen_probs_lose,
        chosen_probs=chosen_probs, beta=beta, loss_type=loss_type)


def fused_sppo_loss(logits: Tensor, labels: Tensor, ref_logps: Tensor, *,
                    chosen_probs_win: Optional[Tensor] = None,
                    chosen_probs_lose: Optional[Tensor] = None,
                    chosen_probs: Optional[Tensor] = None, beta: float = 0.001,
                    loss_type: str = "sppo", ignore_index: int = -100, backend: str = "auto",
                    inplace_backward: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``sppo_loss(*sequence_logps(logits, labels).split(B), *ref_logps.split(B), ...).mean()``.

    The B chosen sequences come first in the batch, the B rejected ones after them. One fused path
    computes the per-sequence log-prob sums (never a [2B, T, V] log-softmax), the O(B) loss, and in
    the backward the gradient into the logits: every token of sequence s receives the same scalar
    ``dloss/dlogp_s``, so ``grad_logits = g_s * (onehot - softmax)`` is written in one pass.

    Args:
        logits: ``[2B, T, V]`` policy logits (``logits[:, :-1]`` views are accepted as they are).
        labels: ``[2B, T]`` aligned labels, ``ignore_index`` on prompt and padding.
        ref_logps: ``[2B]`` reference-model log-probs, same order.
        chosen_probs_win, chosen_probs_lose, chosen_probs: ``[B]`` SPPO probabilities.
        beta: ``1 / eta`` (0.001 in the released models).
        loss_type: ``"sppo"`` (default), ``"sppo_single"`` or ``"sppo_hard"``.
        inplace_backward: write the logits' gradient into the logits buffer.
    Returns:
        ``(loss, policy_logps[2B], metrics)``; the metrics are detached 0-d tensors with TRL's names
        (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen``, ``logps/rejected``) plus ``targets/chosen`` and ``targets/rejected``
        (the regression targets in reward units, ``beta * target``), read without a host sync.
    """
    _check_logits(logits, (3,))
    if logits.shape[0] % 2:
        raise ValueError(f"logits: expected an even batch [2B, T, V] (B chosen then B rejected), "
                         f"got shape {_shape(logits)}")
    labels = _check_labels(labels, logits, ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer: Triton's launcher takes Python ints)
    B = logits.shape[0] // 2
    _check_logps("ref_logps", ref_logps, 2 * B, logits.device)
    beta = _check_loss_args(loss_type, beta, B, logits.device, chosen_probs_win, chosen_probs_lose,
                            chosen_probs, finite=(("ref_logps", ref_logps),))
    be = resolve_backend(backend, logits.device)
    if be == "reference":
        policy = reference.sequence_logps(logits, labels, ignore_index)
        sums = policy
    else:
        tok, policy = _native_logprobs(logits, labels, ignore_index, inplace_backward, be)
        # the loss from float64 sums of the token log-probs: the float32 sum of a ~1000-nat
        # sequence carries ~6e-5 of rounding, which is all of the log-ratio's precision when it is
        # near its target; its gradient reaches the tokens directly (g_tok)
        sums = tok.sum(-1, dtype=torch.float64)
    acc = policy.dtype
    given = {"chosen_probs_win": chosen_probs_win, "chosen_probs_lose": chosen_probs_lose,
             "chosen_probs": chosen_probs}

    def cast(dtype):
        return ref_logps.to(dtype), {k: (None if v is None else v.to(dtype)) for k, v in given.items()}

    ref, probs = cast(acc)
    lref, lprobs = (ref, probs) if sums is policy else cast(sums.dtype)
    losses = reference.sppo_loss(sums[:B], sums[B:], lref[:B], lref[B:], beta=beta,
                                 loss_type=loss_type, **lprobs).to(acc)
    loss = losses.mean()
    return loss, policy, _metrics(policy.detach(), ref.detach(), beta, loss_type, probs)


def sppo_targets(*, chosen_probs_win: Optional[Tensor] = None, chosen_probs_lose: Optional[Tensor] = None,
                 chosen_probs: Optional[Tensor] = None, beta: float = 0.001,
                 loss_type: str = "sppo") -> tuple[Tensor | float, Tensor | float]:
    """:func:`sppo_fast.reference.sppo_targets` (the log-ratios SPPO regresses onto) after the checks
    the losses make: ``beta`` a finite number > 0, the probabilities the loss type needs given as
    ``[B]`` floating tensors of one length on one device, in [0, 1] and not NaN (one host sync)."""
    given = [(n, p) for n, p in (("chosen_probs_win", chosen_probs_win), ("chosen_probs_lose", chosen_probs_lose),
                                 ("chosen_probs", chosen_probs)) if p is not None]
    for name, p in given:
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
        if p.dim() != 1:
            raise ValueError(f"{name}: expected shape [B], got {_shape(p)}")
    n, device = (given[0][1].shape[0], given[0][1].device) if given else (0, torch.device("cpu"))
    beta = _check_loss_args(loss_type, beta, n, device, chosen_probs_win, chosen_probs_lose, chosen_probs)
    return reference.sppo_targets(chosen_probs_win=chosen_probs_win, chosen_probs_lose=chosen_probs_lose,
                                  chosen_probs=chosen_probs, beta=beta, loss_type=loss_type)


def _metrics(policy: Tensor, ref: Tensor, beta: float, loss_type: str,
             probs: dict[str, Optional[Tensor]]) -> dict[str, Tensor]:
    B = policy.shape[0] // 2
    a_w, a_l = policy[:B] - ref[:B], policy[B:] - ref[B:]
    t_w, t_l = reference.sppo_targets(beta=beta, loss_type=loss_type, **probs)
    t_w = torch.as_tensor(t_w, dtype=policy.dtype, device=policy.device).expand(B)
    t_l = torch.as_tensor(t_l, dtype=policy.dtype, device=policy.device).expand(B)
    return {
        "rewards/chosen": (beta * a_w).mean(),
        "rewards/rejected": (beta * a_l).mean(),
        "rewards/margins": (beta * (a_w - a_l)).mean(),
        "rewards/accuracies": (a_w > a_l).to(policy.dtype).mean(),
        "logps/chosen": policy[:B].mean(),
        "logps/rejected": policy[B:].mean(),
        "targets/chosen": (beta * t_w).mean(),
        "targets/rejected": (beta * t_l).mean(),
    }


def pairrm_aggregate(cmp: Tensor, mode: str = "official", *, backend: str = "auto") -> PairwiseResult:
    """PairRM's pairwise logits ``cmp[B, K, K]`` to scores, probabilities and the SPPO selection.

    Same result as :func:`sppo_fast.reference.pairrm_aggregate` (see there for the formulas):
    ``mode="official"`` (default) reproduces LLM-Blender's scores and SPPO's probabilities;
    ``mode="direct"`` uses each pair on its own, ``P[i, j] = sigmoid((cmp[i, j] - cmp[j, i]) / 2)``.
    The diagonal of ``cmp`` is ignored. Raises on NaN or +-inf in ``cmp`` (a NaN logit would silently
    pick a winner; an infinite one gives NaN scores). A ranking, not differentiable: the outputs
    carry no gradient whatever the backend (``cmp`` is read detached).
    """
    if not isinstance(cmp, Tensor):
        raise TypeError(f"cmp: expected a torch.Tensor, got {type(cmp).__name__}")
    _refuse_meta("cmp", cmp)
    if not cmp.dtype.is_floating_point:
        raise TypeError(f"cmp: expected a floating dtype, got {cmp.dtype}")
    if cmp.dim() != 3 or cmp.shape[1] != cmp.shape[2]:
        raise ValueError(f"cmp: expected [B, K, K], got shape {_shape(cmp)}")
    if cmp.shape[1] < 2:
        raise ValueError(f"cmp: need K >= 2 candidates per prompt, got K = {cmp.shape[1]}")
    if mode not in PAIRWISE_MODES:
        raise ValueError(f"mode: expected one of {PAIRWISE_MODES}, got {mode!r}")
    cmp = cmp.detach()  # (the reference's torch ops would otherwise carry a graph that cpp's do not)
    K = cmp.shape[1]
    off_diag = ~torch.eye(K, dtype=torch.bool, device=cmp.device)
    if cmp.numel() and not bool(cmp[:, off_diag].isfinite().all()):  # inf - inf would make NaN scores
        raise ValueError("cmp: contains NaN or +-inf off the diagonal (an overflowed ranker logit?)")
    be = resolve_backend(backend, cmp.device)
    if be == "triton" and K > 64 and backend == "auto":
        be = "reference"  # the Triton kernel keeps a prompt's K x K block in one program
    if be == "reference":
        return reference.pairrm_aggregate(cmp, mode)
    work = cmp if cmp.dtype in (torch.float32, torch.float64) else cmp.float()
    return _IMPLS[be].pairwise(work, mode)
