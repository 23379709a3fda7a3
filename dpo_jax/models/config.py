"""ModelConfig: a frozen description of every supported decoder, read from HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from dpo_jax.models import hf_config as _hf
from dpo_jax.models.hf_config import FAMILIES, ROPE_TYPES

LAYER_TYPES = ("full_attention", "sliding_attention")
DTYPES = ("float32", "bfloat16", "float16")
# "splash": Pallas TPU kernels; "splash_interpret": the same in the Pallas interpreter (CPU tests).
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "splash_interpret")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text) family.

    Hashable and registered as a static pytree (no leaves), so it can be passed through
    `jax.jit` / `jax.eval_shape` as an ordinary argument. Built by hand for random-weight models
    (benchmarks, tests) or from a Hugging Face config.json with `ModelConfig.from_hf_config`.
    """

    family: str  # one of FAMILIES, the Hugging Face model_type
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, the MLP width
    num_layers: int
    num_heads: int  # H, query heads
    num_kv_heads: int  # K, key/value heads; H % K == 0 (grouped-query attention)
    head_dim: int
    rms_norm_eps: float = 1e-6
    # RoPE of global (full-attention) layers: base, and scaling of the inverse frequencies.
    rope_theta: float = 10_000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0  # "linear" and "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3"
    rope_high_freq_factor: float = 4.0  # "llama3"
    rope_original_max_position_embeddings: int = 8192  # "llama3"
    # RoPE base of sliding-window layers (Gemma 3's rope_local_base_freq); None: same as global,
    # with the same scaling. When set, local layers use it with no scaling (as transformers does).
    rope_local_theta: float | None = None
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES; () means all full
    sliding_window: int | None = None  # a query at i sees keys j with 0 <= i - j < window
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (Qwen3, Gemma 3)
    # Gemma 3 specifics.
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w)
    post_norms: bool = False  # extra RMSNorm after attention and after the MLP
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the compute dtype
    mlp_activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power; None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    # Kept only to write config.json back.
    max_position_embeddings: int = 4096
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Numerics and memory.
    dtype: str = "float32"  # compute dtype, one of DTYPES
    param_dtype: str = "float32"  # storage dtype of the params
    remat: bool = False  # recompute each layer's activations in the backward pass
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS; "cudnn" runs on NVIDIA GPUs only
    # Under context parallelism, tokens per query block and per key block of the blocked
    # attention (`context_parallel`); 0 = one zigzag block, T / (2 x the sequence axis).
    attention_block_size: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported (supported: {FAMILIES})")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries; "
                f"expected num_layers={self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types contains {bad}; allowed: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError(
                "layer_types has sliding_attention layers but sliding_window is not set"
            )
        if self.attention_block_size < 0:
            raise ValueError(f"attention_block_size={self.attention_block_size} must be >= 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be > 0 or None")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported (supported: {ROPE_TYPES})"
            )
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r}; allowed: 'silu', 'gelu_tanh'"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; allowed: {ATTENTION_IMPLS}")
        if self.attention_impl == "cudnn" and self.attn_logit_softcapping is not None:
            raise ValueError("attention_impl='cudnn' does not support attn_logit_softcapping")
        for name in ("bos_token_id", "eos_token_id"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def attention_scale(self) -> float:
        """Multiplier of q·k: query_pre_attn_scalar ** -0.5 (Gemma 3) or head_dim ** -0.5."""
        scalar = self.query_pre_attn_scalar or self.head_dim
        return 1.0 / math.sqrt(scalar)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. `config.replace(dtype="bfloat16", remat=True)`)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(
        cls, hf_config: dict[str, Any], source: str = "config.json", **overrides: Any
    ) -> ModelConfig:
        """Reads a Hugging Face config.json (as a dict), as transformers 4.57 or 5.x wrote it;
        `source` names it in errors; `overrides` set dtype, remat, etc.

        Raises:
            ValueError: unsupported architecture (the message lists the supported ones), a
                setting this implementation does not support, or RoPE settings that are missing,
                unknown or contradictory (see `dpo_jax.models.hf_config`); it names `source`.
        """
        return cls(**{**_hf.fields_from_hf(hf_config, source), **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers 4.57 and 5.x both load for these weights."""
        return _hf.hf_config_from(self)
