"""Reference log-probs computed in one pass before training, then carried in each batch.

The pass runs the frozen reference once over every pair (one pair per row, in order) and stores
each pair's (chosen, rejected) summed log-probs under the pair's content: the token ids and
response mask of its chosen and rejected sequences. Training batches, shuffled and possibly
packed differently, then get `ref_logps` [B, 2, S] by looking each slot's pair up. Keying by
content, not by an index, needs nothing from the data pipeline and survives packing; identical
pairs share an entry, which is right since their log-probs are identical.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

PairKey = tuple[bytes, bytes, bytes, bytes]


def _pair_key(batch: dict[str, np.ndarray], row: int, segment: int) -> PairKey:
    parts = []
    for side in (0, 1):
        in_segment = batch["segment_ids"][row, side] == segment
        parts.append(batch["tokens"][row, side][in_segment].astype(np.int32).tobytes())
        parts.append(batch["response_mask"][row, side][in_segment].astype(bool).tobytes())
    return tuple(parts)


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
    """Runs `compute_fn` (host batch -> [B, 2, S] device log-probs) over `batches` into `table`.

    Each batch's result is fetched one batch later, so the device is never idle waiting for it.
    """
    pending = None
    for batch in batches:
        logps = compute_fn(batch)
        if pending is not None:
            table.add(pending[0], np.asarray(jax.device_get(pending[1])))
        pending = (batch, logps)
    if pending is not None:
        table.add(pending[0], np.asarray(jax.device_get(pending[1])))


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
