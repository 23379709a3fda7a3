"""The first pairs of a dataset as the model sees them: tokens, padding, scored positions.

`inspect_pairs` tokenises a source as training does, lays its first pairs out in rows exactly
as `batching.collate_rows` does (one pair a row, or packed), and renders each with `rich`:
prompt tokens in cyan, scored response tokens in bold green, then the padding of each row, and
the counts of dropped and truncated records. Without a terminal (a pipe, a file) the text is
plain and keeps the same layout, so it reads in a log or a README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.text import Text

from dpo_jax.data.batching import collate_rows
from dpo_jax.data.pipeline import make_rows, tokenize_source
from dpo_jax.data.tokenize import DataStats, TokenizedPair

PROMPT_STYLE = "cyan"
SCORED_STYLE = "bold green"
PADDING_STYLE = "dim"


def inspect_pairs(
    source: Any,
    tokenizer: Any,
    console: Console,
    *,
    num_pairs: int,
    max_length: int,
    pairs_per_row: int = 1,
    **tokenize_options: Any,
) -> DataStats:
    """Prints the first `num_pairs` kept pairs of `source` in their rows, then the counts.

    Args:
      source: records, as `pipeline.tokenize_source` reads them.
      tokenizer: a `dpo_jax.tokenizer.Tokenizer`.
      console: where to print (`rich.console.Console(no_color=True)` for plain text).
      num_pairs: how many pairs to show (from the start of the source, unshuffled).
      max_length: T, the row length.
      pairs_per_row: S; > 1 packs pairs into rows as training does.
      **tokenize_options: the rest of `tokenize_source`'s limits (max_prompt_length, ...).

    Returns:
      The counts of the whole source (what training reports).
    """
    pairs, stats = tokenize_source(source, tokenizer, max_length=max_length, **tokenize_options)
    layout = dict(max_length=max_length, pairs_per_row=pairs_per_row, seed=0, shuffle=False)
    stats.rows = len(make_rows(pairs, **layout))
    rows = make_rows(pairs[:num_pairs], **layout)
    batch = collate_rows(
        rows,
        num_rows=len(rows),
        max_length=max_length,
        pairs_per_row=pairs_per_row,
        pad_id=tokenizer.pad_id,
    )
    legend = Text.assemble(
        "legend: ",
        ("prompt", PROMPT_STYLE),
        ", ",
        ("scored response", SCORED_STYLE),
        ", ",
        ("padding", PADDING_STYLE),
        f"; rows of T = {max_length} tokens, up to {pairs_per_row} pair(s) a row",
    )
    console.print(legend)
    for b, row in enumerate(rows):
        for k, pair in enumerate(row):
            for line in render_pair(batch, b, k, pair, tokenizer):
                console.print(line)
        console.print(_padding_line(batch, b, tokenizer.pad_id))
    console.print(f"data: {stats}")
    return stats


def render_pair(
    batch: dict[str, np.ndarray], row: int, slot: int, pair: TokenizedPair, tokenizer: Any
) -> list[Text]:
    """Lines of pair `slot` of batch row `row`: a header, its prompt, chosen and rejected.

    Each side lists its tokens as the token strings of its row, in order, styled by what they
    are, and the positions the loss scores (the response tokens, each predicted from the one
    before it).
    """
    segment = slot + 1
    lines = [Text(f"{pair.where}  (row {row}, segment {segment})", style="bold")]
    for side, name in ((0, "chosen"), (1, "rejected")):
        in_pair = batch["segment_ids"][row, side] == segment  # [T]
        positions = np.flatnonzero(in_pair)
        scored = np.flatnonzero(in_pair & batch["response_mask"][row, side])
        prompt = positions[~np.isin(positions, scored)]
        if side == 0:
            lines.append(_tokens_line("prompt", batch, row, side, prompt, tokenizer, PROMPT_STYLE))
        line = _tokens_line(name, batch, row, side, scored, tokenizer, SCORED_STYLE)
        line.append(f"   scored at {_span(scored)} ({len(scored)} tokens)")
        lines.append(line)
    return lines


def _tokens_line(label, batch, row, side, positions: Sequence[int], tokenizer, style) -> Text:
    pieces = [tokenizer.backend.id_to_token(int(batch["tokens"][row, side, t])) for t in positions]
    line = Text(f"  {label:<10}")
    line.append(" ".join(repr(piece)[1:-1] for piece in pieces), style=style)
    if label == "prompt":
        line.append(f"   positions {_span(positions)} ({len(positions)} tokens)")
    return line


def _padding_line(batch: dict[str, np.ndarray], row: int, pad_id: int) -> Text:
    padding = (batch["segment_ids"][row] == 0).sum(axis=-1)  # [2]
    line = Text(f"  {'padding':<10}")
    line.append(
        f"row {row}: chosen side {padding[0]}, rejected side {padding[1]} tokens of pad id "
        f"{pad_id} (segment 0, never scored)",
        style=PADDING_STYLE,
    )
    return line


def _span(positions: Sequence[int]) -> str:
    if not len(positions):
        return "none"
    return f"{positions[0]}-{positions[-1]}" if len(positions) > 1 else f"{positions[0]}"
