"""Hugging Face checkpoints (config.json + safetensors) to and from our params; never pickle."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import storage
from dpo_jax.models import linear, safetensors_files
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.safetensors_files import RowBlocks, write_safetensors_streamed
from dpo_jax.models.transformer import Params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that hold no weights (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Spec(NamedTuple):
    """One HF tensor: its name and shape, where it goes in our params, and the two layouts' maps.

    A layer's tensor (`layer` set) is row `layer` of the stacked param at `path` (its leading
    axis is the layers axis). Every `to_param` is a reshape of the HF tensor, transposed first
    when `transposed` (Linear weights): sharded loading reads slices by that rule.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[Any, ...]
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None
    transposed: bool = False


def _identity(x):
    return x


def _linear(out_shape: tuple[int, ...]):
    """HF Linear weight [out, in] <-> our kernel [in, *out_shape] (the einsum's layout)."""
    return (
        lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape),
        lambda k: np.ascontiguousarray(k.reshape(k.shape[0], -1).T),
    )


def _linear_from_heads(in_shape: tuple[int, ...]):
    """HF o_proj weight [D, H*Dh] <-> our kernel [H, Dh, D]."""
    return (
        lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, w.shape[0]),
        lambda k: np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T),
    )


def _reshaped(shape: tuple[int, ...]):
    return (lambda b: b.reshape(shape), lambda p: p.reshape(-1))


def _specs(config: ModelConfig) -> Iterator[_Spec]:
    """Every tensor of a transformers checkpoint of this config, with transformers' names."""
    d, v = config.hidden_size, config.vocab_size
    yield _Spec("model.embed_tokens.weight", (v, d), ("embedding",), _identity, _identity)
    yield _Spec("model.norm.weight", (d,), ("final_norm", "scale"), _identity, _identity)
    if not config.tie_word_embeddings:
        yield _Spec(
            "lm_head.weight", (v, d), ("lm_head",), np.transpose, np.transpose, transposed=True
        )
    for i in range(config.num_layers):
        yield from _norm_specs(config, i)
        yield from _attention_specs(config, i)
        yield from _mlp_specs(config, i)


def _norm_specs(config: ModelConfig, i: int) -> Iterator[_Spec]:
    # transformers' Llama calls the pre-MLP norm post_attention_layernorm; Gemma 3 has four norms.
    norms = {"input_layernorm": "attn_norm"}
    if config.post_norms:
        norms.update(
            post_attention_layernorm="post_attn_norm",
            pre_feedforward_layernorm="mlp_norm",
            post_feedforward_layernorm="post_mlp_norm",
        )
    else:
        norms["post_attention_layernorm"] = "mlp_norm"
    for hf_norm, norm in norms.items():
        yield _Spec(
            f"model.layers.{i}.{hf_norm}.weight",
            (config.hidden_size,),
            ("layers", norm, "scale"),
            _identity,
            _identity,
            i,
        )


def _attention_specs(config: ModelConfig, i: int) -> Iterator[_Spec]:
    d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    attn, path = f"model.layers.{i}.self_attn.", ("layers", "attn")
    for name, heads in (("q", h), ("k", k), ("v", k)):
        yield _Spec(
            f"{attn}{name}_proj.weight",
            (heads * dh, d),
            (*path, f"{name}_kernel"),
            *_linear((heads, dh)),
            i,
            transposed=True,
        )
        if config.qkv_bias:
            yield _Spec(
                f"{attn}{name}_proj.bias",
                (heads * dh,),
                (*path, f"{name}_bias"),
                *_reshaped((heads, dh)),
                i,
            )
    yield _Spec(
        f"{attn}o_proj.weight",
        (d, h * dh),
        (*path, "o_kernel"),
        *_linear_from_heads((h, dh)),
        i,
        transposed=True,
    )
    if config.o_bias:
        yield _Spec(f"{attn}o_proj.bias", (d,), (*path, "o_bias"), _identity, _identity, i)
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            yield _Spec(
                f"{attn}{name}.weight", (dh,), (*path, name, "scale"), _identity, _identity, i
            )


def _mlp_specs(config: ModelConfig, i: int) -> Iterator[_Spec]:
    d, f = config.hidden_size, config.intermediate_size
    mlp, path = f"model.layers.{i}.mlp.", ("layers", "mlp")
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        yield _Spec(
            f"{mlp}{name}_proj.weight",
            shape,
            (*path, f"{name}_kernel"),
            np.transpose,
            np.transpose,
            i,
            transposed=True,
        )


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, Any]) -> Params:
    """Our params from tensors named as transformers names them.

    Args:
        config: the model the tensors belong to.
        tensors: name -> array (numpy, or anything with `.shape` that `np.asarray` accepts), e.g.
            "model.layers.0.self_attn.q_proj.weight" -> [H * Dh, D]. HF layouts: Linear weights
            are [out, in]; RMSNorm weights as stored by transformers (Gemma's offsets from 1).

    Returns:
        Params in the structure of `init_params(config, ...)`, jax arrays in `config.param_dtype`;
        each layer's tensors stacked on the leading layers axis of the params under "layers".

    Raises:
        ValueError: a tensor is missing, has the wrong shape (the message names it and both
            shapes), or is not part of this architecture.
    """
    dtype = jnp.dtype(config.param_dtype)
    params: dict[str, Any] = {}
    layer_rows: dict[tuple[Any, ...], list[np.ndarray]] = {}  # stacked param -> its layers' rows
    for spec in _checked_specs(config, tensors):
        value = np.asarray(spec.to_param(np.asarray(tensors[spec.hf_name])), dtype=dtype)
        if spec.layer is None:
            _set(params, spec.path, jnp.asarray(value))
        else:
            layer_rows.setdefault(spec.path, []).append(value)  # _specs yields layers in order
    for path, rows in layer_rows.items():
        _set(params, path, jnp.asarray(np.stack(rows)))  # [layers, ...]
    return params


def _checked_specs(config: ModelConfig, tensors: Mapping[str, Any]) -> list[_Spec]:
    """The specs of `config`, after checking `tensors` has each, of its shape, and no other."""
    specs = list(_specs(config))
    for spec in specs:
        if spec.hf_name not in tensors:
            raise ValueError(f"tensor {spec.hf_name!r} is missing (expected shape {spec.hf_shape})")
        shape = tuple(tensors[spec.hf_name].shape)
        if shape != spec.hf_shape:
            raise ValueError(
                f"tensor {spec.hf_name!r} has shape {shape}, expected {spec.hf_shape} "
                f"from the {config.family} config"
            )
    expected = {spec.hf_name for spec in specs}
    unexpected = sorted(
        name
        for name in tensors
        if name not in expected
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} tensors do not belong to a {config.family} model of this config: "
            f"{unexpected[:10]}"
        )
    return specs


class LazyParam:
    """One of our params, read from its HF tensor(s) only where indexed: `shape`, `dtype`, and
    `param[index]` (a tuple of slices in our layout) reading just that slice's rows/columns.

    A stacked layer param reads each indexed layer from its own tensor. `jax.make_array_from_
    callback` indexes it once per device shard, so no host or device holds the whole tensor.
    """

    def __init__(self, specs: list[_Spec], tensors: Mapping[str, Any], shape, dtype):
        self.specs, self.tensors = specs, tensors
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.stacked = specs[0].layer is not None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        index += (slice(None),) * (self.ndim - len(index))
        index = tuple(
            slice(*part.indices(size)) for part, size in zip(index, self.shape, strict=True)
        )
        if not self.stacked:
            return self._read(self.specs[0], index, self.shape)
        rows = [self._read(spec, index[1:], self.shape[1:]) for spec in self.specs[index[0]]]
        return np.stack(rows) if rows else np.zeros((0, *self.shape[1:]), self.dtype)

    def __array__(self, dtype=None, copy=None):
        array = self[()]
        return array if dtype is None else array.astype(dtype)

    def _read(self, spec: _Spec, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        # Our layout is reshape(T, shape) with T the HF tensor, transposed for Linear weights; a
        # T axis splits into consecutive axes of ours, read as the outer one's range × the rest.
        hf_axes = spec.hf_shape[::-1] if spec.transposed else spec.hf_shape
        box, block_shape, inner = [], [], []
        for group in _axis_groups(hf_axes, shape):
            outer, rest = index[group[0]], math.prod(shape[axis] for axis in group[1:])
            box.append(slice(outer.start * rest, outer.stop * rest))
            block_shape += [outer.stop - outer.start, *(shape[axis] for axis in group[1:])]
            inner += [slice(None), *(index[axis] for axis in group[1:])]
        box = tuple(box[::-1]) if spec.transposed else tuple(box)
        block = np.asarray(self.tensors[spec.hf_name][box])
        block = (block.T if spec.transposed else block).reshape(block_shape)
        return np.ascontiguousarray(block[tuple(inner)]).astype(self.dtype)


def _axis_groups(hf_axes: tuple[int, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """For each axis of `hf_axes`, the consecutive axes of `shape` its reshape splits it into."""
    groups, axis = [], 0
    for size in hf_axes:
        group, product = [axis], shape[axis]
        axis += 1
        while product < size:
            group.append(axis)
            product *= shape[axis]
            axis += 1
        if product != size:
            raise ValueError(f"shape {shape} is not a split of {hf_axes}")
        groups.append(group)
    groups[-1] += list(range(axis, len(shape)))  # trailing axes of size 1
    return groups


def lazy_params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, Any]) -> Params:
    """As `params_from_hf_tensors`, but each leaf a `LazyParam` reading only what is indexed.

    Args:
        config: the model the tensors belong to.
        tensors: name -> tensor indexable by a tuple of slices (numpy, a safetensors slice).

    Raises:
        ValueError: as `params_from_hf_tensors`.
    """
    from dpo_jax.models.transformer import init_params

    specs = _checked_specs(config, tensors)
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    by_path: dict[tuple[Any, ...], list[_Spec]] = {}
    for spec in specs:
        by_path.setdefault(spec.path, []).append(spec)  # layers in order
    params: dict[str, Any] = {}
    for path, path_specs in by_path.items():
        shape = _get(shapes, path).shape
        _set(params, path, LazyParam(path_specs, tensors, shape, config.param_dtype))
    return params


def hf_tensors_from_params(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf_tensors`: transformers-named numpy arrays (contiguous)."""
    tensors = {}
    for spec in _specs(config):
        value = _get(params, spec.path)
        value = np.asarray(jax.device_get(value if spec.layer is None else value[spec.layer]))
        tensors[spec.hf_name] = np.ascontiguousarray(spec.to_hf(value))
        if tensors[spec.hf_name].shape != spec.hf_shape:
            raise ValueError(
                f"param {spec.path} gives {spec.hf_name!r} of shape "
                f"{tensors[spec.hf_name].shape}, expected {spec.hf_shape}"
            )
    return tensors


def linear_weight_names(config: ModelConfig) -> dict[tuple[str, int | None], str]:
    """{(param path as "layers/attn/q_kernel", layer or None): transformers' weight name} of
    every Linear weight ("model.layers.0.self_attn.q_proj.weight"); each is the transpose of
    the param's [in, out] reshape (what LoRA's factors are written against)."""
    return {
        ("/".join(spec.path), spec.layer): spec.hf_name
        for spec in _specs(config)
        if spec.transposed and spec.hf_name.endswith(".weight")
    }


def _safetensors_files(model_dir: str) -> list[str]:
    single = os.path.join(model_dir, WEIGHTS_FILE)
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        index_content = _read_json(index)
        weight_map = index_content.get("weight_map") if isinstance(index_content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no 'weight_map' dict")
        files = []
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, shard)
            if os.path.dirname(os.path.normpath(path)) != os.path.normpath(model_dir):
                raise ValueError(f"{index}: shard {shard!r} is outside the model directory")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard listed in {index} does not exist")
            files.append(path)
        return files
    raise FileNotFoundError(
        f"{model_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
    )


def read_hf_config(model_dir: str) -> dict[str, Any]:
    """config.json of a model directory, as a dict."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    return _read_json(path)


def _read_json(path: str) -> Any:
    """A JSON file's content; a malformed one is a ValueError naming the path, line and column."""
    with open(path, "rb") as f:
        text = f.read()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_hf(
    model_dir: str,
    *,
    lazy: bool = False,
    quantized_type: str | None = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, Params]:
    """Reads a transformers model directory: config.json and safetensors weights.

    Args:
        model_dir: directory with config.json and model.safetensors (or
            model.safetensors.index.json and its shards).
        lazy: return `LazyParam` leaves (nothing read until indexed; for sharded loading with
            `jax.make_array_from_callback`) instead of jax arrays.
        quantized_type: quantise the Linear weights and the embedding on load to this GGUF
            block type (`quantize.HF_TYPES`), as `linear.Quantized` numpy bytes (QLoRA's base).
        **config_overrides: ModelConfig fields to set (dtype, param_dtype, remat, attention_impl).
            Without param_dtype, the checkpoint's (config.json's `dtype` / `torch_dtype`) is used
            when it is one we support (float32, bfloat16), else float32.

    Returns:
        (config, params); params in `config.param_dtype`.

    Raises:
        FileNotFoundError: config.json or the weights are missing (names the path).
        ValueError: unsupported architecture or setting, missing or unknown RoPE settings (naming
            config.json and the key), or a tensor missing or of the wrong shape.
    """
    hf_config = read_hf_config(model_dir)
    if "param_dtype" not in config_overrides:
        config_overrides["param_dtype"] = checkpoint_dtype(hf_config)
    source = os.path.join(model_dir, CONFIG_FILE)
    config = ModelConfig.from_hf_config(hf_config, source, **config_overrides)
    tensors = {}
    for path in _safetensors_files(model_dir):
        for name in safetensors_files.tensor_names(path):
            tensors[name] = safetensors_files.LazyTensor(path, name)
    if quantized_type is not None:
        from dpo_jax.models import quantize  # it builds on this module

        blocks_of = quantize.hf_blocks(quantized_type)
        return config, quantize.quantized_params(config, tensors, blocks_of)
    if lazy:
        return config, lazy_params_from_hf_tensors(config, tensors)
    return config, params_from_hf_tensors(config, tensors)


def checkpoint_dtype(hf_config: Mapping[str, Any]) -> str:
    """The params' dtype a config.json names (`dtype`, or the older `torch_dtype`), when it is
    one of ours ("float32", "bfloat16"); "float32" otherwise (float16 is widened)."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16") else "float32"


def save_hf(model_dir: str, config: ModelConfig, params: Params) -> None:
    """Writes config.json and model.safetensors that transformers' `from_pretrained` loads.

    Weights are written in `config.param_dtype`; a tied model writes no lm_head. The params may
    be device arrays, numpy arrays or `linear.Quantized` kernels (dequantised to float32 here);
    one stacked param at a time is brought to the host and written (`write_safetensors_streamed`),
    so the export holds at most one stack beside the params, not a second copy of the model.
    """
    specs = list(_specs(config))
    by_path: dict[tuple, list[_Spec]] = {}
    for spec in specs:
        by_path.setdefault(spec.path, []).append(spec)
    dtype = np.dtype(config.param_dtype if config.param_dtype != "bfloat16" else "float32")
    if config.param_dtype == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)

    def tensors():
        for path, group in by_path.items():
            param = _get(params, path)
            as_stored = [spec.to_hf for spec in group] == [_identity]
            if isinstance(param, linear.Quantized) and as_stored:
                # A quantised embedding: decoded and written a block of rows at a time.
                blocks = linear.dense_row_blocks(param, dtype)
                host_blocks = (np.asarray(jax.device_get(block)) for block in blocks)
                yield group[0].hf_name, RowBlocks(group[0].hf_shape, dtype, host_blocks)
                continue
            value = np.asarray(jax.device_get(linear.dense(param, dtype)))
            for spec in group:
                tensor = np.ascontiguousarray(
                    spec.to_hf(value if spec.layer is None else value[spec.layer])
                )
                if tensor.shape != spec.hf_shape:
                    raise ValueError(
                        f"param {spec.path} gives {spec.hf_name!r} of shape {tensor.shape}, "
                        f"expected {spec.hf_shape}"
                    )
                yield spec.hf_name, tensor
            del value

    entries = [(spec.hf_name, spec.hf_shape, dtype) for group in by_path.values() for spec in group]
    write_safetensors_streamed(
        storage.join(model_dir, WEIGHTS_FILE), entries, tensors(), {"format": "pt"}
    )
    text = json.dumps(config.to_hf_config(), indent=2, sort_keys=True) + "\n"
    storage.write_text(storage.join(model_dir, CONFIG_FILE), text)
