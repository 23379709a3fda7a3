"""Decoder-only transformers (Flax NNX) and their weight converters."""

from dpo_jax.models.config import ARCHITECTURES, FAMILIES, ModelConfig
from dpo_jax.models.convert_hf import load_hf, params_from_hf_tensors, save_hf
from dpo_jax.models.transformer import (
    init_params,
    logical_axes,
    logits,
    logits_from_hidden,
    make_apply_fn,
)

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "ModelConfig",
    "init_params",
    "load_hf",
    "logical_axes",
    "logits",
    "logits_from_hidden",
    "make_apply_fn",
    "params_from_hf_tensors",
    "save_hf",
]
