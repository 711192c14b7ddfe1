"""sppo_fast: Self-Play Preference Optimization with fused kernels and an exact reference.

    import sppo_fast
    loss, policy_logps, metrics = sppo_fast.fused_sppo_loss(
        logits, sppo_fast.next_token_labels(labels), ref_logps,
        chosen_probs_win=p_win, chosen_probs_lose=p_lose, beta=0.001)

Every op takes ``backend="auto" | "reference" | "cpp" | "triton" | "cuda"``; the pure-PyTorch
definitions live in :mod:`sppo_fast.reference`.
"""

from . import reference
from ._native import cpu_isa, set_cpu_isa
from .linear import fused_linear_sppo_loss, linear_sequence_logps
from .ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    fused_sppo_loss,
    pairrm_aggregate,
    resolve_backend,
    sequence_logps,
    sppo_loss,
    sppo_targets,
    token_logprobs,
)
from .reference import LOSS_TYPES, PAIRWISE_MODES, PairwiseResult, next_token_labels

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "LOSS_TYPES",
    "PAIRWISE_MODES",
    "PairwiseResult",
    "available_backends",
    "cpu_isa",
    "fused_linear_sppo_loss",
    "fused_sppo_loss",
    "linear_sequence_logps",
    "next_token_labels",
    "pairrm_aggregate",
    "reference",
    "resolve_backend",
    "sequence_logps",
    "set_cpu_isa",
    "sppo_loss",
    "sppo_targets",
    "token_logprobs",
]
