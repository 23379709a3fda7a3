"""Fixed-shape batches of preference pairs: one pair per row, or several pairs packed into a row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpo_jax.data.tokenize import TokenizedPair

# Rows still open to new pairs while packing (first fit over these, then the oldest is closed).
PACKING_WINDOW = 8


def pack_pairs(
    lengths: np.ndarray, *, max_length: int, pairs_per_row: int, window: int = PACKING_WINDOW
) -> list[list[int]]:
    """Groups pairs into rows so both the chosen row and the rejected row fit `max_length`.

    Deterministic: pairs are taken in the given order and each goes into the first of the last
    `window` open rows where both of its sequences fit and fewer than `pairs_per_row` pairs are;
    otherwise it opens a new row. Shuffle the order beforehand to mix rows.

    Args:
      lengths: [N, 2] int, (chosen length, rejected length) of each pair, each <= max_length.
      max_length: T, the row length.
      pairs_per_row: S, the most pairs in one row.
      window: how many open rows are searched.

    Returns:
      Rows as lists of indices into `lengths`, in order of opening.

    Raises:
      ValueError: a pair is longer than max_length, or an argument is out of range.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 2 or lengths.shape[1] != 2:
        raise ValueError(f"lengths has shape {lengths.shape}; expected [N, 2]")
    if pairs_per_row < 1 or window < 1:
        raise ValueError(f"pairs_per_row={pairs_per_row} and window={window} must be >= 1")
    if lengths.size and lengths.max() > max_length:
        index = int(np.argmax(lengths.max(axis=1)))
        raise ValueError(f"pair {index} has lengths {lengths[index]} > max_length={max_length}")
    rows: list[list[int]] = []
    used: list[np.ndarray] = []  # [2] tokens used in each row (chosen, rejected)
    open_rows: list[int] = []
    for index, pair_lengths in enumerate(lengths):
        for row in open_rows:
            if np.all(used[row] + pair_lengths <= max_length):
                break
        else:
            row = len(rows)
            rows.append([])
            used.append(np.zeros(2, np.int64))
            open_rows.append(row)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[row].append(index)
        used[row] = used[row] + pair_lengths
        if len(rows[row]) == pairs_per_row:
            open_rows.remove(row)
    return rows


def collate_rows(
    rows: Sequence[Sequence[TokenizedPair]],
    *,
    num_rows: int,
    max_length: int,
    pairs_per_row: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Builds one batch; rows past `len(rows)` are padding with `pair_mask` False.

    Row b of the chosen side (index 0 of axis 1) holds prompt_k + chosen_k for each pair k of
    `rows[b]`, one after another; the rejected side (index 1) holds prompt_k + rejected_k. Pair k
    is segment k + 1 on both sides, and its positions restart at 0.

    Args:
      rows: B' <= num_rows rows, each a list of 1..pairs_per_row pairs.
      num_rows: B, the batch's rows.
      max_length: T.
      pairs_per_row: S.
      pad_id: the token id on padding.

    Returns:
      `tokens` [B, 2, T] int32, `response_mask` [B, 2, T] bool (response tokens, eos included),
      `positions` [B, 2, T] int32 (0 on padding), `segment_ids` [B, 2, T] int32 (0 on padding),
      `pair_mask` [B, S] bool; and `kto_labels` [B, S] bool (True = desirable, False on padding)
      when the pairs are unpaired (KTO) records, which carry a `label`.

    Raises:
      ValueError: too many rows, too many pairs in a row, a row longer than max_length, or a
        pair with no token to score on a side (no prompt token or no response token: the
        pipeline drops these, counted; a pair built by hand is checked here).
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    shape = (num_rows, 2, max_length)
    batch = {
        "tokens": np.full(shape, pad_id, np.int32),
        "response_mask": np.zeros(shape, bool),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "pair_mask": np.zeros((num_rows, pairs_per_row), bool),
    }
    labelled = any(pair.label is not None for row in rows for pair in row)
    if labelled:
        batch["kto_labels"] = np.zeros((num_rows, pairs_per_row), bool)
    for b, row in enumerate(rows):
        if len(row) > pairs_per_row:
            raise ValueError(f"row {b} holds {len(row)} pairs > pairs_per_row={pairs_per_row}")
        batch["pair_mask"][b, : len(row)] = True
        if labelled:
            batch["kto_labels"][b, : len(row)] = [bool(pair.label) for pair in row]
        for side in (0, 1):
            start = 0
            for k, pair in enumerate(row):
                response = pair.chosen_ids if side == 0 else pair.rejected_ids
                _check_scored(pair, side, response)
                sequence = np.concatenate([pair.prompt_ids, response])
                end = start + len(sequence)
                if end > max_length:
                    raise ValueError(f"row {b} ({pair.where}) needs {end} > {max_length} tokens")
                batch["tokens"][b, side, start:end] = sequence
                batch["response_mask"][b, side, start + len(pair.prompt_ids) : end] = True
                batch["positions"][b, side, start:end] = np.arange(len(sequence))
                batch["segment_ids"][b, side, start:end] = k + 1
                start = end
    return batch


def _check_scored(pair: TokenizedPair, side: int, response: np.ndarray) -> None:
    """Every pair scores >= 1 token a side: a response token after >= 1 prompt token (the
    prediction at t - 1 scores token t, and a segment's first token has no prediction)."""
    if len(response) == 0 or len(pair.prompt_ids) == 0:
        name = ("chosen", "rejected")[side]
        raise ValueError(
            f"{pair.where}: the {name} row has {len(pair.prompt_ids)} prompt and "
            f"{len(response)} response tokens: no token to score (needs >= 1 of each)"
        )
