"""User-facing behaviour of the pipeline and the CLI: settings kept per run folder, config
validation, errors as one line, resumable files after a kill, training precision."""

import json

import pytest
import torch

import sppo_fast
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


@pytest.mark.parametrize("yaml_text, match", [
    ("train:\n  learning_rate: 0\n", r"train.learning_rate must be > 0, got 0"),
    ("train: 3\n", r"config field 'train': is a group of fields"),
    ("k: [1, 2]\n", r"config field 'k': expected an integer, got \[1, 2\]"),
    ("k: 2.5\n", r"config field 'k': expected an integer, got 2.5"),
    ("seed: true\n", r"config field 'seed': expected a number"),
    ("train:\n  warmup_ratio: 1.5\n", r"train.warmup_ratio must lie in \[0, 1\], got 1.5"),
    ("train:\n  log_every: 0\n", r"train.log_every must be >= 1, got 0"),
    ("train:\n  save_every: -1\n", r"train.save_every must be >= 0"),
    ("train:\n  max_grad_norm: -1\n", r"train.max_grad_norm must be > 0"),
    ("train:\n  max_length: 48\n  max_prompt_length: 48\n", r"max_prompt_length=48, max_length=48"),
    ("mode: offical\n", r"mode: expected one of \('official', 'direct'\), got 'offical'"),
    ("device: gpu\n", r"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("ranker: ./no/such/ranker\n", r"ranker: no such file or folder './no/such/ranker'"),
    ("eval_prompts: 240\n", r"eval_prompts=240 holds out every one of the 240 shipped prompts"),
])
def test_config_values_are_checked_before_any_work(tmp_path, yaml_text, match):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    with pytest.raises(ValueError, match=match):
        load_config("tiny", y)


def test_yaml_values_are_coerced_like_set_values(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learning_rate: 1e-4\n  max_grad_norm: 2\nseed: '7'\nname: 2024\n")  # 1e-4: a str to PyYAML
    cfg = load_config("tiny", y)
    assert (cfg.train.learning_rate, cfg.train.max_grad_norm, cfg.seed, cfg.name) == (1e-4, 2.0, 7, "2024")
    assert type(cfg.train.max_grad_norm) is float
    with pytest.raises(ValueError, match="config field 'train': is a group of fields"):
        load_config("tiny", overrides={"train": "3"})
    with pytest.raises(ValueError, match="train.learning_rate must be > 0, got -1.0"):
        load_config("tiny", overrides={"train.learning_rate": "-1"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but torch sees no CUDA GPU"):
            it.run_iteration(load_config("tiny", overrides={"device": "cuda", "runs_dir": str(tmp_path)}), 1)
        assert not (tmp_path / "demo" / "iter-1").exists()


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, monkeypatch):
    from test_train import killed_at_call, records

    from sppo_fast.tiny import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer(seed=0)
    cfg = tr.TrainConfig(learning_rate=1e-3, optimizer="adamw", batch_size=2, epochs=2, max_length=64,
                         max_prompt_length=24, save_every=2)
    real = tr._loss
    monkeypatch.setattr(tr, "_loss", killed_at_call(4, real))
    with pytest.raises(KeyboardInterrupt):
        tr.train(it.tiny_policy(tok), tok, records(4), tmp_path, cfg, progress=False)
    monkeypatch.setattr(tr, "_loss", real)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "lo')  # the kill landed in the middle of an append
    tr.train(it.tiny_policy(tok), tok, records(4), tmp_path, cfg, progress=False)
    assert [m["step"] for m in tr.read_metrics(metrics)] == [1, 2, 3, 4]
    assert all(json.loads(x) for x in metrics.read_text().splitlines())


def test_a_kill_between_the_ranking_files_leaves_a_run_that_finishes(tmp_path, monkeypatch):
    from sppo_fast import _io

    cfg = small(tmp_path, prompts_per_iteration="2", k="2", max_new_tokens="4")
    real = _io.write_json

    def dies_on_ranking_json(obj, path, **kw):
        if path.name == "ranking.json":
            raise KeyboardInterrupt
        return real(obj, path, **kw)

    monkeypatch.setattr(_io, "write_json", dies_on_ranking_json)
    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="rank")
    monkeypatch.setattr(_io, "write_json", real)
    out = it.run_iteration(cfg, 1, progress=False, until="rank")
    info = json.loads((out.parent / "ranking.json").read_text())
    assert info["prompts"] == 2 and info["records"] + info["tied"] == 2


def test_the_mistral_preset_checkpoints_during_training():
    m = load_config("mistral-7b")
    steps = m.prompts_per_iteration // (m.train.batch_size * m.train.grad_accum)
    assert 0 < m.train.save_every < steps


def test_errors_are_one_line_with_an_exit_status(tmp_path, capsys, monkeypatch):
    base = ["--quiet", "--set", f"runs_dir={tmp_path}"]
    missing = str(tmp_path / "runs" / "x" / "iter-3" / "model")
    assert cli.main(["eval", "--a", missing, "--b", missing, *base]) == 2
    err = capsys.readouterr().err
    assert f"sppo-fast: error: model {missing!r}: no such file or folder" in err and "Traceback" not in err
    assert "Repo id" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError):  # --debug: the traceback
        cli.main(["eval", "--a", missing, "--b", missing, "--debug", *base])
    (tmp_path / "empty.jsonl").write_text("")
    assert cli.main(["generate", *base, f"prompts={tmp_path / 'empty.jsonl'}"]) == 2
    assert f"no prompts in {tmp_path / 'empty.jsonl'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a config error: before any work, like argparse's
        cli.main(["generate", *base, "ranker=./no/ranker"])
    assert exc.value.code == 2 and "ranker: no such file or folder './no/ranker'" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(it, "run_iteration", interrupted)
    assert cli.main(["train", *base]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_local_paths_that_do_not_exist_are_not_sent_to_the_hub(tmp_path):
    from sppo_fast.pairrm import load_pairrm
    from sppo_fast.pipeline.prompts import load_prompts

    with pytest.raises(FileNotFoundError, match="PairRM '.*/no/pairrm': no such file or folder"):
        load_pairrm(str(tmp_path / "no" / "pairrm"))
    with pytest.raises(FileNotFoundError, match="prompt file '.*/p.jsonl': no such file"):
        load_prompts(str(tmp_path / "p.jsonl"))
    with pytest.raises(FileNotFoundError, match="prompt file 'nofile.jsonl': no such file"):
        load_prompts("nofile.jsonl")  # (a bare file name, which is also a hub name's form: never the hub)
    with pytest.raises(ValueError, match="prompts: no such file or folder 'nofile.jsonl'; built in"):
        load_config("tiny", overrides={"prompts": "nofile.jsonl"})
    (tmp_path / "h.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(str(tmp_path / "h.csv"))


def test_iteration_numbers_are_checked(tmp_path, capsys):
    base = ["--quiet", "--set", f"runs_dir={tmp_path}", "prompts_per_iteration=2", "k=2"]
    assert cli.main(["generate", "--iteration", "2", *base]) == 2
    assert "iteration 2 starts from iteration 1's policy" in capsys.readouterr().err
    assert cli.main(["generate", "--iteration", "-1", *base]) == 2
    assert "iteration must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("demo/iter-*"))


def test_no_held_out_prompts_means_no_win_rate_not_a_tie(tmp_path):
    summary = it.iterate(small(tmp_path, prompts_per_iteration="4", k="2", max_new_tokens="4", eval_prompts="0"),
                         progress=False)
    assert [r["win_rate_vs_iter0"] for r in summary["iterations"]] == [None, None]
    table = it.format_summary(summary).splitlines()
    assert table[1].split()[:2] == ["0", "-"] and table[2].split()[:2] == ["1", "-"]
    assert not (tmp_path / "demo" / "winrate.png").exists()


def test_a_small_prompt_source_warns_or_refuses(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(6)))
    with pytest.warns(UserWarning, match="has 2 prompts after the 4 held out.*repeats prompts"):
        assert len(it.iteration_prompts(small(tmp_path, prompts=str(f), prompts_per_iteration="3"), 1)) == 3
    with pytest.warns(UserWarning, match="iteration 2 reuses prompts of earlier iterations"):
        it.iteration_prompts(small(tmp_path, prompts=str(f), prompts_per_iteration="2"), 2)
    with pytest.raises(ValueError, match="every prompt is held out.*none left to train on"):
        it.iteration_prompts(small(tmp_path, prompts=str(f), eval_prompts="6"), 1)


def test_help_explains_every_option_and_where_outputs_go(capsys):
    for command in ("demo", "iterate", "generate", "rank", "train", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--preset {mistral-7b,tiny}" in text
        if command != "eval":
            assert "<runs_dir>/<name>/" in text
        if command in ("generate", "rank", "train"):
            assert "--iteration N which SPPO iteration, 1-based" in text
    assert "--a MODEL policy A: a model folder" in text and "--b MODEL policy B" in text
    with pytest.raises(SystemExit):
        cli.main(["demo", "--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_long_silent_steps_show_progress(tmp_path, capsys):
    from test_train import records

    from sppo_fast.tiny import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer(seed=0)
    cfg = tr.TrainConfig(batch_size=2, epochs=1, max_length=64, max_prompt_length=24)
    tr.train(it.tiny_policy(tok), tok, records(4), tmp_path / "t", cfg, progress=True)
    assert "reference log-probs" in capsys.readouterr().err
    model = tmp_path / "t" / "model"
    it.evaluate(small(tmp_path, eval_prompts="2"), model, model, progress=True)
    assert f"evaluating: A = {model}" in capsys.readouterr().err


def test_ranking_rejects_infinite_logits_and_a_bare_prompt_string():
    import sppo_fast
    from sppo_fast.pairrm import PairRMRanker, tiny_pairrm

    cmp = torch.randn(2, 3, 3)
    cmp[1, 0, 2] = float("inf")
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"cmp: contains NaN or \+-inf"):
            sppo_fast.pairrm_aggregate(cmp, backend=backend)
    model, tok = tiny_pairrm(seed=0)
    with pytest.raises(TypeError, match="prompts is a str"):
        PairRMRanker(model, tok, progress=False).rank("hi", [["a", "b"], ["c", "d"]])


def test_malformed_inputs_are_one_line_errors(tmp_path, capsys):
    """A YAML file that does not parse, a JSONL file with a bad line and a run name that is not a
    folder name: one line naming the problem, exit status 2, no traceback."""
    (tmp_path / "broken.yaml").write_text("k: [3\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quiet", "--config", str(tmp_path / "broken.yaml")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "broken.yaml: not valid YAML at line 2, column 1" in err and "Traceback" not in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    assert cli.main(["demo", "--quiet", "--set", f"runs_dir={tmp_path}", f"prompts={tmp_path / 'bad.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2 is not valid JSON (Expecting value" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('[{"prompt": "a"}, ')
    assert cli.main(["demo", "--quiet", "--set", f"runs_dir={tmp_path}", f"prompts={tmp_path / 'bad.json'}"]) == 2
    err = capsys.readouterr().err
    assert "bad.json: cannot be read as .json" in err and len(err.strip().splitlines()) == 1
    for name in ("", "..", "../x", "a/b"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--quiet", "--set", f"runs_dir={tmp_path}", f"name={name}"])
        assert exc.value.code == 2 and "name: expected a folder name inside runs_dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown config field 'beta'; did you mean 'train.beta'"):
        load_config("tiny", overrides={"beta": "0.1"})
    with pytest.raises(ValueError, match="unknown config field 'zzz'; fields: device, .*train.<backend, "):
        load_config("tiny", overrides={"zzz": "1"})


def test_bad_prompts_are_found_before_any_work_and_the_fix_is_accepted(tmp_path, capsys):
    """A held-out prompt that is empty, or a missing column, used to surface after an iteration's
    work, or after the run folder had recorded the settings, so that the corrected command was
    refused as 'other settings'. Now nothing is written until the prompts read cleanly."""
    base = ["--quiet", "--set", f"runs_dir={tmp_path}", "iterations=1", "prompts_per_iteration=2", "k=2",
            "max_new_tokens=4", "eval_prompts=2"]
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"prompt": p}) for p in ["first", "", "third", "fourth", "fifth"]))
    assert cli.main(["demo", *base, f"prompts={held}"]) == 2
    assert "held.jsonl: prompt 1 is empty" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"question": f"question {i}"}) for i in range(6)))
    assert cli.main(["generate", *base, f"prompts={q}"]) == 2
    assert "no column 'prompt'; columns: ['question']" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    assert cli.main(["generate", *base, f"prompts={q}", "prompt_field=question"]) == 0
    assert (tmp_path / "demo" / "iter-1" / "generations.parquet").exists()


def test_version_and_a_trained_iterations_earlier_stages_name_their_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sppo-fast {sppo_fast.__version__}"
    args = ["--quiet", "--set", f"runs_dir={tmp_path}", "prompts_per_iteration=4", "k=2", "max_new_tokens=4",
            "eval_prompts=0", "iterations=1"]
    assert cli.main(["train", *args]) == 0
    for stage, name in (("generate", "generations.parquet"), ("rank", "train.parquet"), ("train", "model")):
        assert cli.main([stage, *args]) == 0
        assert capsys.readouterr().out.strip().endswith(f"iter-1/{name}"), stage


def test_help_lists_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        cli.main(["iterate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "config fields (--set FIELD=VALUE" in text
    for field in ("name=demo", "prompts=shipped", "eval_prompts=48", "train.learning_rate=0.0003", "train.beta=0.1"):
        assert field in text, field


def test_eval_of_an_iteration_folder_points_at_its_model(tmp_path, capsys):
    it.run_iteration(small(tmp_path, prompts_per_iteration="2", k="2", max_new_tokens="4"), 1, progress=False,
                     until="generate")  # (writes iter-0/model, the starting policy)
    folder = tmp_path / "demo" / "iter-0"
    assert cli.main(["eval", "--quiet", "--a", str(folder), "--b", str(folder / "model"),
                     "--set", f"runs_dir={tmp_path}", "eval_prompts=2"]) == 2
    assert f"{folder} is an iteration's folder, not a model: its policy is {folder / 'model'}" in capsys.readouterr().err


def test_warnings_print_as_one_line(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(5)))
    assert cli.main(["generate", "--quiet", "--set", f"runs_dir={tmp_path}", f"prompts={f}", "eval_prompts=2",
                     "prompts_per_iteration=4", "k=2", "max_new_tokens=4"]) == 0
    err = capsys.readouterr().err
    assert "sppo-fast: warning: " in err and "repeats prompts" in err and "warnings.warn" not in err
    assert "Generating train split" not in err  # --quiet hides the datasets bars too


def test_a_run_answers_the_held_out_prompts_once_per_policy(tmp_path, monkeypatch):
    """Every iteration is compared with iteration 0: its answers are made once, not once per
    comparison (the same answers: a sample depends on its prompt, index and seed only)."""
    real = it.generate
    answered = []

    def spy(model, tok, prompts, **kw):
        if str(kw.get("desc", "")).startswith("evaluating"):
            answered.append(kw["desc"].split(" = ", 1)[1])
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(it, "generate", spy)
    summary = it.iterate(small(tmp_path, iterations="2", prompts_per_iteration="4", k="2", max_new_tokens="4"),
                         progress=False)
    run = tmp_path / "demo"
    assert sorted(answered) == sorted(str(run / f"iter-{t}" / "model") for t in (0, 1, 2))
    assert len(summary["iterations"]) == 3


def test_a_ranker_the_hub_cannot_provide_can_be_corrected(tmp_path, capsys, monkeypatch):
    """The error lists the built-in rankers, and the corrected command is accepted (the folder had
    recorded the failed name and refused the fix as 'other settings')."""
    from sppo_fast.pairrm import PairRMRanker

    def offline(name, **kw):
        raise OSError(f"PairRM {name!r}: no such local folder, and the Hugging Face hub could not provide it")

    monkeypatch.setattr(PairRMRanker, "from_pretrained", offline)
    base = ["demo", "--quiet", "--set", f"runs_dir={tmp_path}", "iterations=1", "prompts_per_iteration=2", "k=2",
            "max_new_tokens=4", "eval_prompts=2"]
    assert cli.main([*base, "ranker=foo"]) == 2
    err = capsys.readouterr().err
    assert "ranker: PairRM 'foo': no such local folder" in err and "built in: hash, pairrm-tiny" in err
    assert cli.main([*base, "ranker=hash"]) == 0


def test_a_stage_run_may_correct_its_ranker_while_nothing_is_ranked(tmp_path, capsys, monkeypatch):
    """`sppo-fast rank` with a ranker the hub cannot provide fails after generation; the folder then
    holds generations but no ranking, so the corrected ranker is accepted (it was refused as 'other
    settings'); once something is ranked, a ranker change is refused."""
    from sppo_fast.pairrm import PairRMRanker

    def offline(name, **kw):
        raise OSError(f"PairRM {name!r}: no such local folder, and the Hugging Face hub could not provide it")

    monkeypatch.setattr(PairRMRanker, "from_pretrained", offline)
    base = ["--quiet", "--set", f"runs_dir={tmp_path}", "prompts_per_iteration=2", "k=2", "max_new_tokens=4"]
    assert cli.main(["rank", *base, "ranker=nobody/no-ranker"]) == 2
    assert "ranker: PairRM 'nobody/no-ranker'" in capsys.readouterr().err
    assert (tmp_path / "demo" / "iter-1" / "generations.parquet").exists()
    assert cli.main(["rank", *base, "ranker=hash"]) == 0
    assert (tmp_path / "demo" / "iter-1" / "train.parquet").exists()
    assert cli.main(["rank", *base, "ranker=pairrm-tiny"]) == 2
    assert "other settings (ranker: 'hash' then, 'pairrm-tiny' now)" in capsys.readouterr().err


def test_kept_win_rates_follow_the_held_out_prompts(tmp_path, monkeypatch):
    """iter-t/winrate.json is reused only for the same held-out prompts (their content, not the
    file's name), policies, ranker and settings."""
    f = tmp_path / "p.jsonl"
    prompts = [f"question number {i}" for i in range(12)]
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    cfg = small(tmp_path, prompts=str(f), prompts_per_iteration="4", k="2", max_new_tokens="4", eval_prompts="3")
    it.iterate(cfg, progress=False)
    calls = []
    real = it.evaluate
    monkeypatch.setattr(it, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    it.iterate(cfg, progress=False)
    assert calls == []
    f.write_text("\n".join(json.dumps({"prompt": p}) for p in ["another first question", *prompts[1:]]))
    it.iterate(cfg, progress=False)  # (the held-out prompts changed; iteration 1's training ones did not)
    assert calls == [1]
