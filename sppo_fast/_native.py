"""The ``cpp`` and ``cuda`` backends: torch tensors in, the extension's raw-pointer kernels, torch
tensors out.

``sppo_fast._C`` never links libtorch; this module turns validated tensors into data pointers,
sizes, element strides and dtype codes (the contract in ``csrc/ops.h``) and allocates the outputs
on the tensors' device. CPU tensors run the OpenMP kernels; CUDA tensors the CUDA kernels, on
torch's current stream of their device. Callers (``sppo_fast.ops``) have already checked shapes,
dtypes, devices and label ranges.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .reference import PairwiseResult



class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no device, or not implemented yet)."""


try:
    from . import _C
except ImportError as exc:
    _C = None
    _IMPORT_ERROR: Optional[BaseException] = exc
else:
    _IMPORT_ERROR = None


def _source_tree() -> Optional[Path]:
    """The checkout this package was imported from, where that is a source tree (its
    ``pyproject.toml`` and ``csrc/`` beside it) holding no built extension."""
    here = Path(__file__).resolve().parent
    root = here.parent
    if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() and not any(here.glob("_C*")):
        return root
    return None

# Must match csrc/ops.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def available() -> bool:
    return _C is not None


def unavailable_reason() -> str:
    tree = _source_tree()
    # only where no finder knows an extension at all (an editable install keeps it elsewhere and
    # loads it through its own finder: a failure there is another problem, named as it is)
    if tree is not None and importlib.util.find_spec(f"{__package__}._C") is None:
        return (f"sppo_fast was imported from its source tree {tree}, which holds no built extension "
                f"(sppo_fast._C): run from another directory to use the installed package, or install "
                f"this checkout in editable mode (pip install --no-build-isolation -e .); "
                f"the import said: {_IMPORT_ERROR}")
    return f"sppo_fast._C failed to import: {_IMPORT_ERROR}"


def _require() -> None:
    if _C is None:
        raise BackendUnavailableError(unavailable_reason())


def cpu_isa() -> str:
    """Instruction set the CPU kernels use now: ``"avx512"``, ``"avx2"`` or ``"base"``."""
    _require()
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels onto ``"base"``, ``"avx2"`` or ``"avx512"`` (tests and benchmarks)."""
    _require()
    if not _C.cpu_set_isa(name):
        raise ValueError(f"isa: {name!r} is unknown or not supported by this CPU "
                         f"(best here: {_C.cpu_best_isa()!r})")


def cuda_status() -> tuple[bool, int, str]:
    """``(compiled, device_count, reason)`` for the CUDA part of the extension."""
    if _C is None:
        return False, 0, unavailable_reason()
    n, why = _C.cuda_device_count()
    return bool(_C.cuda_compiled()), int(n), why


def _threads() -> int:
    # Follow torch's intra-op setting so that one knob (torch.set_num_threads) governs both.
    return torch.get_num_threads()


def _where(t: Tensor) -> tuple[int, int]:
    """(stream, device) arguments of a launch: (0, -1) runs the CPU kernels."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream, t.device.index
    return 0, -1


def empty_like_fresh(x: Tensor) -> Tensor:
    """``torch.empty_like(x)`` whose pages the kernel will fault in as huge pages where possible.

    A fresh 0.5 GB gradient otherwise costs ~130k page faults on its first write, about as long as
    the whole backward kernel on a 2-core machine.
    """
    return _advise(torch.empty_like(x))


def empty_fresh(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, faulted in as huge pages where possible."""
    return _advise(torch.empty(shape, dtype=dtype))


def _advise(out: Tensor) -> Tensor:
    if out.device.type == "cpu" and out.nbytes >= (8 << 20):
        _C.advise_hugepages(out.data_ptr(), out.nbytes)
    return out


def logprob_fwd(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(token_logp[B, T], lse[B, T, 2], seq_logp[B])`` for ``logits[B, T, V]`` (last stride 1).

    ``lse[..., 0]`` is the row max and ``lse[..., 1]`` the log of the sum of ``exp(row - max)``;
    their sum is the logsumexp. Keeping them apart halves the backward's rounding error.
    """
    B, T, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    tok = torch.empty((B, T), dtype=acc, device=dev)
    lse = torch.empty((B, T, 2), dtype=acc, device=dev)
    on_cpu = dev.type == "cpu"
    seq = torch.zeros((B,), dtype=acc, device=dev)
    if B * T:
        _C.logprob_fwd(
            logits.data_ptr(), DTYPE_CODES[logits.dtype], B, T, V,
            logits.stride(0), logits.stride(1),
            labels.data_ptr(), labels.stride(0), labels.stride(1), ignore_index,
            tok.data_ptr(), lse.data_ptr(), seq.data_ptr() if on_cpu else 0, _threads(), *_where(logits),
        )
        if not on_cpu:  # the CUDA kernel writes per-token values; the O(B T) sums stay in torch
            seq = tok.sum(1, dtype=torch.float64).to(acc)
    return tok, lse, seq


def logprob_bwd(
    logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, ignore_index: int, out: Tensor,
    col0: int = 0, label_logp: Optional[Tensor] = None,
) -> Tensor:
    """Write ``coef[b, t] * (onehot(labels[b, t]) - softmax(logits[b, t]))`` into ``out``.

    ``coef`` is ``[B, T]`` in the accumulation dtype with any strides (a per-sequence coefficient
    is ``coef_seq[:, None].expand(B, T)``, stride 0 along T); ``out`` may be ``logits`` itself.
    With ``col0``, ``logits`` holds columns ``[col0, col0 + V)`` of longer rows whose statistics
    ``lse`` are: the softmax is the full rows', and a label outside the slice has no one-hot term.
    ``label_logp`` ([B, T], the accumulation dtype): each row's label log-prob, computed with
    ``lse`` from the logits ``logits`` were recomputed from; the label entry is then
    ``-coef * expm1(label_logp)`` (a recomputed logit's last bits would make ``1 - p`` cancel).
    """
    B, T, V = logits.shape
    _check_label_logp(label_logp, lse, B, T)
    if B * T:
        _C.logprob_bwd(
            logits.data_ptr(), DTYPE_CODES[logits.dtype], B, T, V,
            logits.stride(0), logits.stride(1),
            labels.data_ptr(), labels.stride(0), labels.stride(1), ignore_index,
            lse.data_ptr(), coef.data_ptr(), coef.stride(0), coef.stride(1),
            out.data_ptr(), out.stride(0), out.stride(1), _threads(), *_where(logits), col0,
            0 if label_logp is None else label_logp.data_ptr(),
        )
    return out


def _check_label_logp(label_logp: Optional[Tensor], lse: Tensor, B: int, T: int) -> None:
    """``label_logp`` as the kernels read it: [B, T] contiguous, in ``lse``'s dtype and device."""
    if label_logp is not None and (label_logp.shape != (B, T) or label_logp.dtype != lse.dtype
                                   or label_logp.device != lse.device or not label_logp.is_contiguous()):
        raise ValueError(f"label_logp: expected a contiguous {lse.dtype} [{B}, {T}] on {lse.device}, got "
                         f"{label_logp.dtype} {list(label_logp.shape)} on {label_logp.device}")


def pairwise(cmp: Tensor, mode: str) -> PairwiseResult:
    """PairRM aggregation of ``cmp[B, K, K]`` (float32 or float64), on cmp's device."""
    B, K, _ = cmp.shape
    f64, dev = torch.float64, cmp.device
    res = PairwiseResult(
        scores=torch.empty((B, K), dtype=torch.float32, device=dev),
        probs=torch.empty((B, K, K), dtype=f64, device=dev),
        win_rates=torch.empty((B, K), dtype=f64, device=dev),
        chosen=torch.empty((B,), dtype=torch.int64, device=dev),
        rejected=torch.empty((B,), dtype=torch.int64, device=dev),
        chosen_probs=torch.empty((B,), dtype=f64, device=dev),
        chosen_probs_win=torch.empty((B,), dtype=f64, device=dev),
        chosen_probs_lose=torch.empty((B,), dtype=f64, device=dev),
        tied=torch.empty((B,), dtype=torch.bool, device=dev),
    )
    if B:
        _C.pairwise(
            cmp.data_ptr(), DTYPE_CODES[cmp.dtype], B, K, cmp.stride(0), cmp.stride(1),
            cmp.stride(2), 0 if mode == "official" else 1,
            *(t.data_ptr() for t in res), _threads(), *_where(cmp),
        )
    return res


def deberta_attention(q: Tensor, k: Tensor, v: Tensor, c2p: Optional[Tensor] = None,
                      p2c: Optional[Tensor] = None, rel_index: Optional[Tensor] = None,
                      qpos: Optional[Tensor] = None, key_mask: Optional[Tensor] = None) -> Tensor:
    """DeBERTa's disentangled attention on the CPU without any ``[LQ, LK]`` tensor: the arguments
    and result of :func:`sppo_fast.kernels.deberta_attention.deberta_attention` (the Triton
    kernel), for float32 or float64 CPU tensors."""
    from .kernels import check_attention_inputs

    check_attention_inputs(q, k, v, c2p, p2c, rel_index, qpos, key_mask)
    if q.device.type != "cpu":
        raise ValueError(f"deberta_attention (cpp): expects CPU tensors, got {q.device}")
    if q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"deberta_attention (cpp): expects float32 or float64, got {q.dtype}")
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    out = torch.empty(B, H, LQ, D, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if LK == 0:
        return out.zero_()
    # values the kernel indexes with (cheap on the CPU), checked before any narrowing cast: out of
    # range would read outside the tables
    if qpos is not None and qpos.numel() and (int(qpos.min()) < 0 or int(qpos.max()) >= LK):
        raise ValueError(f"qpos: positions must lie in [0, {LK}), got {int(qpos.min())}..{int(qpos.max())}")
    widths = [t.shape[-1] for t in (c2p, p2c) if t is not None]
    if widths and rel_index.numel() and (int(rel_index.min()) < 0 or int(rel_index.max()) >= min(widths)):
        raise ValueError(f"rel_index: buckets must lie in [0, {min(widths)}) (the tables' width), "
                         f"got {int(rel_index.min())}..{int(rel_index.max())}")
    rel = rel_index.to(torch.int32).contiguous() if rel_index is not None else None
    pos = qpos.to(torch.int64).contiguous() if qpos is not None else None
    mask = key_mask.ne(0).to(torch.uint8).contiguous() if key_mask is not None else None

    def p(t):
        return 0 if t is None else t.data_ptr()

    def s3(t):
        return (0, 0, 0) if t is None else tuple(t.stride()[:3])
    strides = (*s3(q), *s3(k), *s3(v), *s3(c2p), *s3(p2c),
               0 if pos is None else pos.stride(0), 0 if mask is None else mask.stride(0), *s3(out))
    _C.deberta_attention(p(q), p(k), p(v), p(c2p), p(p2c), p(rel), p(pos), p(mask), p(out),
                         DTYPE_CODES[q.dtype], B, H, LQ, LK, D, strides, _threads())
    return out
