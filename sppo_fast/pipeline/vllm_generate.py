"""Generation with vLLM (optional: ``pip install vllm``, a CUDA GPU), as the official ``generate.py``.

Run as its own process (``python -m sppo_fast.pipeline.vllm_generate ...``; the pipeline does this),
because vLLM keeps most of the GPU's memory until its process ends, and training comes next.
The child writes one Parquet file per chunk of prompts as it goes (the pipeline's
``generations.shards/``), so a killed run keeps the chunks it finished.
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

from .. import _io


def available() -> bool:
    """vLLM is installed and a CUDA GPU is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(model_path: str, prompts: Sequence[str], jobs: Sequence[tuple[int, int, Path]], *, k: int,
                  temperature: float, top_p: float, top_k: int = 0, max_new_tokens: int, seed: int) -> None:
    """Sample in one child process (the model loaded once) and write, for each job ``(lo, hi,
    path)``, the rows ``{prompt, candidates}`` of ``prompts[lo:hi]`` to ``path`` (Parquet, atomic),
    one job after another: a kill keeps the jobs already written. A sample's seed depends only on
    its prompt and index, so the results do not depend on how the prompts are split into jobs."""
    if not jobs:
        return
    spec = Path(jobs[0][2]).with_name(".vllm-request.json")
    _io.write_json({"model": str(model_path), "prompts": list(prompts), "k": k, "temperature": temperature,
                    "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
                    "jobs": [[int(lo), int(hi), str(path)] for lo, hi, path in jobs]}, spec)
    r = subprocess.run([sys.executable, "-m", "sppo_fast.pipeline.vllm_generate", str(spec)])
    missing = [str(path) for _, _, path in jobs if not Path(path).exists()]
    if r.returncode != 0 or missing:
        raise RuntimeError(f"vLLM generation failed (exit code {r.returncode}; {len(missing)} of {len(jobs)} "
                           f"chunks not written); see its output above. A rerun keeps the chunks written")
    spec.unlink(missing_ok=True)


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("request", type=Path)
    req = json.loads(p.parse_args().request.read_text())

    import pyarrow as pa
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from .data import prompt_text
    from .generate import sample_seed

    tok = AutoTokenizer.from_pretrained(req["model"])
    llm = LLM(model=req["model"], dtype="bfloat16", seed=req["seed"])
    k = req["k"]
    for lo, hi, path in req["jobs"]:
        prompts = req["prompts"][lo:hi]
        ids = [tok(prompt_text(tok, x), add_special_tokens=False)["input_ids"] for x in prompts]
        # the job's k samples of every prompt in one call (vLLM batches them); sample i of prompt x
        # is request i * len(prompts) + b
        requests = [{"prompt_token_ids": x} for _ in range(k) for x in ids]
        params = [SamplingParams(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"] or -1,
                                 max_tokens=req["max_new_tokens"], seed=sample_seed(req["seed"], i, x))
                  for i in range(k) for x in prompts]
        outs = llm.generate(requests, params)
        rows = [{"prompt": x, "candidates": [outs[i * len(prompts) + b].outputs[0].text.strip() for i in range(k)]}
                for b, x in enumerate(prompts)]
        _io.write_parquet(pa.Table.from_pylist(rows), Path(path))


if __name__ == "__main__":
    _main()
