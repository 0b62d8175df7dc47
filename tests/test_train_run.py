"""End-to-end training runs: the run directory, the default recipe, init_from, divergence, bad input."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from trainutil import small_config, write_corpus

from phi3jax.cli.train import main as train_main
from phi3jax.config import Phi3Config
from phi3jax.train import checkpoint as ckpt
from phi3jax.train import loop
from phi3jax.train import state as state_lib
from phi3jax.train.config import TrainConfigError
from phi3jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """One small run with every output switched on."""
    run_dir = tmp_path_factory.mktemp("run") / "small"
    cfg = small_config(run_dir, corpus, steps=6, save_every=3, keep_checkpoints=2,
                       **{"data.val_fraction": 0.2, "log.every": 2, "log.eval_every": 3, "log.tensorboard": True,
                          "log.plot": True, "log.baselines": True, "log.sample_prompt": "The", "log.sample_tokens": 8})
    return cfg, loop.train(cfg)


def test_run_directory_holds_every_artifact(finished_run):
    cfg, result = finished_run
    run_dir = result.run_dir
    assert result.status == "completed" and result.step == 6
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    assert ckpt.list_steps(run_dir) == [3, 6]  # keep_checkpoints=2
    step_dir = os.path.join(run_dir, "checkpoints", "6")
    assert {"params", "opt_state", "data_iter", "meta"} <= set(os.listdir(step_dir))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["steps"] == 6 and saved["model"]["hidden_size"] == 32
    assert Phi3Config(**{k: v for k, v in saved["model"].items() if k != "preset"}).vocab_size <= 512


def test_metrics_have_loss_lr_grad_norm_throughput_and_validation(finished_run):
    _, result = finished_run
    records = read_metrics(result.run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert [r["step"] for r in val] == [3, 6] and all(r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in val)
    assert result.val_loss == val[-1]["loss"]
    assert set(result.baselines) == {"unigram", "bigram"} and result.baselines["bigram"] < result.baselines["unigram"]
    assert isinstance(result.sample, str)


def test_a_run_directory_loads_for_generate_chat_and_eval(finished_run):
    _, result = finished_run
    cfg, params, tok = ckpt.load_run(result.run_dir)
    assert cfg.hidden_size == 32 and tok.vocab_size <= cfg.vocab_size
    step_cfg, _, _ = ckpt.load_run(os.path.join(result.run_dir, "checkpoints", "3"))
    assert step_cfg == cfg


def test_the_default_recipe_loss_falls_on_the_default_corpus(tmp_path):
    """The tiny preset on pydoc topics, the real recipe but only 15 steps of 4 x 128 tokens."""
    from phi3jax.train.config import load_config

    cfg = load_config(None, [f"run_dir={tmp_path / 'tiny'}", "steps=15", "batch_size=4", "seq_len=128",
                             "save_every=15", "optim.warmup_steps=5", "log.every=1", "log.eval_every=0",
                             "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
                             "log.sample_prompt=", "data.vocab_size=1024"])
    result = loop.train(cfg)
    losses = [r["loss"] for r in read_metrics(result.run_dir) if r["split"] == "train"]
    assert len(losses) == 15
    assert np.mean(losses[-4:]) < np.mean(losses[:3]) - 0.7, losses
    assert result.val_loss is not None and result.val_loss < result.baselines["unigram"] + 1.0


def test_fine_tuning_starts_from_a_params_only_run_dir(tmp_path, finished_run, corpus):
    """What `convert hf-to-orbax` writes (params only) is a valid init_from=ckpt: source."""
    src_cfg, src = finished_run
    model_cfg, params, _ = ckpt.load_run(src.run_dir)
    converted = tmp_path / "converted"
    converted.mkdir()
    ckpt.write_yaml(str(converted / "config.yaml"), {"model": ckpt.model_fields(model_cfg)})
    os.link(os.path.join(src.run_dir, "tokenizer.model"), converted / "tokenizer.model")
    ckpt.save_params(str(converted), 0, params, model_cfg)
    cfg = small_config(tmp_path / "ft", corpus, steps=2, init_from=f"ckpt:{converted}",
                       **{"optim.learning_rate": 1e-9, "optim.warmup_steps": 0})
    result = loop.train(cfg)
    # Starting from the source weights, a ~0 learning rate leaves its loss where the source ended.
    first = [r for r in read_metrics(result.run_dir) if r["split"] == "train"][0]["loss"]
    src_last = [r for r in read_metrics(src.run_dir) if r["split"] == "train"][-1]["loss"]
    assert first < src_last + 0.5
    _, ft_params, _ = ckpt.load_run(result.run_dir)
    np.testing.assert_allclose(np.asarray(ft_params["embed"]), np.asarray(params["embed"]), atol=1e-6)
    # Running train.py on the params-only directory itself is refused with the fix.
    with pytest.raises(TrainConfigError, match="init_from=ckpt"):
        loop.train(small_config(converted, corpus))


def test_init_from_hf_fine_tunes_a_hugging_face_checkpoint(tmp_path, corpus):
    from conftest import make_hf_dir

    from phi3jax.train.data import train_sentencepiece

    hf = tmp_path / "hf"
    make_hf_dir(hf, vocab_size=512)
    tok = train_sentencepiece([open(os.path.join(corpus, f)).read() for f in sorted(os.listdir(corpus))], 512,
                              str(hf / "tokenizer.model"))
    assert tok.vocab_size <= 512
    cfg = small_config(tmp_path / "ft", corpus, steps=2, init_from=f"hf:{hf}", model={"dtype": "float32"})
    result = loop.train(cfg)
    loaded, _, _ = ckpt.load_run(result.run_dir)
    assert loaded.hidden_size == 64 and loaded.vocab_size == 512
    with pytest.raises(TrainConfigError, match="model.hidden_size"):
        loop.train(small_config(tmp_path / "ft2", corpus, init_from=f"hf:{hf}", model={"hidden_size": 32}))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real_step = state_lib.train_step

    def poisoned(state, batch, *args, **kw):
        new, metrics = real_step(state, batch, *args, **kw)
        metrics["loss"] = jnp.where(state.step == 4, jnp.nan, metrics["loss"])  # the 5th step
        return new, metrics

    monkeypatch.setattr(state_lib, "train_step", poisoned)
    cfg = small_config(tmp_path / "nan", corpus, steps=8, save_every=2)
    with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 5.*last good checkpoint is step 4"):
        loop.train(cfg)
    assert ckpt.list_steps(cfg.run_dir) == [2, 4]
    monkeypatch.setattr(state_lib, "train_step", real_step)
    cfg4, params, _ = ckpt.load_run(cfg.run_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(params))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.parametrize("override, message", [
    ({"seq_len": 4096}, r"seq_len=4096 exceeds the model's max_position_embeddings=128"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size=100 is smaller than the tokenizer"),
])
def test_bad_run_settings_are_clear_errors(tmp_path, corpus, override, message):
    cfg = small_config(tmp_path / "bad", corpus, **{k: v if k != "model" else {**small_config(tmp_path, corpus)
                                                                               .model, **v}
                                                   for k, v in override.items()})
    with pytest.raises(TrainConfigError, match=message):
        loop.train(cfg)


def test_train_py_reports_bad_input_and_exits_nonzero(tmp_path, capsys):
    def run(*args):
        code = train_main([*args, f"run_dir={tmp_path / 'r'}"])
        return code, capsys.readouterr().err

    (tmp_path / "empty.txt").write_text("")
    code, err = run(f"data.path={tmp_path / 'empty.txt'}")
    assert code == 2 and "empty.txt is empty" in err
    code, err = run("optim.lerning_rate=1")
    assert code == 2 and "optim.lerning_rate: unknown config key" in err
    (tmp_path / "x.jsonl").write_text("not json\n")
    code, err = run(f"data.path={tmp_path / 'x.jsonl'}", "data.format=jsonl")
    assert code == 2 and "x.jsonl:1: not valid JSON" in err
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    code, err = run(f"data.path={tmp_path / 'c.jsonl'}", "data.format=chat")
    assert code == 2 and "unknown role 'wizard'" in err
    code, err = run("seq_len=100000")
    assert code == 2 and "seq_len=100000 exceeds the model's max_position_embeddings" in err


def test_train_py_runs_as_a_script():
    from trainutil import run_train_py

    done = run_train_py(["--print-config", "steps=3"])
    assert done.returncode == 0 and "steps: 3" in done.stdout


def test_chat_fine_tuning_runs_with_the_phi3_tokenizer(tmp_path, phi3_vocab):
    """data.format=chat with the real Phi-3 vocabulary (tokenizer.model + its added tokens): the model's
    vocab follows it (32064), and only part of each batch (the assistant replies) carries loss."""
    import pathlib

    from phi3jax.train.data import Tokenize, read_documents

    chats = pathlib.Path(__file__).resolve().parent.parent / "configs" / "data" / "chat_example.jsonl"
    cfg = small_config(tmp_path / "sft", str(chats), steps=2, **{"data.format": "chat",
                                                                 "data.tokenizer": str(phi3_vocab)})
    result = loop.train(cfg)
    model_cfg, _, tok = ckpt.load_run(result.run_dir)
    assert model_cfg.vocab_size == 32064 and tok.token_id("<|end|>") == 32007
    # Counted tokens per step: the assistant replies of the packed conversations, never the whole rows.
    docs = read_documents(str(chats), "chat")
    examples = [Tokenize(tok).map(d) for d in docs]
    share = sum(e["loss_mask"].sum() for e in examples) / sum(len(e["inputs"]) for e in examples)
    assert 0.2 < share < 0.8
    for record in (r for r in read_metrics(result.run_dir) if r["split"] == "train"):
        assert 0 < record["tokens"] < cfg.batch_size * cfg.seq_len * 0.8
