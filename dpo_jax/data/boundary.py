"""Checks at the prompt/response boundary: a row's tokens must be those of its whole text.

The bugs this catches are the ones DPO codebases have shipped: an extra bos between prompt and
response (a tokenizer that adds bos to every encode call, a response text that starts with the
bos string), a doubled or misplaced eos, and a chat template that renders the prompt alone
differently from the same turns inside the whole conversation (that last one is checked where
the template is rendered, `records._rendered_response`, and raises `BoundaryError` too).

What is allowed, precisely. A row is `prompt_ids + response_ids`; its reference is the
tokenisation of the whole text as the pipeline would tokenise it in one piece: bos (when the
tokenizer adds one) + encode(prompt + response) + eos (non-conversational records). For a
conversation, prompt + response is the chat template's rendering of the whole conversation.
  1. prefix: the row and the reference agree on every token before the last prompt token. In
     "joint" mode the row is the reference by construction. In "separate" mode the prompt ids are
     the prompt's own encoding, so its last token may differ: a prompt ending in "▁" or "\\n"
     keeps that piece as its own token where the whole text merges it into the response's first
     word. Any earlier difference is a problem (use "joint" for such a tokenizer).
  2. special tokens at the boundary (the last prompt token and the first response token; unk is
     not one, see `special_ids`): one is allowed only where the reference has the same token at
     the same place (special tokens are split out of the text before the model's pieces, so the
     places line up), and bos never past the row's first token, whatever the text says (the
     model never sees bos mid-sequence at inference).
  3. bos: never inside a response, wherever in it ("a" "▁" "<bos>" "x" has it one token past
     the boundary); a prompt may hold more than its first (a multi-turn Llama 2 template writes
     one per user turn), as its whole text does.
  4. eos: a response never ends in two eos, and a non-conversational response holds eos only as
     its last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# What happens to a pair with a boundary problem: "error" stops with a message naming the
# record and the tokens; "skip" drops it, counted as dropped/boundary_problem.
BOUNDARY_POLICIES = ("error", "skip")


class BoundaryError(ValueError):
    """A pair whose prompt/response boundary is not what its whole text tokenises to."""


def special_ids(tokenizer: Any) -> dict[int, str]:
    """id -> token string of each special token: bos/eos/pad and added tokens marked special.

    unk is left out: it stands for text the vocabulary lacks, not a control token (the unknown
    rate is checked apart, `coverage.check`).
    """
    backend = tokenizer.backend
    specials = {
        token_id: token.content
        for token_id, token in backend.get_added_tokens_decoder().items()
        if token.special
    }
    for token in tokenizer.special_tokens.values():
        specials[backend.token_to_id(token)] = token
    specials.pop(tokenizer.unk_id, None)
    return specials


def find_problem(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    whole_ids: Sequence[int],
    tokenizer: Any,
    *,
    conversational: bool,
) -> str | None:
    """What is wrong at one row's boundary (rules in the module docstring), or None.

    Args:
      prompt_ids: [P] the row's prompt tokens, before truncation.
      response_ids: [R] the row's response tokens (eos included), before truncation.
      whole_ids: the reference: the whole text tokenised in one piece.
      tokenizer: a `dpo_jax.tokenizer.Tokenizer`.
      conversational: whether the text was rendered by a chat template.

    Returns:
      None, or a sentence naming the offending tokens (as strings and ids).
    """
    prompt_ids, response_ids, whole_ids = list(prompt_ids), list(response_ids), list(whole_ids)
    row = prompt_ids + response_ids
    agreed = max(len(prompt_ids) - 1, 0)
    if whole_ids[:agreed] != row[:agreed]:
        at = next(i for i in range(agreed) if i >= len(whole_ids) or whole_ids[i] != row[i])
        return (
            f"the prompt's tokens are not a prefix of the whole text's: at token {at} the row "
            f"has {show(row[at : at + 3], tokenizer)}, the whole text "
            f"{show(whole_ids[at : at + 3], tokenizer)}"
        )
    specials = special_ids(tokenizer)
    for position in (len(prompt_ids) - 1, len(prompt_ids)):
        if not 0 <= position < len(row) or row[position] not in specials:
            continue
        token = row[position]
        side = "last prompt token" if position < len(prompt_ids) else "first response token"
        if token == tokenizer.bos_id and position > 0:
            return f"bos {show([token], tokenizer)} is the {side} (row position {position})"
        if position >= len(whole_ids) or whole_ids[position] != token:
            theirs = show(whole_ids[position : position + 1], tokenizer)
            return (
                f"special token {show([token], tokenizer)} is the {side} (row position "
                f"{position}) where the whole text has {theirs}"
            )
    return _bos_problem(response_ids, tokenizer) or _eos_problem(
        response_ids, tokenizer, conversational
    )


def _bos_problem(response_ids: list[int], tokenizer: Any) -> str | None:
    bos = tokenizer.bos_id
    # A tokenizer whose bos is its eos (GPT-2's <|endoftext|>) ends each response with it.
    body = response_ids[:-1] if bos == tokenizer.eos_id else response_ids
    if bos is None or bos not in body:
        return None
    at = body.index(bos)
    return (
        f"bos {show([bos], tokenizer)} inside the response at token {at}: "
        f"{show(response_ids[max(at - 2, 0) : at + 3], tokenizer)}"
    )


def _eos_problem(response_ids: list[int], tokenizer: Any, conversational: bool) -> str | None:
    eos = tokenizer.eos_id
    if eos is None:
        return None
    if response_ids[-2:] == [eos, eos]:
        return f"the response ends in two eos {show(response_ids[-3:], tokenizer)}"
    if not conversational and eos in response_ids[:-1]:
        at = response_ids.index(eos)
        return (
            f"eos {show([eos], tokenizer)} inside the response at token {at}, not only at its "
            f"end: {show(response_ids[max(at - 2, 0) : at + 3], tokenizer)}"
        )
    return None


def show(ids: Sequence[int], tokenizer: Any) -> str:
    """Tokens as `['▁is'=563, '<bos>'=2]`, for messages."""
    pieces = [f"{tokenizer.backend.id_to_token(int(i))!r}={int(i)}" for i in ids]
    return f"[{', '.join(pieces)}]"
