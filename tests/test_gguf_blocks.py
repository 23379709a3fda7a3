"""gguf_blocks against the `gguf` package's numpy dequantiser, bit for bit.

Every comparison is `np.testing.assert_array_equal` on float32: the decoders repeat the
reference's float32 operations in its order, and the one multiply-add (Q4_K) has exact products,
so an FMA the compiler forms cannot move a bit. The inputs are (a) random blocks whose f16 scale
fields are any finite f16 (zeros, subnormals and both signs included) and whose other bytes are
uniform, and (b) real tensors of each type from the Gemma 3 270M Q4_K_M GGUF.
"""

import ast
import functools
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as reference_dequantize

from dpo_jax.models import gguf_blocks
from dpo_jax.models.gguf_blocks import BLOCK_LAYOUTS, SUPPORTED_TYPES

QUANTISED = ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")
# Byte offsets of each block's f16 fields (ggml-common.h's block structs).
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}

_dequantize_jit = jax.jit(gguf_blocks.dequantize, static_argnames=("type_name", "dtype"))


def _reference(raw: np.ndarray, type_name: str) -> np.ndarray:
    """gguf's float32 dequantisation of `[..., row_bytes]` uint8 -> `[..., cols]`."""
    return reference_dequantize(raw, gguf.GGMLQuantizationType[type_name])


def _finite_f16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform f16 bit patterns with inf/NaN ones (exponent all ones) mapped to zero/subnormal."""
    bits = rng.integers(0, 2**16, shape, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)


def _random_blocks(rng, type_name: str, leading: tuple[int, ...], n_blocks: int) -> np.ndarray:
    """`[*leading, n_blocks * type_size]` uint8 valid blocks: uniform bytes, finite f16 fields."""
    _, type_size = BLOCK_LAYOUTS[type_name]
    raw = rng.integers(0, 256, (*leading, n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[type_name]:
        field = _finite_f16_bits(rng, (*leading, n_blocks))
        raw[..., offset : offset + 2] = field.view(np.uint8).reshape(*leading, n_blocks, 2)
    return raw.reshape(*leading, n_blocks * type_size)


# ---- Random valid blocks ----


@pytest.mark.parametrize("type_name", QUANTISED)
@pytest.mark.parametrize(
    ("leading", "n_blocks"), [((1,), 1), ((5,), 3), ((2, 3), 4), ((64,), 8)], ids=str
)
def test_random_blocks_bit_exact(type_name, leading, n_blocks):
    raw = _random_blocks(np.random.default_rng(n_blocks), type_name, leading, n_blocks)
    got = np.asarray(_dequantize_jit(raw, type_name=type_name))
    block_size, _ = BLOCK_LAYOUTS[type_name]
    assert got.shape == (*leading, n_blocks * block_size) and got.dtype == np.float32
    np.testing.assert_array_equal(got, _reference(raw, type_name))


@pytest.mark.parametrize("type_name", QUANTISED)
def test_output_dtype_is_a_cast_of_float32(type_name):
    raw = _random_blocks(np.random.default_rng(0), type_name, (4,), 2)
    got = _dequantize_jit(raw, type_name=type_name, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), _reference(raw, type_name).astype(got.dtype))


@pytest.mark.parametrize(
    ("type_name", "bits_dtype", "value_dtype"),
    [("F32", np.uint32, np.float32), ("F16", np.uint16, np.float16), ("BF16", np.uint16, None)],
)
def test_float_passthrough_bit_exact(type_name, bits_dtype, value_dtype):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, np.iinfo(bits_dtype).max, (3, 48), bits_dtype, endpoint=True)
    if value_dtype is not None:  # finite values only: NaN payloads are not compared bitwise
        bits = np.where(np.isfinite(bits.view(value_dtype)), bits, 0).astype(bits_dtype)
    raw = bits.view(np.uint8)  # [3, 48 * bytes], little-endian as GGUF
    got = np.asarray(_dequantize_jit(raw, type_name=type_name))
    # BF16: compare bit patterns, so NaNs count too (both widen by a 16-bit shift).
    np.testing.assert_array_equal(got.view(np.uint32), _reference(raw, type_name).view(np.uint32))


# ---- Real tensors from the Gemma 3 270M GGUF ----


@pytest.fixture(scope="module")
def gguf_tensors(gguf_path):
    """name -> (type name, raw `[rows, row_bytes]` uint8) for every tensor (one ~10 s read)."""
    reader = gguf.GGUFReader(gguf_path)
    return {
        tensor.name: (tensor.tensor_type.name, np.asarray(tensor.data).view(np.uint8))
        for tensor in reader.tensors
    }


@pytest.mark.parametrize("type_name", [*QUANTISED, "F32"])
def test_real_tensor_bit_exact(gguf_tensors, type_name):
    if type_name == "Q4_0":  # not in this file: blocks from gguf's own quantiser instead
        name, raw = next((n, r) for n, (k, r) in gguf_tensors.items() if k == "F32")
        weights = np.random.default_rng(0).normal(0, 0.02, (64, 640)).astype(np.float32)
        raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_0)
        got = np.asarray(_dequantize_jit(raw, type_name="Q4_0"))
        np.testing.assert_array_equal(got, _reference(raw, "Q4_0"))
        return
    # The first layer tensor of the type (token_embd, Q8_0 [262144, 640], is too big to bother).
    name, raw = next(
        (name, raw)
        for name, (kind, raw) in gguf_tensors.items()
        if kind == type_name and name.startswith("blk.")
    )
    want = _reference(raw, type_name)
    got = np.asarray(_dequantize_jit(jnp.asarray(raw), type_name=type_name))
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)


# ---- Mixed types: lax.switch inside a jitted scan over layers ----


@functools.partial(jax.jit, static_argnames=("type_names", "cols"))
def _scan_dequantize(stacked: jax.Array, type_indices: jax.Array, type_names, cols):
    """`[L, rows, padded]` uint8, `[L]` int32 -> `[L, rows, cols]` float32, one layer per step."""

    def step(carry, layer):
        data, type_index = layer
        return carry, gguf_blocks.dequantize_any(data, type_index, type_names, cols)

    return jax.lax.scan(step, None, (stacked, type_indices))[1]


def _check_scan(layers: list[tuple[str, np.ndarray]], type_names: tuple[str, ...], cols: int):
    """Stack `layers` ((type, raw [rows, row_bytes]) each) padded, scan, compare each layer."""
    width = max(raw.shape[1] for _, raw in layers)
    stacked = np.stack([gguf_blocks.pad_rows(raw, width) for _, raw in layers])
    indices = np.array([type_names.index(kind) for kind, _ in layers], np.int32)
    got = np.asarray(_scan_dequantize(stacked, indices, type_names=type_names, cols=cols))
    for layer, (kind, raw) in enumerate(layers):
        np.testing.assert_array_equal(got[layer], _reference(raw, kind), err_msg=f"{layer} {kind}")


@pytest.mark.parametrize("type_names", [("Q5_0", "Q8_0"), ("Q4_K", "Q6_K")], ids=str)
def test_dequantize_any_in_scan_random(type_names):
    rng = np.random.default_rng(0)
    cols = 512  # whole blocks of all four types
    layers = [
        (kind, _random_blocks(rng, kind, (6,), cols // BLOCK_LAYOUTS[kind][0]))
        for kind in type_names
    ]
    _check_scan(layers[::-1], type_names, cols)  # layer 0 takes branch 1, layer 1 branch 0


@pytest.mark.parametrize(
    ("kernel", "type_names", "cols"),
    [("attn_v", ("Q5_0", "Q8_0"), 640), ("ffn_down", ("Q4_K", "Q6_K"), 2048)],
)
def test_dequantize_any_in_scan_real(gguf_tensors, kernel, type_names, cols):
    # Layers 0 and 2 of the packaged file differ in type for both kernels.
    layers = [gguf_tensors[f"blk.{layer}.{kernel}.weight"] for layer in (0, 2)]
    assert sorted(kind for kind, _ in layers) == sorted(type_names), layers
    _check_scan(layers, type_names, cols)


def test_pad_rows_zero_pads_on_the_right():
    raw = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(gguf_blocks.pad_rows(raw, 5), [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0]])


# ---- Bad input ----


def _message(call, *args) -> str:
    with pytest.raises((ValueError, TypeError)) as error:
        call(*args)
    return str(error.value)


def test_unsupported_type_names_it_and_the_supported_ones():
    assert SUPPORTED_TYPES == ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")
    expected = (
        "unsupported GGUF tensor type 'Q4_1'; "
        "supported: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K"
    )
    raw = np.zeros((2, 18), np.uint8)
    assert _message(gguf_blocks.dequantize, raw, "Q4_1") == expected
    assert _message(gguf_blocks.dequantize_any, raw, 0, ("Q8_0", "Q4_1"), 32) == expected


def test_partial_block_names_the_shapes():
    assert _message(gguf_blocks.dequantize, np.zeros((2, 35), np.uint8), "Q8_0") == (
        "Q8_0: data of shape (2, 35) does not hold whole blocks: 35 bytes per row is not a "
        "multiple of the type size 34 (block layout (block_size, type_size) = (32, 34))"
    )


def test_other_bad_inputs():
    assert _message(gguf_blocks.dequantize, np.zeros((2, 34), np.int8), "Q8_0") == (
        "Q8_0: data must be uint8 raw GGUF bytes, got int8"
    )
    narrow = np.zeros((2, 440), np.uint8)
    assert _message(gguf_blocks.dequantize_any, narrow, 0, ("Q5_0", "Q8_0"), 640) == (
        "data of shape (2, 440) is narrower than the 680 bytes per row that cols=640 takes in Q8_0"
    )
    assert _message(gguf_blocks.dequantize_any, narrow, 0, ("Q5_0", "Q4_K"), 640) == (
        "Q4_K: cols=640 is not a multiple of its block size (256)"
    )
    assert _message(gguf_blocks.dequantize_any, narrow, 0, (), 640) == (
        "dequantize_any needs at least one type name, got ()"
    )
    assert _message(gguf_blocks.pad_rows, narrow, 400) == (
        "width=400 is below the 440 bytes per row of (2, 440)"
    )


def test_module_imports_jax_and_numpy_only():
    tree = ast.parse(pathlib.Path(gguf_blocks.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"collections", "dataclasses", "functools", "math", "typing", "jax", "numpy"}, (
        roots
    )
