"""The ``triton`` backend: the Triton kernels shipped as ``sppo_fast.kernels``.

Same primitives and contract as ``sppo_fast._native`` (``logprob_fwd``, ``logprob_bwd``,
``pairwise``, ``empty_like_fresh``). Triton is imported lazily, on the first use of this backend, so
``import sppo_fast`` never needs it. Tensors must be on a CUDA device, or anywhere with Triton's
interpreter (TRITON_INTERPRET=1, set before the first import of triton), which the CPU tests use.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from .reference import PairwiseResult


def problem(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"backend 'triton' runs on CUDA tensors, got tensors on {device} "
                "(CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1)")
    return None


def _kernels(name: str):
    return importlib.import_module(f"sppo_fast.kernels.{name}")


def logprob_fwd(logits: Tensor, labels: Tensor, ignore_index: int):
    return _kernels("logprobs").logprob_fwd(logits, labels, ignore_index)


def logprob_bwd(logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, ignore_index: int,
                out: Tensor, col0: int = 0, label_logp: Optional[Tensor] = None) -> Tensor:
    from ._native import _check_label_logp

    _check_label_logp(label_logp, lse, *logits.shape[:2])
    return _kernels("logprobs").logprob_bwd(logits, labels, lse, coef, ignore_index, out, col0=col0,
                                            label_logp=label_logp)


def empty_like_fresh(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def pairwise(cmp: Tensor, mode: str) -> PairwiseResult:
    return PairwiseResult(*_kernels("pairwise").pairwise(cmp, mode))
