"""Inference: generation (prefill, then a jitted decode loop over the KV cache) and sampling."""

from phi3jax.inference.generate import GenerateOutput, generate, inference_params, stop_tokens
from phi3jax.inference.sampling import SamplingParams, greedy_tokens, sample_logits

__all__ = ["GenerateOutput", "SamplingParams", "generate", "greedy_tokens", "inference_params", "sample_logits",
           "stop_tokens"]
