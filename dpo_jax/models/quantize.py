"""A quantised base's params: Linear weights and the embedding as GGUF blocks (`linear.Quantized`).

Two sources fill them: a GGUF file, whose blocks are kept as they are (`convert_gguf`), and a
float checkpoint (HF safetensors), quantised here on the host with the `gguf` package's own
quantiser, `gguf.quants.quantize`, into one of `HF_TYPES`: Q8_0 (8.5 bits a weight: int8 per
32-value block with an f16 scale), Q5_0 (5.5 bits) or Q4_0 (4.5 bits). The model then reads both
the same way (`gguf_blocks`, bit-identical to gguf's dequantiser).

Why GGUF's block formats and gguf's quantiser rather than bitsandbytes' NF4 or qwix: one
format and one decoder serve both sources, gguf is already how the packaged model arrives, and
its quantiser is the reference implementation of the format. qwix quantises by intercepting a
module's einsum, which does not reach through our scan over stacked layers (see `dpo_jax.lora`);
NF4 is bitsandbytes' CUDA format, with no JAX reader and no file format of its own. The
k-quants (Q4_K, Q6_K) are read from files but not made here: gguf's Python quantiser has none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from dpo_jax.models import convert_hf, gguf_blocks, linear
from dpo_jax.models.config import ModelConfig

# The block types a float checkpoint can be quantised to (what gguf's quantiser makes).
HF_TYPES = ("Q8_0", "Q5_0", "Q4_0")

BlocksOf = Callable[[Any, Any], tuple[np.ndarray, str]]


def quantized_params(config: ModelConfig, tensors: Mapping[str, Any], blocks_of: BlocksOf):
    """Params with each Linear weight and the embedding as `linear.Quantized` (one per stacked
    param, layers of different types padded to the widest), the rest float in param_dtype.

    Args:
      config: the model.
      tensors: HF-named tensors (arrays, or lazy ones read by `np.asarray`).
      blocks_of: (tensor, its `convert_hf` spec) -> (uint8 [rows, row_bytes], type name), for
        the Linear weights ([out, in]: rows are outputs) and the embedding ([V, D]).
    """
    from dpo_jax.models.transformer import init_params  # the module imports this one's users

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    blocks: dict[tuple, dict] = {}
    floats: dict[tuple, dict] = {}
    for spec in convert_hf._specs(config):
        tensor = tensors[spec.hf_name]
        if spec.transposed or spec.path == ("embedding",):
            blocks.setdefault(spec.path, {})[spec.layer] = blocks_of(tensor, spec)
        else:
            value = spec.to_param(np.asarray(tensor, np.float32))
            floats.setdefault(spec.path, {})[spec.layer] = value.astype(config.param_dtype)
    params: dict[str, Any] = {}
    for param_path, by_layer in floats.items():
        convert_hf._set(params, param_path, _stack(by_layer))
    for param_path, by_layer in blocks.items():
        shape = convert_hf._get(shapes, param_path).shape
        layered = param_path[0] == "layers"
        kernel = _stacked_blocks(by_layer, shape[1:] if layered else shape, param_path)
        convert_hf._set(params, param_path, kernel)
    return params


def _stack(by_layer: dict) -> np.ndarray:
    if list(by_layer) == [None]:
        return by_layer[None]
    return np.stack([by_layer[layer] for layer in sorted(by_layer)])


def _stacked_blocks(by_layer: dict, kernel_shape: tuple[int, ...], param_path) -> linear.Quantized:
    names = tuple(dict.fromkeys(type_name for _, type_name in by_layer.values()))
    width = max(raw.shape[1] for raw, _ in by_layer.values())
    data = {layer: gguf_blocks.pad_rows(raw, width) for layer, (raw, _) in by_layer.items()}
    types = {layer: np.int32(names.index(type_name)) for layer, (_, type_name) in by_layer.items()}
    return linear.Quantized(
        _stack(data),
        np.asarray(_stack(types), np.int32),
        type_names=names,
        kernel_shape=tuple(kernel_shape),
        transposed=param_path != ("embedding",),
    )


def check_hf_type(type_name: str) -> None:
    """Raises ValueError unless a float checkpoint can be quantised to `type_name`."""
    if type_name not in HF_TYPES:
        raise ValueError(
            f"config.model.quantized_type={type_name!r}: a float checkpoint is quantised to "
            f"{', '.join(HF_TYPES)} (gguf's quantiser; k-quants are read from GGUF files only)"
        )


def hf_blocks(type_name: str) -> BlocksOf:
    """`blocks_of` for float tensors: each quantised with gguf's quantiser to `type_name`."""
    check_hf_type(type_name)
    import gguf

    kind = gguf.GGMLQuantizationType[type_name]

    def blocks_of(tensor, spec):
        weight = np.asarray(tensor, np.float32).reshape(spec.hf_shape[0], -1)
        block_size = gguf_blocks.BLOCK_LAYOUTS[type_name][0]
        if weight.shape[1] % block_size:
            raise ValueError(
                f"{spec.hf_name}: {weight.shape[1]} input features are not whole {type_name} "
                f"blocks of {block_size}"
            )
        return np.asarray(gguf.quants.quantize(weight, kind)).view(np.uint8), type_name

    return blocks_of
