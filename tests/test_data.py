"""Data pipelines: sources, packing with segment ids, deterministic shuffling, per-process shards,
checkpointable iterator state, and clear errors on bad input."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest

from phi3jax.train import data
from phi3jax.train.data import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return data.train_sentencepiece(data.default_corpus()[:30], 512, str(out))


@pytest.fixture(scope="module")
def docs():
    return [t[:1500] for t in data.default_corpus()[:20]]


def test_default_corpus_is_the_shipped_snapshot_of_the_pydoc_topics(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # never the running interpreter's copy
    corpus = data.default_corpus()
    assert len(corpus) == 258 and sum(map(len, corpus)) == 491_797  # the same on every Python
    assert any("for_stmt" in t or "The \"for\" statement" in t for t in corpus)
    assert data.default_corpus_identity()["sha256"] == data.DEFAULT_CORPUS_SHA256
    damaged = tmp_path / "topics.json.gz"
    damaged.write_bytes(gzip.compress(b'{"for": "changed"}'))
    monkeypatch.setattr(data, "DEFAULT_CORPUS_FILE", str(damaged))
    with pytest.raises(DataError, match="damaged"):
        data.default_corpus()


def test_trained_tokenizer_reserves_the_phi3_chat_tokens(tokenizer):
    for token in data.CHAT_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.token_id(token)]
    assert tokenizer.eos_id == tokenizer.token_id("<|endoftext|>")
    assert tokenizer.stop_ids == (tokenizer.token_id("<|end|>"), tokenizer.eos_id)


def test_split_holds_out_about_the_fraction_of_characters_deterministically(docs):
    corpus = data.default_corpus()
    train, val = data.split_train_val(corpus, 0.1, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(corpus)
    share = sum(len(corpus[i]) for i in val) / sum(map(len, corpus))
    assert 0.05 < share <= 0.1
    assert np.array_equal(data.split_train_val(corpus, 0.1, seed=0)[1], val)
    assert not np.array_equal(data.split_train_val(corpus, 0.1, seed=1)[1], val)


def _rows(docs, tokenizer, seq_len=64, split=True):
    return list(data.PackIterDataset(
        data._documents(docs, np.arange(len(docs))).map(data.Tokenize(tokenizer)).to_iter_dataset(),
        seq_len, split))


def test_packing_lays_documents_in_segments_with_restarting_positions(docs, tokenizer):
    rows = _rows(docs, tokenizer)
    examples = [data.Tokenize(tokenizer).map(d) for d in docs]
    total = sum(len(e["inputs"]) for e in examples)
    assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == total  # nothing dropped or padded mid-way
    # Concatenating every segment's tokens gives back the documents' tokens in order.
    stream = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in rows])
    assert np.array_equal(stream, np.concatenate([e["inputs"] for e in examples]))
    for r in rows:
        for seg in np.unique(r["segment_ids"][r["segment_ids"] > 0]):
            where = np.flatnonzero(r["segment_ids"] == seg)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(r["positions"][where], np.arange(len(where)))  # positions restart
        assert np.all(r["loss_mask"][r["segment_ids"] == 0] == 0)


def test_targets_are_shifted_within_each_document_never_across(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon"]
    row = _rows(docs, tokenizer, seq_len=64)[0]
    first = tokenizer.encode(docs[0], add_bos=True) + [tokenizer.eos_id]
    n = len(first) - 1
    assert row["inputs"][:n].tolist() == first[:-1] and row["targets"][:n].tolist() == first[1:]
    assert row["inputs"][n] == tokenizer.bos_id  # the next document starts with its own BOS input
    assert row["segment_ids"][n - 1] == 1 and row["segment_ids"][n] == 2


def test_without_splitting_a_document_that_does_not_fit_starts_the_next_row(docs, tokenizer):
    rows = _rows(docs[:6], tokenizer, seq_len=256, split=False)
    lengths = [len(data.Tokenize(tokenizer).map(d)["inputs"]) for d in docs[:6]]
    starts = [r["positions"][r["segment_ids"] > 0] == 0 for r in rows]
    pieces = sum(int(s.sum()) for s in starts)
    assert pieces == sum(-(-n // 256) for n in lengths)  # only over-long documents are cut


def _collect(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in data.BATCH_KEYS)


def test_iterator_state_restores_the_exact_position(docs, tokenizer):
    ds = data.train_batches(docs, np.arange(len(docs)), tokenizer, seq_len=64, batch_size=3, seed=5)
    it = iter(ds)
    _collect(it, 7)  # mid-document, mid-epoch
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _collect(it, 30)  # crosses epoch boundaries
    fresh = iter(ds)
    fresh.set_state(state)
    assert _same(_collect(fresh, 30), expected)


def test_shuffle_is_deterministic_by_seed_and_differs_per_epoch(docs, tokenizer):
    def first_tokens(seed, n):
        it = iter(data.train_batches(docs, np.arange(len(docs)), tokenizer, seq_len=512, batch_size=1,
                                     seed=seed, split_documents=False))
        return [int(next(it)["inputs"][0, 1]) for _ in range(n)]

    a = first_tokens(0, 2 * len(docs))
    assert a == first_tokens(0, 2 * len(docs))
    assert a != first_tokens(1, 2 * len(docs))
    assert a[: len(docs)] != a[len(docs):]  # epoch 2 is shuffled differently


def test_rows_read_disjoint_documents(tokenizer):
    docs = [f"document number {k}" for k in range(12)]
    it = iter(data.train_batches(docs, np.arange(12), tokenizer, seq_len=16, batch_size=3, seed=0,
                                 split_documents=False))
    seen = [set() for _ in range(3)]
    for _ in range(4):
        batch = next(it)
        for r in range(3):
            seen[r].add(tokenizer.decode(batch["inputs"][r][1:], skip_special=True).split("number")[-1].split()[0])
    assert all(len(s) == 4 for s in seen)
    assert set.union(*seen) == {str(k) for k in range(12)} and sum(map(len, seen)) == 12


def test_the_global_batch_does_not_depend_on_which_process_builds_which_rows(docs, tokenizer):
    """Three "processes" holding rows {0, 1}, {2}, {3, 4, 5} of a global batch of 6 build exactly the rows
    of one process holding all six; their states, merged, move a one-process iterator (and back)."""
    def stream(rows=None):
        return iter(data.train_batches(docs, np.arange(len(docs)), tokenizer, seq_len=64, batch_size=6, seed=2,
                                       rows=rows))

    whole, parts = stream(), [stream([0, 1]), stream([2]), stream([3, 4, 5])]
    for _ in range(9):  # mid-document, across epochs
        full, pieces = next(whole), [next(p) for p in parts]
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in pieces]))
    merged = json.loads(json.dumps(data.merge_states([p.get_state() for p in parts])))
    assert merged == whole.get_state()
    expected = _collect(whole, 5)
    resumed = stream()
    resumed.set_state(merged)  # saved by three processes, resumed by one
    assert _same(_collect(resumed, 5), expected)
    two = [stream([0, 1, 2]), stream([3, 4, 5])]  # ... and by two
    for p in two:
        p.set_state(merged)
    halves = [next(p) for p in two]
    assert _same([{k: np.concatenate([h[k] for h in halves]) for k in data.BATCH_KEYS}], expected[:1])
    with pytest.raises(data.DataError, match="global batch size"):
        iter(data.train_batches(docs, np.arange(len(docs)), tokenizer, seq_len=64, batch_size=8, seed=2)
             ).set_state(merged)


def test_eval_batches_pad_to_whole_batches_without_loss(docs, tokenizer):
    batches = data.eval_batches(docs, np.arange(5), tokenizer, seq_len=64, batch_size=4)
    rows = _rows(docs[:5], tokenizer)
    assert len(batches) == -(-len(rows) // 4)
    assert sum(b["loss_mask"].sum() for b in batches) == sum(r["loss_mask"].sum() for r in rows)


# ----------------------------------------------------------------------------- sources
def test_text_jsonl_and_array_record_sources_read_the_same_documents(tmp_path):
    texts = ["first document\nwith two lines", "second document", "third"]
    (tmp_path / "t").mkdir()
    for k, t in enumerate(texts):
        (tmp_path / "t" / f"{k}.txt").write_text(t)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": k}) for k, t in enumerate(texts)) + "\n\n")
    from array_record.python.array_record_module import ArrayRecordWriter

    ar = tmp_path / "d.array_record"
    writer = ArrayRecordWriter(str(ar), "group_size:1")
    for k, t in enumerate(texts):
        writer.write((json.dumps({"text": t}) if k % 2 else t).encode())  # JSON records or raw UTF-8
    writer.close()
    assert list(data.read_documents(str(tmp_path / "t"), "text")) == texts
    assert list(data.read_documents(str(tmp_path / "t" / "*.txt"), "text")) == texts
    assert list(data.read_documents(str(jsonl), "jsonl")) == texts
    source = data.read_documents(str(ar), "array_record")
    assert [source[i] for i in range(len(source))] == texts


def test_doc_separator_splits_a_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("one\n<SEP>\ntwo\n<SEP>\n")
    assert [d.strip() for d in data.read_documents(str(tmp_path / "a.txt"), "text", doc_separator="<SEP>")] == \
        ["one", "two"]


def test_empty_data_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt is empty"):
        data.read_documents(str(tmp_path / "empty.txt"), "text")


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        data.read_documents(str(path), "jsonl")


def test_jsonl_without_the_text_field_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        data.read_documents(str(path), "jsonl")


def test_chat_record_with_an_unknown_role_is_an_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" +
                    json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: message 0 has unknown role 'robot'"):
        data.read_documents(str(path), "chat")


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        data.read_documents(str(tmp_path / "nope*.txt"), "text")


def test_trained_tokenizer_round_trips_code_with_newlines_and_indentation(tokenizer):
    code = "def f(x):\n    return x\n\nfor i in range(3):\n    pass\n"
    ids = tokenizer.encode(code)
    assert tokenizer.sp.unk_id() not in ids
    assert tokenizer.decode(ids) == code
