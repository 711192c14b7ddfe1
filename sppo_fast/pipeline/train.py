"""The SPPO training loop: flat, readable, resumable.

    ref_logps = reference_logps(model, pairs)          # once per iteration, forward only, no logits
    for step in range(steps):                          # batches in a seeded order, reshuffled per epoch
        for micro in range(grad_accum):                # chosen and rejected in one [2B, T] batch
            hidden = final hidden states               # the lm_head is never applied
            loss = fused_linear_sppo_loss(hidden, lm_head.weight, labels, ref_logps, ...)
            (loss * pairs_in_micro / pairs_in_step).backward()
        clip, step the optimizer and the schedule (HF's linear warmup from 0, then linear decay)
        every log_every steps: the metrics' means since the last log to metrics.jsonl;
        every save_every: a checkpoint

Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel, unchanged: the process group is
initialised here (NCCL on GPUs, gloo on CPUs), the policy is wrapped in DDP through a small module
whose forward returns the final hidden states *and* the lm_head weight, so that DDP sees every
parameter the fused loss differentiates; each rank takes its ``batch_size`` pairs of every global
batch of ``batch_size * world_size`` and rank 0 writes the files. The losses equal a single process
with the same global batch (tested with gloo and 2 processes).

``loss_path="reference"`` computes the logits and uses :func:`sppo_fast.reference` instead: the same
numbers (the tests compare every step), more memory. A checkpoint is a ``save_pretrained`` folder
plus the optimizer, schedule and RNG state, written to a temporary folder and renamed; ``train``
resumes from the newest one and reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .. import _io, reference
from ..linear import fused_linear_sppo_loss, linear_sequence_logps
from ..ops import _metrics
from .data import IGNORE_INDEX, PROB_FIELDS, collate, encode_records


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters (defaults: the released SPPO recipe where it applies)."""
    beta: float = 0.001
    loss_type: str = "sppo"
    learning_rate: float = 5e-7
    optimizer: str = "rmsprop"          # "rmsprop" (official) or "adamw"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    batch_size: int = 8                 # pairs per micro-batch
    grad_accum: int = 1
    epochs: int = 1
    max_length: int = 1024
    max_prompt_length: int = 512
    max_grad_norm: float = 1.0
    seed: int = 42                      # also the data order (shuffled as HF Trainer's seeded sampler)
    shuffle: bool = True                # records in a seeded random order, the batches' order reshuffled per epoch
    disable_dropout: bool = True        # as the official trainer (TRL's disable_dropout): the policy's
                                        # log-ratio to the reference is then 0 before the first step
    log_every: int = 1
    save_every: int = 0                 # 0: only at the end
    loss_path: str = "fused"            # "fused" (no logits) or "reference"
    backend: str = "auto"
    gradient_checkpointing: bool = False
    tensorboard: bool = False           # also log metrics to <out>/tensorboard (pip install tensorboard)
    parallel: str = "ddp"               # under torchrun: "ddp", or "fsdp" (FSDP2, sharded parameters)

    def __post_init__(self):
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"optimizer: expected 'rmsprop' or 'adamw', got {self.optimizer!r}")
        if self.loss_path not in ("fused", "reference"):
            raise ValueError(f"loss_path: expected 'fused' or 'reference', got {self.loss_path!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.loss_type not in reference.LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {reference.LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("beta", "learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:  # NaN fails too
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length}, max_length={self.max_length}: "
                             "need 1 <= max_prompt_length < max_length (room for the response)")


def _body_and_head(model):
    """The decoder (final hidden states, norm included) and the lm_head of a causal LM."""
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None) or model.get_decoder()
    if head is None or body is None:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder and lm_head")
    return body, head


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states ``[B, T, H]`` of a causal LM, without applying its lm_head."""
    body, _ = _body_and_head(model)
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def reference_logps(model, batches: Sequence[dict], backend: str = "auto", *, progress: bool = False) -> list[Tensor]:
    """Sequence log-probs of every batch under ``model`` (forward only, no [N, V] logits)."""
    from tqdm.auto import tqdm

    _, head = _body_and_head(model)
    out = []
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for b in tqdm(batches, desc="reference log-probs", unit="batch", disable=not progress, dynamic_ncols=True):
        # as in training: the same autocast for the body and the lm_head, so that the policy's
        # log-ratio to the reference is exactly 0 before the first step
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            h = hidden_states(model, b["input_ids"], b["attention_mask"])
            out.append(linear_sequence_logps(h, head.weight, b["labels"], bias=head.bias, backend=backend).float())
    model.train(was_training)
    return out


def _float32_master_weights(model) -> None:
    """Cast ``model``'s bf16/fp16 parameters and buffers to float32, in place, before training.

    The optimizer updates the parameters themselves: a bf16 parameter rounds away any update below
    ~2**-8 of its size (lr 5e-7 RMSprop steps are ~5e-7), so most weights would never move. The
    official recipe (DeepSpeed bf16) keeps float32 master weights too; compute stays bf16 through
    autocast on GPUs. Exact (bf16 -> float32 loses nothing), so the reference log-probs are those of
    the loaded weights. Costs 2x the weights' memory; under ``parallel="fsdp"`` the float32 weights
    and optimizer state are sharded across ranks, like ZeRO-3."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a last line cut short (a kill while it was appended) is
    dropped, since the resumed run logs that step again."""
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
    out = []
    for i, x in enumerate(lines):
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {x[:80]!r}") from None
    return out


class _HiddenAndHead(torch.nn.Module):
    """``forward(ids, mask) -> (hidden, lm_head.weight, lm_head.bias)``: the module DDP wraps, so the
    lm_head weight, used by the fused loss rather than by the forward, is still one of its outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        _, head = _body_and_head(self.model)
        return hidden_states(self.model, input_ids, attention_mask), head.weight, head.bias


def _fully_shard(policy: _HiddenAndHead) -> _HiddenAndHead:
    """FSDP2: each decoder layer sharded on its own; the root (embeddings, final norm, lm_head) keeps
    its parameters gathered from its forward until the backward (``reshard_after_forward=False``),
    because the fused loss uses the lm_head weight after the forward has returned. The weight's
    gradient, produced by the fused loss, is reduce-scattered by FSDP like any other."""
    from torch.distributed.fsdp import fully_shard

    body, _ = _body_and_head(policy.model)
    layers = getattr(body, "layers", None) or getattr(body, "h", None) or []
    for layer in layers:
        fully_shard(layer)
    fully_shard(policy, reshard_after_forward=False)
    return policy


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # what still holds the group through a reference cycle goes first
        dist.destroy_process_group()


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group under torchrun when needed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # ours to tear down, before the interpreter does: a group left to its destructors at exit
        # can abort the process ("terminate called without an active exception") after its work
        atexit.register(_destroy_process_group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_records(records: Sequence[dict], batch_size: int, rank: int, world: int) -> list[dict]:
    """This rank's share: pairs ``[r*B, (r+1)*B)`` of every global batch of ``B * world`` pairs."""
    if world == 1:
        return list(records)
    g = batch_size * world
    usable = len(records) - len(records) % g  # every rank must take the same number of steps
    if usable == 0:
        raise ValueError(f"{len(records)} records are fewer than one global batch ({g} = {batch_size} x {world})")
    if usable < len(records) and rank == 0:
        warnings.warn(f"{len(records) - usable} of {len(records)} records fill no whole global batch of {g} "
                      f"({batch_size} pairs x {world} processes) and are left out: every process must take the "
                      f"same steps", stacklevel=3)
    return [records[s + rank * batch_size + i] for s in range(0, usable, g) for i in range(batch_size)]


def _pair_batches(tokenizer, records: Sequence[dict], cfg: TrainConfig, device) -> list[dict]:
    """Micro-batches: ``B`` chosen sequences then their ``B`` rejected ones, with the probabilities."""
    enc = encode_records(tokenizer, records, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         loss_type=cfg.loss_type)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for s in range(0, len(records), cfg.batch_size):
        recs, pairs = records[s: s + cfg.batch_size], enc[s: s + cfg.batch_size]
        b = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad)
        for f in PROB_FIELDS[cfg.loss_type]:
            b[f] = torch.tensor([float(r[f]) for r in recs], dtype=torch.float32)
        n_tokens = int((b["labels"] != IGNORE_INDEX).sum())  # counted on the host: no device sync later
        out.append({**{k: v.to(device) for k, v in b.items()}, "n_tokens": n_tokens})
    return out


def _lr_lambda(total: int, warmup_ratio: float):
    """Hugging Face's ``get_linear_schedule_with_warmup`` with ``ceil(total * warmup_ratio)`` warmup
    steps, as the official trainer: the first step's rate is 0, the peak is reached at the end of the
    warmup, then a linear decay to 0."""
    warm = math.ceil(total * warmup_ratio)

    def f(step: int) -> float:
        if step < warm:
            return step / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return f


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (every parameter of fewer than two
    dimensions) are exempt, as in Hugging Face's Trainer."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def _disable_dropout(model) -> None:
    """Dropout probabilities to 0 in place (TRL's ``disable_dropout_in_model``), including the
    attention dropout Hugging Face models apply functionally from an ``attention_dropout`` attribute."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _shuffled(records: list, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [records[i] for i in torch.randperm(len(records), generator=g).tolist()]


def _epoch_order(n_batches: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The batches' order in ``epoch``: reshuffled per epoch from the seed (the same on every rank)."""
    if not shuffle:
        return list(range(n_batches))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    return torch.randperm(n_batches, generator=g).tolist()


def _loss(policy, b: dict, ref: Tensor, cfg: TrainConfig):
    """``policy``: a :class:`_HiddenAndHead` (DDP-wrapped or not)."""
    h, weight, bias = policy(b["input_ids"], b["attention_mask"])
    probs = {f: b[f] for f in ("chosen_probs_win", "chosen_probs_lose", "chosen_probs") if f in b}
    if cfg.loss_path == "fused":
        return fused_linear_sppo_loss(h, weight, b["labels"], ref, bias=bias, beta=cfg.beta,
                                      loss_type=cfg.loss_type, backend=cfg.backend, **probs)
    logits = torch.nn.functional.linear(h, weight, bias)
    logps = reference.sequence_logps(logits, b["labels"])
    B = logps.shape[0] // 2
    losses = reference.sppo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=cfg.beta, loss_type=cfg.loss_type,
                                 **probs)
    return losses.mean(), logps, _metrics(logps.detach(), ref, cfg.beta, cfg.loss_type, probs)


def train(model, tokenizer, records: Sequence[dict], out_dir: str | os.PathLike, cfg: TrainConfig,
          *, progress: bool = True) -> dict:
    """Train ``model`` (the policy, and the reference at its starting weights) on SPPO records.

    ``records``: official fields (``prompt``, ``chosen``, ``rejected``, ``chosen_probs_win``,
    ``chosen_probs_lose`` or ``chosen_probs``). Writes ``out_dir/metrics.jsonl``,
    ``out_dir/checkpoints/step-N/`` and ``out_dir/model/`` (the final ``save_pretrained``); resumes
    from the newest checkpoint. Returns a summary (steps, last metrics, tokens/s).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    final = out / "model"
    if not records:
        raise ValueError("no training records (every prompt tied, or an empty dataset?)")
    rank, world = _distributed()
    settings = _resume_settings(records, cfg, world)
    if (final / "trainer_state.json").exists():  # finished: its summary, if it was trained on this
        done = _io.read_json(final / "trainer_state.json")
        if "settings" in done:  # (a model written before settings were recorded is taken as it is)
            _refuse_other_settings(done["settings"], settings, final, f"delete {final} to train again")
        return done["summary"]
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    if cfg.tensorboard:  # checked before any work
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("train.tensorboard needs the tensorboard package: pip install tensorboard") from exc
    _float32_master_weights(model)
    if cfg.disable_dropout:
        _disable_dropout(model)
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    ordered = _shuffled(list(records), cfg.seed) if cfg.shuffle else list(records)
    batches = _pair_batches(tokenizer, _rank_records(ordered, cfg.batch_size, rank, world), cfg, device)
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = None
    if ckpts:  # weights before any sharding, optimizer state once the optimizer exists
        state = torch.load(ckpts[-1] / "train_state.pt", map_location="cpu", weights_only=False)
        # (a checkpoint from before fingerprints: refused)
        _refuse_other_settings(state.get("settings", {"records": None}), settings, ckpts[-1],
                               f"resume with the same ones, or delete {out / 'checkpoints'} to start over")
    # the reference is the policy at the start: computed once, never after the policy has moved
    ref_path = out / (f"ref_logps.rank{rank}.pt" if world > 1 else "ref_logps.pt")
    saved = torch.load(ref_path, map_location=device) if ref_path.exists() else None
    if isinstance(saved, dict) and saved.get("settings") == settings:
        refs = saved["refs"]
    elif ckpts:
        raise ValueError(f"{ref_path} is missing or was written for other settings, and the policy has already "
                         f"trained (checkpoint {ckpts[-1].name}): delete {out} to start over")
    else:
        refs = reference_logps(model, batches, cfg.backend, progress=progress and rank == 0)
        tmp = ref_path.with_name(f".{ref_path.name}.tmp")  # one per rank: ranks write side by side
        torch.save({"settings": settings, "refs": refs}, tmp)
        os.replace(tmp, ref_path)
    steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    if ckpts:
        _load_weights(model, ckpts[-1])
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    model.train()
    policy = _HiddenAndHead(model)
    if world > 1:
        import torch.distributed as dist

        policy = _fully_shard(policy) if cfg.parallel == "fsdp" else torch.nn.parallel.DistributedDataParallel(policy)
    opt_cls = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.AdamW
    opt = opt_cls(_param_groups(policy, cfg.weight_decay), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup_ratio))
    step = 0
    if state is not None:
        _load_optimizer(policy, opt, ckpts[-1] / "optimizer")
        sched.load_state_dict(state["scheduler"])
        _set_rng(state["rng"][rank])
        step = state["step"]
    metrics_path = out / "metrics.jsonl"
    if cfg.tensorboard and rank == 0:
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
    if rank == 0 and metrics_path.exists():  # drop what was logged after the checkpoint we resume from
        kept = [m for m in read_metrics(metrics_path) if m["step"] <= step]
        _io.write_text("".join(json.dumps(m) + "\n" for m in kept), metrics_path)
    last: dict = {}
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc="SPPO training", unit="step", disable=not progress, dynamic_ncols=True)
    logged, n_logged = None, 0  # sums of the step means (loss, then the metrics) since the last log
    while step < total:
        epoch, epoch_pos = divmod(step, steps_per_epoch)
        order = _epoch_order(len(batches), cfg.seed, epoch, cfg.shuffle)
        picked = order[epoch_pos * cfg.grad_accum: (epoch_pos + 1) * cfg.grad_accum]
        micro = [(batches[i], refs[i]) for i in picked]
        n_pairs = sum(b["labels"].shape[0] // 2 for b, _ in micro)
        opt.zero_grad(set_to_none=True)
        for b, ref in micro:
            # bf16 autocast on GPUs over float32 parameters (_float32_master_weights): the optimizer
            # updates float32 weights; the fused loss runs bf16 GEMMs, with float32 log-softmax,
            # log-prob sums and lm_head weight gradient
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, m = _loss(policy, b, ref, cfg)
            # the step's loss is the mean over its pairs (a short last micro-batch weighs what it holds)
            share = (b["labels"].shape[0] // 2) / n_pairs
            (loss * share).backward()
            vals = share * torch.stack([loss.detach(), *[v.detach().float() for v in m.values()]])
            logged = vals if logged is None else logged + vals
            tokens += b["n_tokens"]
        n_logged += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the rate this step uses (read after sched.step() it is the next one's)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:  # .item() only on logging steps
            vals = logged / n_logged  # the steps' means since the last log (over their pairs)
            logged, n_logged = None, 0
            if world > 1:  # means over equal shares: the global batch's means
                dist.all_reduce(vals)
                vals /= world
            last = {"step": step, "loss": vals[0].item(), "lr": lr,
                    "grad_norm": float(grad_norm), **{k: v.item() for k, v in zip(m, vals[1:])},
                    "tokens_per_s": world * tokens / (time.perf_counter() - t0)}
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                if writer is not None:
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{last['loss']:.4g}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            _save_checkpoint(out, model, tokenizer, policy, opt, sched, step, cfg, records)
    bar.close()
    if writer is not None:
        writer.close()
    summary = {"steps": total, "last": last}
    full_state = _full_state_dict(model, policy, cfg)  # a collective under FSDP: every rank takes part

    def save_final():
        tmp = final.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=full_state)
        tokenizer.save_pretrained(tmp)
        _io.write_json({"summary": summary, "config": dataclasses.asdict(cfg), "settings": settings},
                       tmp / "trainer_state.json")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    _on_rank0(world, f"writing {final}", save_final)
    if world > 1:
        # the DDP/FSDP wrapper (its reducer holds the process group) sits in reference cycles: free
        # it now, while the interpreter is whole, not in the collection at exit after the group
        del policy, opt, sched, full_state
        gc.collect()
    return summary


# what a resumed run must share with the run that wrote the checkpoint (logging, checkpointing,
# backend and the loss path may change: they do not change the numbers beyond rounding)
_FREE_TO_CHANGE = ("log_every", "save_every", "tensorboard", "backend", "loss_path", "gradient_checkpointing")


def _resume_settings(records: Sequence[dict], cfg: TrainConfig, world: int) -> dict:
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_TO_CHANGE}
    return {**out, "world_size": world, "records": _io.digest(list(records))}


def _refuse_other_settings(then: dict, now: dict, where: Path, remedy: str) -> None:
    """Raise, naming each differing setting, when ``where`` was written with settings other than ``now``."""
    changed = sorted(k for k in now if then.get(k) != now[k])
    if changed:
        diff = "; ".join(f"{k}: {then.get(k)!r} then, {now[k]!r} now" if k != "records" else
                         "records: other training data" for k in changed)
        raise ValueError(f"{where} was written with other settings ({diff}); {remedy}")


def _on_rank0(world: int, what: str, fn) -> None:
    """Run ``fn`` on rank 0 alone, then meet the other ranks: if it failed, every rank raises (rank
    0 its own error) instead of waiting in the next collective until the process group times out."""
    rank = _distributed()[0]
    err = None
    if rank == 0:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            err = exc
    if world > 1:
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.tensor([0.0 if err is None else 1.0], device=dev)
        dist.all_reduce(failed)  # also the barrier
        if failed.item() and err is None:
            raise RuntimeError(f"{what} failed on rank 0 (its traceback has the cause)")
    if err is not None:
        raise err


def _full_state_dict(model, policy, cfg: TrainConfig) -> dict | None:
    """The whole model's weights on rank 0's CPU under FSDP2 (a collective); ``None`` (the model's
    own state dict) otherwise."""
    if _distributed()[1] == 1 or cfg.parallel != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_checkpoint(out: Path, model, tokenizer, policy, opt, sched, step: int, cfg: TrainConfig,
                     records: Sequence[dict]) -> None:
    """``checkpoints/step-N``: a ``save_pretrained`` folder (full weights, loadable with
    ``from_pretrained``) plus ``optimizer/`` (a ``torch.distributed.checkpoint``, written by every
    rank in parallel, its own shard under FSDP2) and ``train_state.pt`` (schedule, step, every rank's
    RNG). Built in a temporary folder and renamed: complete or absent. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    world = _distributed()[1]
    d = out / "checkpoints" / f"step-{step}"
    tmp = d.with_name(f".step-{step}.tmp")

    def fresh():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    _on_rank0(world, f"creating {tmp}", fresh)
    with _single_process_dcp():
        dcp.save({"optimizer": get_optimizer_state_dict(policy, opt)}, checkpoint_id=tmp / "optimizer",
                 no_dist=world == 1)
    full_state = _full_state_dict(model, policy, cfg)
    rngs = [_rng_state()]
    if world > 1:
        import torch.distributed as dist

        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state())
    def finish():
        model.save_pretrained(tmp, state_dict=full_state)
        tokenizer.save_pretrained(tmp)
        torch.save({"scheduler": sched.state_dict(), "rng": rngs, "step": step,
                    "settings": _resume_settings(records, cfg, world)}, tmp / "train_state.pt")
        os.replace(tmp, d)
        for old in (out / "checkpoints").glob("step-*"):  # keep the newest only
            if old != d:
                shutil.rmtree(old, ignore_errors=True)

    _on_rank0(world, f"writing checkpoint {d}", finish)


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns that it 'assumes' a single process even when told so (``no_dist``): silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _load_optimizer(policy, opt, path: Path) -> None:
    """Each rank reads its own part of the optimizer checkpoint (resharded by DCP as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    sd = {"optimizer": get_optimizer_state_dict(policy, opt)}
    with _single_process_dcp():
        dcp.load(sd, checkpoint_id=path, no_dist=_distributed()[1] == 1)
    set_optimizer_state_dict(policy, opt, optim_state_dict=sd["optimizer"])


def _load_weights(model, folder: Path) -> None:
    """Load a ``save_pretrained`` folder (one or several safetensors files) into ``model`` in place.

    When the names on disk are the module's own (dense models), one tensor at a time: no second copy
    of the model in memory on any rank; only weights tied to a loaded one (e.g. ``lm_head.weight``
    tied to the embeddings) may be absent. When they differ (transformers 5 saves MoE experts, or
    GPT-NeoX's head, under their original names), through the model class's ``from_pretrained``,
    which converts them: a second copy of the weights in host memory while it loads, on every rank.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    own = model.state_dict()  # views of the parameters and buffers: copying into them loads
    on_disk: dict = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), f))
    by_storage: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(p.data_ptr(), []).append(name)
    tied = {n for names in by_storage.values() if len(names) > 1 for n in names if any(m in on_disk for m in names)}
    missing, unexpected = sorted(set(own) - set(on_disk) - tied), sorted(set(on_disk) - set(own))
    if missing or unexpected:
        _load_converted(model, folder, missing, unexpected)
        return
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    if t.shape != own[k].shape:
                        raise ValueError(f"{folder}: {k} has shape {tuple(t.shape)}, the model's "
                                         f"{tuple(own[k].shape)}")
                    own[k].copy_(t)


def _load_converted(model, folder: Path, missing: list, unexpected: list) -> None:
    """``from_pretrained`` with the model's own config and dtype (never a default-sized model, no
    rounding), accepted only if it finds every weight and no other."""
    why = f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
    import transformers

    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        same, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True,
                                                 **{dtype_arg: next(model.parameters()).dtype})
    except Exception as exc:  # noqa: BLE001 - the mismatch is the error to report
        raise ValueError(f"{why}; loading it with {type(model).__name__}.from_pretrained failed too: {exc}") from exc
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
                if info.get(k)}
    if problems:
        detail = "; ".join(f"{k} {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ValueError(f"{why}; {type(model).__name__}.from_pretrained does not find them either: {detail}")
    model.load_state_dict(same.state_dict())
