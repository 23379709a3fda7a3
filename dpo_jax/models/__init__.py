"""Decoder-only transformers (Flax NNX) and their weight converters.

Training: `make_apply_fn(config)(params, tokens, positions, segment_ids) -> (hidden, unembedding)`.
Decoding with a KV cache: `cache = init_cache(config, batch_size, max_length)`, then
`decode_fn = jax.jit(make_decode_fn(config), donate_argnums=1)` and
`logits, cache = decode_fn(params, cache, tokens, positions, valid)` ([N, L] int32, int32, bool;
logits [N, L, V] float32): once with the whole left-padded prompt, then once per new token.
"""

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.convert_hf import load_hf, params_from_hf_tensors, save_hf
from dpo_jax.models.hf_config import ARCHITECTURES, FAMILIES
from dpo_jax.models.kv_cache import KVCache, init_cache
from dpo_jax.models.transformer import (
    init_params,
    logical_axes,
    logits,
    logits_from_hidden,
    make_apply_fn,
    make_decode_fn,
)

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "KVCache",
    "ModelConfig",
    "init_cache",
    "init_params",
    "load_hf",
    "logical_axes",
    "logits",
    "logits_from_hidden",
    "make_apply_fn",
    "make_decode_fn",
    "params_from_hf_tensors",
    "save_hf",
]
