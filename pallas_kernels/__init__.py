"""Pallas attention kernels for Phi-3: flash attention (TPU Mosaic, GPU Triton) and decode attention.

    flash_attention(q, k, v, ...)          training / prefill, forward + custom-VJP backward
    decode_attention(q, k_cache, v_cache, lengths, ...)   one query per row vs a KV cache
    mha_reference, decode_reference        plain-JAX references (what the tests compare to)
    sharded_flash_attention, sharded_decode_attention   shard_map wrappers for use under a Mesh
"""

from pallas_kernels.common import BlockSizes
from pallas_kernels.ops import decode_attention, default_backend, flash_attention
from pallas_kernels.reference import decode_reference, mha_reference
from pallas_kernels.sharded import sharded_decode_attention, sharded_flash_attention

__all__ = ["BlockSizes", "decode_attention", "decode_reference", "default_backend", "flash_attention",
           "mha_reference", "sharded_decode_attention", "sharded_flash_attention"]
