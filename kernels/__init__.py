"""Triton kernels of sppo_fast, installed as ``sppo_fast.kernels`` (never as a top-level module).

``logprobs`` (token log-probs and the SPPO gradient, fused), ``pairwise`` (PairRM aggregation) and
``deberta_attention`` (DeBERTa's disentangled attention without [L, L] tensors); the ``triton``
backend (``sppo_fast._triton``) and the PairRM engine call them. Every launcher runs on its
tensors' GPU (:func:`on_device`), whatever the current device is.
"""

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Triton launches on the *current* device and its current stream: make that ``t``'s."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
