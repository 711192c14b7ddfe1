"""The SPPO pipeline: config, prompts, generation, ranking, whole iterations, resume and the CLI."""

import json
import os
import warnings

import pytest
import torch

from sppo_fast import cli
from sppo_fast.pipeline import iterate as it
from sppo_fast.pipeline.config import PRESETS, load_config
from sppo_fast.pipeline.generate import RowSampler, generate
from sppo_fast.pipeline.prompts import SHIPPED_PROMPTS, load_prompts
from sppo_fast.pipeline.rank import HashWordRanker, training_records, win_rate
from sppo_fast.tiny import tiny_chat_tokenizer


def small(tmp_path, **kw):
    over = {"runs_dir": str(tmp_path), "prompts_per_iteration": "64", "eval_prompts": "32", "iterations": "2"}
    over.update(kw)
    return load_config("tiny", overrides=over)


def test_config_presets_yaml_and_overrides(tmp_path):
    assert set(PRESETS) == {"tiny", "mistral-7b"}
    m = load_config("mistral-7b")
    assert (m.train.learning_rate, m.train.optimizer, m.train.beta, m.train.max_length,
            m.train.max_prompt_length, m.train.batch_size * m.train.grad_accum) == (5e-7, "rmsprop", 0.001, 1024, 512, 64)
    y = tmp_path / "c.yaml"
    y.write_text("name: x\nk: 3\ntrain:\n  beta: 0.5\n")
    c = load_config("tiny", y, {"train.epochs": "3", "iterations": "4"})
    assert (c.name, c.k, c.train.beta, c.train.epochs, c.iterations) == ("x", 3, 0.5, 3, 4)
    assert c.train.learning_rate == PRESETS["tiny"]["train"]["learning_rate"]
    for bad, match in (({"kk": "1"}, "unknown config field 'kk'"), ({"train.lr": "1"}, "unknown config field"),
                       ({"k": "1"}, "k must be >= 2"), ({"top_p": "2"}, "top_p"), ({"k": "five"}, "'k'"),
                       ({"train.optimizer": "sgd"}, "optimizer")):
        with pytest.raises(ValueError, match=match):
            load_config("tiny", overrides=bad)
    y.write_text("trian: {}\n")
    with pytest.raises(ValueError, match="unknown config field 'trian'"):
        load_config("tiny", y)
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")


def test_prompts_shipped_and_files(tmp_path):
    assert len(SHIPPED_PROMPTS) == len(set(SHIPPED_PROMPTS)) == 240
    assert load_prompts(limit=3, offset=5) == list(SHIPPED_PROMPTS[5:8])
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"instruction": f"q{i}"}) for i in range(4)))
    assert load_prompts(str(tmp_path / "p.jsonl"), field="instruction") == ["q0", "q1", "q2", "q3"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "}))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        load_prompts(str(tmp_path / "e.jsonl"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompts(str(tmp_path / "p.txt"))


def test_generation_is_seeded_per_prompt_and_sample_index():
    tok = tiny_chat_tokenizer()
    model = it.tiny_policy(tok)
    prompts = list(SHIPPED_PROMPTS[:5])
    a = generate(model, tok, prompts, k=3, max_new_tokens=10, progress=False, batch_size=2)
    assert all(len(c) == 3 for c in a) and len({a[0][0], a[0][1], a[0][2]}) == 3
    # a candidate depends on its prompt, its index and the seed only: not on batching or neighbours
    assert generate(model, tok, prompts, k=3, max_new_tokens=10, progress=False, batch_size=1) == a
    assert generate(model, tok, prompts[::-1], k=3, max_new_tokens=10, progress=False, batch_size=5)[::-1] == a
    assert generate(model, tok, prompts[3:4], k=3, max_new_tokens=10, progress=False) == a[3:4]
    assert generate(model, tok, prompts, k=3, max_new_tokens=10, progress=False, seed=51)[0] != a[0]
    assert len(set(generate(model, tok, prompts[:1], k=3, max_new_tokens=10, progress=False, seed=0)[0])) == 3


def test_row_sampler_draws_from_the_top_p_distribution():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 37, generator=g) * 3
    for top_p, top_k in ((0.5, 0), (0.9, 0), (1.0, 0), (0.9, 4), (1.0, 9)):
        hf = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, scores / 0.7) if top_k else scores / 0.7)
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for seed in range(300):  # which tokens can ever be drawn: exactly Hugging Face's top-k/top-p set
            s = RowSampler([torch.Generator().manual_seed(seed * 6 + r) for r in range(6)], 0.7, top_p, top_k)
            out = s(None, scores)
            assert ((out == 0).sum(1) == 1).all() and (out[out != 0] == float("-inf")).all()
            kept |= out == 0
        assert not (kept & hf.isinf()).any()
        assert kept[hf.softmax(-1) > 0.05].all()  # and its likely tokens are drawn
    # the frequencies follow the filtered softmax (40 rows x 1000 steps = 40000 draws: a 5-sigma band)
    probs = TopPLogitsWarper(0.9)(None, scores[:1] / 0.7).softmax(-1)[0]
    s = RowSampler([torch.Generator().manual_seed(1000 + r) for r in range(40)], 0.7, 0.9)
    counts = torch.zeros(37)
    for _ in range(1000):
        counts += (s(None, scores[:1].expand(40, -1)) == 0).float().sum(0)
    n = 40000
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma + 1).all()
    # int seeds: generators made on the scores' device at the first call, the same streams
    by_int = RowSampler([11, 12], 0.7, 0.9)
    by_gen = RowSampler([torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)], 0.7, 0.9)
    for _ in range(20):
        assert torch.equal(by_int(None, scores[:2]), by_gen(None, scores[:2]))
    # NaN scores (an fp16 overflow upstream) are an error, not a silent last-token draw
    with pytest.raises(ValueError, match="NaN"):
        RowSampler([1], 0.7, 1.0)(None, torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="top_p"):
        RowSampler([], 0.7, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        RowSampler([], 0.0, 0.9)
    with pytest.raises(ValueError, match="top_k"):
        RowSampler([], 0.7, 0.9, -1)


def test_fingerprints_see_every_element():
    """Settings and records are fingerprinted in full: a long numpy array, whose str() elides its
    middle, changes the digest when any element does."""
    import numpy as np

    from sppo_fast import _io

    a = np.arange(5000)
    b = a.copy()
    b[2500] = -1
    assert str(a) == str(b)  # what default=str would have hashed
    assert _io.digest({"x": a}) != _io.digest({"x": b})
    assert _io.digest({"x": a}) == _io.digest({"x": list(range(5000))})
    assert _io.digest([{"p": "q", "n": 1}]) == _io.digest([{"n": 1, "p": "q"}])


def test_records_with_chosen_text_equal_to_rejected_count_as_tied():
    """A ranker that scores copies of one text unequally would pick the same text as chosen and
    rejected: no preference to train on, so the record is left out and counted as tied."""
    cands = [["same", "same", "same"], ["same", "other", "same"]]
    cmp = torch.tensor([[[0, 1e-7, 0], [0, 0, 0], [0, 0, 0]], [[0, 1e-7, 0], [0, 0, 0], [0, 0, 0]]])
    records, tied = training_records(["p", "q"], cands, cmp)
    assert tied == 1 and [r["prompt"] for r in records] == ["q"]
    assert records[0]["chosen"][1]["content"] != records[0]["rejected"][1]["content"]


def test_ranking_records_and_ties():
    r = HashWordRanker()
    prompts = ["p1", "p2"]
    cands = [["good answer", "bad reply here", "x"], ["same", "same", "same"]]
    m = r.pair_matrix(prompts, cands)
    torch.testing.assert_close(m, -m.transpose(1, 2))
    records, tied = training_records(prompts, cands, m)
    assert tied == 1 and len(records) == 1 and records[0]["prompt"] == "p1"
    u = [r.utility(c) for c in cands[0]]
    assert records[0]["chosen"][1]["content"] == cands[0][u.index(max(u))]
    assert records[0]["rejected"][1]["content"] == cands[0][u.index(min(u))]
    assert 0.5 < records[0]["chosen_probs_win"] <= 1 and 0 <= records[0]["chosen_probs_lose"] < 0.5
    assert win_rate(r, prompts, ["a", "same"], ["a", "same"]) == 0.5
    # the probabilities are those of the reference aggregation of this prompt's matrix
    from sppo_fast import reference as R

    agg = R.pairrm_aggregate(m.double())
    w, l = int(agg.chosen[0]), int(agg.rejected[0])
    assert (records[0]["chosen_index"], records[0]["rejected_index"]) == (w, l)
    assert records[0]["chosen_probs"] == pytest.approx(agg.probs[0, w, l].item(), rel=0, abs=1e-6)
    assert records[0]["chosen_probs_win"] == pytest.approx(agg.win_rates[0, w].item(), rel=0, abs=1e-6)
    assert records[0]["chosen_probs_lose"] == pytest.approx(agg.win_rates[0, l].item(), rel=0, abs=1e-6)
    # three candidates, each probability a different number: a field swapped for another shows
    assert len({records[0]["chosen_probs"], records[0]["chosen_probs_win"], records[0]["chosen_probs_lose"],
                agg.probs[0, l, w].item()}) == 4


def test_iterations_raise_the_win_rate_and_resume(tmp_path, monkeypatch):
    whole = it.iterate(small(tmp_path / "whole"), progress=False)
    rates = [r["win_rate_vs_iter0"] for r in whole["iterations"]]
    assert rates[0] == 0.5 and rates[-1] > 0.6, rates
    run = tmp_path / "whole" / "demo"
    for f in ("config.yaml", "summary.json", "winrate.png", "loss.png", "iter-1/generations.parquet",
              "iter-1/train.parquet", "iter-2/model/config.json", "iter-2/metrics.jsonl"):
        assert (run / f).exists(), f
    assert not list(run.rglob(".*tmp*"))
    # killed while training iteration 2: the rerun keeps iteration 1 and what iteration 2 had written
    real = it.train
    calls = []

    def dies_in_iteration_2(model, tok, records, out, cfg, **kw):
        calls.append(out.name)
        if out.name == "iter-2":
            raise KeyboardInterrupt
        return real(model, tok, records, out, cfg, **kw)

    # the ranking stage's ranker calls: pair matrices of the k candidates (the win rates' have 2)
    real_pair_matrix = HashWordRanker.pair_matrix
    ranked = []

    def counting_pair_matrix(self, prompts, candidates):
        if candidates and len(candidates[0]) != 2:
            ranked.append(len(prompts))
        return real_pair_matrix(self, prompts, candidates)

    monkeypatch.setattr(HashWordRanker, "pair_matrix", counting_pair_matrix)
    monkeypatch.setattr(it, "train", dies_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        it.iterate(small(tmp_path / "killed"), progress=False)
    assert calls == ["iter-1", "iter-2"]  # iteration 1 trained, iteration 2 died in training
    assert sum(ranked) == 2 * 64  # both iterations ranked their 64 prompts before that
    killed = tmp_path / "killed" / "demo"
    assert not (killed / "iter-2" / "model" / "trainer_state.json").exists()

    def records_train(model, tok, records, out, cfg, **kw):
        calls.append(out.name)
        return real(model, tok, records, out, cfg, **kw)

    monkeypatch.setattr(it, "train", records_train)
    ranked.clear()
    kept = {f: (killed / f).stat().st_mtime_ns for f in
            ("iter-1/generations.parquet", "iter-1/train.parquet", "iter-2/generations.parquet",
             "iter-2/train.parquet")}
    resumed = it.iterate(small(tmp_path / "killed"), progress=False)
    # neither finished stage reruns: no generation, no ranking (the ranker never sees the k
    # candidates again), train.parquet untouched; only iteration 2 trains
    assert ranked == [], ranked
    assert {f: (killed / f).stat().st_mtime_ns for f in kept} == kept
    assert calls == ["iter-1", "iter-2", "iter-2"]
    monkeypatch.setattr(it, "train", real)
    assert [r["win_rate_vs_iter0"] for r in resumed["iterations"]] == rates
    assert [r["final_loss"] for r in resumed["iterations"]] == [r["final_loss"] for r in whole["iterations"]]
    # a rerun of the finished run answers nothing again: the win rates are kept per iteration
    # (iter-t/winrate.json, with the settings and both policies' identities they were made with)
    loads = []
    monkeypatch.setattr(it, "load_policy", lambda path, device, dtype=None: loads.append(path))
    again = it.iterate(small(tmp_path / "whole"), progress=False)
    assert [r["win_rate_vs_iter0"] for r in again["iterations"]] == rates and loads == []
    kept = json.loads((run / "iter-2" / "winrate.json").read_text())
    assert kept["win_rate"] == rates[2] and kept["settings"]["against"].startswith(str(run / "iter-0" / "model"))


def test_generation_and_ranking_resume_from_finished_chunks(tmp_path, monkeypatch):
    """Killed in the second chunk of generation, then of ranking: the reruns keep the finished
    chunks and end with the files of an uninterrupted run; other settings are refused."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(it, "RANK_CHUNK", 8)
    over = dict(prompts_per_iteration="24", generation_batch_size="2", iterations="1")  # chunks of 8
    whole = it.run_iteration(small(tmp_path / "whole", **over), 1, progress=False, until="rank")

    def dies_on_call(n, real):
        calls = []

        def f(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **k)
        return f

    cfg = small(tmp_path / "killed", **over)
    it_dir = tmp_path / "killed" / "demo" / "iter-1"
    real_generate = it.generate
    monkeypatch.setattr(it, "generate", dies_on_call(2, real_generate))
    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="rank")
    assert (it_dir / "generations.shards" / "000000.parquet").exists()
    assert not (it_dir / "generations.shards" / "000001.parquet").exists()
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        it.run_iteration(small(tmp_path / "killed", max_new_tokens="7", **over), 1, progress=False)
    generated = []
    monkeypatch.setattr(it, "generate", lambda model, tok, prompts, **k: generated.append(len(prompts))
                        or real_generate(model, tok, prompts, **k))

    class DiesInChunk2(HashWordRanker):
        calls = 0

        def pair_matrix(self, prompts, candidates):
            DiesInChunk2.calls += 1
            if DiesInChunk2.calls == 2:
                raise KeyboardInterrupt
            return super().pair_matrix(prompts, candidates)

    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="rank", ranker=DiesInChunk2())
    assert generated == [8, 8]  # the first chunk was kept, not redone
    assert not (it_dir / "generations.shards").exists() and (it_dir / "ranked.shards" / "000000.parquet").exists()
    DiesInChunk2.calls = 10
    killed = it.run_iteration(cfg, 1, progress=False, until="rank", ranker=DiesInChunk2())
    assert DiesInChunk2.calls == 12  # chunks 2 and 3 only
    assert pq.read_table(killed).to_pylist() == pq.read_table(whole).to_pylist()
    assert pq.read_table(it_dir / "generations.parquet").to_pylist() == \
        pq.read_table(tmp_path / "whole" / "demo" / "iter-1" / "generations.parquet").to_pylist()
    assert not list(it_dir.glob("*.shards")) and not (it_dir / "ranked.parquet").exists()


def test_ranking_resume_checks_the_ranker_itself(tmp_path, monkeypatch):
    """The ranking stage's partial (shards) and merged (ranked.parquet) results carry the ranker's
    fingerprint, not only cfg.ranker's name: another ranker passed in with the same config is
    refused, the same one (a new instance) resumes."""
    from sppo_fast.pipeline import rank as rank_mod

    monkeypatch.setattr(it, "RANK_CHUNK", 4)
    cfg = small(tmp_path, prompts_per_iteration="8", iterations="1")
    it_dir = tmp_path / "demo" / "iter-1"
    dying = HashWordRanker()
    real = dying.pair_matrix
    calls = []

    def dies_in_chunk_2(prompts, candidates):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(prompts, candidates)
    dying.pair_matrix = dies_in_chunk_2
    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="rank", ranker=dying)
    assert (it_dir / "ranked.shards" / "000000.parquet").exists()
    with pytest.raises(ValueError, match="ranked.shards holds partial results for other settings \\(ranker\\)"):
        it.run_iteration(cfg, 1, progress=False, until="rank", ranker=HashWordRanker(scale=5.0))
    # killed after merging, before train.parquet: ranked.parquet is all that is left of the stage
    real_records = it.training_records
    monkeypatch.setattr(it, "training_records", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="rank", ranker=HashWordRanker())
    assert (it_dir / "ranked.parquet").exists() and not (it_dir / "ranked.shards").exists()
    monkeypatch.setattr(it, "training_records", real_records)
    with pytest.raises(ValueError, match="ranked.parquet was written with other settings \\(ranker\\)"):
        it.run_iteration(cfg, 1, progress=False, until="rank", ranker=HashWordRanker(scale=5.0))
    out = it.run_iteration(cfg, 1, progress=False, until="rank", ranker=HashWordRanker())
    assert out.exists() and not (it_dir / "ranked.parquet").exists()
    # fingerprints: stable across instances, and they see what the name does not
    fp = rank_mod.ranker_fingerprint
    assert fp(HashWordRanker()) == fp(HashWordRanker()) != fp(HashWordRanker(scale=5.0))
    tiny = [fp(it.make_ranker(small(tmp_path, ranker="pairrm-tiny", **{"train.seed": str(s)}), torch.device("cpu")))
            for s in (0, 0, 1)]
    assert tiny[0] == tiny[1] != tiny[2]

    class Plain:
        pass
    assert fp(Plain()) == fp(Plain()) and "0x" not in fp(Plain())


def test_cli_runs_stages_and_rejects_bad_config(tmp_path, capsys):
    args = ["--quiet", "--set", f"runs_dir={tmp_path}", "prompts_per_iteration=8", "eval_prompts=4"]
    assert cli.main(["generate", *args]) == 0
    assert (tmp_path / "demo" / "iter-1" / "generations.parquet").exists()
    assert not (tmp_path / "demo" / "iter-1" / "train.parquet").exists()
    assert cli.main(["rank", *args]) == 0
    assert (tmp_path / "demo" / "iter-1" / "train.parquet").exists()
    with pytest.raises(SystemExit, match="unknown config field 'nope'"):
        cli.main(["demo", "--set", "nope=1"])
    with pytest.raises(SystemExit, match="field=value"):
        cli.main(["demo", "--set", "iterations"])


def test_rank_stage_with_the_tiny_pairrm(tmp_path):
    cfg = small(tmp_path, ranker="pairrm-tiny", prompts_per_iteration="6")
    out = it.run_iteration(cfg, 1, progress=False, until="rank")
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    info = json.loads((out.parent / "ranking.json").read_text())
    assert info["prompts"] == 6 and len(rows) == info["records"] == 6 - info["tied"]
    assert all(len(r["cmp"]) == cfg.k and r["chosen_index"] != r["rejected_index"] for r in rows)


def test_vllm_backend_is_chosen_only_where_it_can_run(tmp_path):
    from sppo_fast.pipeline import vllm_generate

    if vllm_generate.available():  # pragma: no cover - a GPU machine with vllm
        cfg = small(tmp_path, generation_backend="vllm", prompts_per_iteration="4", max_new_tokens="8")
        out = it.run_iteration(cfg, 1, progress=False, until="generate")
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
        assert len(rows) == 4 and all(len(r["candidates"]) == cfg.k for r in rows)
    else:
        assert not it._use_vllm(small(tmp_path))  # "auto" falls back to Hugging Face generate
        with pytest.raises(ValueError, match="needs vllm installed and a CUDA GPU"):
            it.run_iteration(small(tmp_path, generation_backend="vllm"), 1, progress=False, until="generate")
    with pytest.raises(ValueError, match="generation_backend"):
        small(tmp_path, generation_backend="tgi")


_FAKE_VLLM = """
import json, os


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class _Out:
    def __init__(self, text):
        self.outputs = [type("Completion", (), {"text": text})()]


class LLM:
    def __init__(self, model, dtype, seed):
        self._log({"load": os.path.basename(model), "dtype": dtype})
        self.calls = 0

    @staticmethod
    def _log(entry):
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps(entry) + "\\n")

    def generate(self, requests, params):
        self.calls += 1
        if self.calls == int(os.environ.get("FAKE_VLLM_DIE_AT", "0")):
            raise SystemExit(3)
        assert len(requests) == len(params)
        self._log({"requests": len(requests), "top_k": params[0].kw["top_k"]})
        # a sample's text: its seed and prompt length, so that a mix-up shows
        return [_Out(f" seed {p.kw['seed']} len {len(r['prompt_token_ids'])} ") for r, p in zip(requests, params)]
"""


def test_vllm_generation_writes_chunks_as_it_goes_and_resumes(tmp_path, monkeypatch):
    """The vLLM backend's plumbing, run here with a stand-in ``vllm`` module: one child process
    loads the model once and writes one shard per chunk; killed in its second chunk, the rerun
    keeps the first and ends with the rows of an uninterrupted run, each sample's seed the one
    :func:`sample_seed` gives it, in prompt order."""
    import pyarrow.parquet as pq

    from sppo_fast.pipeline.generate import sample_seed

    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(_FAKE_VLLM)
    log = tmp_path / "vllm.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setattr(it, "_use_vllm", lambda cfg: True)
    monkeypatch.setattr(it, "VLLM_CHUNK", 4)
    over = dict(prompts_per_iteration="10", iterations="1")

    def entries():
        out = [json.loads(x) for x in log.read_text().splitlines()]
        log.unlink()
        return out

    top_k = small(tmp_path, **over).top_k or -1  # (vLLM's "no top-k" is -1)
    whole = it.run_iteration(small(tmp_path / "whole", **over), 1, progress=False, until="generate")
    assert entries() == [{"load": "model", "dtype": "bfloat16"}] + [{"requests": n * 5, "top_k": top_k} for n in (4, 4, 2)]
    cfg = small(tmp_path / "killed", **over)
    rows = pq.read_table(whole).to_pylist()
    prompts = it.iteration_prompts(cfg, 1)
    assert [r["prompt"] for r in rows] == prompts
    assert all(c.startswith(f"seed {sample_seed(cfg.seed, i, r['prompt'])} len ") for r in rows
               for i, c in enumerate(r["candidates"]))
    monkeypatch.setenv("FAKE_VLLM_DIE_AT", "2")
    with pytest.raises(RuntimeError, match="1 of 3 chunks written|2 of 3 chunks not written"):
        it.run_iteration(cfg, 1, progress=False, until="generate")
    shards = tmp_path / "killed" / "demo" / "iter-1" / "generations.shards"
    assert sorted(p.name for p in shards.glob("*.parquet")) == ["000000.parquet"]
    entries()
    monkeypatch.delenv("FAKE_VLLM_DIE_AT")
    killed = it.run_iteration(cfg, 1, progress=False, until="generate")
    assert entries() == [{"load": "model", "dtype": "bfloat16"}] + [{"requests": n * 5, "top_k": top_k} for n in (4, 2)]
    assert pq.read_table(killed).to_pylist() == rows and not shards.exists()


def test_each_stage_loads_the_policy_only_when_it_needs_it(tmp_path, monkeypatch):
    """Generation and training load the iteration's starting policy (once); ranking alone does not
    (on a GPU that was a 7B model held beside PairRM for nothing)."""
    loads = []
    real = it.load_policy

    def counting(*a, **k):
        loads.append(a[0])
        return real(*a, **k)
    monkeypatch.setattr(it, "load_policy", counting)
    cfg = small(tmp_path, prompts_per_iteration="8", iterations="1")
    it.run_iteration(cfg, 1, progress=False, until="generate")
    assert len(loads) == 1
    it.run_iteration(cfg, 1, progress=False, until="rank")
    assert len(loads) == 1  # ranking only
    it.run_iteration(cfg, 1, progress=False)
    assert len(loads) == 2  # training
    it.run_iteration(cfg, 1, progress=False)
    assert len(loads) == 2  # done already


def _record_bars(monkeypatch) -> list:
    """Every tqdm bar made from now on, each with the list of its updates (``.steps``)."""
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.steps = []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    return bars


def _bar(bars, word):
    return [b for b in bars if word in (getattr(b, "desc", "") or "")][0]


def test_generation_progress_moves_with_every_batch(tmp_path, monkeypatch):
    """The generation bar counts samples and moves after every batch of every chunk, not once
    per chunk (a chunk of a 7B model is 4 batches x K samples of up to 2048 tokens)."""
    bars = _record_bars(monkeypatch)
    cfg = small(tmp_path, prompts_per_iteration="8", generation_batch_size="2", iterations="1")
    it.run_iteration(cfg, 1, progress=True, until="generate")
    gen = _bar(bars, "generating")
    assert gen.total == 8 * cfg.k and sum(gen.steps) == gen.total
    assert [s for s in gen.steps if s] == [2] * (4 * cfg.k)  # one chunk of 8 prompts: 4 batches x k


def test_ranking_progress_moves_with_every_step_of_the_ranker(tmp_path, monkeypatch):
    """The ranking bar moves after every ``prompts_per_step`` prompts the ranker takes at a time,
    not once per 512-prompt shard, and the matrices do not depend on that split."""
    from sppo_fast.pipeline.rank import HashWordRanker

    class Stepped(HashWordRanker):
        prompts_per_step = 3
        sizes: list = []

        def pair_matrix(self, prompts, candidates):
            Stepped.sizes.append(len(prompts))
            return super().pair_matrix(prompts, candidates)

    cfg = small(tmp_path / "whole", prompts_per_iteration="8", iterations="1")
    whole = it.run_iteration(cfg, 1, progress=False, until="rank", ranker=HashWordRanker())
    bars = _record_bars(monkeypatch)
    cfg = small(tmp_path / "stepped", prompts_per_iteration="8", iterations="1")
    stepped = it.run_iteration(cfg, 1, progress=True, until="rank", ranker=Stepped())
    rank = _bar(bars, "ranking")
    assert Stepped.sizes == [3, 3, 2]
    assert [s for s in rank.steps if s] == [3, 3, 2] and rank.total == 8
    import pyarrow.parquet as pq
    assert pq.read_table(stepped).to_pylist() == pq.read_table(whole).to_pylist()


def test_per_iteration_prompt_sets_hold_out_the_head_of_set_1(tmp_path):
    """Sets named with {iteration} (as UCLA-AGI's sppo-iter1..3, disjoint thirds): evaluation uses
    the first eval_prompts of set 1 (there is no set 0), and iteration 1 trains after them."""
    for t in (1, 2, 3):
        (tmp_path / f"set{t}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"set {t} prompt {i}"}) + "\n" for i in range(10)))
    cfg = small(tmp_path, prompts=str(tmp_path / "set{iteration}.jsonl"), eval_prompts="3",
                prompts_per_iteration="5")
    held = it.held_out_prompts(cfg)
    assert held == [f"set 1 prompt {i}" for i in range(3)]
    assert it.iteration_prompts(cfg, 1) == [f"set 1 prompt {i}" for i in range(3, 8)]
    assert it.iteration_prompts(cfg, 2) == [f"set 2 prompt {i}" for i in range(5)]
    assert not set(held) & set(sum((it.iteration_prompts(cfg, t) for t in (1, 2, 3)), []))


def test_a_source_with_duplicates_is_named(tmp_path):
    """A prompt the source repeats twice within one iteration, or in both the training slice and the
    held-out head, is reported (the win rate would be measured on trained prompts); a clean source
    is quiet."""
    texts = [f"prompt {i}" for i in range(20)]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    cfg = small(tmp_path, prompts=str(clean), eval_prompts="4", prompts_per_iteration="6")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert it.iteration_prompts(cfg, 2) == texts[10:16]
    texts[12], texts[14], texts[15] = texts[11], texts[1], texts[3]  # iteration 2 is texts[10:16]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    cfg = small(tmp_path, prompts=str(dup), eval_prompts="4", prompts_per_iteration="6")
    with pytest.warns(UserWarning) as record:
        it.iteration_prompts(cfg, 2)
    messages = [str(w.message) for w in record]
    assert any("1 of iteration 2's 6 prompts repeat an earlier one" in m for m in messages), messages
    assert any("2 of iteration 2's prompts are also among the 4 held out" in m for m in messages), messages
