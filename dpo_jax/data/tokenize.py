"""Tokenise preference pairs (prompt and responses apart, or jointly as TRL), then truncate."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from dpo_jax.data.boundary import BOUNDARY_POLICIES, BoundaryError, find_problem, show
from dpo_jax.data.records import (
    DEFAULT_RESPONSE_MARKER,
    PreferenceText,
    RawRecord,
    UnpairedText,
    normalize_record,
    normalize_unpaired_record,
)
from dpo_jax.data.truncation import (
    PROMPT_TOO_LONG_POLICIES,
    TRUNCATION_MODES,
    truncate,
)

# How the prompt/response boundary is found: "separate" tokenises the prompt and each response
# apart and joins the ids; "joint" (TRL 1.16) tokenises prompt + response as one text and splits
# at the common prefix with the prompt's tokens.
BOUNDARY_MODES = ("separate", "joint")
# Why a record was dropped; every key is always reported, zeros included.
DROP_REASONS = (
    "chosen_equals_rejected",  # identical texts: no preference to learn
    "empty_response",  # a response is empty or whitespace only
    "empty_prompt",  # no prompt tokens and no bos: the first response token has no context
    "prompt_too_long",  # prompt over max_prompt_length with prompt_too_long="drop"
    "no_response_tokens",  # the prompt fills max_length: no response token is left
    "chosen_equals_rejected_after_truncation",  # truncation made the two token lists identical
    "boundary_problem",  # on_boundary_problem="skip": see dpo_jax.data.boundary
)
# What was cut in a kept record ("records" counts records with any cut).
TRUNCATED_PARTS = ("records", "prompt", "chosen", "rejected")


@dataclasses.dataclass
class DataStats:
    """Counts of what happened to the records: read, kept, dropped by reason, truncated.

    Attributes:
      records: records read.
      kept: records that became a tokenised pair.
      dropped: reason -> records dropped for it (keys: DROP_REASONS).
      truncated: part -> kept records in which that part was cut (keys: TRUNCATED_PARTS).
      rows: rows of length max_length the kept pairs fill (one per pair unless packed).
    """

    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(DROP_REASONS, 0)
    )
    truncated: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TRUNCATED_PARTS, 0)
    )
    rows: int = 0

    def as_dict(self) -> dict[str, int]:
        """Flat counts: `records`, `kept`, `rows`, `dropped/<reason>`, `truncated/<part>`."""
        counts = {"records": self.records, "kept": self.kept, "rows": self.rows}
        counts.update({f"dropped/{reason}": n for reason, n in self.dropped.items()})
        counts.update({f"truncated/{part}": n for part, n in self.truncated.items()})
        return counts

    def __str__(self) -> str:
        dropped = ", ".join(f"{r}={n}" for r, n in self.dropped.items() if n) or "none"
        truncated = ", ".join(f"{p}={n}" for p, n in self.truncated.items() if n) or "none"
        return (
            f"{self.records} records: {self.kept} kept in {self.rows} rows; "
            f"dropped: {dropped}; truncated: {truncated}"
        )


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """A pair's token ids; a row is `prompt_ids + chosen_ids` (or `+ rejected_ids`).

    Attributes:
      prompt_ids: [P] int32, starting with bos when the tokenizer adds one.
      chosen_ids: [Rc] int32, the chosen response and its eos (unless truncation cut it).
      rejected_ids: [Rr] int32, likewise.
      where: the record's place, for messages.
      label: None for a preference pair. For an unpaired (KTO) record: True when the completion
        (held as `chosen_ids`) is desirable; `rejected_ids` then holds another record's
        completion, scored under this prompt for KTO's reference point z₀.
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    where: str
    label: bool | None = None

    @property
    def lengths(self) -> tuple[int, int]:
        """(chosen row length, rejected row length) in tokens."""
        prompt_length = len(self.prompt_ids)
        return prompt_length + len(self.chosen_ids), prompt_length + len(self.rejected_ids)


def check_limits(
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
    prompt_too_long: str,
    boundary: str = "separate",
    on_boundary_problem: str = "error",
) -> None:
    """Raises ValueError naming the value and the expectation when a limit is invalid."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an int >= 2")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length!r} must be None or in "
            f"[1, max_length={max_length})"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r} must be one of {TRUNCATION_MODES}")
    if prompt_too_long not in PROMPT_TOO_LONG_POLICIES:
        raise ValueError(
            f"prompt_too_long={prompt_too_long!r} must be one of {PROMPT_TOO_LONG_POLICIES}"
        )
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"boundary={boundary!r} must be one of {BOUNDARY_MODES}")
    if on_boundary_problem not in BOUNDARY_POLICIES:
        raise ValueError(
            f"on_boundary_problem={on_boundary_problem!r} must be one of {BOUNDARY_POLICIES}"
        )


def tokenize_pair(
    text: PreferenceText,
    tokenizer: Any,
    stats: DataStats,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    boundary: str = "separate",
    on_boundary_problem: str = "error",
) -> TokenizedPair | None:
    """Tokenises and truncates one pair, counting it in `stats`; None when it is dropped.

    The prompt/response boundary (`boundary`):
      "separate": the prompt is encoded once and each response apart, then joined as token lists,
        so the prompt tokens are exactly the prompt's encoding whatever the responses are; a
        prompt ending in a space or newline keeps that character as its own token.
      "joint" (TRL 1.16's `_prepare_dataset`): prompt + response is encoded as one text and the
        response starts where it diverges from the prompt's own encoding (the shorter common
        prefix of the two rows), so tokens merge across the boundary as they would in free text
        ("▁is" | "▁blue" rather than "▁is" "▁" | "blue"); the prompt's last tokens may then be
        left out of both rows when a merge crosses the boundary.
    bos is prepended when `tokenizer.add_bos` (unless the text already starts with it). eos is
    appended to each response of a non-conversational record (unless it already ends with it);
    a conversational record's responses end with the chat template's own end-of-turn, and get
    none, as in TRL. Each row is then checked against its whole text tokenised in one piece
    (`dpo_jax.data.boundary`): a problem raises `BoundaryError` naming the record and the tokens
    (`on_boundary_problem="error"`) or drops the pair, counted (`"skip"`).

    Truncation, in order:
      1. a prompt over `max_prompt_length` tokens is dropped (`prompt_too_long="drop"`) or cut to
         that length: "keep_end" keeps its last tokens (after the bos, which stays; the
         `max_prompt_length` behaviour of TRL before 1.0), "keep_start" its first;
      2. each response is cut at its end to `max_length - len(prompt)` tokens (its eos may go).
    With `prompt_too_long="error"` either cut raises ValueError naming the record and lengths.
    Without `max_prompt_length`, step 2 alone is TRL 1.16's default truncation ("keep_start": the
    row's first max_length tokens, a prompt that fills them dropped). A pair with no response token
    left, or whose two responses became identical, is dropped.
    """
    stats.records += 1
    reason = _text_problem(text)
    if reason is None:
        prompt_ids, responses, wholes = _encode_pair(text, tokenizer, boundary)
        encoded = (prompt_ids, responses, wholes)
        reason = _ids_problem(
            text, (text.chosen, text.rejected), encoded, tokenizer, on_boundary_problem
        )
    if reason is not None:
        stats.dropped[reason] += 1
        return None
    limits = (max_length, max_prompt_length, truncation_mode, prompt_too_long)
    reason, cut, prompt_ids, (chosen_ids, rejected_ids) = truncate(
        prompt_ids, responses, tokenizer, text.where, limits
    )
    if reason is None and chosen_ids == rejected_ids:
        reason = "chosen_equals_rejected_after_truncation"
    if reason is not None:
        stats.dropped[reason] += 1
        return None
    for part in cut:
        stats.truncated[part] += 1
    stats.truncated["records"] += bool(cut)
    stats.kept += 1
    as_array = lambda ids: np.asarray(ids, dtype=np.int32)
    return TokenizedPair(
        as_array(prompt_ids), as_array(chosen_ids), as_array(rejected_ids), text.where
    )


def _ids_problem(text, response_texts, encoded, tokenizer, on_boundary_problem):
    """A drop reason for the encoded pair, or None; raises BoundaryError under "error"."""
    prompt_ids, responses, wholes = encoded
    if not prompt_ids:
        return "empty_prompt"
    if not all(response.strip() for response in response_texts) or not all(responses):
        return "empty_response"
    names = ("chosen", "rejected") if len(responses) == 2 else ("completion",)
    for name, response_ids, whole_ids in zip(names, responses, wholes, strict=True):
        reason = _check_boundary(
            text, name, prompt_ids, response_ids, whole_ids, tokenizer, on_boundary_problem
        )
        if reason is not None:
            return reason
    return None


def _check_boundary(text, name, prompt_ids, response_ids, whole_ids, tokenizer, policy):
    """None, or "boundary_problem" under policy "skip"; raises BoundaryError under "error"."""
    problem = find_problem(
        prompt_ids, response_ids, whole_ids, tokenizer, conversational=text.conversational
    )
    if problem is None:
        return None
    if policy == "skip":
        return "boundary_problem"
    raise BoundaryError(
        f"{text.where}: {name} row, at the prompt/response boundary: {problem}; the prompt ends "
        f"{show(prompt_ids[-3:], tokenizer)}, the {name} response starts "
        f"{show(response_ids[:3], tokenizer)} (config.data.on_boundary_problem='skip' drops such "
        "pairs, counted)"
    )


def tokenize_records(
    raw_records: Iterable[RawRecord],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    response_marker: str = DEFAULT_RESPONSE_MARKER,
    boundary: str = "separate",
    on_boundary_problem: str = "error",
) -> tuple[list[TokenizedPair], DataStats]:
    """Normalises and tokenises every record; returns the kept pairs and the counts.

    Args:
      raw_records: records from `records.load_records`.
      tokenizer: a `dpo_jax.tokenizer.Tokenizer`.
      max_length: most tokens in a row (prompt + response).
      max_prompt_length: most prompt tokens (bos included), or None.
      truncation_mode: how a prompt over max_prompt_length is cut: "keep_end" keeps its last
        tokens (bos first; older TRL's max_prompt_length rule), "keep_start" its first. TRL 1.16
        has no max_prompt_length and defaults to "keep_start" on the whole row, which is what
        max_prompt_length=None gives here whatever the mode.
      prompt_too_long: "truncate" or "drop" a prompt over max_prompt_length, or "error" on
        any cut (see PROMPT_TOO_LONG_POLICIES).
      response_marker: for implicit-prompt records, the marker after which the prompt ends
        ("" for none; see `records.split_common_prefix`).
      boundary: "separate" or "joint" (TRL's); see `tokenize_pair`.
      on_boundary_problem: "error" or "skip" (counted as dropped/boundary_problem) a pair whose
        rows fail `boundary.find_problem`, or whose chat template renders the prompt alone
        differently from the whole conversation.

    Raises:
      ValueError, TypeError: a malformed record or an invalid limit (see `normalize_record`).
    """
    limits = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        prompt_too_long=prompt_too_long,
        boundary=boundary,
        on_boundary_problem=on_boundary_problem,
    )
    check_limits(**limits)
    stats = DataStats()
    pairs = []
    for raw in raw_records:
        options = dict(response_marker=response_marker)
        text = _normalized(normalize_record, raw, tokenizer, stats, on_boundary_problem, **options)
        pair = None if text is None else tokenize_pair(text, tokenizer, stats, **limits)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def _normalized(normalize, raw, tokenizer, stats: DataStats, on_boundary_problem: str, **options):
    """normalize(raw, tokenizer), or None (counted) for a template's boundary problem under skip."""
    try:
        return normalize(raw, tokenizer, **options)
    except BoundaryError:
        if on_boundary_problem == "error":
            raise
    stats.records += 1
    stats.dropped["boundary_problem"] += 1
    return None


def tokenize_unpaired_records(
    raw_records: Iterable[RawRecord],
    tokenizer: Any,
    *,
    max_length: int,
    kl_group_size: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    prompt_too_long: str = "truncate",
    boundary: str = "separate",
    on_boundary_problem: str = "error",
) -> tuple[list[TokenizedPair], DataStats]:
    """KTO records (prompt, completion, boolean label) as pairs: the completion in the chosen
    slot, a mismatched completion in the rejected slot, `label` set.

    The mismatched completions are TRL's (KTOTrainer's `KL_completion_ids`): the kept records
    are cut into runs of `kl_group_size` (the batch size), and within each run record i takes
    record i − 1's completion, the first the last's: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n−1}).
    Each completion is tokenised and truncated as a response of `tokenize_pair` (it counts as
    "chosen" in the truncation counts); the mismatched one is cut to the same budget.

    Raises:
      ValueError, TypeError: a malformed record (`records.normalize_unpaired_record`: a missing
        or non-boolean label names the record), an invalid limit, or kl_group_size < 2.
    """
    if not isinstance(kl_group_size, int) or kl_group_size < 2:
        raise ValueError(
            f"kl_group_size={kl_group_size!r} must be an int >= 2 (KTO's reference point needs "
            "completions of other records)"
        )
    limits = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        prompt_too_long=prompt_too_long,
        boundary=boundary,
        on_boundary_problem=on_boundary_problem,
    )
    check_limits(**limits)
    stats = DataStats()
    kept = []
    for raw in raw_records:
        text = _normalized(normalize_unpaired_record, raw, tokenizer, stats, on_boundary_problem)
        item = None if text is None else _tokenize_unpaired(text, tokenizer, stats, limits)
        if item is not None:
            kept.append(item)
    pairs = []
    for start in range(0, len(kept), kl_group_size):
        group = kept[start : start + kl_group_size]
        for index, (prompt_ids, completion_ids, text) in enumerate(group):
            mismatched = group[index - 1][1][: max_length - len(prompt_ids)]
            as_array = lambda ids: np.asarray(ids, dtype=np.int32)  # noqa: E731
            pairs.append(
                TokenizedPair(
                    as_array(prompt_ids),
                    as_array(completion_ids),
                    as_array(mismatched),
                    text.where,
                    label=text.label,
                )
            )
    return pairs, stats


def _tokenize_unpaired(text: UnpairedText, tokenizer: Any, stats: DataStats, limits: dict):
    """(prompt_ids, completion_ids, text) truncated as `tokenize_pair` does, or None (counted)."""
    stats.records += 1
    encoded = _encode_responses(
        text.prompt, (text.completion,), text.conversational, tokenizer, limits["boundary"]
    )
    policy = limits["on_boundary_problem"]
    reason = _ids_problem(text, (text.completion,), encoded, tokenizer, policy)
    if reason is None:
        truncation = tuple(
            limits[key]
            for key in ("max_length", "max_prompt_length", "truncation_mode", "prompt_too_long")
        )
        reason, cut, prompt_ids, (completion_ids,) = truncate(
            encoded[0], encoded[1], tokenizer, text.where, truncation
        )
    if reason is not None:
        stats.dropped[reason] += 1
        return None
    for part in cut:
        stats.truncated[part] += 1
    stats.truncated["records"] += bool(cut)
    stats.kept += 1
    return prompt_ids, completion_ids, text


def _text_problem(text: PreferenceText) -> str | None:
    if text.chosen == text.rejected:
        return "chosen_equals_rejected"
    if not text.chosen.strip() or not text.rejected.strip():
        return "empty_response"
    return None


def _encode_prompt(prompt: str, tokenizer: Any) -> list[int]:
    ids = list(tokenizer.encode(prompt)) if prompt else []
    # A chat template usually writes the bos itself; never add a second one.
    if tokenizer.add_bos and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def _with_eos(ids: list[int], tokenizer: Any, add_eos: bool) -> list[int]:
    if add_eos and ids and tokenizer.eos_id is not None and ids[-1] != tokenizer.eos_id:
        return [*ids, tokenizer.eos_id]
    return ids


def _common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return length


def _encode_pair(text: PreferenceText, tokenizer: Any, boundary: str):
    """(prompt_ids, (chosen_ids, rejected_ids), wholes) by the boundary mode (see tokenize_pair)."""
    responses = (text.chosen, text.rejected)
    return _encode_responses(text.prompt, responses, text.conversational, tokenizer, boundary)


def _encode_responses(prompt: str, responses, conversational: bool, tokenizer, boundary: str):
    """(prompt_ids, response_ids per response, whole_ids per response), all lists of ids.

    eos follows non-conversational responses; whole_ids is prompt + response tokenised as one
    text (the reference `boundary.find_problem` checks each row against).
    """
    add_eos = not conversational
    prompt_ids = _encode_prompt(prompt, tokenizer)
    wholes = [
        _with_eos(_encode_prompt(prompt + response, tokenizer), tokenizer, add_eos)
        for response in responses
    ]
    if boundary == "separate":
        encoded = tuple(
            _with_eos(list(tokenizer.encode(response)) if response else [], tokenizer, add_eos)
            for response in responses
        )
        return prompt_ids, encoded, wholes
    prompt_length = min(_common_prefix_length(prompt_ids, whole) for whole in wholes)
    return prompt_ids[:prompt_length], tuple(whole[prompt_length:] for whole in wholes), wholes
