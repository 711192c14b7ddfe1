"""One configuration for a whole SPPO run: a dataclass, loadable from YAML, overridable per field.

Presets: ``tiny`` (the embedded default: a tiny Mistral-architecture policy on this CPU, the shipped
prompts, :class:`~sppo_fast.pipeline.rank.HashWordRanker`) and ``mistral-7b`` (the released recipe:
Mistral-7B-Instruct-v0.2, PairRM, the UCLA-AGI prompt sets, lr 5e-7 RMSprop, beta 0.001, global
batch 64, max_length 1024 / max_prompt_length 512).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional

from .. import _io
from ..reference import PAIRWISE_MODES
from .prompts import PROMPT_FILE_TYPES, SHIPPED_PROMPTS
from .train import _FREE_TO_CHANGE as TRAIN_FREE_TO_CHANGE
from .train import TrainConfig


@dataclasses.dataclass
class SPPOConfig:
    name: str = "demo"
    runs_dir: str = "runs"
    model: str = "tiny"                 # "tiny" or a Hugging Face model name / folder
    ranker: str = "hash"                # "hash", "pairrm-tiny", or a PairRM name / folder
    prompts: str = "shipped"            # "shipped", a file, or a hub set ("{iteration}" is filled in)
    prompt_field: str = "prompt"
    prompts_per_iteration: int = 64
    eval_prompts: int = 48              # held out (the first ones of the source), for win rates
    iterations: int = 3
    k: int = 5
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0                      # 0: none (the official vLLM sampling)
    max_new_tokens: int = 24
    generation_batch_size: int = 64
    generation_backend: str = "auto"    # "hf", "vllm", or "auto" (vLLM when installed with a GPU)
    seed: int = 50
    mode: str = "official"             # pairrm_aggregate mode
    device: str = "auto"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"name: expected a folder name inside runs_dir (no '/'), got {self.name!r}")
        if isinstance(self.train, dict):
            try:
                self.train = TrainConfig(**self.train)
            except ValueError as exc:
                raise ValueError(f"train.{exc}") from None
        if self.mode not in PAIRWISE_MODES:
            raise ValueError(f"mode: expected one of {PAIRWISE_MODES}, got {self.mode!r}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for f, builtin in (("model", ("tiny",)), ("ranker", ("hash", "pairrm-tiny")), ("prompts", ("shipped",))):
            value = getattr(self, f).replace("{iteration}", "1")  # per-iteration sets: set 1 stands for all
            a_file = f == "prompts" and Path(value).suffix.lower() in PROMPT_FILE_TYPES  # (never a hub name)
            if value not in builtin and not Path(value).exists() and (a_file or not _io.looks_like_hub_name(value)):
                raise ValueError(f"{f}: no such file or folder {value!r}"
                                 + ("" if a_file else " (and not a hub name like 'org/name')")
                                 + f"; built in: {', '.join(builtin)}")
        if self.prompts == "shipped" and self.eval_prompts >= len(SHIPPED_PROMPTS):
            raise ValueError(f"eval_prompts={self.eval_prompts} holds out every one of the {len(SHIPPED_PROMPTS)} "
                             f"shipped prompts: none would be left for training")
        for f in ("prompts_per_iteration", "iterations", "max_new_tokens", "generation_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.generation_backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"generation_backend: expected 'auto', 'hf' or 'vllm', got {self.generation_backend!r}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (SPPO compares K responses per prompt), got {self.k}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0, got {self.eval_prompts}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # tiny: top-k 50 keeps a random 2k-token policy's long tail out of its samples
    "tiny": dict(prompts_per_iteration=96, top_k=50,
                 train=dict(learning_rate=3e-4, optimizer="adamw", beta=0.1, batch_size=8, epochs=2,
                            max_length=96, max_prompt_length=48, warmup_ratio=0.1)),
    "mistral-7b": dict(
        model="mistralai/Mistral-7B-Instruct-v0.2", ranker="llm-blender/PairRM",
        prompts="UCLA-AGI/data-mistral-7b-instruct-sppo-iter{iteration}", prompts_per_iteration=20000,
        eval_prompts=0, max_new_tokens=2048, generation_batch_size=16,
        train=dict(learning_rate=5e-7, optimizer="rmsprop", beta=0.001, batch_size=8, grad_accum=8, epochs=1,
                   max_length=1024, max_prompt_length=512, warmup_ratio=0.1, gradient_checkpointing=True,
                   save_every=50)),  # ~310 steps an iteration: a kill loses at most 50 (a checkpoint: ~2x fp32 weights)
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value: Any, like: Any) -> Any:
    """``value`` (a --set string or a YAML value) as the type of the field's default ``like``."""
    if isinstance(like, dict):
        raise ValueError(f"is a group of fields ({', '.join(like)}), not a value: set its fields one by one")
    if isinstance(value, (dict, list)) or value is None:
        kind = {bool: "a boolean", int: "an integer", float: "a number"}.get(type(like), "a string")
        raise ValueError(f"expected {kind}, got {value!r}")
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, (int, float)) and isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(like, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(like, float):
        try:
            return float(value)  # also YAML's strings: PyYAML reads 1e-4 (no dot) as a str
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return str(value)


def load_config(preset: str = "tiny", path: Optional[str | os.PathLike] = None,
                overrides: Optional[dict[str, str]] = None) -> SPPOConfig:
    """A preset, then a YAML file's fields, then ``overrides`` (``{"train.learning_rate": "1e-4"}``).

    Unknown fields and values of the wrong type are rejected with a message naming them.
    """
    import yaml

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    fields = dataclasses.asdict(SPPOConfig())
    fields = _merge(fields, PRESETS[preset])
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:  # (one line: where and what, not PyYAML's traceback)
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where}: {what}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        _set_all(fields, data, f"{path}: ")
    for key, value in (overrides or {}).items():
        _set(fields, key, value)
    return SPPOConfig(**fields)


def _set_all(fields: dict, data: dict, where: str, prefix: str = "") -> None:
    for k, v in data.items():
        node = fields
        for p in prefix.split(".")[:-1]:
            node = node[p]
        if isinstance(v, dict) and isinstance(node.get(k), dict):
            _set_all(fields, v, where, prefix + k + ".")
        else:
            _set(fields, prefix + k, v, where)


def _suggest(fields: dict, key: str) -> str:
    """``"; did you mean 'train.beta'?"`` or the list of fields, for an unknown ``key``."""
    import difflib

    names = sorted(_flat(fields))
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    close += [n for n in names if n.endswith("." + key) and n not in close]  # 'beta' for 'train.beta'
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "; fields: " + ", ".join(n for n in names if "." not in n) + ", train.<" + ", ".join(
        n.split(".", 1)[1] for n in names if n.startswith("train.")) + ">"


def _set(fields: dict, key: str, value: Any, where: str = "") -> None:
    """``fields[a][b] = value`` for ``key = "a.b"``, coerced to the field's type, or a ValueError
    naming the field and the value."""
    parts = key.split(".")
    node = fields
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"{where}unknown config field {key!r}{_suggest(fields, key)}")
        node = node[p]
    if parts[-1] not in node:
        raise ValueError(f"{where}unknown config field {key!r}{_suggest(fields, key)}")
    try:
        node[parts[-1]] = _coerce(value, node[parts[-1]])
    except ValueError as exc:
        raise ValueError(f"{where}config field {key!r}: {exc}") from None


# fields a run folder's later commands may change: they name or locate the folder, extend the run
# (iterations: iteration t's outputs do not depend on how many follow), or do not change the numbers
# beyond rounding (generation_batch_size: a sample depends on its prompt, index and seed only; the
# training fields the checkpoints also let change). Every other field is compared.
FREE_TO_CHANGE = ("name", "runs_dir", "iterations", "generation_batch_size",
                  *(f"train.{k}" for k in TRAIN_FREE_TO_CHANGE))


# fields that only the ranking and what follows it read: free to change while nothing is ranked yet
RANKING_FIELDS = ("ranker", "mode")
_RANKING_OUTPUTS = ("ranked.parquet", "ranked.shards", "ranking.json", "train.parquet", "winrate.json")


def _ranked_anything(run: Path) -> bool:
    """Whether ``run`` holds any output of a ranking (or of what follows it)."""
    return (run / "summary.json").exists() or any(
        (it / name).exists() for it in run.glob("iter-*") for name in _RANKING_OUTPUTS)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_run_config(cfg: SPPOConfig) -> None:
    """Write ``<run_dir>/config.yaml``, or, when the folder already holds results, refuse settings that
    differ from the ones recorded there (except :data:`FREE_TO_CHANGE`): the finished stages would
    be reused silently while config.yaml and summary.json claimed the new settings."""
    import yaml

    run = cfg.run_dir
    path = run / "config.yaml"
    held = sorted(p.name for p in run.iterdir() if p.name not in ("config.yaml", ".lock")) if run.is_dir() else []
    if held and not path.exists():
        raise ValueError(f"{run} holds results ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) but no "
                         f"config.yaml, so the settings they were made with are unknown: restore its config.yaml, "
                         f"give the new run another name (--set name=...) or runs_dir, or delete {run}")
    if held:
        try:
            then = yaml.safe_load(path.read_text()) or {}
            if not isinstance(then, dict):
                raise yaml.YAMLError(f"a {type(then).__name__}, not a mapping of fields")
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: damaged ({str(exc).splitlines()[0]}); restore it (it records the "
                             f"settings of the results in {run}) or delete {run}") from None
        then = _flat(then)
        now = _flat(cfg.to_dict())
        changed = [k for k in sorted(set(then) | set(now)) if k not in FREE_TO_CHANGE and then.get(k) != now.get(k)]
        if changed and set(changed) <= set(RANKING_FIELDS) and not _ranked_anything(run):
            changed = []  # (e.g. a ranker the hub could not provide, corrected after generation)
        if changed:
            diff = "; ".join(f"{k}: {then.get(k, '<absent>')!r} then, {now.get(k, '<absent>')!r} now" for k in changed)
            raise ValueError(f"{run} holds a run made with other settings ({diff}): rerun with the same settings, "
                             f"give the new run another name (--set name=...) or runs_dir, or delete {run}")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)


def save_config(cfg: SPPOConfig, path: Path) -> None:
    import yaml

    _io.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)
