"""`phi3jax eval perplexity`: agreement with Hugging Face torch, windows, and input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sentencepiece as spm
from testmodels import load_torch_model, make_random_phi3, make_run_dir

from phi3jax.cli.main import main
from phi3jax.convert.hf import load_hf
from phi3jax.eval.perplexity import perplexity, read_documents, windows

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was not amused, and neither was the farmer.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    "Short.",
    "A longer document: " + " ".join(f"word{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, phi3_vocab):
    return make_random_phi3(tmp_path_factory.mktemp("ppl_model"), seed=3)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_torch_model(model_dir)


def hf_token_nll(torch_model, ids: list[int]) -> np.ndarray:
    """-log p(ids[t] | ids[:t]) for t >= 1, from the HF model in torch (float64 log-softmax)."""
    import torch

    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def hf_windowed_nll(torch_model, ids: list[int], seq_len: int, stride: int) -> list[float]:
    """An independent sliding-window loop in torch: every target t >= 1 once, the first seq_len
    targets from the first window, then `stride` new targets per window with the window's input
    being the seq_len tokens just before the last target."""
    scored: dict[int, float] = {}
    last = min(seq_len, len(ids) - 1)  # last target of the window
    first = 1
    while first <= last:
        start = max(0, last - seq_len)
        nll = hf_token_nll(torch_model, ids[start: last + 1])  # nll[j] is target start + 1 + j
        for t in range(first, last + 1):
            assert t not in scored
            scored[t] = float(nll[t - start - 1])
        first, last = last + 1, min(last + stride, len(ids) - 1)
    assert sorted(scored) == list(range(1, len(ids)))
    return list(scored.values())


@pytest.mark.torch
def test_perplexity_equals_exp_mean_nll_of_hf_torch(model_dir, torch_model, tmp_path):
    directory = model_dir
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--hf-dir", str(directory), "--data", str(data), "--seq-len", "256",
                 "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    nll = np.concatenate([hf_token_nll(torch_model, [1, *sp.encode(d)]) for d in DOCS])
    assert report["tokens"] == len(nll) == sum(len(sp.encode(d)) for d in DOCS)
    assert report["documents"] == len(DOCS)
    # One batch pads the short documents to the longest one's bucket, so this also shows padding
    # does not leak into real tokens. float32 on both sides: agreement ~1e-6; 1e-4 is the spec's bound.
    assert report["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert report["mean_nll"] == pytest.approx(nll.mean(), rel=1e-4)
    assert report["bos"]["id"] == 1 and "BOS" in report["bos"]["convention"]


def test_run_directory_and_step_directory_give_the_hf_result(model_dir, tmp_path, capsys):
    """--ckpt RUN_DIR (its latest step) and --ckpt RUN_DIR/checkpoints/<step> score like --hf-dir."""
    directory = model_dir
    run = make_run_dir(directory, tmp_path / "run", step=10)
    data = tmp_path / "doc.txt"
    data.write_text(DOCS[0])
    reports = []
    for source in (["--hf-dir", str(directory)], ["--ckpt", str(run)], ["--ckpt", str(run / "checkpoints" / "10")]):
        out = tmp_path / "r.json"
        assert main(["eval", "perplexity", *source, "--data", str(data), "--json", str(out), "--no-progress"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[1]["model"] == {"ckpt": str(run)}
    assert reports[0]["tokens"] == reports[1]["tokens"] == reports[2]["tokens"] > 10
    assert reports[1]["perplexity"] == pytest.approx(reports[0]["perplexity"], rel=1e-6)
    assert reports[2]["perplexity"] == pytest.approx(reports[0]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("stride", [32, 12])
@pytest.mark.torch
def test_sliding_windows_match_hf_torch(model_dir, torch_model, stride):
    """A 200-token document through 32-token windows: disjoint (stride 32) and overlapping (12)."""
    directory = model_dir
    cfg, params = load_hf(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    ids = sp.encode(" ".join(DOCS * 3))[:200]
    result = perplexity(params, cfg, [ids], seq_len=32, stride=stride, batch_size=4, progress=False)
    expected = hf_windowed_nll(torch_model, [1, *ids], seq_len=32, stride=stride)
    assert result.tokens == 200
    assert result.perplexity == pytest.approx(math.exp(np.mean(expected)), rel=1e-4)
    full_context = math.exp(hf_token_nll(torch_model, [1, *ids]).mean())
    assert result.perplexity != pytest.approx(full_context, rel=1e-4)  # the windows really cut the context


def test_windows_score_every_token_exactly_once():
    ids = list(range(100, 150))  # ids[0] plays BOS
    for seq_len, stride in [(8, 8), (8, 3), (8, 1), (64, 64), (1, 1)]:
        rows = windows(ids, seq_len, stride)
        targets = [t for r in rows for t in r.query_tok]
        assert targets == ids[1:], (seq_len, stride)
        for r in rows:
            assert len(r.tokens) <= seq_len
            for pos, tok in zip(r.query_pos, r.query_tok, strict=True):  # the target follows its input position
                assert tok == r.tokens[pos] + 1
        for r in rows[1:-1]:  # every full later window: S targets after T - S tokens of context
            assert len(r.tokens) == seq_len and len(r.query_tok) == stride and r.query_pos[0] == seq_len - stride


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\n\nline two\n")
    assert read_documents(f) == ["line one\n\nline two\n"]


@pytest.mark.parametrize("content, name, message", [
    ("", "empty.txt", "is empty"),
    ("  \n\n", "blank.jsonl", "is empty"),
    ('{"text": "a"}\n{"body": "b"}\n', "nokey.jsonl", "line 2: no 'text' field"),
    ('{"text": "a"}\nnot json\n', "bad.jsonl", "line 2: not valid JSON"),
])
def test_bad_data_files_give_clear_errors(tmp_path, capsys, content, name, message):
    data = tmp_path / name
    data.write_text(content)
    # The data is read before the model is loaded: a nonexistent model path is not reached.
    code = main(["eval", "perplexity", "--hf-dir", str(tmp_path / "no-model"), "--data", str(data)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_data_file_and_missing_checkpoint(tmp_path, capsys, model_dir):
    assert main(["eval", "perplexity", "--hf-dir", str(model_dir), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "no data file" in capsys.readouterr().err
    data = tmp_path / "a.txt"
    data.write_text("hello")
    for flag in ("--ckpt", "--hf-dir"):
        assert main(["eval", "perplexity", flag, str(tmp_path / "missing-run"), "--data", str(data)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "missing-run") in err and ("does not exist" in err or "is not a directory" in err)


def test_bos_field_says_which_flag_reproduces_lm_eval_for_this_model(model_dir, tmp_path, capsys):
    """lm-evaluation-harness adds BOS as the model's tokenizer_config.json says: Phi-3's hub checkpoints
    say add_bos_token false, so --no-bos reproduces it for them; a directory that states nothing gets
    transformers' Llama default (BOS), which phi3jax's default reproduces."""
    import shutil

    from phi3jax.tokenizer import Tokenizer

    hub = tmp_path / "hub"
    shutil.copytree(model_dir, hub)
    added = Tokenizer.phi3(hub / "tokenizer.model").added
    (hub / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(t.id): {"content": t.content, "rstrip": t.rstrip} for t in added}}))
    data = tmp_path / "doc.txt"
    data.write_text(DOCS[1])
    bos = {}
    for name, directory, flags in (("hub", hub, []), ("hub --no-bos", hub, ["--no-bos"]), ("plain", model_dir, [])):
        out = tmp_path / "r.json"
        assert main(["eval", "perplexity", "--hf-dir", str(directory), "--data", str(data), "--json", str(out),
                     "--no-progress", *flags]) == 0
        bos[name] = json.loads(out.read_text())["bos"]
        bos[name]["printed"] = capsys.readouterr().out
    assert bos["hub"]["model_adds_bos"] is False and bos["hub"]["matches_lm_eval_default"] is False
    assert "add_bos_token false" in bos["hub"]["model_adds_bos_from"]
    assert bos["hub"]["lm_eval_default"] == "no BOS: reproduced by --no-bos"
    assert "unlike lm-evaluation-harness's default for this model, no BOS: reproduced by --no-bos" in \
        bos["hub"]["printed"]
    assert bos["hub --no-bos"]["id"] is None and bos["hub --no-bos"]["matches_lm_eval_default"] is True
    assert bos["plain"]["model_adds_bos"] is True and bos["plain"]["matches_lm_eval_default"] is True
