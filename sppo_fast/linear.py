"""The lm_head matmul fused with log-prob gathering and the SPPO loss: the logits never exist.

``fused_linear_sppo_loss(hidden, weight, labels, ref_logps, ...)`` equals
``fused_sppo_loss(hidden @ weight.T + bias, labels, ref_logps, ...)`` with exact gradients for
``hidden``, ``weight`` and ``bias``, but holds at most one chunk of logits at a time.

Algorithm (gradient in the forward pass). The SPPO loss is a sum of per-sequence terms, so the
upstream gradient of every token of sequence ``s`` is one scalar, ``g_s = dloss/dlogp_s``, known as
soon as that sequence's log-prob sum is. The non-ignored tokens are gathered (prompt and padding
cost no FLOPs) and cut into chunks of whole sequences under a token budget. For each chunk:

1. ``logits = h_chunk @ W.T (+ b)`` into a reused [chunk, V] buffer (one GEMM);
2. the native forward kernel: per-token log-probs and the row's (max, log-sum), then the sequence
   sums, then ``g_s`` for every sequence of the chunk (all complete);
3. the native backward kernel turns the buffer in place into ``g_s * (onehot - softmax)``;
4. ``d_hidden[chunk] = G @ W`` and ``d_weight += G.T @ h_chunk`` (two GEMMs), ``d_bias += G.sum(0)``.

Three GEMMs in all, the minimum. A sequence longer than the budget is split into sub-chunks and
done in two passes (sums first, then recomputed logits and gradients): four GEMMs for its tokens.
The gradients are computed for an upstream gradient of 1 and scaled in ``backward``; if the
returned ``policy_logps`` also receive a gradient, one extra recompute pass adds its contribution.
Probabilities that require a gradient get the reference's (as ``ref_logps`` do; the labels none).

Where ``d_weight`` is summed (``weight_grad``). Step 4 adds every chunk's ``G.T @ h`` into one
[V, H] accumulator, which must be float32 to keep the sum accurate: for a 16-bit weight that is
twice the weight's size (2.1 GB for V = 128256, H = 4096), on top of the 16-bit gradient it is
finally cast to. ``weight_grad="recompute"`` has no such accumulator: step 4 only computes
``d_hidden`` and keeps each row's statistics (max, log-sum, log-prob), O(N); in ``backward``, with the true
upstream gradients, a second pass goes over slabs of the vocabulary instead of chunks of tokens:
``logits[:, slab] = h @ W[slab].T`` again, the kernel's backward on that slice of the rows, and
``d_weight[slab] = G.T @ h`` in one GEMM over all the tokens (float32 accumulation inside the
GEMM), written once in the weight's dtype. Four GEMMs instead of three (at most 75% of the GEMM
rate), and almost no memory beside the two gradients: ``d_weight`` is made in forward, and until
the pass writes them its rows are the chunk pass's logits buffer (chunks of at most
V H / (V + 2H) tokens; with ignored tokens the chunk's gathered hidden rows and their ``d_hidden``
lie beside the logits), then each slab's gradient (in the rows after the slab) and, with ignored tokens, the gathered
hidden rows (in the last R rows). The slabs shrink where that room runs out, and only the last few
columns use a buffer, of N x 256 (``MIN_SLAB``). The recomputed logits differ from the chunk
pass's in the last bits (another GEMM shape), so each label's ``1 - p`` is taken from the chunk
pass's log-prob, where it would otherwise cancel for a label the model is sure of.
(Float32 GEMMs on copies of a 16-bit weight, outside the 16-bit mode, use blocks of rows and
slabs in a buffer of their own, summed in float32.) Since
the slab's gradient is formed at the true upstream scale, a 16-bit ``d_weight`` rounds exactly
where the eager reference's does (under an fp16 loss scale too, where unit-scale logit gradients
of ~1e-5 would be subnormal), and a gradient through ``policy_logps`` costs no extra ``d_weight``
pass. ``accumulate_fraction=f`` sits between the two: in the recompute mode, the chunk pass also sums
the first ``f V`` rows of ``d_weight`` in float32 (as accumulate sums all of them), the vocabulary
pass does the other columns, and those rows, copied in last, are until then its room for the
last slabs (instead of the N x 256 buffer, where large enough). The default (``"auto"``) is ``recompute`` in the 16-bit mode below (on a GPU memory is what
runs out; on a CPU it spares the float32-output 16-bit GEMM a CPU lacks), ``accumulate`` otherwise.

Precision. The GEMMs run in float32 (float64 for float64 inputs), on float32 copies of 16-bit
inputs, except in the 16-bit mode (``_lowp_gemms``): bf16/fp16 inputs on a GPU, and bf16 inputs on
a CPU with AMX (and oneDNN enabled). There the GEMMs take the inputs' own
dtype: the buffer holds 16-bit logits and then their 16-bit gradient, ``d_hidden`` is written in
the input dtype, and only ``d_weight`` (and ``d_bias``) are summed in float32 (inside the
vocabulary pass's GEMM, or across chunks). That rounds at the points where the eager reference
in the same dtype rounds, plus once more where a 16-bit ``d_hidden`` is scaled by an upstream
gradient other than 1 or summed with the extra pass; the tests hold every output to the
same-dtype reference's error. The per-row log-softmax work is float32. Under ``torch.autocast``
the inputs are first cast as ``F.linear`` would cast them.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _native, ops, reference

__all__ = ["fused_linear_sppo_loss", "linear_sequence_logps"]

# Default budget for one chunk of logits. On a CPU 32 MiB (256 float32 or 512 bf16 tokens at V = 32000) keeps
# the chunk near the caches. On a GPU the weight-gradient GEMM adds into a float32 [V, H]
# accumulator once per chunk; the chunk must be long enough (thousands of tokens) for that
# read-modify-write to hide under the GEMM's arithmetic: 256 MiB is ~4200 bf16 tokens at V = 32000.
DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_CHUNK_BYTES_CUDA = 256 << 20
# The vocabulary pass's (weight_grad="recompute") widest slab on a GPU, as the size of its gradient:
# no memory is allocated for it (it lives in the rows of d_weight not yet written). Its GEMMs span
# all the tokens, so narrow slabs still make large GEMMs (16384 x 4096 x 2048 at 64 MiB).
DEFAULT_VOCAB_PASS_BYTES_CUDA = 64 << 20
# Its slabs shrink towards the end of the vocabulary, as the room for their gradient in d_weight
# does, down to this many columns; the last few use a buffer of N x this many (8 MiB for 16384 bf16
# tokens). Narrower slabs would make GEMMs that wait on memory (a 16384 x 4096 x 256 GEMM is about
# at an H100's balance point). On this 2-core CPU (bf16, N = 4096, H = 512) the whole call took
# 0-5% longer than with slabs kept at the budget's width and a buffer of that size.
MIN_SLAB = 256


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    chunk_tokens: int
    loss_scale: float  # 1/2 for sppo and sppo_single, 1 for sppo_hard
    with_grads: bool = False  # decided outside: grad mode is off inside Function.forward
    backend: str = "cpp"  # which kernels do the per-chunk work: "cpp", "cuda" or "triton"
    lowp: bool = False  # 16-bit GEMMs and logits (see _lowp_gemms)
    weight_grad: str = "accumulate"  # or "recompute": how d_weight is summed (module notes)
    vocab_elems: int = 0  # the vocabulary pass's widest slab (or block x slab) in elements (0: chunk_tokens x V)
    min_slab: int = MIN_SLAB  # its narrowest slab in d_weight's own memory, in columns
    acc_cols: int = 0  # recompute mode: the first acc_cols vocabulary rows are summed as accumulate does


WEIGHT_GRAD_MODES = ("auto", "accumulate", "recompute")


def _weight_grad_mode(mode: str, lowp: bool) -> str:
    if mode not in WEIGHT_GRAD_MODES:
        raise ValueError(f"weight_grad: expected one of {WEIGHT_GRAD_MODES}, got {mode!r}")
    if mode == "auto":
        return "recompute" if lowp else "accumulate"
    return mode


@functools.lru_cache(maxsize=None)
def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles the OS lets torch use (torch's own probe; False where the
    probe is missing)."""
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a probe that fails means no
        return False


def _cpu_native_bf16() -> bool:
    """Whether bf16 GEMMs on this CPU beat float32 ones: AMX, with oneDNN available and enabled
    (checked at each call). AVX512-BF16 alone measured slower than float32 (oneDNN limited to it:
    960 vs 635 ms), and without oneDNN bf16 GEMMs are emulated (50x slower).
    ``SPPO_FAST_CPU_BF16_GEMMS=1`` or ``0`` overrides."""
    forced = os.environ.get("SPPO_FAST_CPU_BF16_GEMMS")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"SPPO_FAST_CPU_BF16_GEMMS: expected 0 or 1, got {forced!r}")
        return forced == "1"
    mkldnn = torch.backends.mkldnn
    return mkldnn.is_available() and bool(mkldnn.enabled) and _cpu_has_amx()


def _lowp_gemms(hidden: Tensor) -> bool:
    """Whether the chunks run 16-bit GEMMs into 16-bit logits (float32 accumulation inside the GEMM).

    On a GPU, for bf16/fp16 inputs: tensor-core GEMMs, no float32 copy of the weight, half the
    logits buffer. The logits, their gradient and ``d_hidden`` are then rounded to the input dtype
    where the eager reference rounds them (``F.linear`` in that dtype, then autograd's gradient of
    those logits), and ``d_weight`` is summed in float32 (inside the vocabulary pass's GEMM, or
    over the chunks). On a CPU, for bf16 inputs where the CPU has AMX: measured 2.7x faster than float32 GEMMs on copies here (with the vocabulary
    pass, which needs no float32-output 16-bit GEMM, which a CPU lacks). Otherwise float32 GEMMs
    (fp16 on a CPU measured no faster in 16 bits). See ``_cpu_native_bf16``.
    """
    if hidden.dtype in (torch.bfloat16, torch.float16) and hidden.device.type == "cuda":
        return True
    return hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and _cpu_native_bf16()


def _chunk_tokens(chunk_tokens: Optional[int], V: int, elem_bytes: int = 4, cuda: bool = False) -> int:
    if chunk_tokens is None:
        budget = DEFAULT_CHUNK_BYTES_CUDA if cuda else DEFAULT_CHUNK_BYTES
        return max(16, budget // (elem_bytes * V))
    if not isinstance(chunk_tokens, numbers.Integral) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    return int(chunk_tokens)


def _check_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                  ignore_index: int) -> Tensor:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        ops._refuse_meta(name, t)
        if t.dtype not in ops._FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {t.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight: expected [V, H] with H = {hidden.shape[2]}, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got "
                             f"{tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias: expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    if isinstance(labels, Tensor) and tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden {tuple(hidden.shape)} "
                         f"(expected {tuple(hidden.shape[:2])})")
    # the other label checks only look at the logits' shape: a zero-stride stand-in for them
    stand_in = hidden.new_empty(()).expand(*hidden.shape[:2], weight.shape[0])
    return ops._check_labels(labels, stand_in, ignore_index)


def _accumulate_fraction(fraction) -> float:
    if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0):
        raise ValueError(f"accumulate_fraction: expected a number in [0, 1], got {fraction!r}")
    return float(fraction)


def _options(hidden: Tensor, weight: Tensor, ignore_index: int, chunk_tokens: Optional[int],
             loss_scale: float, with_grads: bool, backend: str, weight_grad: str = "auto",
             accumulate_fraction: float = 0.0) -> _Options:
    lowp = _lowp_gemms(hidden)
    mode = _weight_grad_mode(weight_grad, lowp)
    elem = hidden.element_size() if lowp else (8 if hidden.dtype == torch.float64 else 4)
    cuda = hidden.device.type == "cuda"
    chunk = _chunk_tokens(chunk_tokens, weight.shape[0], elem, cuda)
    if mode == "recompute" and with_grads and chunk_tokens is None:
        # the chunk pass's buffer is then the not yet written d_weight [V, H]: the chunk's logits
        # [c, V] and, with ignored tokens, its gathered hidden rows and their d_hidden (2 x [c, H])
        # fit in it (e.g. 3261 instead of 4194 bf16 tokens at V = 32000, H = 4096 on a GPU)
        V_, H_ = weight.shape
        chunk = min(chunk, max(16, V_ * H_ // (V_ + 2 * H_)))
    vocab = DEFAULT_VOCAB_PASS_BYTES_CUDA // elem if cuda and chunk_tokens is None else 0
    # (the accumulate mode sums every row so; a whole number of 64-row blocks, or all of V)
    V = weight.shape[0]
    acc_cols = _aligned(round(accumulate_fraction * V), below=V) if mode == "recompute" else 0
    return _Options(ignore_index, chunk, loss_scale, with_grads, backend, lowp, mode, vocab, acc_cols=acc_cols)


@dataclass
class _Plan:
    rows: Tensor       # [R] flat indices of the non-ignored tokens, in order
    seq_of_row: Tensor  # [R] sequence of each
    labels: Tensor     # [R] their labels
    groups: list       # (row_start, row_end, seq_start, seq_end, whole)


def _plan(labels: Tensor, ignore_index: int, chunk_tokens: int) -> _Plan:
    S, T = labels.shape
    keep = (labels != ignore_index).reshape(-1)
    rows = keep.nonzero().squeeze(1)  # on a GPU: one host sync per call, like the line below
    seq_of_row = torch.div(rows, T, rounding_mode="floor")
    counts = keep.view(S, T).sum(1).tolist()  # S ints: once per call, not per token
    groups, r, s0, r0 = [], 0, 0, 0
    for s, c in enumerate(counts):
        if c > chunk_tokens:  # a long sequence: close the open group, then this one alone
            if r > r0:
                groups.append((r0, r, s0, s, True))
            groups.append((r, r + c, s, s + 1, False))
            r0, s0 = r + c, s + 1
        elif r + c - r0 > chunk_tokens:
            groups.append((r0, r, s0, s, True))
            r0, s0 = r, s
        r += c
    if r > r0 or s0 < S:
        groups.append((r0, r, s0, S, True))
    return _Plan(rows, seq_of_row, labels.reshape(-1)[rows], groups)


# How a GPU adds a 16-bit product into a float32 accumulator, best first: "addmm" (torch's addmm with
# out_dtype=float32 and the float32 accumulator as its input; accepted by recent torch only), "mm"
# (a float32-output 16-bit GEMM into a temporary, then an add; torch >= 2.8), "upcast" (float32
# copies of the operands and a float32 GEMM). The first call finds out which this torch accepts.
_GPU_ADD_MM: list = ["addmm", "mm", "upcast"]


def _add_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``, with ``acc`` float32 (or float64) whatever the dtype of ``a`` and ``b``."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    while acc.device.type == "cuda" and _GPU_ADD_MM[0] != "upcast":
        try:  # cuBLAS: 16-bit operands, float32 accumulation
            if _GPU_ADD_MM[0] == "addmm":
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            else:
                acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):  # this torch lacks the overload
            _GPU_ADD_MM.pop(0)  # (its dtype checks run before any write: acc is untouched)
    # exact products of the 16-bit values, accumulated in float32 (a CPU; an old torch)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast``, ``F.linear`` would run in the autocast dtype; so does the fused path.
    The casts are autograd ops: float32 parameters still get float32 gradients."""
    if not isinstance(hidden, Tensor):
        return hidden, weight, bias  # the argument checks name the problem
    dev = hidden.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # an old torch, or a device autocast does not know
        return hidden, weight, bias
    if not on:
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        ok = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if ok else t
    return cast(hidden), cast(weight), cast(bias)


def _no_autocast(device: torch.device):
    """The chunk loop picks its own GEMM dtypes: autocast must not recast them (e.g. a bf16
    ``d_hidden`` chunk into a float32 ``d_hidden``)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not support
        return contextlib.nullcontext()


class _Chunked:
    """The chunk loop of one call: GEMMs through torch, per-row work through ``_native``.

    ``with_grads``: the chunk pass also writes ``d_hidden`` (and, in the accumulate mode, sums
    ``d_weight`` and ``d_bias``; in the recompute mode it keeps every row's statistics instead, for
    :meth:`vocab_pass`).
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: _Plan,
                 opts: _Options, with_grads: bool, weight_grads: bool = True, vocab_out: bool = True,
                 acc: Optional[tuple] = None):
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.impl = ops._IMPLS[opts.backend]
        dev = self.dev = hidden.device
        self.h = hidden.reshape(-1, hidden.shape[-1])
        # the GEMMs' dtype, which is also the logits buffer's: float32 (a copy of a 16-bit weight),
        # or the inputs' own 16-bit dtype in the low-precision mode
        self.gemm = hidden.dtype if opts.lowp else self.acc
        self.w = weight.to(self.gemm)
        self.w_dtype = weight.dtype
        self.b = None if bias is None else bias.to(self.gemm)
        self.plan, self.opts = plan, opts
        # every token labelled (rows = 0..N-1): the rows' hidden states are slices, not gathered copies
        self.every_row = len(plan.rows) == self.h.shape[0]
        self.by_vocab = opts.weight_grad == "recompute"
        longest = max((g[1] - g[0] for g in plan.groups), default=0)
        self.chunk_rows = min(longest, opts.chunk_tokens)  # the chunk pass's buffer, in rows
        self.buf: Optional[Tensor] = None
        self.seq = torch.zeros(hidden.shape[0], dtype=torch.float64, device=dev)
        self.dh = self.dw = self.db = self.lse = self.tok = None
        # recompute mode: the first opts.acc_cols rows of d_weight (and d_bias), summed over the
        # chunks in float32 as the accumulate mode sums all of them; the vocabulary pass does the rest
        self.dw_acc = self.db_acc = None
        self._head_room: Optional[Tensor] = None  # (see _vocab_pass_in_place)
        self._upcast: Optional[Tensor] = None  # (see _add_gemm)
        if with_grads:
            # each row's d_hidden is written once, so it can take its final dtype at once (and
            # needs no zeros when every row is written)
            self.dh = (torch.empty if self.every_row else torch.zeros)(self.h.shape, dtype=self.gemm, device=dev)
            if self.by_vocab:
                self.lse = torch.empty((len(plan.labels), 2), dtype=self.acc, device=dev)
                # each row's log-prob as the chunk pass computed it: the vocabulary pass's label
                # term (see _slab)
                self.tok = torch.empty(len(plan.labels), dtype=self.acc, device=dev)
                if weight_grads and opts.acc_cols and acc is not None:  # add into these (no second copy)
                    self.dw_acc, self.db_acc = acc
                elif weight_grads and opts.acc_cols:
                    self.dw_acc = torch.zeros((opts.acc_cols, weight.shape[1]), dtype=self.acc, device=dev)
                    if bias is not None:
                        self.db_acc = torch.zeros(opts.acc_cols, dtype=self.acc, device=dev)
            elif weight_grads:  # (without: d_hidden only, e.g. for a frozen lm_head)
                self.dw = torch.zeros(weight.shape, dtype=self.acc, device=dev)
                self.db = None if bias is None else torch.zeros(weight.shape[0], dtype=self.acc, device=dev)
        # the recompute mode's d_weight, made now: until the vocabulary pass writes it, its memory
        # is the chunk pass's buffer, then the pass's own scratch (see vocab_pass)
        self.dw_out = None
        if with_grads and weight_grads and vocab_out and self.by_vocab and self.w_dtype == self.gemm:
            self.dw_out = self._empty(weight.shape, self.w_dtype)

    def _empty(self, shape, dtype: torch.dtype) -> Tensor:
        return (_native.empty_fresh(tuple(shape), dtype) if self.dev.type == "cpu"
                else torch.empty(shape, dtype=dtype, device=self.dev))

    def _buffer(self, n: int, in_weight_grad: bool = True) -> Tensor:
        """The one buffer, of at least ``n`` elements (a chunk of logits, or a block x slab), reused:
        the not yet written ``d_weight`` where it exists and is large enough (``in_weight_grad``)."""
        if in_weight_grad and self.dw_out is not None and n <= self.dw_out.numel():
            return self.dw_out.view(-1)
        if self.buf is None or self.buf.numel() < n:
            self.buf = None  # free the old one first
            self.buf = self._empty((n,), self.gemm)
        return self.buf

    def _beside_logits(self, k: int, n: int) -> Optional[Tensor]:
        """The ``k``-th [n, H] block of the not yet written ``d_weight`` after the chunk pass's
        logits (its gathered hidden rows, 0, and their ``d_hidden``, 1), or None without room."""
        if self.dw_out is None or self.every_row:
            return None
        H = self.h.shape[1]
        start = self.chunk_rows * self.w.shape[0] + k * self.chunk_rows * H
        if start + self.chunk_rows * H > self.dw_out.numel():
            return None
        return self.dw_out.view(-1)[start:start + n * H].view(n, H)

    def _rows(self, r0: int, r1: int) -> Tensor:
        """The hidden states of compact rows [r0, r1), in the GEMMs' dtype."""
        if self.every_row:
            return self.h[r0:r1].to(self.gemm)
        room = self._beside_logits(0, r1 - r0)
        if room is not None and self.h.dtype == self.gemm:
            return torch.index_select(self.h, 0, self.plan.rows[r0:r1], out=room)
        return self.h.index_select(0, self.plan.rows[r0:r1]).to(self.gemm)

    def _logits(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Logits of compact rows [r0, r1) in the shared buffer, and those rows' hidden states."""
        h = self._rows(r0, r1)
        V = self.w.shape[0]
        out = self._buffer(self.chunk_rows * V)[: (r1 - r0) * V].view(r1 - r0, V)
        if self.b is None:
            torch.mm(h, self.w.t(), out=out)
        else:
            torch.addmm(self.b, h, self.w.t(), out=out)
        return out, h

    def _forward_rows(self, logits: Tensor, r0: int, r1: int, add_to_sums: bool = True) -> Tensor:
        tok, lse, _ = self.impl.logprob_fwd(logits[:, None], self.plan.labels[r0:r1, None],
                                            self.opts.ignore_index)
        if self.tok is not None:
            self.tok[r0:r1] = tok[:, 0]
        if add_to_sums:
            self.seq.index_add_(0, self.plan.seq_of_row[r0:r1], tok[:, 0].double())
        return lse

    def _backward_rows(self, logits: Tensor, h: Tensor, lse: Tensor, r0: int, r1: int,
                       coef_seq: Tensor) -> None:
        """The buffer becomes coef * (onehot - softmax) in place; then the two gradient GEMMs
        (only ``d_hidden``'s when ``d_weight`` waits for the vocabulary pass)."""
        coef = coef_seq.to(self.acc)[self.plan.seq_of_row[r0:r1]][:, None]
        g = logits[:, None]
        self.impl.logprob_bwd(g, self.plan.labels[r0:r1, None], lse, coef, self.opts.ignore_index, g)
        if self.every_row:
            torch.mm(logits, self.w, out=self.dh[r0:r1])
        else:
            room = self._beside_logits(1, r1 - r0)
            self.dh.index_copy_(0, self.plan.rows[r0:r1],
                                torch.mm(logits, self.w) if room is None else torch.mm(logits, self.w, out=room))
        if self.by_vocab:
            self.lse[r0:r1] = lse.view(-1, 2)
            if self.dw_acc is not None:
                k = self.dw_acc.shape[0]
                self._add_gemm(self.dw_acc, logits[:, :k].t(), h)
                if self.db_acc is not None:
                    self.db_acc += logits[:, :k].sum(0, dtype=self.db_acc.dtype)
            return
        if self.dw is None:
            return
        self._add_gemm(self.dw, logits.t(), h)
        if self.db is not None:
            self.db += logits.sum(0, dtype=self.db.dtype)

    def _add_gemm(self, acc: Tensor, a: Tensor, b: Tensor) -> None:
        """``acc += a @ b`` (:func:`_add_mm`). Where that takes float32 copies of 16-bit operands (a
        CPU: no float32-output 16-bit GEMM), they go into one scratch reused by every chunk."""
        if a.dtype == acc.dtype or acc.device.type == "cuda":
            _add_mm(acc, a, b)
            return
        need = a.numel() + b.numel()
        if self._upcast is None or self._upcast.numel() < need:
            self._upcast = None
            self._upcast = torch.empty(need, dtype=acc.dtype, device=acc.device)
        fa = self._upcast[: a.numel()].view(a.shape)
        fb = self._upcast[a.numel(): need].view(b.shape)
        fa.copy_(a)
        fb.copy_(b)
        acc.addmm_(fa, fb)

    def _spans(self, r0: int, r1: int):
        C = self.opts.chunk_tokens
        return [(a, min(a + C, r1)) for a in range(r0, r1, C)]

    def logps(self) -> Tensor:
        """Forward only: the per-sequence log-prob sums [S] (float64)."""
        for r0, r1, _, _, _ in self.plan.groups:
            for a, b in self._spans(r0, r1):
                self._forward_rows(self._logits(a, b)[0], a, b)
        return self.seq

    def run(self, coef_fn) -> Tensor:
        """The chunk pass with gradients. ``coef_fn(seq_logps)`` maps the sums of complete
        sequences to their upstream gradients; returns the sums [S] (float64)."""
        for r0, r1, s0, s1, whole in self.plan.groups:
            if whole:  # one chunk of whole sequences: the three GEMMs, logits computed once
                logits, h = self._logits(r0, r1)
                lse = self._forward_rows(logits, r0, r1)
                self._backward_rows(logits, h, lse, r0, r1, coef_fn(self.seq))
                continue
            for a, b in self._spans(r0, r1):  # a long sequence, pass 1: its sum
                self._forward_rows(self._logits(a, b)[0], a, b)
            coef = coef_fn(self.seq)
            for a, b in self._spans(r0, r1):  # pass 2: recomputed logits, gradients
                logits, h = self._logits(a, b)
                lse = self._forward_rows(logits, a, b, add_to_sums=False)
                self._backward_rows(logits, h, lse, a, b, coef)
        return self.seq

    def vocab_pass(self, lse: Tensor, coef_seq: Tensor, out: Optional[Tensor] = None,
                   tok: Optional[Tensor] = None, acc: Optional[tuple] = None) -> tuple[Tensor, Optional[Tensor]]:
        """``(d_weight, d_bias)`` slab by slab of the vocabulary, from every row's saved statistics
        ``lse`` [R, 2]: each slab's logits are recomputed for all the rows, turned into that slice
        of ``coef * (onehot - softmax)``, and multiplied by the rows' hidden states in one GEMM.
        ``d_weight`` is in the weight's dtype (written into ``out`` where given), ``d_bias`` in the
        accumulation dtype. ``tok`` [R]: the rows' log-probs from the chunk pass, for the label
        terms (see :meth:`_slab`). ``acc``: ``(d_weight[:k], d_bias[:k] or None)`` summed by the
        chunk pass (``acc_cols``, float32): the pass does columns ``[k, V)`` and copies those in
        last, so that until then rows ``[0, k)`` of ``d_weight`` are room for its last slabs."""
        R, (V, H) = len(self.plan.labels), self.w.shape
        k = 0 if acc is None or acc[0] is None else acc[0].shape[0]
        db = None if self.b is None else torch.zeros(V, dtype=self.acc, device=self.dev)
        dw = out if out is not None else self.dw_out
        if dw is None:
            dw = self._empty((V, H), self.w_dtype)
        if R == 0:  # every token ignored
            return dw.zero_(), db
        if k == V:  # every row summed by the chunk pass: nothing to recompute
            dw.copy_(acc[0])
            if db is not None and acc[1] is not None:
                db += acc[1]
            return dw, db
        coef = coef_seq.to(self.acc)[self.plan.seq_of_row][:, None]
        labels = self.plan.labels[:, None]
        # the label terms coef * (1 - p) = -coef * expm1(log p) take the chunk pass's log p (see _slab)
        if self.w_dtype != self.gemm:  # float32 GEMMs for a 16-bit weight
            self._vocab_pass_blocked(dw, db, lse, coef, labels, tok, start=k)
        else:
            self._vocab_pass_in_place(dw, db, lse, coef, labels, tok, start=k)
        if k:
            dw[:k].copy_(acc[0])
            if db is not None and acc[1] is not None:
                db[:k] += acc[1]
        return dw, db

    def _slab(self, g: Tensor, h: Tensor, v0: int, v1: int, labels: Tensor, lse: Tensor,
              coef: Tensor, db: Optional[Tensor], label_logp: Optional[Tensor] = None) -> None:
        """``g`` [rows, v1 - v0] becomes the rows' ``coef * (onehot - softmax)`` on columns [v0, v1).

        The slab's logits are recomputed by a GEMM of another shape than the chunk pass's, so they
        differ from the logits the saved (max, log-sum) came from in the last bits; off the label
        that is a relative error of a few ulps in ``p``, but the label's ``1 - p`` cancels where
        ``p`` is close to 1. So the kernel takes the label entries from ``label_logp`` [rows] (the
        chunk pass's ``log p``: ``-coef * expm1(log p)``), in the same pass."""
        self._slab_logits(g, h, v0, v1)
        g3 = g[:, None]
        self.impl.logprob_bwd(g3, labels, lse, coef, self.opts.ignore_index, g3, col0=v0,
                              label_logp=None if label_logp is None else label_logp[:, None])
        if db is not None:
            db[v0:v1] += g.sum(0, dtype=db.dtype)

    def _slab_logits(self, g: Tensor, h: Tensor, v0: int, v1: int) -> None:
        """The slab's logits into ``g``: ``h @ W[v0:v1].T (+ b[v0:v1])``."""
        if self.b is None:
            torch.mm(h, self.w[v0:v1].t(), out=g)
        else:
            torch.addmm(self.b[v0:v1], h, self.w[v0:v1].t(), out=g)

    def _vocab_pass_in_place(self, dw: Tensor, db: Optional[Tensor], lse: Tensor, coef: Tensor,
                             labels: Tensor, label_logp: Optional[Tensor], start: int = 0) -> None:
        """Every slab in one GEMM over all its rows, ``d_weight[slab] = G.T @ h``, with little
        memory: until they are written, the rows of ``d_weight`` after the slab hold the slab's
        gradient ``G``. So slabs shrink towards the end of the vocabulary, down to ``min_slab``
        columns, and the last few use a buffer of their own, of rows x that many columns.

        With ignored tokens, the labelled rows' hidden states are first gathered into the last R
        rows of ``d_weight`` (while that leaves room for slabs); the columns left when it does not
        are done over all the tokens, in place, the ignored ones with a zero gradient (a little
        more arithmetic instead of an [R, H] copy).

        ``start``: the first column (those before it come from the chunk pass: their rows, not yet
        written, serve the last slabs instead of a buffer where they are large enough)."""
        R, (V, H) = len(labels), self.w.shape
        N = self.h.shape[0]
        budget = self.opts.vocab_elems or min(R, self.opts.chunk_tokens) * V
        self._head_room = dw.view(-1)[: start * H] if start else None
        if self.every_row:
            self._slabs(dw, db, start, V, self.h, labels, lse, coef, label_logp, budget, last=True)
            return
        v0 = start
        if V - R - start > self._slab_widths(R, budget)[1] * (1 + -(-R // H)):
            compact = dw.view(-1)[(V - R) * H:].view(R, H)
            torch.index_select(self.h, 0, self.plan.rows, out=compact)
            v0 = self._slabs(dw, db, start, V - R, compact, labels, lse, coef, label_logp, budget, last=False)
        # the remaining columns, over every token (the ignored ones with a zero gradient)
        rows = self.plan.rows
        full = lambda t, fill: torch.full((N, t.shape[1]), fill, dtype=t.dtype, device=self.dev).index_copy_(0, rows, t)  # noqa: E731
        labels, lse, coef = full(labels, self.opts.ignore_index), full(lse, 0), full(coef, 0)
        if label_logp is not None:
            label_logp = full(label_logp[:, None], 0)[:, 0]
        self._slabs(dw, db, v0, V, self.h, labels, lse, coef, label_logp, budget, last=True)

    def _slabs(self, dw: Tensor, db: Optional[Tensor], v0: int, end: int, h: Tensor, labels: Tensor,
               lse: Tensor, coef: Tensor, label_logp: Optional[Tensor], budget: int, last: bool) -> int:
        """Slabs from column ``v0`` while the slab's gradient fits in ``d_weight``'s rows after it,
        below row ``end``; with ``last``, to the end of the vocabulary. Returns the next column."""
        rows, (V, H) = h.shape[0], dw.shape
        flat = dw.view(-1)
        widest, narrowest = self._slab_widths(rows, budget)
        while v0 < V:
            # G [rows, w] must fit in rows [v0 + w, end): rows * w <= (end - v0 - w) * H
            w = _aligned(min(widest, V - v0, (end - v0) * H // (rows + H)))
            if w < min(narrowest, V - v0):
                if not last:
                    break
                w = min(narrowest, V - v0)
                head = self._head_room
                if head is not None and rows * w <= head.numel():  # rows [0, start), written last
                    g = head[: rows * w].view(rows, w)
                else:
                    g = self._buffer(rows * w, in_weight_grad=False)[: rows * w].view(rows, w)
            else:
                g = flat[(v0 + w) * H:(v0 + w) * H + rows * w].view(rows, w)
            self._slab(g, h, v0, v0 + w, labels, lse, coef, db, label_logp)
            torch.mm(g.t(), h, out=dw[v0:v0 + w])
            v0 += w
        return v0

    def _slab_widths(self, rows: int, budget: int) -> tuple[int, int]:
        """The widest slab (the budget's: the tuned GEMM shape) and the narrowest one in ``d_weight``."""
        widest = _aligned(max(self.opts.min_slab, budget // rows))
        return widest, self.opts.min_slab

    def _vocab_pass_blocked(self, dw: Tensor, db: Optional[Tensor], lse: Tensor, coef: Tensor,
                            labels: Tensor, label_logp: Optional[Tensor], start: int = 0) -> None:
        """For float32 GEMMs on copies of a 16-bit weight: a block of rows x a slab fills a buffer,
        and every slab is summed over the blocks in a float32 accumulator, then cast."""
        R, (V, H) = len(labels), self.w.shape
        space = min(R * V, self.opts.vocab_elems or min(R, self.opts.chunk_tokens) * V)
        buf = self._buffer(space, in_weight_grad=False)
        space = buf.numel()
        # slabs of at least min(V, 256) columns; a block of gathered hidden rows (not needed when
        # every row is labelled) no larger than the buffer; the accumulator no larger either
        rb = min(R, max(1, space // min(V, 256)))
        if not self.every_row:
            rb = min(rb, max(1, space // H))
        vs = _aligned(min(V, max(1, space // rb), max(1, space // H)), below=V)
        part = torch.empty((vs, H), dtype=self.acc, device=self.dev)
        hs = self._rows(0, R) if rb == R else None
        for v0 in range(start, V, vs):
            v1 = min(v0 + vs, V)
            part.zero_()
            for a in range(0, R, rb):
                b = min(a + rb, R)
                h = hs if hs is not None else self._rows(a, b)
                g = buf[: (b - a) * (v1 - v0)].view(b - a, v1 - v0)
                self._slab(g, h, v0, v1, labels[a:b], lse[a:b], coef[a:b], db,
                           None if label_logp is None else label_logp[a:b])
                _add_mm(part[: v1 - v0], g.t(), h)
            dw[v0:v1].copy_(part[: v1 - v0])


def _aligned(w: int, below: Optional[int] = None) -> int:
    """A slab width rounded down to a multiple of 64 (of 16 under 64): leading dimensions that are
    multiples of 16 bytes. Unchanged when it is already the whole rest (``below``)."""
    if below is not None and w >= below:
        return w
    return w - w % 64 if w >= 64 else (w - w % 16 if w >= 16 else w)


class _FusedLinearSPPO(torch.autograd.Function):
    """(loss, policy_logps[S]). The chunk pass runs in forward with an upstream gradient of 1:
    ``d_hidden`` (and, accumulating, ``d_weight``); ``backward`` scales them, and in the recompute
    mode runs the vocabulary pass with the true upstream gradients, so that a 16-bit ``d_weight``
    is rounded once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, targets, opts: _Options):
        S = hidden.shape[0]
        B = S // 2
        plan = _plan(labels, opts.ignore_index, opts.chunk_tokens)
        need = opts.with_grads
        ref64, t64 = ref.double(), targets.double()
        # dloss/dlogp_s = 2 * scale * (a_s - t_s) / B: each sequence's own scalar (an empty batch:
        # no sequence, and the loss is the mean of nothing, NaN, as the reference's)
        per_pair = 2 * opts.loss_scale / B if B else 0.0
        coef = lambda seq: per_pair * (seq - ref64 - t64)  # noqa: E731
        work = _Chunked(hidden, weight, bias, plan, opts, with_grads=need,
                        weight_grads=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        with _no_autocast(hidden.device):
            seq = work.run(coef) if need else work.logps()
        a = seq - ref64 - t64
        loss = (opts.loss_scale * (a[:B] ** 2 + a[B:] ** 2)).mean()
        acc = work.acc
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.coef, ctx.ref_dtype = coef(seq), ref.dtype  # (all that ref_logps' gradient needs)
        if need:
            ctx.grads = (work.dh.view(hidden.shape), work.dw, work.db)
            # the vocabulary pass's inputs (recompute mode), and the d_weight it writes
            ctx.plan, ctx.lse, ctx.tok, ctx.dw_out = plan, work.lse, work.tok, work.dw_out
            ctx.acc_part = (work.dw_acc, work.db_acc)  # (recompute mode with acc_cols)
            ctx.save_for_backward(hidden, weight, bias, labels)
        return loss.to(acc), seq.to(acc)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a first-order gradient (create_graph=True works)
    def backward(ctx, g_loss, g_pol):
        opts = ctx.opts
        # loss = f(seq - ref - targets): ref_logps and the targets (so the probabilities they come
        # from, as in the reference) get -dloss/dlogp
        d_ref = None if g_loss is None else (-ctx.coef * g_loss.double()).to(ctx.ref_dtype)
        d_t = None if g_loss is None or not ctx.needs_input_grad[5] else -ctx.coef * g_loss.double()
        if not opts.with_grads:  # only ref_logps (or the probabilities) want a gradient
            return None, None, None, None, d_ref, d_t, None
        hidden, weight, bias, labels = ctx.saved_tensors
        # the upstream gradient of every sequence's log-prob sum
        coef = torch.zeros_like(ctx.coef)
        if g_loss is not None:
            coef += ctx.coef * g_loss.double()
        if g_pol is not None:
            coef += g_pol.double()
        want_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        pre, ctx.grads = ctx.grads, None  # hand our buffers to autograd: no copy of d_weight
        acc_w, acc_b = ctx.acc_part
        ctx.acc_part = (None, None)
        if pre is None:  # a second backward through the same graph (retain_graph): recompute
            dh, dw, db = _recompute(hidden, weight, bias, labels, opts, coef, weight_grads=want_w)
        else:
            dh, dw, db = pre
            if g_loss is None:
                scale = 0.0
            elif g_loss.device.type == "cpu":
                scale = float(g_loss)  # free on the CPU, and lets loss.backward() skip the pass
            else:  # float32 (float64) even where d_hidden is 16-bit; no host sync
                scale = g_loss.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
            if not (isinstance(scale, float) and scale == 1.0):
                # (d_weight, d_bias: the accumulate mode's, or the recompute mode's first rows; float32)
                for t in (dh, dw, db, acc_w, acc_b):
                    if t is not None:
                        t.mul_(scale)
            if g_pol is not None:  # policy_logps used elsewhere too: one more pass adds its part
                by_chunks = want_w and (opts.weight_grad == "accumulate" or acc_w is not None)
                # (the recompute mode's float32 rows, already scaled, take this pass's part in place)
                eh, ew, eb = _recompute(hidden, weight, bias, labels, opts, g_pol.double(),
                                        weight_grads=by_chunks, vocab_pass=False,
                                        scratch=ctx.dw_out,  # (not yet written: its logits' room)
                                        acc=None if acc_w is None else (acc_w, acc_b))
                dh += eh
                if acc_w is None and ew is not None:
                    dw += ew
                if acc_w is None and eb is not None:
                    db += eb
                del eh, ew, eb  # not alive during the vocabulary pass
            if opts.weight_grad == "recompute" and want_w:
                with _no_autocast(hidden.device):
                    work = _Chunked(hidden, weight, bias, ctx.plan, opts, with_grads=False)
                    dw, db = work.vocab_pass(ctx.lse, coef, out=ctx.dw_out, tok=ctx.tok, acc=(acc_w, acc_b))
                del acc_w, acc_b
        ctx.plan = ctx.lse = ctx.tok = ctx.dw_out = None
        return (dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype),
                None, d_ref, d_t, None)


def _recompute(hidden, weight, bias, labels, opts: _Options, coef_seq: Tensor, weight_grads: bool = True,
               scratch: Optional[Tensor] = None, vocab_pass: bool = True, acc: Optional[tuple] = None):
    """Gradients of sum_s coef_seq[s] * logp_s, by recomputing every chunk's logits (and, in the
    recompute mode, then the vocabulary pass); without ``weight_grads`` only ``d_hidden``.
    ``scratch``: an unwritten ``d_weight`` whose memory may hold the chunks' logits meanwhile.
    Without ``vocab_pass`` the recompute mode returns only the chunk pass's part of the weight
    gradients: the first ``acc_cols`` rows (or None), added into ``acc`` where given."""
    plan = _plan(labels, opts.ignore_index, opts.chunk_tokens)
    work = _Chunked(hidden, weight, bias, plan, opts, with_grads=True, weight_grads=weight_grads,
                    vocab_out=vocab_pass, acc=acc)
    if scratch is not None and work.dw_out is None and scratch.dtype == work.gemm:
        work.dw_out = scratch  # (only as the chunk buffer: no vocabulary pass runs here)
    with _no_autocast(hidden.device):
        for r0, r1, _, _, _ in plan.groups:
            for a, b in work._spans(r0, r1):
                logits, h = work._logits(a, b)
                lse = work._forward_rows(logits, a, b, add_to_sums=False)
                work._backward_rows(logits, h, lse, a, b, coef_seq)
        work._upcast = None  # (the chunks' scratch: not alive during the vocabulary pass)
        dw, db = work.dw, work.db
        if work.by_vocab and weight_grads:
            acc = (work.dw_acc, work.db_acc)
            dw, db = work.vocab_pass(work.lse, coef_seq, tok=work.tok, acc=acc) if vocab_pass else acc
    if not weight_grads:
        dw = db = None
    return work.dh.view(hidden.shape), dw, db


def _loss_scale(loss_type: str) -> float:
    return 1.0 if loss_type == "sppo_hard" else 0.5


def fused_linear_sppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, ref_logps: Tensor, *,
                           bias: Optional[Tensor] = None, chosen_probs_win: Optional[Tensor] = None,
                           chosen_probs_lose: Optional[Tensor] = None,
                           chosen_probs: Optional[Tensor] = None, beta: float = 0.001,
                           loss_type: str = "sppo", ignore_index: int = -100, backend: str = "auto",
                           chunk_tokens: Optional[int] = None, weight_grad: str = "auto",
                           accumulate_fraction: float = 0.0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``fused_sppo_loss(hidden @ weight.T + bias, labels, ref_logps, ...)`` without the logits.

    Args:
        hidden: ``[2B, T, H]`` final hidden states (B chosen sequences, then B rejected).
        weight: ``[V, H]`` lm_head weight; ``bias``: ``[V]`` or None.
        labels: ``[2B, T]`` aligned labels (see :func:`sppo_fast.next_token_labels`).
        ref_logps: ``[2B]`` reference log-probs; probabilities, ``beta``, ``loss_type``,
            ``ignore_index`` as in :func:`sppo_fast.fused_sppo_loss`.
        chunk_tokens: tokens per chunk of logits (default: 32 MiB of logits on a CPU,
            256 MiB of logits on a GPU, and at most V H / (V + 2H) tokens with ``recompute``,
            whose chunks use ``d_weight``'s memory). The vocabulary pass's slabs hold ``chunk_tokens x V``
            elements at most, by default on a GPU 64 MiB.
        weight_grad: ``"accumulate"`` (three GEMMs; ``d_weight`` summed over the chunks in a
            float32 [V, H]), ``"recompute"`` (four GEMMs; a second pass over vocabulary slabs
            writes ``d_weight`` once, in the weight's dtype), or ``"auto"``: recompute where the
            GEMMs run in 16 bits (16-bit inputs on a GPU; bf16 on a CPU with AMX),
            else accumulate. See the module notes.
        accumulate_fraction: in ``recompute``, the share of the vocabulary (its first rows, in
            blocks of 64) whose ``d_weight`` is summed over the chunks in a float32 buffer, as
            ``accumulate`` sums all of it, instead of recomputed: from 0 (default; the least memory)
            to 1 (accumulate's three GEMMs). Between, it trades ``fraction x V x H x 4`` bytes for
            that fraction of the fourth GEMM. The accumulate mode sums all of it anyway. (Where
            the GEMMs run in float32 on copies of a 16-bit weight, the vocabulary pass has
            float32 buffers of its own, so above about 0.35 this takes more memory than accumulate.)
    Returns:
        ``(loss, policy_logps[2B], metrics)``; gradients reach ``hidden``, ``weight``, ``bias``
        (and ``ref_logps``). Peak extra memory with ``recompute`` (where the GEMMs' dtype is the
        weight's): the two gradients, a buffer of N x 256 and O(N). With ``accumulate``: one
        [chunk, V] buffer, ``d_hidden`` (in the input dtype in the 16-bit mode, else float32),
        ``d_weight`` in float32 and then a copy in the weight's dtype. Outside the 16-bit mode
        also a float32 copy of a 16-bit weight. A weight without ``requires_grad`` costs no
        ``d_weight`` work or memory. See the module notes on precision.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    labels = _check_linear(hidden, weight, bias, labels, ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer: Triton's launcher takes Python ints)
    _weight_grad_mode(weight_grad, False)  # a bad name fails whatever the backend
    accumulate_fraction = _accumulate_fraction(accumulate_fraction)
    _chunk_tokens(chunk_tokens, 1)  # (so does a bad chunk size)
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected an even batch [2B, T, H] (B chosen then B rejected), "
                         f"got shape {tuple(hidden.shape)}")
    B = hidden.shape[0] // 2
    ops._check_logps("ref_logps", ref_logps, 2 * B, hidden.device)
    beta = ops._check_loss_args(loss_type, beta, B, hidden.device, chosen_probs_win, chosen_probs_lose,
                                chosen_probs, finite=(("ref_logps", ref_logps),))
    probs = {"chosen_probs_win": chosen_probs_win, "chosen_probs_lose": chosen_probs_lose,
             "chosen_probs": chosen_probs}
    be = ops.resolve_backend(backend, hidden.device)
    if be == "reference":
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return ops.fused_sppo_loss(logits, labels, ref_logps, beta=beta, loss_type=loss_type,
                                   ignore_index=ignore_index, backend="reference", **probs)
    t_w, t_l = reference.sppo_targets(beta=beta, loss_type=loss_type, **{
        k: (None if v is None else v.double()) for k, v in probs.items()})
    targets = torch.cat([torch.as_tensor(t_w, dtype=torch.float64, device=hidden.device).expand(B),
                         torch.as_tensor(t_l, dtype=torch.float64, device=hidden.device).expand(B)])
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    opts = _options(hidden, weight, ignore_index, chunk_tokens, _loss_scale(loss_type), need, be,
                    weight_grad, accumulate_fraction)
    loss, policy = _FusedLinearSPPO.apply(hidden, weight, bias, labels, ref_logps, targets, opts)
    acc = policy.dtype
    metrics = ops._metrics(policy.detach(), ref_logps.detach().to(acc), beta, loss_type,
                           {k: (None if v is None else v.to(acc)) for k, v in probs.items()})
    return loss, policy, metrics


def linear_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ignore_index: int = -100,
                          backend: str = "auto", chunk_tokens: Optional[int] = None) -> Tensor:
    """``sequence_logps(hidden @ weight.T + bias, labels)`` without the logits; no gradient.

    How the reference model's log-probs are precomputed once per iteration: O(chunk x V) memory.
    Returns ``[B]`` float32 (float64 for float64 inputs). In the 16-bit mode (``_lowp_gemms``: a
    GPU, or bf16 on an AMX CPU) these come from 16-bit logits, as the eager ``F.linear`` in that
    dtype would give them; the per-row log-softmax is float32 either way.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    labels = _check_linear(hidden, weight, bias, labels, ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer: Triton's launcher takes Python ints)
    _chunk_tokens(chunk_tokens, 1)  # (a bad chunk size fails whatever the backend)
    be = ops.resolve_backend(backend, hidden.device)
    with torch.no_grad(), _no_autocast(hidden.device):
        if be == "reference":
            return reference.sequence_logps(torch.nn.functional.linear(hidden, weight, bias), labels,
                                            ignore_index)
        opts = _options(hidden, weight, ignore_index, chunk_tokens, 1.0, False, be)
        plan = _plan(labels, ignore_index, opts.chunk_tokens)
        work = _Chunked(hidden, weight, bias, plan, opts, with_grads=False)
        return work.logps().to(work.acc)
