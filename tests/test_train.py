"""SPPO training: tokenisation, the fused loss against the reference path step by step, resume."""

import json
import random

import pytest
import torch

from sppo_fast.pipeline import train as tr
from sppo_fast.pipeline.iterate import tiny_policy
from sppo_fast.pipeline.data import IGNORE_INDEX, collate, encode_pair, encode_records, encode_responses
from sppo_fast.tiny import synthetic_text, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer(seed=0)


def records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = synthetic_text(rng, rng.randint(3, 15))
        w, l = synthetic_text(rng, rng.randint(2, 30)), synthetic_text(rng, rng.randint(2, 30))
        out.append({"prompt": p, "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": w}],
                    "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": l}],
                    "chosen_probs_win": rng.uniform(0.5, 0.9), "chosen_probs_lose": rng.uniform(0.1, 0.5)})
    return out


def test_one_bos_one_eos_and_masked_prompt(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    e = encode_pair(tok, "What is the model?", "It is good.", max_length=64, max_prompt_length=32)
    ids = list(e.input_ids)
    assert ids.count(bos) == 1 and ids[0] == bos  # the template's BOS, not doubled
    assert ids.count(eos) == 1 and ids[-1] == eos
    prompt = tok(tr_prompt := tok.apply_chat_template([{"role": "user", "content": "What is the model?"}],
                                                      tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert tr_prompt.startswith("<s>[INST]")
    n = len(prompt)
    assert ids[:n] == prompt
    assert list(e.labels[:n]) == [IGNORE_INDEX] * n
    assert list(e.labels[n:]) == ids[n:] == tok("It is good.", add_special_tokens=False)["input_ids"] + [eos]
    # a response ending in EOS gets no second one
    assert list(encode_pair(tok, "q", "It is good.</s>", max_length=64, max_prompt_length=32).input_ids).count(eos) == 1


def _template_ids(tok, prompt):
    return tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_truncation_sides(tok):
    long_p = synthetic_text(random.Random(1), 200)
    long_r = synthetic_text(random.Random(2), 200)
    e = encode_pair(tok, long_p, long_r, max_length=48, max_prompt_length=20)
    n_prompt = sum(1 for x in e.labels if x == IGNORE_INDEX)
    assert n_prompt == 20 and len(e.input_ids) == 48
    assert list(e.input_ids[:20]) == [tok.bos_token_id] + _template_ids(tok, long_p)[-19:]  # kept the end ([/INST])
    full_resp = tok(long_r, add_special_tokens=False)["input_ids"]
    assert list(e.input_ids[20:]) == full_resp[:28]  # kept the start; a cut response has no EOS (official)
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_pair(tok, "a", "b", max_length=10, max_prompt_length=10)


def test_truncation_is_the_official_rule_decided_per_pair(tok):
    """TRL's tokenize_row: nothing is cut while prompt + the pair's longer response (EOS counted) fits
    max_length; past it the prompt goes to its last max_prompt_length tokens, and only then, if still
    too long, both responses to max_length - max_prompt_length."""
    rng = random.Random(3)
    eos, bos = tok.eos_token_id, tok.bos_token_id
    prompt, short, long_ = synthetic_text(rng, 4), synthetic_text(rng, 3), synthetic_text(rng, 60)
    p_ids = [bos] + _template_ids(tok, prompt)[1:]
    r_short, r_long = (tok(x, add_special_tokens=False)["input_ids"] + [eos] for x in (short, long_))
    assert len(p_ids) < 16 and len(r_long) > 40 and len(p_ids) + len(r_long) <= 96
    # a short prompt and a response longer than max_length - max_prompt_length: nothing is cut
    (e,) = encode_responses(tok, prompt, [long_], max_length=96, max_prompt_length=48)
    assert list(e.input_ids) == p_ids + r_long
    # a long prompt: cut only when the pair's longer response does not fit beside it
    long_p = synthetic_text(rng, 80)
    lp_ids = [bos] + _template_ids(tok, long_p)[1:]
    assert len(lp_ids) + len(r_short) <= 128 < len(lp_ids) + len(r_long)
    (alone,) = encode_responses(tok, long_p, [short], max_length=128, max_prompt_length=48)
    assert list(alone.input_ids) == lp_ids + r_short  # fits: untouched
    a, b = encode_responses(tok, long_p, [short, long_], max_length=128, max_prompt_length=48)
    cut = [bos] + lp_ids[len(lp_ids) - 47:]
    assert list(a.input_ids) == cut + r_short  # its partner is long: the prompt is cut for both
    assert list(b.input_ids) == cut + r_long and len(b.input_ids) <= 128
    # still too long after the prompt's cut: both responses to max_length - max_prompt_length
    a, b = encode_responses(tok, long_p, [short, long_], max_length=64, max_prompt_length=48)
    assert list(a.input_ids) == cut + r_short  # (shorter than the cut already)
    assert list(b.input_ids) == cut + r_long[:16]


def test_records_are_checked_before_any_work(tok):
    rec = records(3)
    with pytest.raises(ValueError, match="record 1: missing field 'chosen_probs_win' \\(loss_type='sppo' reads it\\)"):
        encode_records(tok, [rec[0], {**rec[1], "chosen_probs_win": None}, rec[2]], loss_type="sppo")
    with pytest.raises(ValueError, match="record 0: missing field 'chosen_probs'"):
        encode_records(tok, rec, loss_type="sppo_single")
    assert len(encode_records(tok, [{k: v for k, v in r.items() if "probs" not in k} for r in rec],
                              loss_type="sppo_hard")) == 3
    np = pytest.importorskip("numpy")
    ok = encode_records(tok, [{**rec[0], "chosen_probs_win": np.float32(0.7)}], loss_type="sppo")
    assert len(ok) == 1
    with pytest.raises(ValueError, match="record 0: chosen_probs_lose must be a probability in \\[0, 1\\], got True"):
        encode_records(tok, [{**rec[0], "chosen_probs_lose": True}], loss_type="sppo")
    user_only = [{"role": "user", "content": rec[0]["prompt"]}]
    with pytest.raises(ValueError, match="record 0: rejected is a message list whose last turn is not the "
                                         "assistant's \\(got 'user'\\)"):
        encode_records(tok, [{**rec[0], "rejected": user_only}])


def test_collate_shifts_labels(tok):
    a = encode_pair(tok, "hi", "ok then", max_length=32, max_prompt_length=16)
    b = collate([a], tok.pad_token_id)
    assert b["labels"][0, :-1].tolist() == list(a.labels[1:]) and b["labels"][0, -1] == IGNORE_INDEX


def run(tok, tmp_path, name, n_records=10, **kw):
    cfg = tr.TrainConfig(**{**dict(learning_rate=1e-3, optimizer="adamw", batch_size=2, epochs=4, max_length=64,
                                   max_prompt_length=24, beta=0.1), **kw})
    model = tiny_policy(tok)
    tr.train(model, tok, records(n_records), tmp_path / name, cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return model, lines


def test_fused_and_reference_paths_agree_for_20_steps(tok, tmp_path):
    _, fused = run(tok, tmp_path, "fused")
    _, ref = run(tok, tmp_path, "ref", loss_path="reference")
    assert len(fused) == len(ref) == 20
    # the logged rate is the one each step used, the official trainer's schedule (Hugging Face's
    # linear warmup over ceil(10% of 20) = 2 steps, from 0, then a linear decay that reaches 0 only
    # after the last step; a rate read after the schedule's step was the next step's)
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    hf, rates = get_linear_schedule_with_warmup(opt, 2, 20), []
    for _ in range(20):
        rates.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert [m["lr"] for m in fused] == pytest.approx(rates, rel=1e-12, abs=0)
    assert fused[0]["lr"] == 0 and fused[1]["lr"] == pytest.approx(5e-4) and fused[-1]["lr"] > 0
    losses = [m["loss"] for m in fused]
    assert max(losses) > 1.2 * min(losses)  # training moved the loss: the comparison is not vacuous
    for a, b in zip(fused, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4, abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=2e-3, abs=1e-5)
    # both paths take ref_logps from the same helper, so the agreement above cannot see a wrong
    # reference: at step 1 (metrics of the loss before the first update) the policy is the
    # reference, so every reward is 0: exactly so on the fused path (the same lm_head kernels as
    # reference_logps; 0.0 here), up to the float32 rounding of the ~-200-nat sums on the reference
    # path (beta * a few 1e-5 nats; 8e-7 seen). A reference off by 0.3 nats gives 0.03.
    for path, tol in ((fused, 1e-6), (ref, 1e-5)):
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(path[0][k]) <= tol, (k, path[0][k])


def test_a_step_is_the_mean_over_its_pairs_and_a_log_the_mean_over_its_steps(tok, tmp_path):
    """6 pairs in one step as micro-batches of 4 and 2 give the loss, metrics and gradient (its norm,
    logged before clipping) of one micro-batch of 6: a micro-batch weighs the pairs it holds (the mean
    of the micro-batches' means weighted the 2 pairs as 4, a 36% gradient difference; the logged loss
    was the last micro-batch's alone). A log every 2 steps reports the mean of those 2 steps."""
    kw = dict(n_records=6, epochs=1, warmup_ratio=0.0)
    _, split = run(tok, tmp_path, "split", batch_size=4, grad_accum=2, **kw)
    _, whole = run(tok, tmp_path, "whole", batch_size=6, grad_accum=1, **kw)
    assert len(split) == len(whole) == 1
    for k in ("loss", "grad_norm", "rewards/accuracies", "logps/chosen", "logps/rejected", "targets/chosen"):
        assert split[0][k] == pytest.approx(whole[0][k], rel=1e-5, abs=1e-7), k
    kw = dict(n_records=8, epochs=2, batch_size=2, grad_accum=2)
    _, every = run(tok, tmp_path, "every", **kw)
    _, pairs = run(tok, tmp_path, "pairs", log_every=2, **kw)
    assert [m["step"] for m in pairs] == [2, 4] and len(every) == 4
    for i, m in enumerate(pairs):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert m[k] == pytest.approx((every[2 * i][k] + every[2 * i + 1][k]) / 2, rel=1e-5, abs=1e-7), k


def test_seeded_data_order(tok, tmp_path, monkeypatch):
    """Records in a seeded random order (the official trainer's seeded sampler), the batches reshuffled
    per epoch; shuffle=False keeps the given order."""
    seen = []
    real = tr._loss

    def spy(policy, b, ref, cfg):
        seen.append(b["input_ids"][0].tolist())
        return real(policy, b, ref, cfg)

    monkeypatch.setattr(tr, "_loss", spy)

    def order(name, **kw):
        seen.clear()
        run(tok, tmp_path, name, n_records=8, batch_size=1, epochs=2, **kw)
        return list(seen)

    plain = order("plain", shuffle=False)
    assert plain[:8] == plain[8:]  # the given order, each epoch
    a, a2, b = order("a", seed=1), order("a2", seed=1), order("b", seed=2)
    assert a == a2 and a != b  # seeded
    assert sorted(a[:8]) == sorted(plain[:8]) == sorted(a[8:]) and a[:8] != plain[:8] and a[:8] != a[8:]


def test_dropout_is_disabled_as_the_official_trainer_does(tok, tmp_path):
    """With dropout on, the policy's first forward differs from the reference (taken in eval mode),
    so the step-1 rewards are not 0 (TRL's disable_dropout is on in the official trainer)."""
    def first_rewards(name, **kw):
        model = tiny_policy(tok)
        for m in model.modules():  # Hugging Face attention reads this attribute, functionally
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.5
        cfg = tr.TrainConfig(learning_rate=1e-3, batch_size=2, epochs=1, max_length=64, max_prompt_length=24,
                             beta=0.1, **kw)
        tr.train(model, tok, records(4), tmp_path / name, cfg, progress=False)
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        return first["rewards/chosen"], first["rewards/rejected"], model

    *on, model = first_rewards("off")
    assert max(map(abs, on)) <= 1e-6
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    *kept, _ = first_rewards("kept", disable_dropout=False)
    assert max(map(abs, kept)) > 1e-4


def test_weight_decay_spares_biases_and_norms(tok):
    model = tiny_policy(tok)
    decay, rest = tr._param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert {names[id(p)] for p in rest["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_records_left_out_under_data_parallel_are_named():
    with pytest.warns(UserWarning, match=r"3 of 7 records fill no whole global batch of 4 \(2 pairs x 2 processes\)"):
        share = tr._rank_records(list(range(7)), 2, 0, 2)
    assert share == [0, 1]
    assert tr._rank_records(list(range(7)), 2, 1, 2) == [2, 3]


def test_a_finished_model_is_reused_only_for_its_own_settings(tok, tmp_path):
    model, first = run(tok, tmp_path, "done", epochs=1)
    again = tiny_policy(tok)
    cfg = dict(learning_rate=1e-3, optimizer="adamw", batch_size=2, epochs=1, max_length=64, max_prompt_length=24,
               beta=0.1)
    summary = tr.train(again, tok, records(10), tmp_path / "done", tr.TrainConfig(**cfg), progress=False)
    assert summary["steps"] == len(first) and summary["last"] == first[-1]
    with pytest.raises(ValueError, match=r"model was written with other settings \(epochs: 1 then, 3 now\); delete"):
        tr.train(again, tok, records(10), tmp_path / "done", tr.TrainConfig(**{**cfg, "epochs": 3}), progress=False)
    with pytest.raises(ValueError, match="records: other training data"):
        tr.train(again, tok, records(12), tmp_path / "done", tr.TrainConfig(**cfg), progress=False)


def test_reference_logps_are_the_models_sequence_logps(tok):
    """train.reference_logps (hidden states and lm_head, no [N, V] logits) against the float64
    reference sequence log-probs of the model's own logits, batch by batch."""
    from sppo_fast import reference as R

    model = tiny_policy(tok)
    cfg = tr.TrainConfig(batch_size=3, max_length=64, max_prompt_length=24)
    batches = tr._pair_batches(tok, records(7, seed=3), cfg, torch.device("cpu"))
    got = tr.reference_logps(model, batches)
    assert model.training  # restored
    assert len(got) == len(batches) == 3
    with torch.no_grad():
        model.eval()
        for b, r in zip(batches, got):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            expect = R.sequence_logps(logits.double(), b["labels"])
            assert r.shape == expect.shape and r.dtype == torch.float32
            torch.testing.assert_close(r.double(), expect, rtol=1e-5, atol=1e-4)
        model.train()


def killed_at_call(n, real):
    """``real``, except that its n-th call raises KeyboardInterrupt (a kill mid-run)."""
    calls = []

    def f(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    return f


def test_resume_gives_the_same_weights(tok, tmp_path, monkeypatch):
    whole, _ = run(tok, tmp_path, "whole")
    real = tr._loss
    monkeypatch.setattr(tr, "_loss", killed_at_call(8, real))
    with pytest.raises(KeyboardInterrupt):
        run(tok, tmp_path, "resumed", save_every=3)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-6"
    assert type(whole).from_pretrained(ckpt).config.vocab_size == whole.config.vocab_size  # a HF folder
    monkeypatch.setattr(tr, "_loss", real)
    # a resume with other settings or data would not reach the same weights: refused, nothing lost
    with pytest.raises(ValueError, match=r"batch_size: 2 then, 4 now.*delete"):
        run(tok, tmp_path, "resumed", save_every=3, batch_size=4)
    with pytest.raises(ValueError, match="records: other training data"):
        run(tok, tmp_path, "resumed", save_every=3, n_records=12)
    assert (tmp_path / "resumed" / "checkpoints" / "step-6").exists()
    resumed, lines = run(tok, tmp_path, "resumed", save_every=3, log_every=1, loss_path="fused")
    assert [m["step"] for m in lines] == list(range(1, 21))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    assert (tmp_path / "resumed" / "model" / "config.json").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_reference_logps_follow_the_settings_until_the_policy_moves(tok, tmp_path, monkeypatch):
    """Killed before its first checkpoint, a rerun with another batch size recomputes the reference
    log-probs (the policy has not moved) and matches a fresh run with that batch size."""
    real = tr._loss
    monkeypatch.setattr(tr, "_loss", killed_at_call(2, real))
    with pytest.raises(KeyboardInterrupt):
        run(tok, tmp_path, "a", epochs=1)
    assert (tmp_path / "a" / "ref_logps.pt").exists() and not (tmp_path / "a" / "checkpoints").exists()
    monkeypatch.setattr(tr, "_loss", real)
    _, rerun = run(tok, tmp_path, "a", epochs=1, batch_size=5)
    _, fresh = run(tok, tmp_path, "b", epochs=1, batch_size=5)
    assert [m["loss"] for m in rerun] == [m["loss"] for m in fresh] and len(fresh) == 2


def test_bad_configs_and_records(tok, tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        tr.TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="loss_type"):
        tr.TrainConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="batch_size"):
        tr.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        tr.train(tiny_policy(tok), tok, [{"prompt": "a", "chosen": "b"}], tmp_path / "x", tr.TrainConfig(),
                 progress=False)
    bad = records(2)
    bad[1]["chosen_probs_win"] = float("nan")
    with pytest.raises(ValueError, match="record 1: chosen_probs_win must be a probability"):
        tr.train(tiny_policy(tok), tok, bad, tmp_path / "z", tr.TrainConfig(), progress=False)
    assert not (tmp_path / "z" / "ref_logps.pt").exists()  # rejected before any work
    with pytest.raises(ValueError, match="record 0: prompt and rejected must be text"):
        tr.train(tiny_policy(tok), tok, [{"prompt": "a", "chosen": "b", "rejected": None}], tmp_path / "w",
                 tr.TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="no training records"):
        tr.train(tiny_policy(tok), tok, [], tmp_path / "y", tr.TrainConfig(), progress=False)


def test_tensorboard_logging_or_a_clear_error(tok, tmp_path):
    cfg = tr.TrainConfig(batch_size=2, max_length=64, max_prompt_length=24, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            tr.train(tiny_policy(tok), tok, records(4), tmp_path / "tb", cfg, progress=False)
        assert not (tmp_path / "tb" / "ref_logps.pt").exists()
    else:
        tr.train(tiny_policy(tok), tok, records(4), tmp_path / "tb", cfg, progress=False)
        assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("tie", [False, True])
def test_load_weights_one_tensor_at_a_time(tok, tmp_path, tie):
    """A checkpoint folder (sharded or not, tied embeddings or not) loads into a fresh model in place;
    a missing or misshapen tensor is an error that names it."""
    from transformers import MistralConfig, MistralForCausalLM

    def model(seed):
        torch.manual_seed(seed)
        return MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=tie))

    src = model(1)
    src.save_pretrained(tmp_path / "one")
    src.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder in ("one", "sharded"):
        dst = model(2)
        tr._load_weights(dst, tmp_path / folder)
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), name
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "one" / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v for k, v in sd.items() if "layers.1.mlp" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*layers.1.mlp"):
        tr._load_weights(model(2), broken)
    (broken / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    with pytest.raises(ValueError, match="missing.*layers.1.mlp"):  # nor through from_pretrained, which
        tr._load_weights(model(2), broken)  # would fill the missing weights with new random ones
    save_file({**sd, "model.norm.weight": torch.ones(7)}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(7,\)"):
        tr._load_weights(model(2), broken)


def test_load_weights_of_a_model_saved_under_other_names(tmp_path):
    """transformers 5 saves a Mixtral's experts under their original per-expert names, not the fused
    module names: the checkpoint still loads, through the model class's own conversion."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(1)
    src = MixtralForCausalLM(cfg)
    src.save_pretrained(tmp_path / "moe")
    torch.manual_seed(2)
    dst = MixtralForCausalLM(cfg)
    dst.config.dtype = torch.bfloat16  # as after .float() of a bf16 model: the weights stay float32
    tr._load_weights(dst, tmp_path / "moe")
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    # a weight missing there too: the error names it
    from safetensors.torch import load_file, save_file

    f = next((tmp_path / "moe").glob("*.safetensors"))
    save_file({k: v for k, v in load_file(str(f)).items() if k != "model.norm.weight"}, str(f))
    with pytest.raises(ValueError, match="from_pretrained does not find them either.*model.norm.weight"):
        tr._load_weights(dst, tmp_path / "moe")
