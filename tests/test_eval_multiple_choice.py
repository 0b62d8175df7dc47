"""`phi3jax eval multiple-choice`: lm-evaluation-harness prompts and tokenisation, agreement with an
independent Hugging Face torch scoring, and input errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import sentencepiece as spm
from testmodels import load_torch_model, make_random_phi3

from phi3jax.cli.main import main
from phi3jax.eval.loglikelihood import encode_pair
from phi3jax.eval.multiple_choice import hellaswag_preprocess, load_hellaswag, load_mmlu, read_mmlu_csv

MMLU = {
    "astronomy": {
        "dev": [["What is the closest star to Earth?", "Proxima Centauri", "The Sun", "Sirius", "Vega", "B"],
                ["How many planets orbit the Sun?", "7", "8", "9", "10", "B"],
                ["Which planet has the most moons?", "Earth", "Mars", "Saturn", "Venus", "C"]],
        "test": [["What is a light-year a unit of?", "Time", "Distance", "Speed", "Mass", "B"],
                 ["  Which is the largest planet?\n", "Jupiter", "Mercury", "Mars", "Pluto, a dwarf planet", "A"],
                 ["What is the Sun mostly made of?", "Iron", "Rock", "Hydrogen", "Water", "C"],
                 ["What causes the seasons on Earth?", "Distance", "Axial tilt", "Moon", "Comets", "B"]],
    },
    "high_school_biology": {
        "dev": [["What do plants absorb for photosynthesis?", "Oxygen", "Nitrogen", "Carbon dioxide", "Helium",
                 "C"],
                ["Where is DNA stored in a eukaryotic cell?", "Nucleus", "Ribosome", "Membrane", "Vacuole", "A"]],
        "test": [["Which organelle makes ATP?", "Golgi", "Mitochondrion", "Lysosome", "Nucleolus", "B"],
                 ["Red blood cells carry mainly what?", "Oxygen", "Glucose", "Hormones", "Antibodies", "A"],
                 ["What is the basic unit of life?", "Atom", "Organ", "Tissue", "Cell", "D"]],
    },
}

HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two "
                 "men supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the "
                 "snow on his car."]},
    {"ind": 24, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Choose a "
     "sunny spot.", "ctx_b": "you", "label": "1",
     "endings": ["should [step] plant them in the dark.", "need at least six hours of sun a day.",
                 "can [substeps] water them with soda.", "must paint the pots blue."]},
    {"ind": 30, "activity_label": "Playing piano", "ctx_a": "A woman sits at a piano.", "ctx_b": "she",
     "label": 0, "endings": ["plays a song while people listen.", "eats the piano keys.", "jumps into a pool.",
                             "drives a tractor across the stage."]},
]


def write_mmlu(root, data=MMLU):
    for subject, splits in data.items():
        for split, rows in splits.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, phi3_vocab):
    return make_random_phi3(tmp_path_factory.mktemp("mc_model"), seed=7)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_torch_model(model_dir)


# ---------------------------------------------------------------- the independent torch scorer
def expected_mmlu_prompt(subject: str, shots: list[list[str]], question: list[str]) -> str:
    """The harness's MMLU prompt, written out longhand."""
    def block(row):
        q, a, b, c, d = row[:5]
        return f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    text = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for s in shots:
        text += block(s) + " " + s[5] + "\n\n"
    return text + block(question)


def torch_choice_loglikelihoods(torch_model, sp, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(continuation) for each choice: BOS + context, continuation " " + choice, split as the
    harness does (the continuation's ids are the whole string's ids beyond the context's)."""
    import torch

    out = []
    for choice in choices:
        ctx = [1, *sp.encode(context)]
        whole = [1, *sp.encode(context + " " + choice)]
        cont = whole[len(ctx):]
        with torch.no_grad():
            logits = torch_model(torch.tensor([whole[:-1]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        positions = range(len(ctx) - 1, len(whole) - 1)
        out.append(float(sum(logp[p, t] for p, t in zip(positions, cont, strict=True))))
    return out


# ------------------------------------------------------------------------------------- tests
def test_mmlu_prompt_is_the_harness_format(tmp_path):
    root = write_mmlu(tmp_path / "data")
    items = load_mmlu(root, shots=2)
    first = items[0]
    assert first.group == "astronomy" and first.choices == ("A", "B", "C", "D") and first.gold == 1
    assert first.context == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What is the closest star to Earth?\nA. Proxima Centauri\nB. The Sun\nC. Sirius\nD. Vega\nAnswer: B\n\n"
        "How many planets orbit the Sun?\nA. 7\nB. 8\nC. 9\nD. 10\nAnswer: B\n\n"
        "What is a light-year a unit of?\nA. Time\nB. Distance\nC. Speed\nD. Mass\nAnswer:")
    assert items[1].context.endswith("\nWhich is the largest planet?\nA. Jupiter\nB. Mercury\nC. Mars\n"
                                     "D. Pluto, a dwarf planet\nAnswer:")  # question stripped, quoted comma kept
    assert [i.group for i in items] == ["astronomy"] * 4 + ["high_school_biology"] * 3
    assert items[4].context.startswith("The following are multiple choice questions (with answers) about "
                                       "high school biology.\n\n")


def test_continuation_takes_the_whitespace_and_the_ids_beyond_the_context(phi3_vocab):
    sp = spm.SentencePieceProcessor(model_file=str(phi3_vocab / "tokenizer.model"))
    context, continuation = encode_pair(sp.encode, "Question?\nAnswer: ", "B", bos=1)
    assert context == [1, *sp.encode("Question?\nAnswer:")]  # the trailing space moved to the continuation
    assert continuation == sp.encode("Question?\nAnswer: B")[len(context) - 1:] == [350]  # "▁B"
    _, no_bos = encode_pair(sp.encode, "Answer:", " B", bos=None)
    assert no_bos == [350]


@pytest.mark.torch
def test_mmlu_matches_independent_hf_torch_scoring(model_dir, torch_model, tmp_path):
    directory = model_dir
    root = write_mmlu(tmp_path / "data")
    out = tmp_path / "mmlu.json"
    assert main(["eval", "multiple-choice", "--hf-dir", str(directory), "--task", "mmlu", "--data", str(root),
                 "--shots", "2", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    expected_preds, correct = [], []
    questions = [(s, q, MMLU[s]["dev"][:2]) for s in MMLU for q in MMLU[s]["test"]]
    for (subject, question, shots), got in zip(questions, report["questions"], strict=True):
        lls = torch_choice_loglikelihoods(torch_model, sp, expected_mmlu_prompt(subject, shots, question),
                                          list("ABCD"))
        # float32 forward passes on both sides: log-likelihoods agree to ~1e-5.
        np.testing.assert_allclose(got["loglikelihoods"], lls, rtol=0, atol=2e-4)
        assert min(abs(a - b) for i, a in enumerate(lls) for b in lls[i + 1:]) > 1e-3  # no near-ties to flip
        expected_preds.append(int(np.argmax(lls)))
        correct.append(float(np.argmax(lls) == "ABCD".index(question[5])))
    assert [q["pred"] for q in report["questions"]] == expected_preds
    assert report["overall"]["acc"] == pytest.approx(np.mean(correct))
    assert report["overall"]["n"] == 7 and set(report["groups"]) == set(MMLU)
    assert report["groups"]["astronomy"]["n"] == 4
    assert report["bos"]["id"] == 1


def test_hellaswag_preprocessing():
    assert hellaswag_preprocess(" Home and Garden: [header] How to grow tomatoes [title] Choose a sunny spot. You") \
        == "Home and Garden: How to grow tomatoes. Choose a sunny spot. You"
    assert hellaswag_preprocess("can [substeps] water them with soda.") == "can water them with soda."


@pytest.mark.torch
def test_hellaswag_matches_independent_hf_torch_scoring(model_dir, torch_model, tmp_path):
    directory = model_dir
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in HELLASWAG))
    items = load_hellaswag(data)
    assert items[0].context == ("Removing ice from car: Then, the man writes over the snow covering the window of a "
                                "car, and a woman wearing winter clothes smiles. Then")
    assert items[1].gold == 1 and items[1].choices[2] == "can water them with soda."
    out = tmp_path / "hs.json"
    assert main(["eval", "multiple-choice", "--hf-dir", str(directory), "--task", "hellaswag", "--data", str(data),
                 "--json", str(out), "--no-progress", "--batch-size", "4"]) == 0
    report = json.loads(out.read_text())
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    acc, acc_norm = [], []
    for item, got in zip(items, report["questions"], strict=True):
        lls = torch_choice_loglikelihoods(torch_model, sp, item.context, list(item.choices))
        np.testing.assert_allclose(got["loglikelihoods"], lls, rtol=0, atol=2e-4)
        norm = np.array(lls) / np.array([len(c) for c in item.choices])  # characters, as the harness divides
        assert got["pred"] == int(np.argmax(lls)) and got["pred_norm"] == int(np.argmax(norm))
        acc.append(float(np.argmax(lls) == item.gold))
        acc_norm.append(float(np.argmax(norm) == item.gold))
    assert report["overall"]["acc"] == pytest.approx(np.mean(acc))
    assert report["overall"]["acc_norm"] == pytest.approx(np.mean(acc_norm))


# -------------------------------------------------------------------------------- bad input
def _run_bad(tmp_path, capsys, model=None, data=None, extra=()):
    args = ["eval", "multiple-choice", "--hf-dir", str(model or tmp_path / "never-loaded"), "--task", "mmlu",
            "--data", str(data), *extra]
    code = main(args)
    return code, capsys.readouterr().err


def test_csv_with_a_missing_column(tmp_path, capsys):
    f = tmp_path / "anatomy_test.csv"
    f.write_text("What is the femur?,A bone,A muscle,An organ,A nerve,A\nWhich organ pumps blood?,Lung,Heart,Liver,B\n")
    code, err = _run_bad(tmp_path, capsys, data=f)
    assert code == 2
    assert "anatomy_test.csv line 2: 5 columns, expected 6" in err and "missing" in err


def test_csv_header_missing_a_column(tmp_path):
    f = tmp_path / "anatomy_test.csv"
    f.write_text("question,A,B,C,answer\nWhat is the femur?,A bone,A muscle,An organ,A\n")
    with pytest.raises(ValueError, match="the header has no column 'D'"):
        read_mmlu_csv(str(f))


def test_answer_letter_outside_a_to_d(tmp_path, capsys):
    f = tmp_path / "anatomy_test.csv"
    f.write_text("What is the femur?,A bone,A muscle,An organ,A nerve,A\nWhat pumps blood?,Lung,Heart,Liver,Skin,E\n")
    code, err = _run_bad(tmp_path, capsys, data=f)
    assert code == 2
    assert "line 2: answer 'E' is not one of A, B, C, D" in err


def test_empty_csv(tmp_path, capsys):
    f = tmp_path / "anatomy_test.csv"
    f.write_text("")
    code, err = _run_bad(tmp_path, capsys, data=f)
    assert code == 2 and "anatomy_test.csv is empty" in err


def test_empty_folder_and_missing_dev_split(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run_bad(tmp_path, capsys, data=tmp_path / "empty")
    assert code == 2 and "no MMLU CSV files" in err
    root = write_mmlu(tmp_path / "data", {"astronomy": {"test": MMLU["astronomy"]["test"]}})
    code, err = _run_bad(tmp_path, capsys, data=root, extra=["--shots", "1"])
    assert code == 2 and "need its dev split" in err


def test_checkpoint_path_that_does_not_exist(tmp_path, capsys):
    root = write_mmlu(tmp_path / "data")
    for flag in ("--ckpt", "--hf-dir"):
        code = main(["eval", "multiple-choice", flag, str(tmp_path / "no-such-run"), "--task", "mmlu",
                     "--data", str(root)])
        err = capsys.readouterr().err
        assert code == 2 and str(tmp_path / "no-such-run") in err
        assert "does not exist" in err or "is not a directory" in err


def test_hellaswag_bad_label(tmp_path):
    f = tmp_path / "hs.jsonl"
    f.write_text(json.dumps({**HELLASWAG[0], "label": 7}) + "\n")
    with pytest.raises(ValueError, match="line 1: label 7 is outside 0..3"):
        load_hellaswag(f)


def test_acc_norm_divides_by_choice_characters(monkeypatch, phi3_vocab):
    """acc picks the highest log-likelihood; acc_norm the highest per character of the choice."""
    import phi3jax.eval.multiple_choice as mc
    from phi3jax.eval.multiple_choice import Item, score_items
    from phi3jax.tokenizer import Tokenizer

    # "a" (1 char): -2 -> -2 per char; "bbbbbbbbbb" (10 chars): -10 -> -1 per char.
    monkeypatch.setattr(mc, "loglikelihoods", lambda *a, **k: [(-2.0, False), (-10.0, False)])
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    [result] = score_items(None, None, tok, [Item("q", "g", "Pick:", ("a", "bbbbbbbbbb"), gold=1)])
    assert (result["pred"], result["pred_norm"]) == (0, 1)
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)
