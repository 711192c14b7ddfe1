"""Pure-PyTorch reference for every sppo_fast op: the definition of truth.

Tests hold every backend to these functions evaluated in float64; benchmarks use them as the eager
baseline. Formulas follow the official SPPO code (``sppo/trainer.py``, ``scripts/compute_prob.py``)
and LLM-Blender (``get_scores_from_cmps``); see ``shared/docs/sppo-facts.md``.

Nothing here is fused or clever on purpose: ``token_logprobs`` materialises the full log-softmax.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "PAIRWISE_MODES",
    "PairwiseResult",
    "next_token_labels",
    "token_logprobs",
    "sequence_logps",
    "sppo_loss",
    "sppo_targets",
    "pairrm_aggregate",
]

LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard")
PAIRWISE_MODES = ("official", "direct")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every 16/32-bit float accumulates and returns float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_token_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``torch.cat([labels[:, 1:], full_like(labels[:, :1], ignore_index)], 1)``.

    Hugging Face causal-LM labels say which token position ``t`` *is*; the logits at ``t`` predict
    token ``t + 1``. Shifting the labels left by one (and ignoring the last position) aligns them
    with the logits as they are, so ``logits`` is never sliced or copied: pass
    ``(model(...).logits, next_token_labels(batch["labels"]))`` to any sppo_fast op.

    Args:
        labels: ``[B, T]`` integer labels with ``ignore_index`` on prompt and padding positions.
    Returns:
        ``[B, T]`` labels where position ``t`` holds ``labels[:, t + 1]``; the last column is
        ``ignore_index``.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype (token ids), got {labels.dtype}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [B, T], got shape {tuple(labels.shape)}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]``, 0 where ignored.

    Args:
        logits: ``[..., V]`` floating point (fp16, bf16, fp32 or fp64).
        labels: ``[...]`` integer, each in ``[0, V)`` or equal to ``ignore_index``.
    Returns:
        ``[...]`` log-probabilities: float64 for float64 logits, float32 otherwise.
    """
    logp = torch.log_softmax(logits.to(_acc_dtype(logits.dtype)), dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, torch.where(keep, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``token_logprobs(logits, labels, ignore_index).sum(-1)``: log p(y | x) per sequence.

    Labels must already be aligned with the logits (see :func:`next_token_labels`). A sequence whose
    labels are all ``ignore_index`` gets log-prob 0.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``.
    Returns:
        ``[B]`` summed log-probabilities (float32, or float64 for float64 logits).
    """
    return token_logprobs(logits, labels, ignore_index).sum(-1)


def sppo_targets(
    *,
    chosen_probs_win: Optional[Tensor] = None,
    chosen_probs_lose: Optional[Tensor] = None,
    chosen_probs: Optional[Tensor] = None,
    beta: float = 0.001,
    loss_type: str = "sppo",
) -> tuple[Tensor | float, Tensor | float]:
    """The log-ratios SPPO regresses onto, ``(target_chosen, target_rejected)``.

    - ``sppo``:        ``((P_win - 1/2) / beta, (P_lose - 1/2) / beta)``
    - ``sppo_single``: ``((P - 1/2) / beta, -(P - 1/2) / beta)``
    - ``sppo_hard``:   ``(1 / (2 beta), -1 / (2 beta))``

    The definition alone: :func:`sppo_fast.sppo_targets` checks its arguments first.
    """
    if loss_type == "sppo":
        if chosen_probs_win is None or chosen_probs_lose is None:
            raise ValueError("loss_type='sppo' needs chosen_probs_win and chosen_probs_lose")
        return (1 / beta) * (chosen_probs_win - 0.5), (1 / beta) * (chosen_probs_lose - 0.5)
    if loss_type == "sppo_single":
        if chosen_probs is None:
            raise ValueError("loss_type='sppo_single' needs chosen_probs")
        t = (1 / beta) * (chosen_probs - 0.5)
        return t, -t
    if loss_type == "sppo_hard":
        return 0.5 / beta, -0.5 / beta
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_probs_win: Optional[Tensor] = None,
    chosen_probs_lose: Optional[Tensor] = None,
    chosen_probs: Optional[Tensor] = None,
    beta: float = 0.001,
    loss_type: str = "sppo",
) -> Tensor:
    """Per-pair SPPO losses ``[B]`` (the batch loss is their mean).

    With log-ratios ``a_w = policy_chosen - ref_chosen`` and ``a_l = policy_rejected - ref_rejected``:

    - ``sppo``:        ``((a_w - (P_win - 1/2)/beta)^2 + (a_l - (P_lose - 1/2)/beta)^2) / 2``
    - ``sppo_single``: ``((a_w - (P - 1/2)/beta)^2 + (a_l + (P - 1/2)/beta)^2) / 2``
    - ``sppo_hard``:   ``(a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2`` (TRL; no halving)

    All arguments are ``[B]``; ``beta = 1 / eta``.
    """
    t_w, t_l = sppo_targets(
        chosen_probs_win=chosen_probs_win,
        chosen_probs_lose=chosen_probs_lose,
        chosen_probs=chosen_probs,
        beta=beta,
        loss_type=loss_type,
    )
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    losses = (a_w - t_w) ** 2 + (a_l - t_l) ** 2
    return losses if loss_type == "sppo_hard" else losses / 2


class PairwiseResult(NamedTuple):
    """PairRM aggregation of one batch of prompts with K candidates each.

    scores:            [B, K] float32, LLM-Blender's "max_logits" scores
    probs:             [B, K, K] float64, P[i, j] = P(candidate i beats candidate j)
    win_rates:         [B, K] float64, mean_j P[i, j] (self term 1/2 included)
    chosen, rejected:  [B] int64, argmax / argmin of the scores (first index on ties)
    chosen_probs:      [B] float64, P[chosen, rejected]
    chosen_probs_win:  [B] float64, win_rates[chosen]
    chosen_probs_lose: [B] float64, win_rates[rejected]
    tied:              [B] bool, all K scores equal: no pair can be formed (chosen == rejected)
    """

    scores: Tensor
    probs: Tensor
    win_rates: Tensor
    chosen: Tensor
    rejected: Tensor
    chosen_probs: Tensor
    chosen_probs_win: Tensor
    chosen_probs_lose: Tensor
    tied: Tensor


def numpy_order_sum(x: Tensor) -> Tensor:
    """``x.sum(-1)``, added up in exactly NumPy's order for a contiguous reduction.

    NumPy sums up to 7 values left to right, up to 128 values in 8 interleaved accumulators
    combined as ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))`` plus the leftovers, and larger blocks by
    halving. Floating-point addition is not associative, so this order is what makes the official
    mode bit-identical to LLM-Blender's and SPPO's NumPy code.
    """
    n = x.shape[-1]
    if n < 8:
        res = torch.full(x.shape[:-1], -0.0, dtype=x.dtype, device=x.device)
        for i in range(n):
            res = res + x[..., i]
        return res
    if n <= 128:
        r = [x[..., k] for k in range(8)]
        i = 8
        while i < n - n % 8:
            r = [r[k] + x[..., i + k] for k in range(8)]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for j in range(i, n):
            res = res + x[..., j]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return numpy_order_sum(x[..., :n2]) + numpy_order_sum(x[..., n2:])


def pairrm_aggregate(cmp: Tensor, mode: str = "official") -> PairwiseResult:
    """Turn PairRM's pairwise logits into SPPO's scores, probabilities and selection.

    ``cmp[b, i, j]`` is PairRM's logit that candidate ``i`` (in the candidate1 slot) beats candidate
    ``j``; the diagonal is ignored (treated as 0, as in the official code).

    - scores (both modes; LLM-Blender ``get_scores_from_cmps``, policy "max_logits"):
      ``score_i = (1/K) sum_j (cmp[i, j] - cmp[j, i])``, computed in cmp's dtype (float32 for
      16-bit input) and stored as float32.
    - ``mode="official"`` (SPPO ``compute_prob.py``): ``P[i, j] = 1 / (1 + exp(score_j - score_i))``.
    - ``mode="direct"``: each pair on its own, order-debiased,
      ``P[i, j] = sigmoid((cmp[i, j] - cmp[j, i]) / 2)``; unlike the official mode it does not depend
      on the other K - 2 candidates (SPPO issue #15). Selection still uses the scores.

    ``win_rates[i] = (1/K) sum_j P[i, j]`` (self term 1/2 included), chosen = argmax of the scores,
    rejected = argmin (first index on ties). Sums follow NumPy's order, so the official mode
    reproduces the NumPy pipeline bit for bit (probabilities are evaluated in float64 from the
    float32 scores).

    Args:
        cmp: ``[B, K, K]`` floating point, K >= 2.
        mode: ``"official"`` (default) or ``"direct"``.
    """
    if mode not in PAIRWISE_MODES:
        raise ValueError(f"mode: expected one of {PAIRWISE_MODES}, got {mode!r}")
    B, K, _ = cmp.shape
    work = cmp if cmp.dtype in (torch.float32, torch.float64) else cmp.float()
    eye = torch.eye(K, dtype=torch.bool, device=cmp.device)
    m = work.masked_fill(eye, 0)
    diff = m - m.transpose(-1, -2)
    scores = (numpy_order_sum(diff) / K).to(torch.float32)
    if mode == "official":
        s = scores.double()
        probs = 1.0 / (1.0 + torch.exp(s[:, None, :] - s[:, :, None]))
    else:
        m64 = m.double()
        probs = 1.0 / (1.0 + torch.exp(-((m64 - m64.transpose(-1, -2)) / 2.0)))
    win_rates = numpy_order_sum(probs) / K
    chosen = _first_arg(scores, largest=True)
    rejected = _first_arg(scores, largest=False)
    rows = torch.arange(B, device=cmp.device)
    return PairwiseResult(
        scores=scores,
        probs=probs,
        win_rates=win_rates,
        chosen=chosen,
        rejected=rejected,
        chosen_probs=probs[rows, chosen, rejected],
        chosen_probs_win=win_rates[rows, chosen],
        chosen_probs_lose=win_rates[rows, rejected],
        tied=scores.amax(-1) == scores.amin(-1),
    )


def _first_arg(x: Tensor, largest: bool) -> Tensor:
    """First index of the max (or min) along the last dim, like ``numpy.argmax``."""
    best = x.amax(-1, keepdim=True) if largest else x.amin(-1, keepdim=True)
    idx = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    return torch.where(x == best, idx, x.shape[-1]).amin(-1)
