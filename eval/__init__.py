"""Evaluation: perplexity and multiple-choice (MMLU, HellaSwag) scoring by log-likelihood.

`phi3jax eval perplexity|multiple-choice` drives these from the command line (eval/cli.py).
"""

from phi3jax.eval.loglikelihood import Row, encode_pair, loglikelihoods, score_rows
from phi3jax.eval.multiple_choice import Item, evaluate, load_hellaswag, load_mmlu, load_task, score_items, summarize
from phi3jax.eval.perplexity import EvalDataError, PerplexityResult, perplexity, perplexity_of_texts, read_documents

__all__ = ["EvalDataError", "Item", "PerplexityResult", "Row", "encode_pair", "evaluate", "load_hellaswag",
           "load_mmlu", "load_task", "loglikelihoods", "perplexity", "perplexity_of_texts", "read_documents",
           "score_items", "score_rows", "summarize"]
