"""Run LLM-Blender's own PairRM code on our weights: the yardstick of the tests and benchmarks.

The PyPI package ``llm-blender`` 0.0.2 was written for transformers 4. This is the one place that
adapts it to transformers 5, and it touches nothing outside LLM-Blender's objects:

- ``transformers.utils.hub.TRANSFORMERS_CACHE`` (removed in 5) is restored before the import;
- the tokenizer handed to LLM-Blender's collator gets the removed ``batch_encode_plus`` (which was
  ``tokenizer(texts, **kwargs)``);
- ``Blender.loadranker`` always downloads ``microsoft/deberta-v3-large``, so the ranker is assembled
  offline from LLM-Blender's ``CrossCompareReranker`` and ``CrossCompareCollator`` around our backbone.
"""

from __future__ import annotations

import copy


def import_llm_blender():
    """Import ``llm_blender`` under transformers 4 or 5; raises ImportError if it is not installed."""
    import transformers.utils.hub as hub

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub import constants

        hub.TRANSFORMERS_CACHE = constants.HF_HUB_CACHE
    import llm_blender

    return llm_blender


def _with_batch_encode_plus(tokenizer):
    tok = copy.deepcopy(tokenizer)
    if not hasattr(tok, "batch_encode_plus"):
        tok.batch_encode_plus = lambda texts, **kwargs: tok(list(texts), **kwargs)
    return tok


def llm_blender_ranker(model, tokenizer, *, source_max_length: int = 1224,
                       candidate_max_length: int = 412, device: str = "cpu"):
    """A ``llm_blender.Blender`` whose ranker is LLM-Blender's ``CrossCompareReranker`` sharing
    ``model``'s (a :class:`sppo_fast.pairrm.PairRM`) backbone and head weights, with its
    ``CrossCompareCollator`` on a copy of ``tokenizer``. ``Blender.rank`` / ``compare`` /
    ``ranker._full_predict`` then run LLM-Blender's code unchanged.
    """
    import torch

    llm_blender = import_llm_blender()
    from llm_blender.blender.blender import Blender
    from llm_blender.pair_ranker.collator import CrossCompareCollator
    from llm_blender.pair_ranker.ranker import CrossCompareReranker

    tok = _with_batch_encode_plus(tokenizer)
    collator = CrossCompareCollator(source_max_length, tok, candidate_max_length)
    cfg = llm_blender.RankerConfig(ranker_type="pairranker", model_type="deberta", model_name="local",
                                   source_maxlength=source_max_length,
                                   candidate_maxlength=candidate_max_length, n_tasks=model.n_tasks,
                                   drop_out=model.drop_out, inference_mode="full", fp16=False,
                                   device=device)
    backbone = model.pretrained_model
    backbone.config.out_hidden_state_size = backbone.config.hidden_size  # read by CrossCompareReranker
    ranker = CrossCompareReranker(backbone, cfg, tok)
    with torch.no_grad():
        ranker.head_layer.load_state_dict(model.head_layer.state_dict())
    blender = Blender(llm_blender.BlenderConfig(device=device, use_tqdm=False))
    blender.ranker = ranker.to(device).eval()
    blender.ranker_tokenizer = tok
    blender.ranker_collator = collator
    blender.ranker_config = cfg
    return blender
