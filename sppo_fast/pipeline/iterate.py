"""Whole SPPO iterations: generate, rank, build the training set, train; evaluate; summarise.

Files of a run (every one written to a temporary name and renamed when complete; a stage is done
exactly when its output exists, so rerunning after a kill continues from the first missing one):

    runs/<name>/config.yaml                   the run's settings: a later command on the folder with
                                              other settings is refused (config.FREE_TO_CHANGE)
    runs/<name>/iter-0/model/                 the starting policy (tiny: built here)
    runs/<name>/iter-t/generations.parquet    prompt, K candidates
    runs/<name>/iter-t/train.parquet          official fields + candidates, scores, matrix
    runs/<name>/iter-t/{generations,ranked}.shards/  while generation or ranking runs: one Parquet
                                              file per finished chunk of prompts (a rerun keeps
                                              them), merged and removed when the stage completes
    runs/<name>/iter-t/{metrics.jsonl, model/}
    runs/<name>/summary.json, winrate.png, loss.png
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import _io
from .config import SPPOConfig, check_run_config
from .generate import generate
from .prompts import load_prompts
from .rank import HashWordRanker, ranker_fingerprint, training_records, win_rate
from .train import read_metrics, train


def _device(cfg: SPPOConfig) -> torch.device:
    if cfg.device == "auto":  # under torchrun, each rank on its own GPU
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r}, but torch sees no CUDA GPU here (use device=cpu or auto)")
    return torch.device(cfg.device)


def tiny_policy(tokenizer, seed: int = 0):
    """A randomly initialised Mistral-architecture causal LM at tiny size (hidden 64, 2 layers)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MistralForCausalLM(cfg)


def _atomic_parquet(rows: list[dict], path: Path, metadata: dict[str, str] | None = None) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    _io.write_parquet(table, path)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return _io.read_parquet(path).to_pylist()


def policy_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (generation and evaluation); :func:`~sppo_fast.pipeline.train.train` trains a
    float32 copy of the weights whatever this is (bf16 compute through autocast)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_policy(path: str | Path, device: torch.device, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or policy_dtype(device)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / "model" / "config.json").exists():
        raise ValueError(f"{path} is an iteration's folder, not a model: its policy is {folder / 'model'}")
    model = _io.local_or_hub(path, "model", lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype))
    return model.to(device), AutoTokenizer.from_pretrained(path)


def make_ranker(cfg: SPPOConfig, device: torch.device):
    if cfg.ranker == "hash":
        return HashWordRanker()
    from ..pairrm import PairRMRanker, tiny_pairrm

    if cfg.ranker == "pairrm-tiny":
        model, tok = tiny_pairrm(seed=cfg.train.seed)
        return PairRMRanker(model.to(device), tok, mode=cfg.mode, progress=False)
    try:
        return PairRMRanker.from_pretrained(cfg.ranker, device=device, mode=cfg.mode, progress=False)
    except OSError as exc:  # (a name of the hub's form that it cannot provide: say what is built in)
        raise OSError(f"ranker: {exc}; built in: hash, pairrm-tiny") from exc


def _initial_policy(cfg: SPPOConfig, run: Path, device: torch.device) -> Path:
    out = run / "iter-0" / "model"
    if out.exists():
        return out
    if cfg.model != "tiny":
        return Path(cfg.model)  # a hub name or folder: read directly
    from ..tiny import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer(seed=cfg.train.seed)
    model = tiny_policy(tok, seed=cfg.train.seed)
    tmp = out.with_name(".model.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _sharded_stage(out: Path, n: int, chunk: int, settings: dict, compute, *, desc: str, unit: str,
                   progress: bool, per_item: int = 1) -> list[dict]:
    """Rows for items ``[0, n)``, computed ``chunk`` at a time by ``compute(lo, hi, advance) -> rows``.

    The bar counts ``per_item`` units per item; ``compute`` may move it as it goes with
    ``advance(units)`` (a chunk can take long), and whatever it did not is added when it returns.

    Each finished chunk is written atomically to ``<out stem>.shards/`` with the stage's settings;
    a rerun keeps what a killed run finished and refuses shards written with other settings. The
    merged rows go to ``out`` (atomic, the settings in its Parquet metadata), then the shards are
    removed; an existing ``out`` is returned only if it was written with the same settings."""
    import shutil

    from tqdm.auto import tqdm

    settings = json.loads(json.dumps({**settings, "items": n, "chunk": chunk}))  # as JSON reads it back
    if out.exists():  # merged by a run killed before the next stage consumed it
        old = _io.parquet_metadata(out).get(b"sppo_fast.settings")
        if old is None or json.loads(old) != settings:
            why = "no record of its settings" if old is None else f"other settings ({_diff(json.loads(old), settings)})"
            raise ValueError(f"{out} was written with {why}; rerun with the same settings, or delete it "
                             f"to redo the stage")
        return _read_parquet(out)
    shards = out.with_name(f"{out.stem}.shards")
    shards.mkdir(exist_ok=True)
    spec = shards / "settings.json"
    if spec.exists() and _io.read_json(spec) != settings:
        raise ValueError(f"{shards} holds partial results for other settings "
                         f"({_diff(_io.read_json(spec), settings)}); rerun with the same "
                         f"settings, or delete that folder to start the stage over")
    _io.write_json(settings, spec)
    rows: list[dict] = []
    with tqdm(total=n * per_item, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(0, n, chunk):
            path = _shard_path(out, lo, chunk)
            moved = [0]

            def advance(units: int) -> None:
                moved[0] += units
                bar.update(units)
            if path.exists():
                part = _read_parquet(path)
            else:
                part = compute(lo, min(lo + chunk, n), advance)
                if not path.exists():  # (a compute may write its chunks itself: vLLM's child does)
                    _atomic_parquet(part, path)
            rows += part
            bar.update(len(part) * per_item - moved[0])
    _atomic_parquet(rows, out, {"sppo_fast.settings": json.dumps(settings)})
    shutil.rmtree(shards, ignore_errors=True)
    return rows


def _in_run(path: Path, run: Path) -> str:
    """``path`` relative to the run folder where it lies inside it, else as given."""
    try:
        return Path(path).resolve().relative_to(Path(run).resolve()).as_posix()
    except ValueError:
        return str(path)


def _diff(old: dict, new: dict) -> str:
    """The names of the settings that differ, comma-separated."""
    return ", ".join(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _shard_path(out: Path, lo: int, chunk: int) -> Path:
    """Where :func:`_sharded_stage` keeps the chunk of ``out`` that starts at item ``lo``."""
    return out.with_name(f"{out.stem}.shards") / f"{lo // chunk:06d}.parquet"


def _prompt_source(cfg: SPPOConfig, t: int) -> str:
    return cfg.prompts.replace("{iteration}", str(t))


def held_out_prompts(cfg: SPPOConfig) -> list[str]:
    """The evaluation prompts: the first ``eval_prompts`` of the source, or, for per-iteration sets
    (``{iteration}`` in the name: disjoint thirds, as the official UCLA-AGI sets), of set 1, which
    iteration 1 then trains after (there is no set 0)."""
    return load_prompts(_prompt_source(cfg, 1), field=cfg.prompt_field, limit=cfg.eval_prompts)


def iteration_prompts(cfg: SPPOConfig, t: int) -> list[str]:
    """Iteration t's training prompts: a fresh slice per iteration after the held-out ones (or,
    for per-iteration sets, the first ``prompts_per_iteration`` of set t, after the held-out ones
    in set 1)."""
    if "{iteration}" in cfg.prompts:
        prompts = load_prompts(_prompt_source(cfg, t), field=cfg.prompt_field, limit=cfg.prompts_per_iteration,
                               offset=cfg.eval_prompts if t == 1 else 0)
        _warn_repeats(cfg, t, prompts)
        return prompts
    start = cfg.eval_prompts + (t - 1) * cfg.prompts_per_iteration
    prompts = load_prompts(cfg.prompts, field=cfg.prompt_field, offset=start, limit=cfg.prompts_per_iteration)
    if len(prompts) == cfg.prompts_per_iteration:
        _warn_repeats(cfg, t, prompts)
    if len(prompts) < cfg.prompts_per_iteration:
        # a small source (the shipped set) is reused cyclically; each iteration still differs
        pool = load_prompts(cfg.prompts, field=cfg.prompt_field, offset=cfg.eval_prompts)
        if not pool:
            raise ValueError(f"{cfg.prompts}: every prompt is held out for evaluation (eval_prompts="
                             f"{cfg.eval_prompts}): none left to train on; lower eval_prompts")
        if len(pool) < cfg.prompts_per_iteration:
            warnings.warn(f"{cfg.prompts} has {len(pool)} prompts after the {cfg.eval_prompts} held out, fewer than "
                          f"prompts_per_iteration={cfg.prompts_per_iteration}: iteration {t} repeats prompts "
                          f"(lower prompts_per_iteration to avoid duplicates)", stacklevel=2)
        elif cfg.prompts != "shipped":  # the shipped set is small by design
            warnings.warn(f"{cfg.prompts} has {len(pool)} prompts after the {cfg.eval_prompts} held out: iteration "
                          f"{t} reuses prompts of earlier iterations", stacklevel=2)
        prompts = [pool[(start - cfg.eval_prompts + i) % len(pool)] for i in range(cfg.prompts_per_iteration)]
    return prompts


def _warn_repeats(cfg: SPPOConfig, t: int, prompts: list[str]) -> None:
    """Warn when a source's own repeats put a prompt twice into iteration t or into both its training
    prompts and the held-out ones (whose win rate would then be measured partly on trained prompts)."""
    seen: set[str] = set()
    repeated = sum(1 for p in prompts if p in seen or seen.add(p))
    if repeated:
        warnings.warn(f"{cfg.prompts}: {repeated} of iteration {t}'s {len(prompts)} prompts repeat an earlier one "
                      f"of the same iteration (the source holds duplicates)", stacklevel=3)
    held = set(held_out_prompts(cfg)) if cfg.eval_prompts else set()
    shared = len(seen & held)
    if shared:
        warnings.warn(f"{cfg.prompts}: {shared} of iteration {t}'s prompts are also among the {cfg.eval_prompts} "
                      f"held out for evaluation (the source holds duplicates): the win rate is measured partly on "
                      f"prompts the policy trained on", stacklevel=3)


def check_prompts(cfg: SPPOConfig, iterations, held_out: bool = False) -> None:
    """Read the prompts that iterations ``iterations`` will generate from (those whose generations
    are not written yet) and, with ``held_out`` and ``eval_prompts``, the held-out ones: a missing
    column, an empty or non-string prompt or an unreadable file is found before any work, and before
    the run folder records these settings (which would then refuse the corrected ones)."""
    if held_out and cfg.eval_prompts:
        held_out_prompts(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the stage itself warns about small sources)
        for t in iterations:
            if not (cfg.run_dir / f"iter-{t}" / "generations.parquet").exists():
                iteration_prompts(cfg, t)


STAGES = ("generate", "rank", "train")
RANK_CHUNK = 512  # prompts per ranking shard
VLLM_CHUNK = 512  # prompts per generation shard with vLLM (k samples each, one vLLM call)


def _use_vllm(cfg: SPPOConfig) -> bool:
    from .vllm_generate import available

    if cfg.generation_backend == "vllm" and not available():
        raise ValueError("generation_backend='vllm' needs vllm installed and a CUDA GPU")
    return cfg.generation_backend == "vllm" or (cfg.generation_backend == "auto" and available())


def run_iteration(cfg: SPPOConfig, t: int, *, ranker=None, progress: bool = True, until: str = "train",
                  checked: bool = False) -> Path:
    """Iteration t (1-based): from iteration t-1's policy to iteration t's; returns its model folder.

    ``until``: stop after ``"generate"`` or ``"rank"`` (earlier stages run first when missing).
    ``checked``: the prompts and the run folder's settings were checked already (by :func:`iterate`).
    The run folder is locked meanwhile: another process on it stops with an error."""
    with _io.folder_lock(cfg.run_dir):
        return _run_iteration(cfg, t, ranker=ranker, progress=progress, until=until, checked=checked)


def _run_iteration(cfg: SPPOConfig, t: int, *, ranker, progress: bool, until: str, checked: bool) -> Path:
    if until not in STAGES:
        raise ValueError(f"until: expected one of {STAGES}, got {until!r}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"iteration must be >= 1 (iteration 1 trains from the starting policy), got {t!r}")
    if not checked:
        check_prompts(cfg, [t])
        check_run_config(cfg)
    device = _device(cfg)
    run = cfg.run_dir
    prev = run / f"iter-{t - 1}" / "model"
    if t > 1 and not (prev / "trainer_state.json").exists():
        raise ValueError(f"iteration {t} starts from iteration {t - 1}'s policy, which {run} does not have yet: "
                         f"run `sppo-fast train --iteration {t - 1}` with the same settings first")
    it = run / f"iter-{t}"
    final = it / "model"
    if (final / "trainer_state.json").exists() and until == "train":
        return final
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (it / "train.parquet").exists():
        raise ValueError(f"iteration {t} has no train.parquet yet: run generation and ranking in one process "
                         f"first (sppo-fast rank ...), then train under torchrun")
    it.mkdir(parents=True, exist_ok=True)
    start = _initial_policy(cfg, run, device) if t == 1 else run / f"iter-{t - 1}" / "model"
    gen_path = it / "generations.parquet"
    loaded: list = []

    def policy():  # loaded once, and only by a stage that needs it (not by ranking alone)
        if not loaded:
            loaded.extend(load_policy(start, device))
        return loaded

    if not gen_path.exists():
        prompts = iteration_prompts(cfg, t)
        opts = dict(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

        # (a policy inside the run folder by its place there: the folder may be moved or renamed)
        settings = {"policy": _in_run(start, run), "prompts": _io.digest(prompts), **opts}
        if _use_vllm(cfg):
            from .vllm_generate import generate_vllm

            chunk = VLLM_CHUNK
            settings["backend"] = "vllm"

            def sample(lo: int, hi: int, advance) -> list[dict]:
                # one child process (vLLM loads the model once) writes every chunk not yet written,
                # from this one on; the stage then finds the later ones done
                jobs = [(a, min(a + chunk, len(prompts)), _shard_path(gen_path, a, chunk))
                        for a in range(lo, len(prompts), chunk)]
                generate_vllm(str(start), prompts, [j for j in jobs if not j[2].exists()], **opts)
                return _read_parquet(jobs[0][2])
        else:
            chunk = 4 * cfg.generation_batch_size

            def sample(lo: int, hi: int, advance) -> list[dict]:  # candidates do not depend on the chunking
                model, tok = policy()
                cands = generate(model, tok, prompts[lo:hi], batch_size=cfg.generation_batch_size, progress=False,
                                 on_samples=advance, **opts)
                return [{"prompt": p, "candidates": c} for p, c in zip(prompts[lo:hi], cands)]

        _sharded_stage(gen_path, len(prompts), chunk, settings, sample,
                       desc=f"iteration {t}: generating", unit="sample", progress=progress, per_item=cfg.k)
    if until == "generate":
        return gen_path
    train_path = it / "train.parquet"
    if not train_path.exists():
        gens = _read_parquet(gen_path)
        ranker = ranker or make_ranker(cfg, device)

        # PairRM sorts and buckets the pairs of `prompts_per_step` prompts at a time anyway (a multiple
        # of its truncation group): calling it that many at a time changes nothing but moves the bar
        step = max(1, int(getattr(ranker, "prompts_per_step", 64)))

        def judge(lo: int, hi: int, advance) -> list[dict]:
            rows = []
            for a in range(lo, hi, step):
                part = gens[a:min(a + step, hi)]
                m = ranker.pair_matrix([g["prompt"] for g in part], [g["candidates"] for g in part])
                rows += [{**g, "cmp": row.tolist()} for g, row in zip(part, m.float().cpu())]
                advance(len(part))
            return rows

        # the ranker's identity, not only cfg.ranker's name: pairrm-tiny's weights follow train.seed,
        # a ranker object may be passed in, a hub name may point at another revision
        ranked = _sharded_stage(it / "ranked.parquet", len(gens), RANK_CHUNK,
                                {"ranker": ranker_fingerprint(ranker), "generations": _io.digest(gens)}, judge,
                                desc=f"iteration {t}: ranking", unit="prompt", progress=progress)
        cmp = torch.tensor([r["cmp"] for r in ranked], dtype=torch.float32)
        records, tied = training_records([r["prompt"] for r in ranked], [r["candidates"] for r in ranked], cmp,
                                         mode=cfg.mode)
        # train.parquet, the stage's completion mark, last: a kill in between redoes the (cheap) step
        _io.write_json({"prompts": len(ranked), "tied": tied, "records": len(records)}, it / "ranking.json")
        _atomic_parquet(records, train_path)
        (it / "ranked.parquet").unlink(missing_ok=True)
    if until == "rank":
        return train_path
    ranker = None  # (one made here: its memory back before the policy trains)
    records = _read_parquet(train_path)
    train(*policy(), records, it, cfg.train, progress=progress)
    return final


EVAL_SAMPLES = 2  # answers per held-out prompt and policy


def evaluate(cfg: SPPOConfig, model_a: Path, model_b: Path, *, ranker=None, samples: int = EVAL_SAMPLES,
             progress: bool = False, answers: Optional[dict] = None) -> float:
    """Win rate of policy A against policy B on the held-out prompts under the ranker: each prompt
    answered ``samples`` times by each (same seeds), both orders compared, ties count one half.
    ``answers``: a dict that keeps each policy's answers by its path, for later calls (a run
    compares every iteration with the same iteration 0)."""
    device = _device(cfg)
    if not cfg.eval_prompts:
        raise ValueError("eval_prompts is 0: no held-out prompts to evaluate on")
    prompts = held_out_prompts(cfg)
    ranker = ranker or make_ranker(cfg, device)
    answers = {} if answers is None else answers
    for which, path in (("A", model_a), ("B", model_b)):
        if str(path) not in answers:
            model, tok = load_policy(path, device)
            answers[str(path)] = generate(
                model, tok, prompts, k=samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7, progress=progress,
                desc=f"evaluating: {which} = {path}", batch_size=cfg.generation_batch_size)
            del model
    outs = [answers[str(model_a)], answers[str(model_b)]]
    rates = [win_rate(ranker, prompts, [a[s] for a in outs[0]], [b[s] for b in outs[1]]) for s in range(samples)]
    return sum(rates) / len(rates)


def _policy_id(path: Path) -> str:
    """A saved policy's identity: its path and the digest of its training record (or config)."""
    for name in ("trainer_state.json", "config.json"):
        if (Path(path) / name).is_file():
            return f"{path}: {_io.digest((Path(path) / name).read_text())}"
    return str(path)


def _evaluate_once(cfg: SPPOConfig, t: int, model: Path, base: Path, ranker, answers: dict, progress: bool) -> float:
    """Iteration t's win rate against iteration 0, kept in ``iter-t/winrate.json`` for a rerun of a
    finished run (the run folder's settings are fixed; the ranker's identity is checked too)."""
    path = cfg.run_dir / f"iter-{t}" / "winrate.json"
    key = {"policy": _policy_id(model), "against": _policy_id(base), "ranker": ranker_fingerprint(ranker),
           "held_out": _io.digest(held_out_prompts(cfg)), "dtype": str(policy_dtype(_device(cfg))),
           "samples": EVAL_SAMPLES, "eval_prompts": cfg.eval_prompts,
           "prompts": cfg.prompts, "seed": cfg.seed, "temperature": cfg.temperature, "top_p": cfg.top_p,
           "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens}
    if path.exists():
        try:
            kept = json.loads(path.read_text())
        except ValueError:
            kept = {}  # (a cache: a damaged one is recomputed)
        if isinstance(kept, dict) and kept.get("settings") == key:
            return kept["win_rate"]
    wr = evaluate(cfg, model, base, ranker=ranker, samples=EVAL_SAMPLES, progress=progress, answers=answers)
    _io.write_json({"win_rate": wr, "settings": key}, path)
    return wr


def iterate(cfg: SPPOConfig, *, progress: bool = True, ranker=None) -> dict:
    """Run ``cfg.iterations`` iterations end to end, then the win rate of each iteration's policy
    against iteration 0 on held-out prompts; writes summary.json, winrate.png and loss.png. The run
    folder is locked meanwhile: another process on it stops with an error."""
    with _io.folder_lock(cfg.run_dir):
        return _iterate(cfg, progress=progress, ranker=ranker)


def _iterate(cfg: SPPOConfig, *, progress: bool, ranker) -> dict:
    check_prompts(cfg, range(1, cfg.iterations + 1), held_out=True)
    check_run_config(cfg)  # (before a hub ranker downloads; a ranker that fails may still be corrected)
    device = _device(cfg)
    ranker = ranker or make_ranker(cfg, device)
    run = cfg.run_dir
    t0 = time.perf_counter()
    models = [_initial_policy(cfg, run, device)]
    for t in range(1, cfg.iterations + 1):
        if progress:
            print(f"== SPPO iteration {t}/{cfg.iterations}")
        models.append(run_iteration(cfg, t, ranker=ranker, progress=progress, checked=True))
    rows, answers = [], {}
    for t, m in enumerate(models):
        info = _ranking_info(run / f"iter-{t}") if t else {}
        last = _io.read_json(m / "trainer_state.json")["summary"]["last"] if t else {}
        # None: not evaluated (no held-out prompts), not a tie
        wr = ((_evaluate_once(cfg, t, m, models[0], ranker, answers, progress) if t else 0.5)
              if cfg.eval_prompts else None)
        rows.append({"iteration": t, "win_rate_vs_iter0": wr, "tied_prompts": info.get("tied", 0),
                     "train_records": info.get("records", 0), "final_loss": last.get("loss"),
                     "reward_margin": last.get("rewards/margins")})
    summary = {"config": cfg.to_dict(), "iterations": rows, "seconds": time.perf_counter() - t0}
    _io.write_json(summary, run / "summary.json", indent=2)
    plot_run(run, rows)
    return summary


def _ranking_info(it: Path) -> dict:
    """ranking.json; for a folder ranked before it was written ahead of train.parquet, the record
    count from train.parquet (the tie count is then unknown)."""
    if (it / "ranking.json").exists():
        return _io.read_json(it / "ranking.json")
    import pyarrow.parquet as pq

    return {"records": pq.read_metadata(it / "train.parquet").num_rows, "tied": None}


def plot_run(run: Path, rows: list[dict]) -> None:
    """winrate.png (win rate of each iteration against iteration 0) and loss.png (training loss)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (pip install matplotlib)
        return
    rated = [r for r in rows if r["win_rate_vs_iter0"] is not None]
    if rated:  # none with eval_prompts=0: no win-rate plot rather than a flat line at 0.5
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["iteration"] for r in rated], [r["win_rate_vs_iter0"] for r in rated], "o-")
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("SPPO iteration")
        ax.set_ylabel("win rate vs iteration 0")
        ax.set_ylim(0, 1)
        ax.set_title("held-out win rate under the ranker")
        fig.tight_layout()
        fig.savefig(run / "winrate.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for r in rows[1:]:
        path = run / f"iter-{r['iteration']}" / "metrics.jsonl"
        if path.exists():
            m = read_metrics(path)
            ax.plot([offset + x["step"] for x in m], [x["loss"] for x in m], label=f"iteration {r['iteration']}")
            offset += len(m)
    ax.set_xlabel("training step")
    ax.set_ylabel("SPPO loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=110)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    lines = [f"{'iteration':>9}  {'win rate vs iter 0':>18}  {'train pairs':>11}  {'tied':>4}  {'final loss':>10}"]
    for r in summary["iterations"]:
        loss = f"{r['final_loss']:.4g}" if r["final_loss"] is not None else "-"
        wr = "-" if r["win_rate_vs_iter0"] is None else f"{r['win_rate_vs_iter0']:.3f}"
        lines.append(f"{r['iteration']:>9}  {wr:>18}  {r['train_records']:>11}  "
                     f"{'-' if r['tied_prompts'] is None else r['tied_prompts']:>4}  {loss:>10}")
    lines.append(f"({summary['seconds']:.0f} s)")
    return "\n".join(lines)
