"""Generation with vLLM (optional: ``pip install vllm``, a CUDA GPU), as the official ``generate.py``.

Run as its own process (``python -m sppo_fast.pipeline.vllm_generate ...``; the pipeline does this),
because vLLM keeps most of the GPU's memory until its process ends, and training comes next.
Prompts are passed as token ids (the chat template's text already starts with BOS, which vLLM's
tokenizer would double); sample ``k`` of each prompt is its own request with the seed
:func:`~sppo_fast.pipeline.generate.sample_seed` gives it, as in the Hugging Face backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def available() -> bool:
    """vLLM is installed and a CUDA GPU is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(model_path: str, prompts: Sequence[str], out_path: Path, *, k: int, temperature: float,
                  top_p: float, top_k: int = 0, max_new_tokens: int, seed: int) -> Path:
    """Sample in a child process and write ``out_path`` (Parquet: prompt, candidates) atomically."""
    spec = Path(out_path).with_name(".vllm-request.json")
    spec.write_text(json.dumps({"model": str(model_path), "prompts": list(prompts), "k": k,
                                "temperature": temperature, "top_p": top_p, "top_k": top_k,
                                "max_new_tokens": max_new_tokens, "seed": seed, "out": str(out_path)}))
    r = subprocess.run([sys.executable, "-m", "sppo_fast.pipeline.vllm_generate", str(spec)])
    if r.returncode != 0 or not Path(out_path).exists():
        raise RuntimeError(f"vLLM generation failed (exit code {r.returncode}); see its output above")
    spec.unlink(missing_ok=True)
    return Path(out_path)


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("request", type=Path)
    req = json.loads(p.parse_args().request.read_text())

    import pyarrow as pa
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from .. import _io
    from .data import prompt_text
    from .generate import sample_seed

    tok = AutoTokenizer.from_pretrained(req["model"])
    ids = [tok(prompt_text(tok, x), add_special_tokens=False)["input_ids"] for x in req["prompts"]]
    llm = LLM(model=req["model"], dtype="bfloat16", seed=req["seed"])
    cands: list[list[str]] = [[] for _ in ids]
    for i in range(req["k"]):
        params = [SamplingParams(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"] or -1,
                                 max_tokens=req["max_new_tokens"], seed=sample_seed(req["seed"], i, x))
                  for x in req["prompts"]]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params)
        for b, o in enumerate(outs):
            cands[b].append(o.outputs[0].text.strip())
    rows = [{"prompt": x, "candidates": c} for x, c in zip(req["prompts"], cands)]
    _io.write_parquet(pa.Table.from_pylist(rows), Path(req["out"]))


if __name__ == "__main__":
    _main()
