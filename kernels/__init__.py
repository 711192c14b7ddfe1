"""Triton kernels of sppo_fast, installed as ``sppo_fast.kernels`` (never as a top-level module).

The Triton backend (fused token log-probs with the SPPO gradient, PairRM aggregation) is its own
issue; until it lands this package ships empty and ``backend="triton"`` raises
``sppo_fast.BackendUnavailableError`` saying so.
"""
