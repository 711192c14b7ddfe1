"""User-facing behaviour of the pipeline and the CLI: settings kept per run folder, config
validation, errors as one line, resumable files after a kill, training precision."""

import json

import pytest
import torch

from sppo_fast import cli
from sppo_fast.pipeline import iterate as it
from sppo_fast.pipeline import train as tr
from sppo_fast.pipeline.config import load_config


def small(tmp_path, **kw):
    over = {"runs_dir": str(tmp_path), "prompts_per_iteration": "8", "eval_prompts": "4", "iterations": "1",
            "max_new_tokens": "8"}
    over.update(kw)
    return load_config("tiny", overrides=over)


def test_training_updates_float32_weights_whatever_dtype_the_policy_is_loaded_in(tmp_path, monkeypatch):
    """On GPUs the policy is loaded in bf16 (for generation); the optimizer must still update float32
    weights: a bf16 weight rounds a 5e-7-sized step away."""
    from test_train import records

    from sppo_fast.tiny import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer(seed=0)
    model = it.tiny_policy(tok).to(torch.bfloat16)  # as load_policy gives it on CUDA
    seen = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        opt = real(params, **kw)
        seen.extend(p.dtype for g in opt.param_groups for p in g["params"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    cfg = tr.TrainConfig(learning_rate=1e-6, optimizer="adamw", batch_size=2, epochs=1, max_length=64,
                         max_prompt_length=24)
    start = {k: v.float().clone() for k, v in model.state_dict().items()}
    tr.train(model, tok, records(4), tmp_path / "t", cfg, progress=False)
    assert seen and set(seen) == {torch.float32}
    moved = sum(int((v != start[k]).sum()) for k, v in model.state_dict().items() if "weight" in k)
    assert moved > 0.5 * sum(v.numel() for k, v in start.items() if "weight" in k)  # lr 1e-6 steps land
    assert json.loads((tmp_path / "t" / "model" / "config.json").read_text())["dtype"] == "float32"


def test_a_run_folder_refuses_other_settings(tmp_path):
    """`demo` then `demo --set seed=51` used to reuse the seed-50 outputs while config.yaml said 51."""
    import yaml

    tiny = dict(prompts_per_iteration="2", k="2", max_new_tokens="4")
    it.run_iteration(small(tmp_path, **tiny), 1, progress=False, until="generate")
    config = tmp_path / "demo" / "config.yaml"
    before = config.read_text()
    assert yaml.safe_load(before)["seed"] == 50
    with pytest.raises(ValueError, match=r"other settings \(seed: 50 then, 51 now; train.beta: 0.1 then, 0.2 now\)"
                                         r".*name=.*delete"):
        it.run_iteration(small(tmp_path, seed="51", **{"train.beta": "0.2"}, **tiny), 1, progress=False,
                         until="generate")
    assert config.read_text() == before
    # fields that do not change the results may change: more iterations, another batch size
    out = it.run_iteration(small(tmp_path, iterations="3", generation_batch_size="1", **tiny), 1, progress=False,
                           until="generate")
    assert out.exists() and yaml.safe_load(config.read_text())["iterations"] == 3


def test_every_set_counts_and_an_empty_set_is_refused(capsys):
    args = cli.build_parser().parse_args(["demo", "--set", "seed=51", "k=3", "--set", "train.beta=0.2"])
    cfg = cli._config(args)
    assert (cfg.seed, cfg.k, cfg.train.beta) == (51, 3, 0.2)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--set"])
    assert "--set: expected at least one argument" in capsys.readouterr().err
