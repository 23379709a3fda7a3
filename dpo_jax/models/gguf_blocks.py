"""Dequantisation of GGUF (llama.cpp) quantised blocks in pure JAX, jit-, scan- and switch-safe.

A quantised 2-D GGUF tensor is kept as its raw bytes, uint8 `[rows, row_bytes]`, one row per
entry of the tensor's slower dimension; a row is `cols / block_size` blocks of `type_size` bytes
laid out as ggml-common.h defines them (all multi-byte fields little-endian). The row is GGUF's
fastest dimension (ne0), the input features of a linear layer. `dequantize` turns such bytes into
floats on the device, so weights can stay quantised in memory and be expanded layer by layer
inside the model's scan.

Exactness: every decoder performs the same float32 operations, in the same order, as the `gguf`
package's numpy reference (`gguf.quants.dequantize`), and every product in them is exact in
float32: an 11-bit f16 significand times Q4_K's 6-bit scale and 4-bit quant needs 21 bits, times
Q6_K's int8 scale and 6-bit quant 23, within float32's 24. So the one multiply-add (Q4_K's
`(d * sc) * q - dmin * m`) rounds once whether or not XLA contracts it into an FMA, and the
output is bit-identical to the reference for every block with finite f16 fields (the tests
check this on random blocks and on real Gemma 3 tensors).

The `gguf` package is not imported here: the library reads GGUF bytes through its own loader,
and this module needs nothing but jax and numpy.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

QK_K = 256  # the super-block size of the k-quants (ggml-common.h)

# type name -> (block_size in values, type_size in bytes), as ggml-common.h's block structs.
BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 2 + 32),  # f16 d; int8 qs[32]
    "Q4_0": (32, 2 + 16),  # f16 d; uint8 qs[16]
    "Q5_0": (32, 2 + 4 + 16),  # f16 d; uint8 qh[4]; uint8 qs[16]
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),  # f16 d, dmin; uint8 scales[12]; uint8 qs[128]
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql[128]; qh[64]; int8 sc[16]; d
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BLOCK_LAYOUTS)


# ---- Fields from bytes ----


def _u16(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Little-endian uint16 from its two bytes, `[...]` uint8 each -> `[...]` uint16."""
    return lo.astype(jnp.uint16) | (hi.astype(jnp.uint16) << 8)


def _f16(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """An f16 field from its two bytes, `[...]` uint8 each -> `[...]` float32 (exact widening)."""
    return jax.lax.bitcast_convert_type(_u16(lo, hi), jnp.float16).astype(jnp.float32)


def _int8(bytes_: jax.Array) -> jax.Array:
    """Bytes read as two's-complement int8, `[...]` uint8 -> `[...]` int32."""
    return jax.lax.bitcast_convert_type(bytes_, jnp.int8).astype(jnp.int32)


def _bit_fields(bytes_: jax.Array, width: int) -> jax.Array:
    """Each byte's `width`-bit fields, lowest first, `[..., n]` uint8 -> `[..., 8 // width, n]`
    int32."""
    value = bytes_.astype(jnp.int32)[..., None, :]  # [..., 1, n]
    # Shifts at full rank, so this runs under jax_numpy_rank_promotion="raise" (as the tests do).
    shifts = jnp.arange(0, 8, width, dtype=jnp.int32).reshape((1,) * (value.ndim - 2) + (-1, 1))
    return (value >> shifts) & ((1 << width) - 1)


def _split(array: jax.Array, *shape: int) -> jax.Array:
    """The last axis of `[..., prod(shape)]` split into `[..., *shape]`."""
    return array.reshape(array.shape[:-1] + shape)


def _merge(array: jax.Array, count: int) -> jax.Array:
    """The last `count` axes merged into one, row-major: `[..., a, b]` -> `[..., a * b]` for 2."""
    return array.reshape(array.shape[:-count] + (math.prod(array.shape[-count:]),))


# ---- Block decoders: uint8 [..., type_size] -> float32 [..., block_size] ----


def _float32_block(blocks: jax.Array) -> jax.Array:
    """F32: `[..., 1, 4]` uint8 -> `[..., 1]` float32."""
    low, high = _u16(blocks[..., 0], blocks[..., 1]), _u16(blocks[..., 2], blocks[..., 3])
    bits = low.astype(jnp.uint32) | (high.astype(jnp.uint32) << 16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]


def _float16_block(blocks: jax.Array) -> jax.Array:
    """F16: `[..., 1, 2]` uint8 -> `[..., 1]` float32."""
    return _f16(blocks[..., 0], blocks[..., 1])[..., None]


def _bfloat16_block(blocks: jax.Array) -> jax.Array:
    """BF16: `[..., 1, 2]` uint8 -> `[..., 1]` float32 (bf16 is float32's top half)."""
    bits = _u16(blocks[..., 0], blocks[..., 1]).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]


def _q8_0_block(blocks: jax.Array) -> jax.Array:
    """Q8_0: `[..., 34]` uint8 -> `[..., 32]` float32, y[i] = qs[i] * d."""
    scale = _f16(blocks[..., 0], blocks[..., 1])[..., None]  # [..., 1]
    quants = _int8(blocks[..., 2:]).astype(jnp.float32)  # [..., 32]
    return quants * scale


def _q4_0_block(blocks: jax.Array) -> jax.Array:
    """Q4_0: `[..., 18]` uint8 -> `[..., 32]` float32, y[i] = (q[i] - 8) * d, q[i] the low nibble
    of qs[i] for i < 16 and the high nibble of qs[i - 16] otherwise."""
    scale = _f16(blocks[..., 0], blocks[..., 1])[..., None]  # [..., 1]
    quants = _merge(_bit_fields(blocks[..., 2:18], 4), 2)  # [..., 32]
    return (quants - 8).astype(jnp.float32) * scale


def _q5_0_block(blocks: jax.Array) -> jax.Array:
    """Q5_0: `[..., 22]` uint8 -> `[..., 32]` float32, y[i] = (q[i] - 16) * d.

    q[i]'s low 4 bits are the low nibble of qs[i] for i < 16 and the high nibble of qs[i - 16]
    otherwise; its 5th bit is bit i of the little-endian uint32 qh, i.e. bit i % 8 of byte i // 8.
    """
    scale = _f16(blocks[..., 0], blocks[..., 1])[..., None]  # [..., 1]
    high_bits = jnp.swapaxes(_bit_fields(blocks[..., 2:6], 1), -2, -1)  # [..., 4 (byte), 8 (bit)]
    low_bits = _bit_fields(blocks[..., 6:22], 4)  # [..., 2, 16]
    quants = _merge(low_bits, 2) | (_merge(high_bits, 2) << 4)  # [..., 32]
    return (quants - 16).astype(jnp.float32) * scale


def _q4_k_scales(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K's eight 6-bit scales and mins, `[..., 12]` uint8 -> two `[..., 8]` int32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    packed = packed.astype(jnp.int32)
    scale_bytes, min_bytes, low_bytes = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales_high = (low_bytes & 0x0F) | ((scale_bytes >> 6) << 4)
    mins_high = (low_bytes >> 4) | ((min_bytes >> 6) << 4)
    scales = jnp.concatenate([scale_bytes & 0x3F, scales_high], axis=-1)
    mins = jnp.concatenate([min_bytes & 0x3F, mins_high], axis=-1)
    return scales, mins


def _q4_k_block(blocks: jax.Array) -> jax.Array:
    """Q4_K: `[..., 144]` uint8 -> `[..., 256]` float32, eight sub-blocks of 32 values.

    y = (d * sc[j]) * q - (dmin * m[j]) in sub-block j; each 32-byte chunk c of qs holds
    sub-block 2c in its low nibbles and 2c + 1 in its high ones.
    """
    scale = _f16(blocks[..., 0], blocks[..., 1])[..., None]  # [..., 1]
    min_scale = _f16(blocks[..., 2], blocks[..., 3])[..., None]  # [..., 1]
    scales, mins = _q4_k_scales(blocks[..., 4:16])  # [..., 8] each
    sub_scale = (scale * scales.astype(jnp.float32))[..., None]  # [..., 8, 1]
    sub_min = (min_scale * mins.astype(jnp.float32))[..., None]  # [..., 8, 1]
    quants = _bit_fields(_split(blocks[..., 16:], 4, 32), 4)  # [..., 4, 2, 32]
    quants = _split(_merge(quants, 3), 8, 32)  # [..., 8, 32]
    values = sub_scale * quants.astype(jnp.float32) - sub_min
    return _merge(values, 2)


def _q6_k_quants(low: jax.Array, high: jax.Array) -> jax.Array:
    """Q6_K's 6-bit quants of one 128-value half, ql `[..., 64]` and qh `[..., 32]` uint8 ->
    `[..., 128]` int32 in -32..31.

    Value 32g + l (g = 0..3, l = 0..31) takes nibble g // 2 of ql[32 (g % 2) + l] as its low
    4 bits and bits 2g, 2g + 1 of qh[l] as its top 2.
    """
    low_bits = _bit_fields(_split(low, 2, 32), 4)  # [..., 2 (ql half), 2 (nibble), 32]
    low_bits = jnp.swapaxes(low_bits, -3, -2)  # [..., 2 (nibble), 2 (ql half), 32]
    high_bits = _bit_fields(high, 2)  # [..., 4, 32]
    quants = _split(_merge(low_bits, 3), 4, 32) | (high_bits << 4)  # [..., 4, 32]
    return _merge(quants, 2) - 32


def _q6_k_block(blocks: jax.Array) -> jax.Array:
    """Q6_K: `[..., 210]` uint8 -> `[..., 256]` float32, sixteen sub-blocks of 16 values.

    y = (d * sc[j]) * q in sub-block j; the block is two halves of 128 values, half h using
    ql[64h : 64h + 64] and qh[32h : 32h + 32] (see `_q6_k_quants`).
    """
    low, high = _split(blocks[..., 0:128], 2, 64), _split(blocks[..., 128:192], 2, 32)
    quants = _q6_k_quants(low, high)  # [..., 2, 128]
    quants = _split(_merge(quants, 2), 16, 16)  # [..., 16, 16]
    scale = _f16(blocks[..., 208], blocks[..., 209])[..., None]  # [..., 1]
    sub_scale = (scale * _int8(blocks[..., 192:208]).astype(jnp.float32))[..., None]  # [..., 16, 1]
    values = sub_scale * quants.astype(jnp.float32)  # [..., 16, 16]
    return _merge(values, 2)


_DECODERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "F32": _float32_block,
    "F16": _float16_block,
    "BF16": _bfloat16_block,
    "Q8_0": _q8_0_block,
    "Q4_0": _q4_0_block,
    "Q5_0": _q5_0_block,
    "Q4_K": _q4_k_block,
    "Q6_K": _q6_k_block,
}


# ---- Public API ----


def _layout(type_name: str) -> tuple[int, int]:
    if type_name not in BLOCK_LAYOUTS:
        raise ValueError(
            f"unsupported GGUF tensor type {type_name!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return BLOCK_LAYOUTS[type_name]


def row_bytes(type_name: str, cols: int) -> int:
    """Bytes in one row of `cols` values of GGUF type `type_name`.

    Raises:
        ValueError: for an unsupported type, or `cols` not a multiple of the type's block size.
    """
    block_size, type_size = _layout(type_name)
    if cols % block_size:
        raise ValueError(
            f"{type_name}: cols={cols} is not a multiple of its block size ({block_size})"
        )
    return cols // block_size * type_size


def dequantize(data: jax.Array, type_name: str, dtype=jnp.float32) -> jax.Array:
    """Raw GGUF bytes to values, bit-identical to `gguf.quants.dequantize` in float32.

    Args:
        data: `[..., row_bytes]` uint8, each row `cols / block_size` whole blocks (any leading
            axes; a jnp or numpy array, traced or not).
        type_name: a GGUF type name in `SUPPORTED_TYPES`, e.g. "Q4_K" (`GGMLQuantizationType.name`).
        dtype: the output dtype; values are computed in float32 and cast once at the end.

    Returns:
        `[..., cols]` of `dtype`, cols = row_bytes / type_size * block_size.

    Raises:
        ValueError: for an unsupported type, or a row_bytes that is not whole blocks.
        TypeError: for data that is not uint8.
    """
    block_size, type_size = _layout(type_name)
    if data.dtype != jnp.uint8:
        raise TypeError(f"{type_name}: data must be uint8 raw GGUF bytes, got {data.dtype}")
    if data.ndim == 0 or data.shape[-1] % type_size:
        raise ValueError(
            f"{type_name}: data of shape {tuple(data.shape)} does not hold whole blocks: "
            f"{data.shape[-1] if data.ndim else 0} bytes per row is not a multiple of the type "
            f"size {type_size} (block layout (block_size, type_size) = ({block_size}, {type_size}))"
        )
    n_blocks = data.shape[-1] // type_size
    blocks = _split(jnp.asarray(data), n_blocks, type_size)  # [..., n_blocks, type_size]
    values = _DECODERS[type_name](blocks)  # [..., n_blocks, block_size]
    return values.reshape(data.shape[:-1] + (n_blocks * block_size,)).astype(dtype)


def _dequantize_prefix(data: jax.Array, width: int, type_name: str, dtype) -> jax.Array:
    """`dequantize` of the first `width` bytes of each row (the rest is padding)."""
    return dequantize(data[..., :width], type_name, dtype)


def dequantize_any(
    data: jax.Array,
    type_index: jax.Array,
    type_names: tuple[str, ...],
    cols: int,
    dtype=jnp.float32,
) -> jax.Array:
    """Dequantise bytes whose GGUF type is chosen at run time, for stacks of mixed-type layers.

    A layer stack whose kernel has different types in different layers (the Gemma 3 270M GGUF's
    attn_v is Q5_0 or Q8_0, its ffn_down Q4_K or Q6_K) is stored as one byte array padded to the
    widest type (`pad_rows`) plus an int32 type index per layer; inside the scan over layers,
    `jax.lax.switch` runs the one decoder that layer needs.

    Args:
        data: `[..., padded_row_bytes]` uint8; a row of type t holds its `row_bytes(t, cols)`
            bytes first, then anything (zeros from `pad_rows`).
        type_index: int32 scalar, traced or not, indexing `type_names`; `jax.lax.switch` clamps
            an out-of-range index to the first or last branch.
        type_names: the candidate types, each in `SUPPORTED_TYPES`.
        cols: values per row, a multiple of every candidate's block size.
        dtype: the output dtype.

    Returns:
        `[..., cols]` of `dtype`, whichever type is chosen.

    Raises:
        ValueError: for no candidates, an unsupported type, `cols` not whole blocks of one, or
            rows narrower than the widest candidate's.
    """
    if not type_names:
        raise ValueError("dequantize_any needs at least one type name, got ()")
    widths = [row_bytes(name, cols) for name in type_names]
    if data.ndim == 0 or data.shape[-1] < max(widths):
        raise ValueError(
            f"data of shape {tuple(data.shape)} is narrower than the {max(widths)} bytes per row "
            f"that cols={cols} takes in {type_names[widths.index(max(widths))]}"
        )
    branches = [
        functools.partial(_dequantize_prefix, width=width, type_name=name, dtype=dtype)
        for name, width in zip(type_names, widths, strict=True)
    ]
    return jax.lax.switch(type_index, branches, data)


def pad_rows(data: np.ndarray, width: int) -> np.ndarray:
    """Host-side: zero-pad uint8 rows `[rows, row_bytes]` to `[rows, width]` (for `dequantize_any`).

    Raises:
        ValueError: for data that is not 2-D uint8, or a width below row_bytes.
    """
    data = np.asarray(data)
    if data.ndim != 2 or data.dtype != np.uint8:
        raise ValueError(f"pad_rows wants 2-D uint8 rows, got shape {data.shape} {data.dtype}")
    if width < data.shape[1]:
        raise ValueError(
            f"width={width} is below the {data.shape[1]} bytes per row of {data.shape}"
        )
    return np.pad(data, ((0, 0), (0, width - data.shape[1])))
