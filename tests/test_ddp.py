"""Data-parallel training under torchrun (DDP and FSDP2): 2 CPU processes (gloo) give the losses of
one process with the same global batch."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_train import records, tiny_policy
    from sppo_fast.pipeline import train as tr
    from sppo_fast.tiny import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer(seed=0)
    cfg = tr.TrainConfig(learning_rate=1e-3, optimizer="adamw", batch_size={batch}, epochs=3, max_length=64,
                         max_prompt_length=24, beta=0.1, loss_path={path!r}, parallel={parallel!r},
                         save_every={save_every})
    if {kill_at}:  # every rank dies in the same step, after the checkpoint of step save_every
        real, calls = tr._loss, [0]
        def killed(*a, **k):
            calls[0] += 1
            if calls[0] == {kill_at}:
                raise SystemExit(3)
            return real(*a, **k)
        tr._loss = killed
    tr.train(tiny_policy(tok), tok, records(8), {out!r}, cfg, progress=False)
''')


def run(tmp_path, name, nproc, batch, path="fused", parallel="ddp", save_every=0, kill_at=0):
    from pathlib import Path

    script = tmp_path / f"{name}.py"
    out = tmp_path / name
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), batch=batch, out=str(out), path=path,
                                     parallel=parallel, save_every=save_every, kill_at=kill_at))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)] \
        if nproc > 1 else [sys.executable, str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    first_failure = [x for x in r.stderr.splitlines() if "[rank0]" in x] or r.stderr.splitlines()
    if kill_at:
        assert r.returncode != 0, "the run was meant to be killed"
        return None
    assert r.returncode == 0, "\n".join(first_failure)[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("path,parallel", [("fused", "ddp"), ("reference", "ddp"), ("fused", "fsdp")])
def test_two_processes_match_one(tmp_path, path, parallel):
    one = run(tmp_path, "one", 1, 4, path)
    two = run(tmp_path, "two", 2, 2, path, parallel)
    assert len(one) == len(two) == 6
    assert max(m["loss"] for m in one) > 1.2 * min(m["loss"] for m in one)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-3, abs=1e-6)
    assert (tmp_path / "two" / "model" / "config.json").exists()
    if parallel == "fsdp":  # the saved model holds the full, gathered weights
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")
        for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4, k


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_resume_from_a_checkpoint(tmp_path, parallel):
    """Killed in step 5 after the checkpoint of step 4, rerun: the same losses and final weights as
    an uninterrupted two-process run; the checkpoint is a ``from_pretrained`` folder with full weights."""
    from transformers import AutoModelForCausalLM

    whole = run(tmp_path, "whole", 2, 2, parallel=parallel)
    run(tmp_path, "resumed", 2, 2, parallel=parallel, save_every=2, kill_at=5)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-4"
    assert (ckpt / "optimizer").is_dir() and not (tmp_path / "resumed" / "model").exists()
    at4 = AutoModelForCausalLM.from_pretrained(ckpt)  # the full model, gathered from the shards
    uninterrupted = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    shapes = [a.shape for a in uninterrupted.state_dict().values()]
    assert [a.shape for a in at4.state_dict().values()] == shapes
    resumed = run(tmp_path, "resumed", 2, 2, parallel=parallel, save_every=2)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "model")
    for (k, a), b in zip(uninterrupted.state_dict().items(), final.state_dict().values()):
        assert (a - b).abs().max() < 1e-6, k


RANK0_FAILS = textwrap.dedent('''
    import sys, torch.distributed as dist
    from sppo_fast.pipeline import train as tr

    dist.init_process_group("gloo")
    def fails():
        raise OSError("disk full")
    try:
        tr._on_rank0(2, "writing the checkpoint", fails)
        print(f"rank {{dist.get_rank()}}: no error", flush=True)
    except Exception as exc:
        print(f"rank {{dist.get_rank()}}: {{type(exc).__name__}}: {{exc}}", flush=True)
    tr._on_rank0(2, "nothing", lambda: None)  # and when it succeeds, both ranks go on
    print(f"rank {{dist.get_rank()}}: done", flush=True)
    dist.destroy_process_group()  # else gloo may abort at interpreter exit
''')


def test_a_failure_on_rank0_reaches_every_rank(tmp_path):
    """Work that rank 0 does alone (checkpoint and model writes): its failure raises on every rank
    at once instead of leaving the others in a collective until the process group times out."""
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_FAILS.format())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120)
    assert "rank 0: OSError: disk full" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "rank 1: RuntimeError: writing the checkpoint failed on rank 0" in r.stdout, r.stdout
    assert r.stdout.count(": done") == 2  # both went on (not the exit status: gloo's teardown once aborted)
