"""A GGUF file's metadata (header and key-value section) read directly, without its tensors.

`gguf.GGUFReader` parses every field and maps every tensor, which takes ~11 s for the Gemma 3
GGUF's 262k-entry vocabulary; reading the key-value section alone takes a fraction of a second:
numeric arrays come out as numpy views of the file, string arrays as lists. Every length is
checked against the bytes left, so a damaged header is an error, not a huge allocation.
"""

import os
import struct
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUF value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian values from a byte buffer, checking each length against what is left."""

    def __init__(self, buffer, path: str):
        self.buffer, self.offset, self.path = buffer, 0, path

    def take(self, size: int, what: str):
        if size < 0 or self.offset + size > len(self.buffer):
            raise ValueError(
                f"{self.path}: GGUF {what} at byte {self.offset} needs {size} bytes; the file "
                f"has {len(self.buffer) - self.offset} left (truncated or damaged header)"
            )
        start, self.offset = self.offset, self.offset + size
        return self.buffer[start : self.offset]

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        return bytes(self.take(self.scalar("<Q", what), what)).decode("utf-8")


def _value(cursor: _Cursor, value_type: int, key: str) -> Any:
    if value_type in _SCALARS:
        return cursor.scalar(_SCALARS[value_type][0], key)
    if value_type == _STRING:
        return cursor.string(key)
    if value_type != _ARRAY:
        raise ValueError(f"{cursor.path}: GGUF key {key!r} has unknown value type {value_type}")
    item_type, count = cursor.scalar("<I", key), cursor.scalar("<Q", key)
    if item_type in _SCALARS:
        dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
        return np.frombuffer(cursor.take(count * dtype.itemsize, key), dtype=dtype)
    if item_type == _STRING:
        if count > len(cursor.buffer) // 8:  # each string needs at least its 8-byte length
            raise ValueError(
                f"{cursor.path}: GGUF key {key!r} claims {count} strings (damaged header)"
            )
        return [cursor.string(key) for _ in range(count)]
    raise ValueError(f"{cursor.path}: GGUF key {key!r} is an array of unsupported type {item_type}")


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (version 2 or 3), tensors left unread.

    Returns:
      key -> value: ints, floats, bools and strings as Python values; numeric arrays as numpy
      arrays (read-only views of the file); string arrays as lists of str.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a GGUF file, an unsupported version, or a length the file cannot hold.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    buffer = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    cursor = _Cursor(buffer, path)
    if bytes(cursor.take(4, "magic")) != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (no 'GGUF' magic)")
    version = cursor.scalar("<I", "version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    cursor.scalar("<Q", "tensor count")
    num_keys = cursor.scalar("<Q", "key count")
    if num_keys > len(buffer) // 12:  # each key needs at least its length and its type
        raise ValueError(
            f"{path}: GGUF header claims {num_keys} keys, more than its {len(buffer)} bytes can "
            "hold (truncated or damaged header)"
        )
    metadata = {}
    for _ in range(num_keys):
        key = cursor.string("key")
        metadata[key] = _value(cursor, cursor.scalar("<I", key), key)
    return metadata
