"""Hugging Face config.json, as transformers 4.57 and 5.x write it, to ModelConfig fields and back.

The two versions store RoPE differently:

- transformers 4.x: top-level `rope_theta`, `rope_scaling` (`{rope_type | type, factor, ...}` or
  null) and, for Gemma 3, `rope_local_base_freq` (the sliding-window layers' base).
- transformers 5.x: `rope_parameters`, `{rope_type, rope_theta, factor, ...}`; for Gemma 3 one such
  dict per layer type, `{"full_attention": {...}, "sliding_attention": {...}}`. No top-level keys.

`fields_from_hf` reads either. Where a config.json holds both (our own export writes both, so that
either version loads it), they must agree. A config.json with neither, an unknown `rope_type` or a
scaling key missing is an error naming the file and the key: never a default, because a wrong RoPE
gives plausible logits and no other sign (transformers 4.57 reads a transformers 5 config.json
with its default base, silently).

Defaults: `HF_DEFAULTS` holds, per family, the value transformers' config class gives a key that
config.json leaves out, identical in 4.57.1 and 5.25 (tests/test_hf_config.py checks each against
the installed transformers); RoPE has none, as above.
"""

from __future__ import annotations

import math
from typing import Any

# Hugging Face `architectures[0]` -> our family name (the HF `model_type`).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
FAMILIES = tuple(ARCHITECTURES.values())
ARCHITECTURE_OF_FAMILY = {family: arch for arch, family in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3")
# The keys each rope_type needs besides rope_type and rope_theta (transformers'
# modeling_rope_utils: _compute_linear_scaling_rope_parameters, _compute_llama3_parameters).
_ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# The __init__ defaults of transformers' LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config and
# Gemma3TextConfig (models/<family>/configuration_<family>.py), the same in 4.57.1 and 5.25.
# Where config.json leaves out num_key_value_heads, both set it to num_attention_heads; head_dim,
# to hidden_size // num_attention_heads (Llama, Mistral, Qwen2); Qwen2/3's window applies only
# with use_sliding_window; Gemma 3's sliding_window_pattern is read from kwargs with default 6
# (4.57) and layer_types are written out (5.x).
HF_DEFAULTS = {
    "llama": dict(
        rms_norm_eps=1e-6,
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
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def family_of(hf_config: dict[str, Any], source: str = "config.json") -> str:
    """Our family name for a config.json's `architectures` (or `model_type`)."""
    for arch in hf_config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf_config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise ValueError(
        f"{source}: unsupported model: architectures={hf_config.get('architectures')}, "
        f"model_type={model_type!r}; supported architectures: {sorted(ARCHITECTURES)} "
        f"(model_type {sorted(FAMILIES)})"
    )


def fields_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """ModelConfig's fields from a config.json (as a dict); `source` names it in errors.

    Raises:
        ValueError: an unsupported architecture or setting, a missing key, or RoPE settings that
            are missing, unknown or contradictory; the message names `source` and the key.
    """
    family = family_of(hf_config, source)
    hf = {**HF_DEFAULTS[family], **{k: v for k, v in hf_config.items() if v is not None}}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window"):
        if key in hf_config:  # an explicit null means "none" here, not "the default"
            hf[key] = hf_config[key]
    for key in _REQUIRED_KEYS:
        if key not in hf:
            raise ValueError(f"{source}: {family} config has no {key!r}")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=True is not supported")
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
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        max_position_embeddings=hf["max_position_embeddings"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    fields.update(rope_fields(family, hf_config, source))
    fields.update(_family_fields(family, hf, source))
    return fields


# ---- RoPE, in either format ----


def rope_fields(family: str, hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig's rope_* fields from config.json's RoPE keys, 4.x or 5.x (module docstring)."""
    if family == "gemma3_text":
        full = _agreed_rope(hf_config, source, layer_type="full_attention")
        local = _agreed_rope(hf_config, source, layer_type="sliding_attention")
        if local["rope_type"] != "default":
            raise ValueError(
                f"{source}: rope_parameters.sliding_attention.rope_type="
                f"{local['rope_type']!r}: scaled RoPE on sliding-window layers is not supported"
            )
        return {**_scaling_fields(full), "rope_local_theta": local["rope_theta"]}
    return _scaling_fields(_agreed_rope(hf_config, source, layer_type=None))


def _agreed_rope(hf_config: dict[str, Any], source: str, layer_type: str | None) -> dict:
    """One layer type's RoPE, normalised; from the 5.x and the 4.x keys, which must agree."""
    new = _rope_5x(hf_config, source, layer_type)
    old = _rope_4x(hf_config, source, layer_type)
    if new is None and old is None:
        where = f"rope_parameters.{layer_type}" if layer_type else "rope_parameters"
        old_key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
        raise ValueError(
            f"{source}: no RoPE settings: neither {where!r} (transformers 5) nor {old_key!r} "
            "(transformers 4) is set, and no default is assumed"
        )
    if new is not None and old is not None and not _same_rope(new, old):
        raise ValueError(
            f"{source}: the RoPE settings disagree: rope_parameters gives {new}, the top-level "
            f"rope_theta/rope_scaling give {old}; transformers 5 and 4 would read different models"
        )
    return new if new is not None else old


def _rope_5x(hf_config: dict, source: str, layer_type: str | None) -> dict | None:
    params = hf_config.get("rope_parameters")
    if not params:
        return None
    key = "rope_parameters"
    if layer_type is not None:
        if not isinstance(params.get(layer_type), dict):
            raise ValueError(
                f"{source}: rope_parameters has no {layer_type!r} entry (Gemma 3 keeps one per "
                f"layer type; found keys {sorted(params)})"
            )
        params, key = params[layer_type], f"rope_parameters.{layer_type}"
    return _normalised(params, params.get("rope_theta"), source, key)


def _rope_4x(hf_config: dict, source: str, layer_type: str | None) -> dict | None:
    if layer_type == "sliding_attention":  # Gemma 3's local layers: a base, never scaled
        theta = hf_config.get("rope_local_base_freq")
        return None if theta is None else _normalised({}, theta, source, "rope_local_base_freq")
    theta, scaling = hf_config.get("rope_theta"), hf_config.get("rope_scaling")
    if theta is None and not scaling:
        return None
    return _normalised(scaling or {}, theta, source, "rope_scaling")


def _normalised(params: dict, theta: Any, source: str, key: str) -> dict[str, Any]:
    """{rope_type, rope_theta, <the type's scaling keys>} as floats/ints, or an error."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        supported = ", ".join(ROPE_TYPES)
        raise ValueError(
            f"{source}: {key}.rope_type={rope_type!r} is not supported (supported: {supported})"
        )
    if theta is None:
        raise ValueError(f"{source}: {key} sets rope_type={rope_type!r} but no rope_theta")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"{source}: {key}.partial_rotary_factor={partial} is not supported")
    rope = {"rope_type": rope_type, "rope_theta": float(theta)}
    for name in _ROPE_SCALING_KEYS[rope_type]:
        if params.get(name) is None:
            raise ValueError(f"{source}: {key} (rope_type={rope_type!r}) has no {name!r}")
        rope[name] = int(params[name]) if name.startswith("original_") else float(params[name])
    return rope


def _same_rope(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isclose(a[k], b[k])) for k in a
    )


def _scaling_fields(rope: dict[str, Any]) -> dict[str, Any]:
    fields = {"rope_type": rope["rope_type"], "rope_theta": rope["rope_theta"]}
    if "factor" in rope:
        fields["rope_factor"] = rope["factor"]
    if rope["rope_type"] == "llama3":
        fields.update(
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    return fields


# ---- The family-specific fields ----


def _family_fields(family: str, hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The fields that differ between families, from a config.json merged with its defaults."""
    if family == "gemma3_text":
        return _gemma3_fields(hf, source)
    if hf["hidden_act"] != "silu":
        raise ValueError(
            f"{source}: {family} hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
        )
    num_layers = hf["num_hidden_layers"]
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


def _gemma3_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"{source}: gemma3 hidden_activation={hf['hidden_activation']!r} is not supported"
        )
    for key in ("use_bidirectional_attention", "attention_bias"):
        if hf[key]:
            raise ValueError(f"{source}: gemma3 {key}=True is not supported")
    pattern = hf["sliding_window_pattern"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    return dict(
        layer_types=tuple(layer_types),
        sliding_window=hf["sliding_window"],
        qk_norm=True,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        # transformers stores Gemma 3's attn_logit_softcapping but never applies it (Gemma 3
        # replaced it with q/k norm; released configs set it to null): follow it.
        attn_logit_softcapping=None,
        final_logit_softcapping=hf["final_logit_softcapping"],
    )


# ---- Writing: a config.json both transformers 4.57 and 5.x load ----


def hf_config_from(config: Any) -> dict[str, Any]:
    """The config.json transformers needs for a ModelConfig's weights, in both RoPE formats.

    Types are those transformers 5's strict config classes ask for (int where it declares int:
    query_pre_attn_scalar); both `dtype` (5.x) and `torch_dtype` (4.x) name the storage dtype.
    """
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURE_OF_FAMILY[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": _jsonable(config.bos_token_id),
        "eos_token_id": _jsonable(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        **_hf_rope(config),
    }
    if config.family != "mistral":  # transformers reads a Mistral with layer_types as Ministral
        hf["layer_types"] = list(config.layer_types)
    hf.update(_hf_family_keys(config))
    return hf


def _hf_rope(config: Any) -> dict[str, Any]:
    """RoPE as transformers 4.x (top-level keys) and 5.x (rope_parameters) both read it."""
    scaling = _hf_rope_scaling(config)
    full = {"rope_type": config.rope_type, "rope_theta": config.rope_theta, **(scaling or {})}
    keys: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_scaling": scaling}
    if config.family == "gemma3_text":
        local_theta = config.rope_local_theta or config.rope_theta
        keys["rope_local_base_freq"] = local_theta
        keys["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }
    else:
        keys["rope_parameters"] = full
    return keys


def _hf_rope_scaling(config: Any) -> dict[str, Any] | None:
    if config.rope_type == "default":
        return None
    if config.rope_type == "linear":
        return {"rope_type": "linear", "factor": config.rope_factor}
    return {
        "rope_type": "llama3",
        "factor": config.rope_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_position_embeddings,
    }


def _hf_family_keys(config: Any) -> dict[str, Any]:
    if config.family == "gemma3_text":
        scalar = config.query_pre_attn_scalar or config.head_dim
        return dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
            sliding_window=config.sliding_window,
            attn_logit_softcapping=config.attn_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
            attention_bias=False,
        )
    keys: dict[str, Any] = {"hidden_act": "silu"}
    if config.family == "llama":
        keys.update(attention_bias=config.qkv_bias, mlp_bias=False)
    if config.family == "mistral":
        keys["sliding_window"] = config.sliding_window
    if config.family in ("qwen2", "qwen3"):
        sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
        keys.update(
            use_sliding_window=bool(sliding),
            sliding_window=config.sliding_window,
            max_window_layers=sliding[0] if sliding else config.num_layers,
        )
    if config.family == "qwen3":
        keys["attention_bias"] = config.qkv_bias
    return keys


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
