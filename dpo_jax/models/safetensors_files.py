"""safetensors files: tensors read lazily from a checkpoint, and files written whole (the
`safetensors` package) or streamed (an export), to local paths and URLs (`dpo_jax.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open
from safetensors.numpy import save_file

from dpo_jax import storage


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]):
    """A safetensors file at a local path (streamed) or a URL (serialised, then one upload)."""
    if storage.is_remote(path):
        storage.write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata=metadata)


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """A tensor given as consecutive blocks along its first axis, each written as it comes: the
    whole tensor is never on the host (a quantised embedding decoded to float32 is 0.67 GB for
    Gemma 3's 262,144 x 640).

    Attributes:
      shape: the whole tensor's shape.
      dtype: every block's dtype.
      blocks: arrays [rows_i, *shape[1:]] whose rows add up to shape[0].
    """

    shape: tuple[int, ...]
    dtype: Any
    blocks: Iterable[np.ndarray]


def _write_tensor(writer, path: str, name: str, tensor: Any) -> None:
    """Writes an array, or a `RowBlocks` block by block (checking each block's shape)."""
    if not isinstance(tensor, RowBlocks):
        writer.write(np.ascontiguousarray(tensor).view(np.uint8).data)
        return
    rows = 0
    for block in tensor.blocks:
        if block.shape[1:] != tuple(tensor.shape[1:]) or block.dtype != np.dtype(tensor.dtype):
            raise ValueError(
                f"{path}: a block {block.dtype}{list(block.shape)} of {name!r} does not fit "
                f"{np.dtype(tensor.dtype)}{list(tensor.shape)}"
            )
        writer.write(np.ascontiguousarray(block).view(np.uint8).data)
        rows += block.shape[0]
    if rows != tensor.shape[0]:
        raise ValueError(f"{path}: the blocks of {name!r} hold {rows} rows of {tensor.shape[0]}")


def write_safetensors_streamed(path: str, entries, tensors, metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time, in `entries`' order.

    The `safetensors` package's writers take every tensor at once (a dict), which for an export
    means a second copy of the whole model on the host; the format is an 8-byte little-endian
    header length, a JSON header of names, dtypes, shapes and byte offsets, then the tensors'
    bytes back to back, so with the shapes known up front the header is written first and each
    tensor streamed after it (the file reads back with `safetensors` and transformers).

    Args:
      path: a local path or a URL.
      entries: [(name, shape, numpy dtype)], the order the tensors come in.
      tensors: an iterator of (name, array or `RowBlocks`) in that order.
      metadata: the header's `__metadata__`.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[np.dtype(dtype).name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-byte aligned, as safetensors pads
    if not storage.is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    expected = iter(entries)
    with storage.open_file(path, "wb") as writer:
        writer.write(len(text).to_bytes(8, "little") + text)
        for name, tensor in tensors:
            want_name, want_shape, want_dtype = next(expected)
            got = (name, tuple(tensor.shape), np.dtype(tensor.dtype))
            if got != (want_name, tuple(want_shape), np.dtype(want_dtype)):
                raise ValueError(f"{path}: tensor {got} is not the header's next, {want_name}")
            _write_tensor(writer, path, name, tensor)


class LazyTensor:
    """A tensor in a safetensors file: shape from the header, data read by `np.asarray`."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        with safe_open(path, framework="numpy") as f:
            self.shape = tuple(f.get_slice(name).get_shape())

    def __array__(self, dtype=None, copy=None):
        with safe_open(self.path, framework="numpy") as f:
            array = f.get_tensor(self.name)
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        """Reads only `index` (slices with step 1) from the file, in the file's dtype."""
        with safe_open(self.path, framework="numpy") as f:
            return f.get_slice(self.name)[index]


def tensor_names(path: str) -> list[str]:
    """The tensor names of a safetensors file; a damaged file is a ValueError naming it."""
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        size = os.path.getsize(path)
        raise ValueError(
            f"{path}: not a readable safetensors file ({size} bytes; {e}): truncated or damaged?"
        ) from None
