"""Truncation of a tokenised pair to the row: the prompt to max_prompt_length, then each response
to what is left of max_length, or (prompt_too_long="error") an error for any cut."""

from __future__ import annotations

from typing import Any

TRUNCATION_MODES = ("keep_end", "keep_start")
# What happens to a pair over the limits: "truncate" cuts it (a prompt over max_prompt_length,
# then each response to the row's budget), "drop" drops a prompt over max_prompt_length (and
# still cuts responses), "error" refuses any cut at all: a prompt over max_prompt_length, a
# response over the row's budget or a prompt that fills the row raise naming the record and the
# lengths, so no pair is ever silently shortened.
PROMPT_TOO_LONG_POLICIES = ("truncate", "drop", "error")


def truncate(prompt_ids, responses, tokenizer, where: str, limits):
    """(drop reason or None, cut parts, prompt_ids, responses) after truncation.

    Args:
      prompt_ids: the prompt's ids.
      responses: each response's ids (one for an unpaired record, two for a pair).
      tokenizer: for its bos (kept first by "keep_end").
      where: the record's place, for messages.
      limits: (max_length, max_prompt_length or None, truncation_mode, prompt_too_long).

    Raises:
      ValueError: any cut under prompt_too_long="error" (the record and the lengths named).
    """
    max_length, max_prompt_length, truncation_mode, prompt_too_long = limits
    strict = prompt_too_long == "error"
    cut = set()
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        if strict:
            raise ValueError(
                f"{where}: the prompt has {len(prompt_ids)} tokens > max_prompt_length="
                f"{max_prompt_length} (prompt_too_long='error' refuses every cut)"
            )
        if prompt_too_long == "drop":
            return "prompt_too_long", cut, prompt_ids, responses
        prompt_ids = cut_prompt(prompt_ids, max_prompt_length, truncation_mode, tokenizer)
        cut.add("prompt")
    budget = max_length - len(prompt_ids)
    names = ("chosen", "rejected") if len(responses) == 2 else ("chosen",)
    for name, ids in zip(names, responses, strict=True):
        if len(ids) > max(budget, 0) and strict:
            raise ValueError(
                f"{where}: the {name} row has {len(prompt_ids)} prompt + {len(ids)} response "
                f"tokens > max_length={max_length} (prompt_too_long='error' refuses every cut)"
            )
        if len(ids) > budget:
            cut.add(name)
    if budget <= 0:
        return "no_response_tokens", cut, prompt_ids, responses
    return None, cut, prompt_ids, tuple(ids[:budget] for ids in responses)


def cut_prompt(ids: list[int], limit: int, truncation_mode: str, tokenizer: Any) -> list[int]:
    if truncation_mode == "keep_start":
        return ids[:limit]
    # keep_end: the bos stays first, as the model was trained to see it.
    if tokenizer.add_bos and ids[:1] == [tokenizer.bos_id] and limit > 1:
        return [ids[0], *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]
