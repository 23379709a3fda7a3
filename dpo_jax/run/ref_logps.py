"""Reference log-probs computed in one pass before training, then carried in each batch.

The pass runs the frozen reference once over every pair (one pair per row, in order) and stores
each pair's (chosen, rejected) summed log-probs under the pair's content: the token ids and
response mask of its chosen and rejected sequences. Training batches, shuffled and possibly
packed differently, then get `ref_logps` [B, 2, S] by looking each slot's pair up. Keying by
content, not by an index, needs nothing from the data pipeline and survives packing; identical
pairs share an entry, which is right since their log-probs are identical. The key is a sha256
of that content, so a table of a million pairs holds 32 bytes of key per pair and can be written
to a file (`dpo_jax.run.ref_cache`).

With several processes each one runs the pass on its slice of every batch (as the pipeline gives
it), and the slices' pairs and log-probs are all-gathered, so every process ends with the whole
table: its training batches, shuffled anew each epoch, read pairs that another process saw.
"""

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

PairKey = bytes  # sha256 of the pair's content: 32 bytes


def _pair_key(batch: dict[str, np.ndarray], row: int, segment: int) -> PairKey:
    """sha256 over the pair's chosen and rejected token ids and response masks (each part
    length-prefixed, so no two different pairs share the byte stream)."""
    hasher = hashlib.sha256()
    for side in (0, 1):
        in_segment = batch["segment_ids"][row, side] == segment
        for part in (
            batch["tokens"][row, side][in_segment].astype(np.int32).tobytes(),
            batch["response_mask"][row, side][in_segment].astype(bool).tobytes(),
        ):
            hasher.update(len(part).to_bytes(8, "little"))
            hasher.update(part)
    return hasher.digest()


def _slots(batch: dict[str, np.ndarray]) -> Iterator[tuple[int, int]]:
    """(row, slot) of every real pair of a host batch."""
    rows, slots = np.nonzero(batch["pair_mask"])
    return zip(rows.tolist(), slots.tolist(), strict=True)


class RefLogpsTable:
    """Pair content -> (chosen, rejected) reference log-probs, float32."""

    def __init__(self):
        self._logps: dict[PairKey, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._logps)

    def add(self, batch: dict[str, np.ndarray], logps: np.ndarray) -> None:
        """Stores the log-probs [B, 2, S] of a host batch's real pairs."""
        for row, slot in _slots(batch):
            self._logps[_pair_key(batch, row, slot + 1)] = np.asarray(
                logps[row, :, slot], np.float32
            )

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [N, 32] uint8, log-probs [N, 2] float32), for a file (`dpo_jax.run.ref_cache`)."""
        keys = np.frombuffer(b"".join(self._logps), np.uint8).reshape(len(self), 32)
        logps = np.stack(list(self._logps.values())) if self._logps else np.zeros((0, 2))
        return keys, logps.astype(np.float32)

    @classmethod
    def from_arrays(cls, keys: np.ndarray, logps: np.ndarray) -> "RefLogpsTable":
        """The table `to_arrays` gave.

        Raises:
          ValueError: arrays of the wrong shapes.
        """
        if keys.ndim != 2 or keys.shape[1] != 32 or logps.shape != (len(keys), 2):
            raise ValueError(
                f"keys {keys.shape} and log-probs {logps.shape}: expected [N, 32], [N, 2]"
            )
        table = cls()
        for key, value in zip(keys, logps, strict=True):
            table._logps[key.tobytes()] = np.asarray(value, np.float32)
        return table

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch plus `ref_logps` [B, 2, S] float32 (0 on padding slots).

        Raises:
          ValueError: a pair of the batch was not in the precomputation pass.
        """
        num_rows, num_slots = batch["pair_mask"].shape
        ref_logps = np.zeros((num_rows, 2, num_slots), np.float32)
        for row, slot in _slots(batch):
            key = _pair_key(batch, row, slot + 1)
            if key not in self._logps:
                raise ValueError(
                    f"row {row} slot {slot} of a batch holds a pair that the reference pass did "
                    f"not see ({len(self)} pairs precomputed); the pass must cover every source"
                )
            ref_logps[row, :, slot] = self._logps[key]
        return {**batch, "ref_logps": ref_logps}


def precompute(
    table: RefLogpsTable,
    batches: Iterable[dict[str, np.ndarray]],
    compute_fn: Callable[[dict[str, np.ndarray]], jax.Array],
) -> None:
    """Runs `compute_fn` over `batches` into `table`.

    Args:
      table: where the log-probs go.
      batches: this process's host batches (its rows of each global batch).
      compute_fn: host batch -> [B, 2, S] log-probs of the global batch, sharded along B as the
        batch was placed (`sharding.put_batch`).

    Each batch's result is fetched one batch later, so the device is never idle waiting for it.
    With several processes every process must run this over its slices of the same batches.
    """
    pending = None
    for batch in batches:
        logps = compute_fn(batch)
        if pending is not None:
            table.add(*_all_rows(*pending))
        pending = (batch, logps)
    if pending is not None:
        table.add(*_all_rows(*pending))


def host_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded along axis 0, in the order of its host
    batch (`jax.make_array_from_process_local_data` lays the local rows out by row index)."""
    shards = {shard.index[0].start or 0: shard for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def _all_rows(batch: dict[str, np.ndarray], logps: jax.Array):
    """(host batch, host log-probs [B, 2, S]) of every process's rows of the batch."""
    rows = host_rows(logps)
    if jax.process_count() == 1:
        return batch, rows
    from jax.experimental import multihost_utils

    keyed = {key: batch[key] for key in ("tokens", "response_mask", "segment_ids", "pair_mask")}
    # Each process's batch rows and log-prob rows travel together, so they stay paired.
    gathered = multihost_utils.process_allgather({**keyed, "ref_logps": rows}, tiled=True)
    logps_all = gathered.pop("ref_logps")
    return {key: np.asarray(value) for key, value in gathered.items()}, np.asarray(logps_all)


class WithRefLogps:
    """A data iterator whose batches carry `ref_logps`; its state is the wrapped iterator's."""

    def __init__(self, iterator: Any, table: RefLogpsTable):
        self._iterator = iterator
        self._table = table

    def __iter__(self) -> "WithRefLogps":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self._table.attach(next(self._iterator))

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)
