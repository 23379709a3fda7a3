"""ModelConfig: a frozen description of every supported decoder, read from HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

# Hugging Face `architectures[0]` -> our family name (the HF `model_type`).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
FAMILIES = tuple(ARCHITECTURES.values())
_ARCHITECTURE_OF_FAMILY = {family: arch for arch, family in ARCHITECTURES.items()}

LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# "splash": Pallas TPU kernels; "splash_interpret": the same in the Pallas interpreter (CPU tests).
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "splash_interpret")

# transformers' class defaults for the keys a config.json may leave out (transformers 4.57).
_HF_DEFAULTS = {
    "llama": dict(
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=2048,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "mistral": dict(
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "qwen2": dict(
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "qwen3": dict(
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=32768,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        head_dim=128,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "gemma3_text": dict(
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        use_bidirectional_attention=False,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


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
    def from_hf_config(cls, hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a Hugging Face config.json (as a dict); `overrides` set dtype, remat, etc.

        Raises:
            ValueError: unsupported architecture (the message lists the supported ones) or a
                setting this implementation does not support (e.g. an unknown rope_scaling type).
        """
        family = _family_of(hf_config)
        hf = {**_HF_DEFAULTS[family], **{k: v for k, v in hf_config.items() if v is not None}}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window"):
            if key in hf_config:  # an explicit null means "none" here, not "the default"
                hf[key] = hf_config[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in hf:
                raise ValueError(f"config.json ({family}) has no {key!r}")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        num_heads = hf["num_attention_heads"]
        fields = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=float(hf["rope_theta"]),
            tie_word_embeddings=bool(hf["tie_word_embeddings"]),
            max_position_embeddings=hf["max_position_embeddings"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **_rope_scaling_fields(hf.get("rope_scaling")),
        )
        fields.update(_family_fields(family, hf))
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers needs to load these weights (float32 storage)."""
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURE_OF_FAMILY[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self._hf_rope_scaling(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": _jsonable(self.bos_token_id),
            "eos_token_id": _jsonable(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.family != "mistral":  # transformers reads a Mistral with layer_types as Ministral
            hf["layer_types"] = list(self.layer_types)
        if self.family == "gemma3_text":
            hf.update(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
                sliding_window=self.sliding_window,
                rope_local_base_freq=self.rope_local_theta or self.rope_theta,
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                attention_bias=False,
            )
        else:
            hf["hidden_act"] = "silu"
        if self.family == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=False)
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
            hf.update(
                use_sliding_window=bool(sliding),
                sliding_window=self.sliding_window,
                max_window_layers=sliding[0] if sliding else self.num_layers,
            )
        if self.family == "qwen3":
            hf["attention_bias"] = self.qkv_bias
        return hf

    def _hf_rope_scaling(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.rope_factor}
        return {
            "rope_type": "llama3",
            "factor": self.rope_factor,
            "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_max_position_embeddings,
        }


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _family_of(hf_config: dict[str, Any]) -> str:
    supported = f"supported architectures: {sorted(ARCHITECTURES)} (model_type {sorted(FAMILIES)})"
    for arch in hf_config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise ValueError(
        f"unsupported model: architectures={hf_config.get('architectures')}, "
        f"model_type={model_type!r}; {supported}"
    )


def _rope_scaling_fields(rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    if not rope_scaling:
        return {"rope_type": "default"}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return {"rope_type": "default"}
    if rope_type == "linear":
        return {"rope_type": "linear", "rope_factor": float(rope_scaling["factor"])}
    if rope_type == "llama3":
        return {
            "rope_type": "llama3",
            "rope_factor": float(rope_scaling["factor"]),
            "rope_low_freq_factor": float(rope_scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(rope_scaling["high_freq_factor"]),
            "rope_original_max_position_embeddings": int(
                rope_scaling["original_max_position_embeddings"]
            ),
        }
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})")


def _family_fields(family: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The fields that differ between families, from a config.json merged with its defaults."""
    num_layers = hf["num_hidden_layers"]
    if family == "gemma3_text":
        if hf["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"gemma3 hidden_activation={hf['hidden_activation']!r} is not supported"
            )
        if hf["use_bidirectional_attention"]:
            raise ValueError("gemma3 use_bidirectional_attention=True is not supported")
        if hf["attention_bias"]:
            raise ValueError("gemma3 attention_bias=True is not supported")
        pattern = hf["sliding_window_pattern"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)
        ]
        return dict(
            layer_types=tuple(layer_types),
            sliding_window=hf["sliding_window"],
            rope_local_theta=float(hf["rope_local_base_freq"]),
            qk_norm=True,
            norm_plus_one=True,
            post_norms=True,
            embed_scale=True,
            mlp_activation="gelu_tanh",
            query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
            # transformers (4.57) stores Gemma 3's attn_logit_softcapping but never applies it
            # (Gemma 3 replaced it with q/k norm; released configs set it to null): follow it.
            attn_logit_softcapping=None,
            final_logit_softcapping=hf["final_logit_softcapping"],
        )
    if hf["hidden_act"] != "silu":
        raise ValueError(f"{family} hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    fields: dict[str, Any] = {}
    if family == "llama":
        fields.update(qkv_bias=bool(hf["attention_bias"]), o_bias=bool(hf["attention_bias"]))
    elif family == "mistral":
        window = hf["sliding_window"]
        # With layer_types, transformers' AutoConfig reads the model as Ministral: the window
        # applies to the "sliding_attention" layers only.
        layer_types = hf.get("layer_types") or ["sliding_attention"] * num_layers
        if not window:
            layer_types = ["full_attention"] * num_layers
        fields.update(sliding_window=window, layer_types=tuple(layer_types))
    else:  # qwen2, qwen3
        window = hf["sliding_window"] if hf["use_sliding_window"] else None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if window and i >= hf["max_window_layers"] else "full_attention"
            for i in range(num_layers)
        ]
        if not window:  # transformers ignores "sliding_attention" when the window is off
            layer_types = ["full_attention"] * num_layers
        fields.update(sliding_window=window, layer_types=tuple(layer_types))
        if family == "qwen2":
            fields["qkv_bias"] = True
        else:
            fields.update(qk_norm=True, qkv_bias=bool(hf["attention_bias"]))
    return fields
