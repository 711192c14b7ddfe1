"""Prompt sources: the SPPO prompt sets on the hub, local files, and a small set shipped here.

``load_prompts("shipped")`` needs nothing from the network: 240 instruction prompts written for this
project (12 request forms x 20 topics), enough for the embedded default's iterations and held-out
evaluation. ``load_prompts("UCLA-AGI/data-mistral-7b-instruct-sppo-iter1")`` is the official set
(field ``prompt``) for users who are online; ``load_prompts("my.jsonl")`` reads JSON, JSONL, CSV or
Parquet files with a prompt column.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .. import _io

_FORMS = (
    "Explain {t} to a curious student in a few sentences.",
    "Give three practical tips about {t}.",
    "What is the most common mistake people make with {t}?",
    "Write a short, clear summary of why {t} matters.",
    "Compare two different ways to approach {t}.",
    "Describe a simple example that shows how {t} works.",
    "What should a beginner learn first about {t}?",
    "Write a friendly message that asks a colleague for help with {t}.",
    "List the steps to plan a small project about {t}.",
    "What questions would you ask an expert on {t}?",
    "Suggest a careful way to measure progress in {t}.",
    "Tell a very short story in which {t} plays a part.",
)
_TOPICS = (
    "cooking rice", "saving money", "learning a language", "growing tomatoes", "writing a report",
    "planning a trip", "sleeping well", "reading research papers", "fixing a bicycle", "running a meeting",
    "training a small model", "debugging a program", "keeping a garden", "studying history",
    "making music", "measuring the weather", "teaching children", "choosing a laptop", "drawing a map",
    "reviewing code",
)
SHIPPED_PROMPTS: tuple[str, ...] = tuple(f.format(t=t) for t in _TOPICS for f in _FORMS)
# local prompt files, by suffix: the datasets builder that reads them
PROMPT_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_json_lines(path: Path) -> None:
    """The first line of a JSON-lines file that is not one JSON object, named."""
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}: line {n} is a JSON {type(value).__name__}, not an object with a "
                                 f"prompt field")


def load_prompts(source: str = "shipped", *, split: str = "train", field: str = "prompt",
                 limit: Optional[int] = None, offset: int = 0) -> list[str]:
    """Prompts from ``"shipped"``, a local file (.json/.jsonl/.csv/.parquet) or a hub dataset name.

    ``offset``/``limit`` select a slice (iterations take consecutive slices of one source).
    Raises ``ValueError`` naming the problem: a missing column, non-string or empty prompts.
    """
    if source == "shipped":
        prompts = list(SHIPPED_PROMPTS)
    else:
        import datasets

        path = Path(source)
        if not path.exists() and path.suffix.lower() in PROMPT_FILE_TYPES:  # a file, not a hub name
            raise FileNotFoundError(f"prompt file {source!r}: no such file")
        if path.is_file():
            kind = PROMPT_FILE_TYPES.get(path.suffix.lower())
            if kind is None:
                raise ValueError(f"{source}: unsupported prompt file type {path.suffix!r} "
                                 "(use .json, .jsonl, .csv or .parquet)")
            if not path.read_bytes().strip():
                raise ValueError(f"no prompts in {source} (an empty file)")
            if path.suffix.lower() == ".jsonl":
                _check_json_lines(path)
            quiet = logging.getLogger("datasets")
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)  # (a parse error is also logged, as a second message)
            try:
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
            except Exception as exc:  # noqa: BLE001 - datasets wraps the parser's error in its own
                cause = exc
                while cause.__cause__ is not None or cause.__context__ is not None:
                    cause = cause.__cause__ or cause.__context__
                if "no data" in str(exc):  # a CSV with a header alone: 'Instruction "train" corresponds to no data'
                    raise ValueError(f"no prompts in {source}") from exc
                first = next((x for x in str(cause).splitlines() if x.strip()), type(cause).__name__)
                raise ValueError(f"{source}: cannot be read as {path.suffix} ({type(cause).__name__}: "
                                 f"{first})") from exc
            finally:
                quiet.setLevel(level)
        else:  # a hub dataset, for users who are online
            ds = _io.local_or_hub(source, "prompt set", lambda name: datasets.load_dataset(name, split=split))
        if field not in ds.column_names:
            raise ValueError(f"{source}: no column {field!r}; columns: {ds.column_names}")
        prompts = ds[field]
        if not prompts:
            raise ValueError(f"no prompts in {source}")
    end = len(prompts) if limit is None else offset + limit
    out = prompts[offset:end]
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{source}: prompt {offset + i} is {'empty' if isinstance(p, str) else type(p).__name__}")
    return out
