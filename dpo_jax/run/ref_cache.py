"""A persistent cache of precomputed reference log-probs, keyed by what they depend on.

The precomputed pass (`dpo_jax.run.ref_logps`) costs one reference forward over every pair. A sweep
over β, or a rerun after a crash, recomputes the same numbers; with `config.dpo.reference=
"cached"` the pass's table is written to `<ref_cache_dir>/<fingerprint>.safetensors` and later
runs with the same fingerprint read it back instead (no reference forward runs).

The fingerprint is a dict of component hashes, so a miss can say what changed:
  reference weights   every param's path, dtype, shape and bytes
  tokenizer           its vocabulary and model (tokenizers' JSON), special tokens, chat template
  data                the content of each source (the file's bytes, or the records as JSON)
  data settings       max_length, max_prompt_length, truncation, boundary, ...
  scoring             what changes which tokens are scored or how they sum (LD-DPO's α, the
                      logit soft-cap)
The file is safetensors (two arrays, the fingerprint in its metadata): it cannot run code when
read, unlike a pickle, and a damaged file is a clear error.
"""

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dpo_jax import storage
from dpo_jax.run.ref_logps import RefLogpsTable


def _digest(*chunks: bytes) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(len(chunk).to_bytes(8, "little"))
        hasher.update(chunk)
    return hasher.hexdigest()


def params_digest(params: Any) -> str:
    """sha256 of every leaf's path, dtype, shape and bytes (gathered across processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    chunks = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(jax.device_get(leaf))
        header = f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode()
        chunks += [header, array.tobytes()]
    return _digest(*chunks)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary and model, special tokens, chat template and add_bos."""
    backend = getattr(tokenizer, "backend", None)
    vocabulary = backend.to_str() if backend is not None else repr(tokenizer)
    extra = json.dumps(
        {
            "special": getattr(tokenizer, "special_tokens", None),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "add_bos": getattr(tokenizer, "add_bos", None),
        },
        sort_keys=True,
        default=str,
    )
    return _digest(vocabulary.encode(), extra.encode())


def _source_digest(source: Any) -> str:
    if getattr(source, "fingerprint", None):  # a `datasets` source: its own digest
        return _digest(f"datasets {source.fingerprint}".encode())
    if isinstance(source, (str, os.PathLike)):
        return _digest(storage.read_bytes(source))
    records = [source[index] for index in range(len(source))]
    return _digest(json.dumps(records, sort_keys=True, default=str).encode())


def fingerprint(
    *,
    ref_params: Any,
    tokenizer: Any,
    sources: Sequence[Any],
    data_settings: dict[str, Any],
    scoring: dict[str, Any],
) -> dict[str, str]:
    """The components the reference log-probs depend on, each as a hex digest."""
    components = {
        "reference weights": params_digest(ref_params),
        "tokenizer": tokenizer_digest(tokenizer),
        "data settings": _digest(json.dumps(data_settings, sort_keys=True).encode()),
        "scoring": _digest(json.dumps(scoring, sort_keys=True).encode()),
    }
    for index, source in enumerate(s for s in sources if s is not None):
        components[f"data {index}"] = _source_digest(source)
    return components


def cache_file(cache_dir: str, components: dict[str, str]) -> str:
    """`<cache_dir>/<digest of all components>.safetensors`."""
    name = _digest(json.dumps(components, sort_keys=True).encode())[:32]
    return storage.join(cache_dir, f"{name}.safetensors")


def load(path: str) -> RefLogpsTable | None:
    """The table cached at `path`, or None when there is none.

    Raises:
      ValueError: the file exists but is not a readable cache (names the path).
    """
    if not storage.exists(path):
        return None
    import safetensors.numpy

    try:
        arrays = safetensors.numpy.load(storage.read_bytes(path))
        return RefLogpsTable.from_arrays(arrays["keys"], arrays["logps"])
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(
            f"{path}: not a readable reference log-prob cache ({error}); delete it to recompute"
        ) from None


def save(path: str, components: dict[str, str], table: RefLogpsTable) -> None:
    """Writes the table atomically (`dpo_jax.storage.write_bytes`), on process 0 only."""
    if jax.process_index() != 0:
        return
    import safetensors.numpy

    keys, logps = table.to_arrays()
    metadata = {"fingerprint": json.dumps(components, sort_keys=True)}
    data = safetensors.numpy.save({"keys": keys, "logps": logps}, metadata=metadata)
    storage.write_bytes(path, data)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte little-endian length, then the
    header's JSON), read without the tensors: safetensors' own reader wants a local file."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def what_changed(cache_dir: str, components: dict[str, str]) -> str:
    """Names the components that differ from the newest cache file in `cache_dir`."""
    if not storage.is_dir(cache_dir):
        return "no cache yet"
    files = [
        storage.join(cache_dir, name)
        for name in storage.list_dir(cache_dir)
        if name.endswith(".safetensors")
    ]
    if not files:
        return "no cache yet"
    newest = max(files, key=storage.modified_time)
    try:
        cached = json.loads(_header_metadata(storage.read_bytes(newest))["fingerprint"])
    except Exception:  # noqa: BLE001 - an unreadable neighbour only loses the explanation
        return f"the newest cache ({newest}) is unreadable"
    changed = sorted(
        name for name in set(cached) | set(components) if cached.get(name) != components.get(name)
    )
    return "changed since the newest cache: " + (", ".join(changed) or "nothing")
