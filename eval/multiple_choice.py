"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores it.

Each question becomes one request per choice: (prompt, " " + choice). The request is tokenised
the harness's way (`encode_pair`: trailing whitespace of the context moves onto the
continuation, the whole string is encoded once, and the continuation is what the whole has
beyond the context's own encoding). The score of a choice is the summed log-probability of its
tokens. Two accuracies:

  acc       argmax of the summed log-likelihoods;
  acc_norm  argmax of log-likelihood / len(choice): the choice's length in characters (without
            the leading space), which is what the harness's code divides by (its docs call it
            byte-length normalisation; the two agree on ASCII text).

Ties go to the first choice (numpy argmax), as in the harness.

Tasks:
  mmlu       the original release (Hendrycks et al.): data/{dev,val,test}/<subject>_<split>.csv,
             no header, columns question, A, B, C, D, answer letter. Prompt (the harness's `mmlu`
             task and the original evaluate.py): "The following are multiple choice questions
             (with answers) about <subject with spaces>.\n\n", then K dev examples (the first K,
             as the harness's first_n sampler) each "<question>\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:
             <letter>\n\n", then the test question ending in "Answer:". Choices A, B, C, D.
  hellaswag  the release JSONL (ctx_a, ctx_b, activity_label, endings, label). Context
             preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices the
             preprocessed endings, where preprocess strips, turns " [title]" into ". ", drops
             other [bracketed] tags and collapses double spaces. K-shot examples are the first K
             of --fewshot-data, joined with blank lines (the harness samples them at random
             from the train split, so K > 0 differs from its numbers in the draw only).

BOS: by default every prompt starts with the BOS token (how Phi-3 and train.py's models see
text). lm-evaluation-harness's HF backend does what the model's tokenizer does (its
tokenizer_config.json's `add_bos_token`): no BOS for Phi-3's hub checkpoints, whose tokenizers say
false, so pass add_bos=False / --no-bos to reproduce its scores for them (docs/evaluate.md).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.eval.loglikelihood import encode_pair, loglikelihoods
from phi3jax.eval.perplexity import EvalDataError
from phi3jax.model import Params

LETTERS = ("A", "B", "C", "D")
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
TASKS = ("mmlu", "hellaswag")


@dataclasses.dataclass(frozen=True)
class Item:
    """One scored question: the prompt, the choices (each scored as " " + choice) and the gold index."""

    id: str
    group: str
    context: str
    choices: tuple[str, ...]
    gold: int


# --------------------------------------------------------------------------------------- MMLU
@dataclasses.dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS


def read_mmlu_csv(path: str) -> list[MMLUQuestion]:
    """Rows of one MMLU CSV (release format: no header; a header row naming the six columns is
    also accepted). Errors name the file, the line and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no MMLU CSV at {path!r}")
    rows: list[tuple[int, list[str]]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        line = 1
        for row in reader:  # a quoted cell may span lines: report the line the row starts on
            if any(cell.strip() for cell in row):
                rows.append((line, row))
            line = reader.line_num + 1
    if not rows:
        raise EvalDataError(f"{path} is empty: no questions")
    columns, expected = list(range(len(MMLU_COLUMNS))), len(MMLU_COLUMNS)
    header = [cell.strip().lower() for cell in rows[0][1]]
    if header and header[0] == "question":
        missing = [c for c in MMLU_COLUMNS if c.lower() not in header]
        if missing:
            raise EvalDataError(f"{path}: the header has no column {', '.join(map(repr, missing))}; "
                                f"MMLU CSVs need {', '.join(MMLU_COLUMNS)}")
        columns, expected = [header.index(c.lower()) for c in MMLU_COLUMNS], len(header)
        rows = rows[1:]
        if not rows:
            raise EvalDataError(f"{path} has a header but no questions")
    out = []
    for lineno, row in rows:
        if len(row) != expected:
            raise EvalDataError(f"{path} line {lineno}: {len(row)} columns, expected {expected} "
                                f"({', '.join(MMLU_COLUMNS)}); is a column missing?")
        question, a, b, c, d, answer = (row[i] for i in columns)
        letter = answer.strip().upper()
        if letter not in LETTERS:
            raise EvalDataError(f"{path} line {lineno}: answer {answer!r} is not one of A, B, C, D")
        out.append(MMLUQuestion(question, (a, b, c, d), LETTERS.index(letter)))
    return out


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def mmlu_question_text(q: MMLUQuestion) -> str:
    """'<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' (the harness strips the question)."""
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, q.choices, strict=True))
    return f"{q.question.strip()}\n{options}Answer:"


def mmlu_prompt(subject: str, question: MMLUQuestion, shots: Sequence[MMLUQuestion]) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    examples = "".join(f"{mmlu_question_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return header + examples + mmlu_question_text(question)


_SPLIT_SUFFIX = re.compile(r"_(test|val|dev)$")


def _mmlu_files(path: str, split: str) -> list[tuple[str, str, str | None]]:
    """(subject, csv path, dev csv path or None) for a release root, a split folder, or one CSV."""
    if os.path.isdir(path):
        folder = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
        files = sorted(glob.glob(os.path.join(folder, "*.csv")))
        if not files:
            raise EvalDataError(f"no MMLU CSV files in {folder} (expected <subject>_{split}.csv files, or a "
                                f"release root with a {split}/ folder)")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no MMLU data at {path!r}")
    out = []
    for file in files:
        stem = os.path.splitext(os.path.basename(file))[0]
        subject = _SPLIT_SUFFIX.sub("", stem)
        folder = os.path.dirname(os.path.abspath(file))
        candidates = [os.path.join(os.path.dirname(folder), "dev", f"{subject}_dev.csv"),
                      os.path.join(folder, f"{subject}_dev.csv")]
        dev = next((c for c in candidates if os.path.isfile(c) and os.path.abspath(c) != os.path.abspath(file)),
                   None)
        out.append((subject, file, dev))
    return out


def load_mmlu(path: str | os.PathLike, shots: int = 0, split: str = "test", subjects: Sequence[str] | None = None,
              limit: int | None = None) -> list[Item]:
    """MMLU items (K-shot prompts from each subject's dev CSV) from a release root, a folder of
    <subject>_<split>.csv files, or a single CSV."""
    files = _mmlu_files(os.fspath(path), split)
    if subjects:
        known = {s for s, _, _ in files}
        unknown = sorted(set(subjects) - known)
        if unknown:
            raise EvalDataError(f"unknown subject(s) {unknown}; found {sorted(known)}")
        files = [f for f in files if f[0] in set(subjects)]
    items = []
    for subject, file, dev in files:
        shot_questions: list[MMLUQuestion] = []
        if shots > 0:
            if dev is None:
                raise EvalDataError(f"{shots}-shot prompts for {subject!r} need its dev split: no "
                                    f"{subject}_dev.csv in ../dev/ or next to {file}")
            shot_questions = read_mmlu_csv(dev)
            if len(shot_questions) < shots:
                raise EvalDataError(f"{dev} has {len(shot_questions)} questions, fewer than --shots {shots}")
            shot_questions = shot_questions[:shots]
        questions = read_mmlu_csv(file)[:limit]
        for k, q in enumerate(questions):
            items.append(Item(f"{subject}/{k}", subject, mmlu_prompt(subject, q, shot_questions), LETTERS, q.answer))
    return items


# ---------------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(context, endings, label) per line of a HellaSwag JSONL, preprocessed as the harness does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HellaSwag JSONL at {path!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(doc, dict):
                raise EvalDataError(f"{path} line {lineno}: expected a JSON object")
            missing = [k for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label") if k not in doc]
            if missing:
                hint = " (the HellaSwag test split is unlabelled; use the validation split)" if missing == [
                    "label"] else ""
                raise EvalDataError(f"{path} line {lineno}: missing field(s) {missing}{hint}")
            endings = doc["endings"]
            if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
                raise EvalDataError(f"{path} line {lineno}: 'endings' must be a list of at least two strings")
            try:
                label = int(doc["label"])
            except (TypeError, ValueError):
                raise EvalDataError(f"{path} line {lineno}: label {doc['label']!r} is not an integer") from None
            if not 0 <= label < len(endings):
                raise EvalDataError(f"{path} line {lineno}: label {label} is outside 0..{len(endings) - 1}")
            context = doc["ctx_a"] + " " + str(doc["ctx_b"]).capitalize()
            out.append((hellaswag_preprocess(doc["activity_label"] + ": " + context),
                        tuple(hellaswag_preprocess(e) for e in endings), label))
    if not out:
        raise EvalDataError(f"{path} is empty: no questions")
    return out


def load_hellaswag(path: str | os.PathLike, shots: int = 0, fewshot_path: str | None = None,
                   limit: int | None = None) -> list[Item]:
    """HellaSwag items from a JSONL file (or a folder holding hellaswag_val.jsonl)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if fewshot_path is None and os.path.isfile(os.path.join(path, "hellaswag_train.jsonl")):
            fewshot_path = os.path.join(path, "hellaswag_train.jsonl")
        path = os.path.join(path, "hellaswag_val.jsonl")
    docs = read_hellaswag(path)[:limit]
    prefix = ""
    if shots > 0:
        if fewshot_path is None:
            raise EvalDataError(f"--shots {shots} for hellaswag needs --fewshot-data (e.g. hellaswag_train.jsonl)")
        examples = read_hellaswag(fewshot_path)
        if len(examples) < shots:
            raise EvalDataError(f"{fewshot_path} has {len(examples)} examples, fewer than --shots {shots}")
        prefix = "".join(f"{ctx} {endings[gold]}\n\n" for ctx, endings, gold in examples[:shots])
    return [Item(f"hellaswag/{k}", "hellaswag", prefix + ctx, endings, gold)
            for k, (ctx, endings, gold) in enumerate(docs)]


# ------------------------------------------------------------------------------------ scoring
def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample variance, as the harness reports it."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def score_items(params: Params, cfg: Phi3Config, tokenizer: Any, items: Sequence[Item], add_bos: bool = True,
                batch_size: int = 8, max_length: int | None = None, progress: bool | str = True
                ) -> list[dict[str, Any]]:
    """Per-question results: log-likelihood of every choice, acc and acc_norm predictions."""
    if not items:
        raise EvalDataError("no questions to score")
    bos = tokenizer.bos_id if add_bos else None
    requests = []
    for item in items:
        if not 0 <= item.gold < len(item.choices):
            raise EvalDataError(f"{item.id}: gold index {item.gold} is outside its {len(item.choices)} choices")
        for choice in item.choices:
            context_ids, continuation_ids = encode_pair(tokenizer.encode, item.context, " " + choice, bos)
            if not context_ids:
                raise EvalDataError(f"{item.id}: empty prompt; score with a BOS token (do not pass --no-bos)")
            requests.append((context_ids, continuation_ids))
    scored = loglikelihoods(params, cfg, requests, max_length=max_length, batch_size=batch_size, progress=progress)
    results, k = [], 0
    for item in items:
        lls = np.array([ll for ll, _ in scored[k: k + len(item.choices)]])
        greedy = [g for _, g in scored[k: k + len(item.choices)]]
        k += len(item.choices)
        lengths = np.array([float(len(c)) for c in item.choices])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
        results.append({"id": item.id, "group": item.group, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                        "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
                        "loglikelihoods": lls.tolist(), "is_greedy": greedy})
    return results


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-group and overall acc / acc_norm. `overall` averages over questions (the harness's
    size-weighted MMLU aggregate); `macro` averages the groups' accuracies."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    per_group = {g: {"n": len(rs), "acc": float(np.mean([r["acc"] for r in rs])),
                     "acc_norm": float(np.mean([r["acc_norm"] for r in rs]))} for g, rs in sorted(groups.items())}
    acc = [r["acc"] for r in results]
    acc_norm = [r["acc_norm"] for r in results]
    overall = {"n": len(results), "acc": float(np.mean(acc)), "acc_stderr": _stderr(acc),
               "acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": _stderr(acc_norm)}
    macro = {"acc": float(np.mean([g["acc"] for g in per_group.values()])),
             "acc_norm": float(np.mean([g["acc_norm"] for g in per_group.values()]))}
    return {"overall": overall, "macro": macro, "groups": per_group}


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one line per group, then the overall (question-weighted) line."""
    rows = [(g, s["n"], s["acc"], s["acc_norm"]) for g, s in summary["groups"].items()]
    width = max([len("overall"), *(len(g) for g, *_ in rows)])
    lines = [f"{'group':<{width}}  {'n':>6}  {'acc':>7}  {'acc_norm':>8}", "-" * (width + 35)]
    lines += [f"{g:<{width}}  {n:>6d}  {a:>7.4f}  {an:>8.4f}" for g, n, a, an in rows]
    o = summary["overall"]
    if len(rows) > 1:
        lines.append("-" * (width + 35))
    lines.append(f"{'overall':<{width}}  {o['n']:>6d}  {o['acc']:>7.4f}  {o['acc_norm']:>8.4f}")
    return "\n".join(lines)


def load_task(task: str, data: str | os.PathLike, shots: int = 0, limit: int | None = None,
              subjects: Sequence[str] | None = None, split: str = "test", fewshot_data: str | None = None
              ) -> list[Item]:
    """The items of `task` ("mmlu" or "hellaswag") read from `data`, with K-shot prompts."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if task == "mmlu":
        return load_mmlu(data, shots=shots, split=split, subjects=subjects, limit=limit)
    if task == "hellaswag":
        return load_hellaswag(data, shots=shots, fewshot_path=fewshot_data, limit=limit)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def evaluate(params: Params, cfg: Phi3Config, tokenizer: Any, items: Sequence[Item], add_bos: bool = True,
             batch_size: int = 8, max_length: int | None = None, progress: bool | str = True) -> dict[str, Any]:
    """Score `items` and return the JSON-ready report: overall, macro and per-group accuracies,
    the BOS convention, and every question's log-likelihoods and predictions."""
    results = score_items(params, cfg, tokenizer, items, add_bos=add_bos, batch_size=batch_size,
                          max_length=max_length, progress=progress)
    bos = ({"id": tokenizer.bos_id, "convention": "every prompt starts with BOS"} if add_bos
           else {"id": None, "convention": "no BOS"})
    return {"bos": bos, "acc_norm": "log-likelihood / length of the choice in characters (lm-evaluation-harness)",
            **summarize(results), "questions": results}
