"""Gemma 3 from a GGUF file (llama.cpp format): Hugging Face config, float32 weights, tokenizer."""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from dpo_jax.models import convert_hf, gguf_blocks, quantize
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.gguf_tokenizer import (  # noqa: F401 - re-exported
    SUPPORTED_TOKENIZERS,
    load_gguf_tokenizer,
    sentencepiece_bpe,
    tokenizer_from_pieces,
)
from dpo_jax.tokenizer import Tokenizer, check_tokenizer_fits

__all__ = [
    "check_tokenizer_fits",
    "gguf_to_hf",
    "load_gguf",
    "load_gguf_tokenizer",
    "sentencepiece_bpe",
]

SUPPORTED_ARCHITECTURES = ("gemma3",)

# GGUF per-layer tensor name -> transformers' Gemma 3 name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Gemma 3 settings that llama.cpp hard-codes instead of storing them in the file (llama-model.cpp,
# LLM_ARCH_GEMMA3): every 6th layer is global, local layers use RoPE base 10,000, and queries are
# scaled by head_dim**-0.5 except in the 62-layer 27B model, where it is (hidden/heads)**-0.5.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE_FREQ = 10_000.0
_GEMMA3_27B_BLOCK_COUNT = 62

# Bounds on the metadata, so a corrupt header cannot make us plan absurd allocations.
_MAX_DIM = 1 << 20
_MAX_LAYERS = 1024


def load_gguf(
    path: str | os.PathLike, *, lazy: bool = False, quantized: bool = False, **config_overrides: Any
):
    """Loads a Gemma 3 GGUF file as our model.

    Args:
      path: the .gguf file.
      lazy: params as `convert_hf.LazyParam`s (for sharded loading): a tensor is dequantised
        when a slice of it is first read, and only one stacked param's tensors are kept.
      quantized: keep the Linear weights and the embedding in the file's blocks
        (`linear.Quantized`, numpy bytes; QLoRA's base), dequantised by the model where read;
        the norms are float as always.
      **config_overrides: ModelConfig fields to set (e.g. dtype="bfloat16", remat=True).

    Returns:
      (config, params, tokenizer): a `ModelConfig`, the params pytree for `make_apply_fn(config)`
      (dequantised to float32, stored in `config.param_dtype`), and the file's `Tokenizer`.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: an unsupported architecture or tokenizer, or a tensor or setting that does not
        fit the model described by the metadata; with `quantized`, a block type that
        `gguf_blocks` does not decode (named, with the supported ones).
    """
    hf_config, tensors, tokenizer = gguf_to_hf(path, lazy=lazy or quantized)
    config = ModelConfig.from_hf_config(hf_config, str(path), **config_overrides)
    check_tokenizer_fits(tokenizer, config)
    if quantized:
        blocks_of = functools.partial(_raw_blocks, path=str(path))
        return config, quantize.quantized_params(config, tensors, blocks_of), tokenizer
    if lazy:
        return config, convert_hf.lazy_params_from_hf_tensors(config, tensors), tokenizer
    params = convert_hf.params_from_hf_tensors(config, tensors)
    return config, params, tokenizer


def gguf_to_hf(
    path: str | os.PathLike, *, lazy: bool = False
) -> tuple[dict[str, Any], dict[str, Any], Tokenizer]:
    """Reads a GGUF file into what a Hugging Face checkpoint holds.

    Args:
      path: the .gguf file.

    Returns:
      (hf_config, tensors, tokenizer): the config.json dict transformers would use
      (`Gemma3ForCausalLM`), float32 numpy tensors keyed and shaped as in transformers' state dict
      (e.g. `model.layers.0.self_attn.q_proj.weight`, [H * head_dim, D]; with `lazy`, tensors
      dequantised when first indexed), and the tokenizer.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: see `load_gguf`.
    """
    reader = _open(path)
    metadata = _read_metadata(reader)
    tokenizer = _tokenizer_from_reader(reader, metadata, path)
    hf_config = _hf_config_from_metadata(metadata, tokenizer.vocab_size, reader, path)
    tensors = _read_tensors(reader, hf_config, path, lazy=lazy)
    return hf_config, tensors, tokenizer


def _open(path: str | os.PathLike):
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error


def _read_metadata(reader) -> dict[str, Any]:
    """Scalar and string fields; the tokenizer's 262k-entry arrays are read apart."""
    from gguf import GGUFValueType

    metadata = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            continue
        metadata[key] = field.contents()
    return metadata


def _array_field(reader, key: str, path: str) -> list:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    return [field.parts[index] for index in field.data]


def _hf_config_from_metadata(
    metadata: dict[str, Any], vocab_size: int, reader, path: str
) -> dict[str, Any]:
    """transformers' Gemma3TextConfig as a dict, from the `gemma3.*` keys and llama.cpp's
    hard-coded Gemma 3 settings."""
    architecture = _architecture(metadata, path)

    def get(key: str, bound: int | None = None):
        return _metadata_value(metadata, f"{architecture}.{key}", path, bound)

    num_layers = get("block_count", _MAX_LAYERS)
    hidden_size = get("embedding_length", _MAX_DIM)
    num_heads = get("attention.head_count", _MAX_DIM)
    head_dim = get("attention.key_length", _MAX_DIM)
    if get("attention.value_length", _MAX_DIM) != head_dim:
        raise ValueError(f"{path}: key_length and value_length differ; Gemma 3 needs them equal")
    query_pre_attn_scalar = (
        hidden_size // num_heads if num_layers == _GEMMA3_27B_BLOCK_COUNT else head_dim
    )
    layer_types = _layer_types(reader, architecture, num_layers, path)
    tied = all(tensor.name != "output.weight" for tensor in reader.tensors)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length", _MAX_DIM),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", _MAX_DIM),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 1 << 30),
        # GGUF stores float32: 1e-6 arrives as 9.99999997e-07; keep the value that was written.
        "rms_norm_eps": _float32_value(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(get("rope.freq_base")),
        "rope_local_base_freq": _float32_value(
            metadata.get(f"{architecture}.rope.freq_base_swa", _GEMMA3_ROPE_LOCAL_BASE_FREQ)
        ),
        "rope_scaling": _rope_scaling(metadata, architecture, path),
        "sliding_window": get("attention.sliding_window", 1 << 30),
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _architecture(metadata: dict[str, Any], path: str) -> str:
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported "
            f"(supported: {list(SUPPORTED_ARCHITECTURES)})"
        )
    return architecture


def _metadata_value(metadata: dict[str, Any], key: str, path: str, bound: int | None = None):
    """metadata[key]; with `bound`, an int in [1, bound] (a corrupt header cannot ask for more)."""
    if key not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    value = metadata[key]
    if bound is not None and not (isinstance(value, int) and 0 < value <= bound):
        raise ValueError(f"{path}: {key}={value!r} must be an integer in [1, {bound}]")
    return value


def _layer_types(reader, architecture: str, num_layers: int, path: str) -> list[str]:
    """Which layers use the sliding window: `attention.sliding_window_pattern` when the file has
    it (an int n: every n-th layer is global; or one bool per layer, True = sliding), else
    llama.cpp's Gemma 3 default of every 6th layer global."""
    key = f"{architecture}.attention.sliding_window_pattern"
    field = reader.fields.get(key)
    pattern = _GEMMA3_SLIDING_WINDOW_PATTERN if field is None else field.contents()
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise ValueError(f"{path}: {key} has {len(pattern)} entries for {num_layers} layers")
        return ["sliding_attention" if is_sliding else "full_attention" for is_sliding in pattern]
    if not (isinstance(pattern, int) and pattern > 0):
        raise ValueError(f"{path}: {key}={pattern!r} must be a positive integer or a list of bools")
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


def _rope_scaling(metadata: dict[str, Any], architecture: str, path: str) -> dict[str, Any] | None:
    """Gemma 3 4B and larger scale the global layers' RoPE linearly (factor 8)."""
    rope_type = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if rope_type == "none":
        return None
    if rope_type != "linear":
        raise ValueError(
            f"{path}: {architecture}.rope.scaling.type={rope_type!r} is not supported "
            "(supported: 'linear', 'none')"
        )
    factor = _float32_value(metadata[f"{architecture}.rope.scaling.factor"])
    return {"rope_type": "linear", "factor": factor}


def _float32_value(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def _expected_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """transformers' Gemma 3 state-dict names and shapes ([out, in] for projections)."""
    hidden = hf_config["hidden_size"]
    head_dim = hf_config["head_dim"]
    q_width = hf_config["num_attention_heads"] * head_dim
    kv_width = hf_config["num_key_value_heads"] * head_dim
    mlp = hf_config["intermediate_size"]
    layer_shapes = {
        "self_attn.q_proj": (q_width, hidden),
        "self_attn.k_proj": (kv_width, hidden),
        "self_attn.v_proj": (kv_width, hidden),
        "self_attn.o_proj": (hidden, q_width),
        "self_attn.q_norm": (head_dim,),
        "self_attn.k_norm": (head_dim,),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "pre_feedforward_layernorm": (hidden,),
        "post_feedforward_layernorm": (hidden,),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }
    shapes = {
        "model.embed_tokens.weight": (hf_config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not hf_config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (hf_config["vocab_size"], hidden)
    for layer in range(hf_config["num_hidden_layers"]):
        for name, shape in layer_shapes.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def _hf_name(gguf_name: str, path: str) -> str:
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{int(match.group(1))}.{_LAYER_TENSORS[match.group(2)]}.weight"
    base = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.weight"
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a Gemma 3 model")


class _GGUFTensor:
    """A GGUF tensor under its transformers name: `shape`, and dequantised when indexed (a few
    recently used ones are kept in `cache`, shared by the file's tensors)."""

    def __init__(self, tensor, shape: tuple[int, ...], name: str, cache: dict, capacity: int):
        self.tensor, self.shape, self.name = tensor, shape, name
        self.cache, self.capacity = cache, capacity

    def __array__(self, dtype=None, copy=None):
        array = self._dequantized()
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        return self._dequantized()[index]

    def _dequantized(self) -> np.ndarray:
        if self.name not in self.cache:
            while len(self.cache) >= self.capacity:
                self.cache.pop(next(iter(self.cache)))  # the oldest
            self.cache[self.name] = _dequantize(self.tensor, self.shape, self.name)
        return self.cache[self.name]


def _dequantize(tensor, shape: tuple[int, ...], name: str) -> np.ndarray:
    from gguf.quants import dequantize

    weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    weights = weights.reshape(shape)
    if name.endswith("norm.weight"):
        # llama.cpp stores Gemma's RMSNorm scale as (1 + w); transformers' Gemma multiplies
        # by (1 + w) itself, so it holds w (its GGUF loader subtracts 1 the same way).
        weights = weights - np.float32(1.0)
    return weights


def _read_tensors(
    reader, hf_config: dict[str, Any], path: str, *, lazy: bool = False
) -> dict[str, Any]:
    """Dequantised float32 tensors under transformers' names, each shape checked first (with
    `lazy`, `_GGUFTensor`s that dequantise when indexed, keeping one layer-stack's worth)."""
    expected = _expected_shapes(hf_config)
    cache: dict[str, np.ndarray] = {}
    capacity = int(hf_config["num_hidden_layers"]) + 1
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        # GGUF lists dimensions fastest-first; numpy/torch order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if name not in expected:
            raise ValueError(f"{path}: tensor {tensor.name!r} ({name}) is not in this model")
        if shape != expected[name]:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} ({name}) has shape {shape}, "
                f"but the metadata implies {expected[name]}"
            )
        if name in tensors:
            raise ValueError(f"{path}: tensor {tensor.name!r} appears twice")
        lazy_tensor = _GGUFTensor(tensor, shape, name, cache, capacity)
        tensors[name] = lazy_tensor if lazy else np.asarray(lazy_tensor)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(
            f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return tensors


def _raw_blocks(tensor: _GGUFTensor, spec, *, path: str) -> tuple[np.ndarray, str]:
    """(uint8 [rows, row_bytes] bytes of the file's tensor (a view of the mapped file), type)."""
    type_name = tensor.tensor.tensor_type.name
    if type_name not in gguf_blocks.SUPPORTED_TYPES:
        raise ValueError(
            f"{path}: tensor {tensor.tensor.name!r} is {type_name}, a block type the quantised "
            f"base cannot keep (supported: {', '.join(gguf_blocks.SUPPORTED_TYPES)})"
        )
    rows = spec.hf_shape[0]
    return np.asarray(tensor.tensor.data).view(np.uint8).reshape(rows, -1), type_name


def _tokenizer_from_reader(reader, metadata: dict[str, Any], path: str) -> Tokenizer:
    tokens = [
        bytes(part).decode("utf-8") for part in _array_field(reader, "tokenizer.ggml.tokens", path)
    ]
    scores = np.concatenate(_array_field(reader, "tokenizer.ggml.scores", path)).astype(np.float32)
    types = np.concatenate(_array_field(reader, "tokenizer.ggml.token_type", path)).astype(np.int64)
    return tokenizer_from_pieces(tokens, scores, types, metadata, path)
