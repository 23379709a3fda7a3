"""Preference batches with grain: seeded shuffle, fixed shapes, per-host shards, resumable state.

Records are normalised and tokenised eagerly, once, before the grain pipeline is built: the
counts of dropped and truncated records (`DataStats`) are then complete before the first step
(a grain `filter` would lose them), and packing knows every pair's length. The pipeline then
works on rows (one pair each, or several packed ones):

    MapDataset.source(rows) -> shuffle(seed) -> repeat(num_epochs, a new shuffle each epoch)
      -> batches of `batch_size` consecutive rows -> this host's slice -> numpy dict

Batches are cut from one stream that runs across epochs; only the very last batch of a finite
stream is short, and it is padded with `pair_mask` False, never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dpo_jax.data.batching import collate_rows, pack_pairs
from dpo_jax.data.records import DEFAULT_RESPONSE_MARKER, load_records, unpair_records
from dpo_jax.data.tokenize import (
    DataStats,
    TokenizedPair,
    tokenize_records,
    tokenize_unpaired_records,
)

# One background thread builds the next few batches. grain's default (16 threads, 500 elements
# ahead) would hold 500 whole batches in memory.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class _HostBatch:
    """Batch j of the stream, as this host sees it: rows [j*B + p*Bh, j*B + (p+1)*Bh)."""

    rows: grain.MapDataset
    global_batch_size: int
    process_index: int
    num_rows: int  # Bh = B / process_count
    max_length: int
    pairs_per_row: int
    pad_id: int

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        start = batch_index * self.global_batch_size + self.process_index * self.num_rows
        stop = min(start + self.num_rows, len(self.rows))
        return collate_rows(
            [self.rows[i] for i in range(start, stop)],
            num_rows=self.num_rows,
            max_length=self.max_length,
            pairs_per_row=self.pairs_per_row,
            pad_id=self.pad_id,
        )


class _EvalBatches(Sequence):
    """Batches read one at a time, in order, by index (no prefetch threads)."""

    def __init__(self, batches: grain.MapDataset):
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        return self._batches[index]


def tokenize_source(
    source: Any,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    response_marker: str = DEFAULT_RESPONSE_MARKER,
    boundary: str = "separate",
    on_boundary_problem: str = "error",
    kl_group_size: int | None = None,
) -> tuple[list[TokenizedPair], DataStats]:
    """Reads, normalises and tokenises every record of `source` (see `records.load_records`).

    With `kl_group_size` (KTO), records become unpaired ones (`records.unpair_records`: a
    preference pair gives its chosen and its rejected completion) and are tokenised by
    `tokenize.tokenize_unpaired_records`, each pair then carrying its `label`.

    Raises:
      ValueError: the source is empty, a record is malformed, or no record was kept (the
        message carries the counts).
    """
    limits = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        prompt_too_long=prompt_too_long,
        boundary=boundary,
        on_boundary_problem=on_boundary_problem,
    )
    if kl_group_size is not None:
        raw = unpair_records(load_records(source))
        pairs, stats = tokenize_unpaired_records(
            raw, tokenizer, kl_group_size=kl_group_size, **limits
        )
    else:
        pairs, stats = tokenize_records(
            load_records(source), tokenizer, response_marker=response_marker, **limits
        )
    if not pairs:
        raise ValueError(f"no preference pair survived tokenisation: {stats}")
    return pairs, stats


def make_rows(
    pairs: Sequence[TokenizedPair], *, max_length: int, pairs_per_row: int, seed: int, shuffle: bool
) -> list[list[TokenizedPair]]:
    """One row per pair, or (pairs_per_row > 1) pairs packed once, in a seeded order."""
    if pairs_per_row == 1:
        return [[pair] for pair in pairs]
    order = np.arange(len(pairs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(pairs))
    lengths = np.array([pairs[i].lengths for i in order], dtype=np.int64).reshape(-1, 2)
    packed = pack_pairs(lengths, max_length=max_length, pairs_per_row=pairs_per_row)
    return [[pairs[order[i]] for i in row] for row in packed]


def batches_from_rows(
    rows: Sequence[list[TokenizedPair]],
    *,
    batch_size: int,
    max_length: int,
    pairs_per_row: int,
    pad_id: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """The grain dataset of this host's batches (see the module docstring)."""
    check_batching(batch_size, pairs_per_row, num_epochs, process_index, process_count)
    dataset = grain.MapDataset.source(list(rows))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)  # reshuffles each epoch with a seed derived from `seed`
    host_batch = _HostBatch(
        rows=dataset,
        global_batch_size=batch_size,
        process_index=process_index,
        num_rows=batch_size // process_count,
        max_length=max_length,
        pairs_per_row=pairs_per_row,
        pad_id=pad_id,
    )
    num_batches = -(-len(dataset) // batch_size)  # integer ceil: len is 2**63 - 1 when forever
    return grain.MapDataset.range(num_batches).map(host_batch)


def check_batching(
    batch_size: int,
    pairs_per_row: int,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
) -> None:
    """Raises ValueError naming the value and the expectation when a batching argument is bad."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
        )
    if pairs_per_row < 1:
        raise ValueError(f"pairs_per_row={pairs_per_row} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be None (forever) or >= 1")


def make_pair_iterator(
    source: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    response_marker: str = DEFAULT_RESPONSE_MARKER,
    boundary: str = "separate",
    on_boundary_problem: str = "error",
    kl_group_size: int | None = None,
    pairs_per_row: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[grain.DatasetIterator, DataStats]:
    """The training stream: an iterator of this host's batches, and the data counts.

    Args:
      source: a `.jsonl`/`.parquet` path, a list of record dicts, or a
        `tfds_source.PreferenceDataSource`.
      tokenizer: a `dpo_jax.tokenizer.Tokenizer`.
      batch_size: B, rows per global batch (a multiple of process_count); each host yields
        B / process_count of them.
      max_length: T, tokens per row.
      max_prompt_length: most prompt tokens (bos included), or None.
      truncation_mode: "keep_end" (TRL's default: keep the prompt's last tokens) or "keep_start".
      prompt_too_long: "truncate" or "drop" a prompt over max_prompt_length, or "error" on any
        cut (see `truncation.PROMPT_TOO_LONG_POLICIES`).
      response_marker: an implicit prompt ends right after the last such marker the two
        responses share (HH-RLHF's "\\n\\nAssistant:"; "" for none), else before their last
        shared whitespace (see `records.split_common_prefix`).
      boundary: "separate" or "joint" (TRL's), see `tokenize.tokenize_pair`.
      on_boundary_problem: "error" or "skip" (counted) a pair whose prompt/response boundary
        fails `dpo_jax.data.boundary`'s checks.
      kl_group_size: None for preference pairs; for KTO, the run of records whose completions
        rotate into the mismatched slot (the batch size; see `tokenize_source`).
      pairs_per_row: S; 1 pads each pair to its own row, > 1 packs up to S pairs in a row.
      seed: the shuffle's (and packing order's) seed.
      shuffle: whether to shuffle rows (each epoch differently).
      num_epochs: passes over the data, or None for forever.
      process_index: this host's index (default: jax's).
      process_count: the number of hosts (default: jax's).

    Returns:
      (iterator, stats). The iterator yields dicts of numpy arrays: `tokens`, `response_mask`,
      `positions`, `segment_ids` [B/process_count, 2, T] and `pair_mask` [B/process_count, S];
      save and restore its position with `get_state()` / `set_state(state)`.

    Raises:
      ValueError, TypeError: bad records or arguments (the message says which and where).
    """
    batches, stats = _host_batches(
        source,
        tokenizer,
        batch_size=batch_size,
        pairs_per_row=pairs_per_row,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        prompt_too_long=prompt_too_long,
        response_marker=response_marker,
        boundary=boundary,
        on_boundary_problem=on_boundary_problem,
        kl_group_size=kl_group_size,
    )
    return iter(batches.to_iter_dataset(READ_OPTIONS)), stats


def make_eval_batches(
    source: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    response_marker: str = DEFAULT_RESPONSE_MARKER,
    boundary: str = "separate",
    on_boundary_problem: str = "error",
    kl_group_size: int | None = None,
    pairs_per_row: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[Sequence[dict[str, np.ndarray]], DataStats]:
    """Every held-out pair once, in order; the last batch padded, never dropped.

    Arguments as in `make_pair_iterator`; pairs are packed in their given order when
    pairs_per_row > 1.

    Returns:
      (batches, stats): `batches` is a sequence of dicts shaped as in `make_pair_iterator`
      (`len(batches)` batches, each built when it is read; rows past the end of the data have
      `pair_mask` False).
    """
    batches, stats = _host_batches(
        source,
        tokenizer,
        batch_size=batch_size,
        pairs_per_row=pairs_per_row,
        seed=0,
        shuffle=False,
        num_epochs=1,
        process_index=process_index,
        process_count=process_count,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        prompt_too_long=prompt_too_long,
        response_marker=response_marker,
        boundary=boundary,
        on_boundary_problem=on_boundary_problem,
        kl_group_size=kl_group_size,
    )
    return _EvalBatches(batches), stats


def _host_batches(
    source: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    pairs_per_row: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    max_length: int,
    **tokenize_options: Any,
) -> tuple[grain.MapDataset, DataStats]:
    """Checks the arguments, tokenises every record, makes rows, then this host's batches."""
    process_index, process_count = _process(process_index, process_count)
    check_batching(batch_size, pairs_per_row, num_epochs, process_index, process_count)
    pairs, stats = tokenize_source(source, tokenizer, max_length=max_length, **tokenize_options)
    rows = make_rows(
        pairs, max_length=max_length, pairs_per_row=pairs_per_row, seed=seed, shuffle=shuffle
    )
    stats.rows = len(rows)
    batches = batches_from_rows(
        rows,
        batch_size=batch_size,
        max_length=max_length,
        pairs_per_row=pairs_per_row,
        pad_id=tokenizer.pad_id,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    return batches, stats


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves the hosts to jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count
