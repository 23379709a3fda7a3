"""The linear layers' kernels: a plain array, GGUF blocks, or a base with unmerged LoRA adapters.

Every linear kernel of the decoder is read through `project` (or `dense` where a layer needs the
weight itself, the unembedding). A kernel is either an array in the layout its einsum reads
(`transformer._LOGICAL_AXES`), or an `Adapted` kernel: the frozen base W with PEFT's adapters
A [in, r] and B [r, out], computed unmerged as

    x·W + (alpha / r) · dropout(x)·A·B

so the step never forms W + s·A·B or a gradient the size of W: the base is under
`stop_gradient` and only the thin x·A and (x·A)·B products are differentiated. Adapted kernels
are pytrees whose arrays carry the stacked layers' leading axis like the kernel they adapt, so
`jax.lax.scan` over the layers slices them with the rest of the params, and they are sharded
like their kernels (`dpo_jax.sharding` reads the base's axes).

Dropout is PEFT's: on the adapter path's input only, inverted (kept values scaled by 1/(1-p)),
during training only (a kernel built without a key applies none).

A `Quantized` kernel (QLoRA) is a GGUF tensor kept in its block format, raw uint8 bytes with a
type per layer, dequantised by `dpo_jax.models.gguf_blocks` where the layer reads it: inside the
layer scan one layer's kernel at a time exists in floating point, and only while that layer
runs (and again in its rematerialised backward). The embedding may be one too: a lookup
dequantises the rows it gathers, the tied unembedding the whole table once per forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax.models import gguf_blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen kernel with unmerged low-rank adapters.

    Attributes:
      base: the kernel [*in, *out] (its leading layers axis, if stacked, included in each).
      lora_a: A [in, r] float32, in = prod(in axes).
      lora_b: B [r, out] float32, out = prod(out axes).
      dropout_key: a PRNG key (one per layer when stacked), or None for no dropout.
      scale: alpha / r.
      dropout: p, the probability of zeroing an input of the adapter path.
    """

    base: Any
    lora_a: jax.Array
    lora_b: jax.Array
    dropout_key: jax.Array | None
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A kernel kept as GGUF blocks (QLoRA's frozen base), dequantised where it is read.

    Attributes:
      data: uint8 [*stack, rows, row_bytes]: each row the GGUF tensor's row (its fastest axis,
        the input features of a Linear weight), zero-padded to the widest of `type_names`.
      type_index: int32 [*stack]: each layer's type, an index into `type_names`.
      type_names: the GGUF types in the stack ("Q4_K", "Q6_K", ...; `gguf_blocks.SUPPORTED_TYPES`).
      kernel_shape: the unstacked kernel's shape in the model's layout ([*in, *out]).
      transposed: rows are outputs (a Linear weight [out, in], read as its transpose); False
        for the embedding [V, D], whose rows are what a lookup gathers.
    """

    data: jax.Array
    type_index: jax.Array
    type_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    transposed: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape, a stacked one's layers axis first (as the float param's)."""
        return tuple(self.data.shape[:-2]) + self.kernel_shape

    @property
    def row_length(self) -> int:
        """Values per stored row (GGUF's ne0)."""
        if self.transposed:
            return math.prod(self.kernel_shape) // self.data.shape[-2]
        return self.kernel_shape[-1]


def _rows(data: jax.Array, type_index: jax.Array, kernel: Quantized) -> jax.Array:
    """Stored rows [..., row_bytes] of one layer (scalar type_index) -> float32 [..., ne0]."""
    if len(kernel.type_names) == 1:
        return gguf_blocks.dequantize(data, kernel.type_names[0])
    return gguf_blocks.dequantize_any(data, type_index, kernel.type_names, kernel.row_length)


# Values decoded at once when a whole unstacked table is read (the tied unembedding): the
# decoders' int32 fields and float32 values of a [262144, 640] table are GBs; decoded in row
# chunks, each chunk is cast to the compute dtype before the next is decoded.
_DECODE_CHUNK_VALUES = 1 << 22


def _row_chunks(rows: int, cols: int) -> int:
    """The fewest chunks dividing `rows` with at most _DECODE_CHUNK_VALUES values each."""
    count = max(1, -(-rows * cols // _DECODE_CHUNK_VALUES))
    while rows % count:
        count += 1
    return count


def _dequantized_table(kernel: Quantized, dtype: Any, *, transpose: bool = False) -> jax.Array:
    """An unstacked quantised kernel in `dtype`, in the model's layout or (`transpose`) its
    transpose, decoded in row chunks.

    Each chunk is written in place into the one output buffer (`dynamic_update_slice` in a
    `fori_loop`), already in the layout asked for: a `lax.map` of the chunks followed by a
    reshape or a transpose held the table two or three times over (Gemma 3's tied unembedding,
    [640, 262144] in bfloat16, is 0.34 GB a copy).
    """
    if transpose and len(kernel.kernel_shape) != 2:
        raise ValueError(f"only a 2-D kernel is read transposed, got {kernel.kernel_shape}")
    rows, row_bytes = kernel.data.shape
    count = _row_chunks(rows, kernel.row_length)
    size = rows // count
    # Stored rows land as rows of the model's layout (an embedding [V, D]) or as its columns (a
    # Linear weight stored [out, in], read as [in, out]); `transpose` flips that once more.
    rows_are_columns = kernel.transposed != transpose
    matrix = (kernel.row_length, rows) if rows_are_columns else (rows, kernel.row_length)

    def write(index, table):
        chunk = jax.lax.dynamic_slice_in_dim(kernel.data, index * size, size)
        values = _rows(chunk, kernel.type_index, kernel).astype(dtype)  # [size, ne0]
        if rows_are_columns:
            return jax.lax.dynamic_update_slice_in_dim(table, values.T, index * size, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(table, values, index * size, axis=0)

    if count == 1:  # one layer's kernel inside the layer scan: no loop, no zeroed buffer
        values = _rows(kernel.data, kernel.type_index, kernel).astype(dtype)
        table = values.T if rows_are_columns else values
    else:
        table = jax.lax.fori_loop(0, count, write, jnp.zeros(matrix, dtype))
    return table.reshape(kernel.kernel_shape[::-1] if transpose else kernel.kernel_shape)


def _dequantized(kernel: Quantized) -> jax.Array:
    """float32 in the model's layout, [*stack, *kernel_shape]."""

    def one(data, type_index):
        values = _rows(data, type_index, kernel)  # [rows, ne0]
        return (values.T if kernel.transposed else values).reshape(kernel.kernel_shape)

    for _ in range(kernel.type_index.ndim):  # outside the layer scan: every layer at once
        one = jax.vmap(one)
    return one(kernel.data, kernel.type_index)


FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF tensor types that store floats, not blocks


def is_quantized(kernel: Any) -> bool:
    """Whether `kernel` is a `Quantized` one in a quantised (block) type in every layer."""
    return isinstance(kernel, Quantized) and not set(kernel.type_names) & set(FLOAT_TYPES)


def is_node(value: Any) -> bool:
    """Whether `value` is one of this module's kernels (a pytree node to treat as one leaf)."""
    return isinstance(value, (Adapted, Quantized))


def dense_params(params: Any, dtype: Any = jnp.float32) -> Any:
    """`params` with every kernel of this module as one array (`dense`: dequantised, LoRA's
    merged); plain arrays as they are."""
    return jax.tree.map(
        lambda leaf: dense(leaf, dtype) if is_node(leaf) else leaf, params, is_leaf=is_node
    )


def take_rows(table: Any, tokens: jax.Array, dtype: Any) -> jax.Array:
    """An embedding lookup, [V, D] table at [N, T] ids -> [N, T, D] in `dtype`; a quantised
    table dequantises only the gathered rows."""
    if isinstance(table, Quantized):
        rows = jnp.take(table.data, tokens, axis=0)  # [N, T, row_bytes]
        return _rows(rows, table.type_index, table).astype(dtype)
    return jnp.take(table, tokens, axis=0).astype(dtype)


def dense_row_blocks(kernel: Any, dtype: Any) -> Iterator[jax.Array]:
    """`dense(kernel, dtype)` as consecutive blocks of its first axis, for an export: an
    unstacked quantised table stored by rows (an embedding) is decoded one chunk of rows at a
    time (`_DECODE_CHUNK_VALUES`), so its float copy never exists whole; any other kernel comes
    as one block."""
    if not (isinstance(kernel, Quantized) and kernel.type_index.ndim == 0) or kernel.transposed:
        yield dense(kernel, dtype)
        return
    rows = kernel.data.shape[0]
    size = rows // _row_chunks(rows, kernel.row_length)
    decode = jax.jit(lambda chunk: _rows(chunk, kernel.type_index, kernel).astype(dtype))
    for start in range(0, rows, size):
        yield decode(kernel.data[start : start + size]).reshape(size, *kernel.kernel_shape[1:])


def dense_transposed(kernel: Any, dtype: Any) -> jax.Array:
    """An unstacked 2-D kernel's transpose in `dtype` ([V, D] embedding -> [D, V] unembedding);
    a quantised one is decoded straight into that layout, never held both ways."""
    if isinstance(kernel, Quantized) and kernel.type_index.ndim == 0:
        return _dequantized_table(kernel, dtype, transpose=True)
    return dense(kernel, dtype).T


def dense(kernel: Any, dtype: Any) -> jax.Array:
    """The kernel as one array in `dtype`: itself, dequantised, or W + s·A·B (for a layer that
    needs the weight whole, like the unembedding; its gradient then flows to A and B)."""
    if isinstance(kernel, Quantized):
        if kernel.type_index.ndim == 0:
            return _dequantized_table(kernel, dtype)
        return _dequantized(kernel).astype(dtype)
    if isinstance(kernel, Adapted):
        base = dense(jax.lax.stop_gradient(kernel.base), jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", kernel.lora_a, kernel.lora_b)
        return (base + kernel.scale * delta.reshape(base.shape)).astype(dtype)
    return kernel.astype(dtype)


def project(tokens: jax.Array, kernel: Any, equation: str) -> jax.Array:
    """`einsum(equation, tokens, kernel)` plus an adapted kernel's s·dropout(x)·A·B.

    Args:
      tokens: [N, *in] in the compute dtype (N tokens, the kernel's input axes).
      kernel: an array, a `Quantized` or an `Adapted` kernel, unstacked (inside the layer scan).
      equation: the einsum of tokens and the kernel, e.g. "nd,dhk->nhk".

    Returns:
      [N, *out] in the compute dtype.
    """
    dtype = tokens.dtype
    if not isinstance(kernel, Adapted):
        return jnp.einsum(equation, tokens, dense(kernel, dtype))
    base = dense(jax.lax.stop_gradient(kernel.base), dtype)
    out = jnp.einsum(equation, tokens, base)
    inputs = tokens.reshape(tokens.shape[0], -1)  # [N, in]
    if kernel.dropout_key is not None and kernel.dropout > 0:
        keep = jax.random.bernoulli(kernel.dropout_key, 1.0 - kernel.dropout, inputs.shape)
        inputs = jnp.where(keep, inputs / jnp.asarray(1.0 - kernel.dropout, dtype), 0)
    # PEFT's order: the adapter path in the adapters' float32, added to the base's output in
    # float32, the sum rounded once to the compute dtype.
    low = jnp.dot(inputs, kernel.lora_a, preferred_element_type=jnp.float32)  # [N, r]
    update = jnp.dot(low, kernel.lora_b, preferred_element_type=jnp.float32)  # [N, out]
    total = out.astype(jnp.float32) + kernel.scale * update.reshape(out.shape)
    return total.astype(dtype)


def fan_in_out(shape: tuple[int, ...], num_in: int) -> tuple[int, int]:
    """(in, out) of an unstacked kernel of `shape` whose first `num_in` axes are inputs."""
    return math.prod(shape[:num_in]), math.prod(shape[num_in:])
