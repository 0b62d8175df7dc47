"""Preference tuning (objective: dpo): records, tokenization, packing, the losses, the three
reference options, resume, a short run that learns, and `phi3jax eval preference`.

The comparison with TRL itself (the same model, tokenizer and records through both) is in
tests/test_dpo_trl.py (PyTorch)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trainutil import REPO, run_train_py, small_config, write_config, write_corpus

from phi3jax.tokenizer import Tokenizer
from phi3jax.train import checkpoint as ckpt
from phi3jax.train import loop
from phi3jax.train import preference as pref
from phi3jax.train.config import TrainConfigError
from phi3jax.train.data import DataError
from phi3jax.train.dpo import DpoConfig, pair_logps, preference_terms
from phi3jax.train.metrics import plot_losses, read_metrics
from phi3jax.train.step import token_nll

EXAMPLE = str(REPO / "configs" / "data" / "preference_example.jsonl")


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_vocab):
    return Tokenizer.phi3(phi3_vocab / "tokenizer.model")


def _write(tmp_path, lines, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def _conv(prompt="What does pass do?", chosen="Nothing.", rejected="It stops the program.", system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# ----------------------------------------------------------------------------- records
@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', "'rejected' is missing"),
    ("not json", "not valid JSON"),
    (json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": [{"role": "assistant", "content": "y"}],
                 "rejected": [{"role": "assistant", "content": "z"}]}), "unknown role 'robot'"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "chosen": [{"role": "assistant", "content": "y"}],
                 "rejected": [{"role": "assistant", "content": "z"}]}),
     "ends with an assistant turn"),
    (json.dumps({"prompt": "x", "chosen": [{"role": "assistant", "content": "y"}], "rejected": "z"}),
     "all be strings"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "y"}],
                 "rejected": [{"role": "assistant", "content": "z"}]}), "chosen must start with an assistant turn"),
])
def test_malformed_records_are_refused_with_the_line_named(tmp_path, line, message):
    path = _write(tmp_path, [_conv(), line])
    with pytest.raises(DataError, match=message) as info:
        pref.read_records(path)
    assert f"{path}:2" in str(info.value)


def test_conversational_records_tokenize_as_the_chat_template_with_the_reply_and_its_end(phi3_tokenizer):
    tok = phi3_tokenizer
    record = _conv(system="Be brief.")
    prompt, chosen, rejected = pref.tokenize_record(record, tok)
    assert prompt == tok.encode(tok.apply_chat_template(record["prompt"], add_generation_prompt=True))
    end = tok.token_id("<|end|>")
    assert chosen == tok.encode("Nothing.") + [end]  # the reply and its closing <|end|>, nothing more
    assert rejected == tok.encode("It stops the program.") + [end]
    # The same ids as SFT's loss mask marks for the conversation with the chosen reply.
    ids, mask = tok.encode_chat(record["prompt"] + record["chosen"])
    assert ids == prompt + chosen and [i for i, m in zip(ids, mask, strict=True) if m] == chosen


def test_plain_text_records_get_bos_and_eos_as_trl_adds_them(phi3_tokenizer):
    tok = phi3_tokenizer
    prompt, chosen, _ = pref.tokenize_record({"prompt": "The sky is", "chosen": " blue", "rejected": " green"}, tok)
    assert prompt[0] == tok.bos_id and chosen[-1] == tok.eos_id
    assert prompt + chosen == tok.encode("The sky is blue" + tok.decode([tok.eos_id]), add_bos=True)


def test_truncation_follows_trls_collator_and_is_counted(phi3_tokenizer):
    records = [("a", _conv()), ("b", _conv(prompt="word " * 40)), ("c", _conv(chosen="long " * 30))]
    lengths = [[len(s[0]) for s in p.sequences()]
               for p in pref.tokenize_records(records, phi3_tokenizer, max_length=1000).pairs]
    data = pref.tokenize_records(records, phi3_tokenizer, max_length=30)
    assert (data.records, data.dropped, data.truncated) == (3, 1, 1)  # b: its prompt alone fills 30 tokens
    assert [p.index for p in data.pairs] == [0, 2]
    kept = data.pairs[1]
    assert len(kept.chosen[0]) == 30 and len(kept.rejected[0]) == lengths[2][1]  # keep_start: the end is cut
    np.testing.assert_array_equal(kept.chosen[0], data.pairs[1].chosen[0][:30])
    end = pref.tokenize_records(records, phi3_tokenizer, max_length=30, truncation_mode="keep_end")
    assert end.dropped == 0 and all(len(s[0]) <= 30 for p in end.pairs for s in p.sequences())
    assert end.pairs[1].chosen[1][-1] == 1.0  # keep_end keeps the completion's end
    assert "1 dropped" in data.describe(30) and "1 truncated" in data.describe(30)


# ----------------------------------------------------------------------------- packing
def _pairs(tokenizer, n=12, max_length=64):
    return pref.tokenize_records(pref.read_records(EXAMPLE)[:n], tokenizer, max_length=max_length).pairs


def test_pairs_are_packed_whole_chosen_then_rejected_and_resume_exactly(phi3_tokenizer):
    pairs = _pairs(phi3_tokenizer)
    rows = pref.eval_batches(pairs, seq_len=128, batch_size=2)
    seen = []
    for batch in rows:
        for b in range(batch["inputs"].shape[0]):
            seg, index = batch["segment_ids"][b], batch[pref.INDEX_KEY][b]
            for s in range(1, seg.max() + 1, 2):  # chosen s, rejected s + 1: the same record
                assert set(index[seg == s]) == set(index[seg == s + 1]) and len(set(index[seg == s])) == 1
                record = int(index[seg == s][0])
                pair = next(p for p in pairs if p.index == record)
                np.testing.assert_array_equal(batch["inputs"][b][seg == s], pair.chosen[0][:-1])
                np.testing.assert_array_equal(batch["loss_mask"][b][seg == s + 1], pair.rejected[1][1:])
                seen.append(record)
    assert sorted(seen) == sorted(p.index for p in pairs)  # each pair once, none split
    stream = iter(pref.train_batches(pairs, seq_len=128, batch_size=2, seed=3))
    for _ in range(3):
        next(stream)
    state = stream.get_state()
    expected = [next(stream) for _ in range(4)]
    again = iter(pref.train_batches(pairs, seq_len=128, batch_size=2, seed=3))
    again.set_state(state)
    for a, b in zip(expected, [next(again) for _ in range(4)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_packed_log_probabilities_equal_each_sequence_scored_alone(phi3_tokenizer):
    """One forward over packed pairs gives each completion the log-probability it has alone
    (float32, 1e-4: the same model, different batch shapes)."""
    from phi3jax.config import Phi3Config
    from phi3jax.model import init_params

    cfg = Phi3Config.preset("tiny").replace(vocab_size=32064, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    params = init_params(cfg, jax.random.key(0))
    pairs = _pairs(phi3_tokenizer, n=6)
    batch = pref.eval_batches(pairs, seq_len=256, batch_size=3)[0]
    device = {k: jnp.asarray(v) for k, v in pref.with_reference(batch, None).items()}
    packed = pref.record_logps(np.asarray(pair_logps(-token_nll(params, cfg, device), device)[0]), batch, 6)
    score = jax.jit(lambda b: -jnp.sum(token_nll(params, cfg, b) * b["loss_mask"]))
    checked = 0
    for pair in pairs:
        if np.isnan(packed[pair.index]).any():
            continue  # not in this first batch
        for side, (ids, mask) in enumerate(pair.sequences()):
            n, pad = len(ids) - 1, 128 - (len(ids) - 1)  # alone in a row of its own (padding: segment 0)
            alone = {"inputs": np.pad(ids[:-1], (0, pad)), "targets": np.pad(ids[1:], (0, pad)),
                     "loss_mask": np.pad(mask[1:], (0, pad)), "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
                     "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad))}
            logp = float(score({k: jnp.asarray(v)[None] for k, v in alone.items()}))
            assert packed[pair.index, side] == pytest.approx(logp, abs=1e-4)
            checked += 1
    assert checked >= 4


# ----------------------------------------------------------------------------- the losses
def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0),
                                       ("robust", 0.2), ("simpo", 0.1)])
def test_losses_and_rewards_are_trls_formulas(loss, eps):
    """The per-pair loss and rewards against TRL's formulas written out again in numpy (float32, 1e-5)."""
    rng = np.random.default_rng(0)
    policy, ref = -rng.uniform(5, 50, (7, 2)), -rng.uniform(5, 50, (7, 2))
    counts = rng.integers(3, 30, (7, 2)).astype(np.float64)
    beta, gamma = 0.3, 0.7
    dpo = DpoConfig(beta=beta, loss=loss, label_smoothing=eps, gamma=gamma)
    got, metrics = preference_terms(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
                                    jnp.asarray(counts, jnp.float32), dpo)
    delta = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
    rewards = beta * (policy - ref)
    if loss == "sigmoid":
        want = -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    elif loss == "hinge":
        want = np.maximum(0.0, 1 - beta * delta)
    elif loss == "ipo":
        avg = (policy - ref) / counts
        want = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        want = (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        avg = policy / counts
        x = avg[:, 0] - avg[:, 1] - gamma / beta
        want = -(1 - eps) * _log_sigmoid(beta * x) - eps * _log_sigmoid(-beta * x)
        rewards = beta * avg
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["rewards/chosen"]), rewards[:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["rewards/margins"]), rewards[:, 0] - rewards[:, 1], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(metrics["rewards/accuracies"]), rewards[:, 0] > rewards[:, 1])


def test_bad_dpo_settings_name_the_key(tmp_path):
    data = _write(tmp_path, [_conv()])
    common = {"init_from": "ckpt:x", "objective": "dpo", "data.format": "preference"}
    with pytest.raises(TrainConfigError, match="data.format"):
        small_config("r", data, objective="dpo")
    with pytest.raises(TrainConfigError, match="preference data is for objective=dpo"):
        small_config("r", data, **{"data.format": "preference"})
    with pytest.raises(TrainConfigError, match="adapter_off"):
        small_config("r", data, **common, **{"dpo.reference": "adapter_off"})
    with pytest.raises(TrainConfigError, match="dpo.label_smoothing"):
        small_config("r", data, **common, **{"dpo.loss": "hinge", "dpo.label_smoothing": 0.1})
    with pytest.raises(TrainConfigError, match="dpo.max_length=40: .* at most seq_len // 2 \\+ 1 = 33"):
        small_config("r", data, **common, **{"dpo.max_length": 40})
    with pytest.raises(TrainConfigError, match="dpo.loss='kto'"):
        small_config("r", data, **common, **{"dpo.loss": "kto"})
    with pytest.raises(TrainConfigError, match="init_from"):
        small_config("r", data, objective="dpo", **{"data.format": "preference"})


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small language model trained briefly on the corpus, with the chat tokens in its vocabulary."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)
    cfg = small_config(tmp_path_factory.mktemp("base") / "run", corpus, steps=8, save_every=8,
                       **{"model.dtype": "float32", "model.max_position_embeddings": 256,
                          "model.original_max_position_embeddings": 256})
    loop.train(cfg)
    return cfg.run_dir


def _dpo_config(run_dir, base_run, **overrides):
    settings = {"model": {}, "init_from": f"ckpt:{base_run}", "objective": "dpo", "steps": 6, "save_every": 3,
                "batch_size": 2, "seq_len": 256, "data.format": "preference", "data.val_fraction": 0.25,
                "optim.learning_rate": 3e-3, "optim.warmup_steps": 1, "optim.weight_decay": 0.0,
                "log.eval_every": 3, **overrides}
    return small_config(run_dir, EXAMPLE, **settings)


def _losses(run_dir, split="train", key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r["split"] == split}


@pytest.fixture(scope="module")
def precomputed_run(tmp_path_factory, base_run):
    """Six uninterrupted DPO steps with the reference precomputed."""
    return loop.train(_dpo_config(tmp_path_factory.mktemp("pre") / "run", base_run,
                                  **{"dpo.reference": "precomputed"}))


def test_precomputed_and_frozen_references_give_the_same_losses(tmp_path, base_run, precomputed_run):
    """The reference scored in every step or once before training: the same losses (float32, 1e-5:
    the same sums computed in two programs)."""
    frozen, pre = loop.train(_dpo_config(tmp_path / "frozen", base_run)), precomputed_run
    assert os.path.isfile(os.path.join(pre.run_dir, pref.REFERENCE_FILE))
    a, b = _losses(frozen.run_dir), _losses(pre.run_dir)
    assert a.keys() == b.keys() and len(a) == 6
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)
    assert a[1] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
        va, vb = _losses(frozen.run_dir, "val", key), _losses(pre.run_dir, "val", key)
        assert va.keys() == vb.keys() and all(va[s] == pytest.approx(vb[s], abs=1e-4) for s in va)


def test_adapter_off_equals_frozen_with_a_copy_of_the_lora_base(tmp_path, base_run):
    """LoRA: the base with the adapters off is the reference a frozen copy of the starting model gives
    (B = 0 at the start); the same losses to 1e-5."""
    lora = {"lora.rank": 4, "lora.alpha": 8.0, "lora.base_dtype": "float32"}
    off = loop.train(_dpo_config(tmp_path / "off", base_run, **lora, **{"dpo.reference": "adapter_off"}))
    frozen = loop.train(_dpo_config(tmp_path / "frozen", base_run, **lora))
    a, b = _losses(off.run_dir), _losses(frozen.run_dir)
    assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    assert a[6] != pytest.approx(a[1], abs=1e-4)  # it trained


def test_killed_dpo_run_resumes_bit_for_bit(tmp_path, base_run, precomputed_run):
    """SIGKILL after step 4 (checkpoint at 3), rerun: the same losses and metrics as a run that never
    stopped, with the precomputed reference read back from the run directory."""
    straight = precomputed_run
    cfg = _dpo_config(tmp_path / "killed", base_run, **{"dpo.reference": "precomputed"})
    killed = run_train_py(["--config", write_config(cfg, tmp_path / "cfg.yaml")], fault="kill_after_step:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert ckpt.list_steps(cfg.run_dir) == [3]
    assert loop.train(cfg).step == 6
    for key in ("loss", "rewards/margins", "logps/rejected"):
        assert _losses(cfg.run_dir, key=key) == _losses(straight.run_dir, key=key)


def test_a_short_dpo_run_prefers_the_chosen_answers_on_held_out_pairs(tmp_path, base_run):
    """Ten held-out pairs of the example data, scored at step 0 and at the end. Check: rewards/accuracies
    and rewards/margins rise above their starting values (0: at step 0 the policy is the reference),
    accuracy above one half, and the chosen answers' mean log-probability does not collapse: it stays
    within 25% of its starting value (DPO may lower it somewhat while it lowers the rejected more)."""
    cfg = _dpo_config(tmp_path / "dpo", base_run, steps=30, save_every=30, **{"log.eval_every": 30})
    seen = {}

    def watch(step, run):
        if step == 1:
            seen["start"] = run.evaluate()

    loop.train(cfg, on_step=watch)
    end = {k: v for k, v in read_metrics(cfg.run_dir)[-1].items()}
    start = seen["start"]
    assert end["split"] == "val" and end["step"] == 30
    assert end["rewards/accuracies"] > 0.5 and end["rewards/margins"] > start["rewards/margins"] + 0.05
    assert end["logps/chosen"] > 1.25 * start["logps/chosen"]
    assert plot_losses(cfg.run_dir).endswith("loss.png")  # the loss and the rewards panel


def test_eval_preference_of_a_model_against_itself_and_against_its_start(tmp_path, base_run):
    from phi3jax.cli.main import main

    out = tmp_path / "report.json"
    assert main(["eval", "preference", "--ckpt", base_run, "--ref-ckpt", base_run, "--data", EXAMPLE,
                 "--seq-len", "256", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["pairs"] == 40 and report["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert report["rewards/margins"] == 0 and report["rewards/accuracies"] == 0
    tok = Tokenizer.load(base_run)
    pairs = pref.tokenize_records(pref.read_records(EXAMPLE), tok, max_length=128).pairs
    record = report["records"][5]
    assert record["chosen_tokens"] == int(pairs[5].chosen[1].sum())
    assert record["ref_chosen_logps"] == record["chosen_logps"] < 0
    with pytest.raises(SystemExit, match="--ref-ckpt"):
        main(["eval", "preference", "--ckpt", base_run, "--data", EXAMPLE])
