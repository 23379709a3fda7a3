"""The synthetic preference task: sort, reverse or copy digits; the rejected answer has 1-2 wrong.

A prompt is `"<task> d1 ... dn ="` (task in sort / reverse / copy, 3 <= n <= 7 digits); the chosen
response is the right answer (`"1 2 3"`); the rejected one is that answer with one or two
digits replaced. With the word-level tokenizer below a prompt is at most 10 tokens (bos
included) and a response at most 8 (eos included), so `MAX_LENGTH` = 18 holds every pair.

The train and eval splits never share a prompt: a prompt's CRC32 decides its split.
"""

from __future__ import annotations

import zlib

import numpy as np
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from dpo_jax.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TASKS = ("sort", "reverse", "copy")
DIGITS = tuple(str(d) for d in range(10))
VOCAB = (*SPECIAL_TOKENS, *TASKS, *DIGITS, "=")
MIN_DIGITS, MAX_DIGITS = 3, 7
MAX_PROMPT_LENGTH = MAX_DIGITS + 3  # bos, task, digits, "="
MAX_RESPONSE_LENGTH = MAX_DIGITS + 1  # digits, eos
MAX_LENGTH = MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH
SPLITS = ("train", "eval")
EVAL_FRACTION_PERCENT = 10  # percent of the prompt space held out for "eval"


def make_tokenizer() -> Tokenizer:
    """A word-level tokenizer over `VOCAB` (ids in that order), with bos/eos/pad and add_bos."""
    backend = tokenizers.Tokenizer(
        WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(
        backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
    )


def answer(task: str, digits: list[str]) -> list[str]:
    """The right response to `task` on `digits`."""
    if task == "sort":
        return sorted(digits)
    if task == "reverse":
        return digits[::-1]
    if task == "copy":
        return list(digits)
    raise ValueError(f"task={task!r} must be one of {TASKS}")


def split_of(prompt: str) -> str:
    """Which split a prompt belongs to, from its CRC32 (stable across runs and machines)."""
    return "eval" if zlib.crc32(prompt.encode()) % 100 < EVAL_FRACTION_PERCENT else "train"


def make_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """`n` records `{"prompt", "chosen", "rejected"}` of `split`, the same for the same seed.

    Raises:
      ValueError: n < 0 or an unknown split.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    records = []
    while len(records) < n:
        task = TASKS[rng.integers(len(TASKS))]
        length = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
        digits = [DIGITS[d] for d in rng.integers(10, size=length)]
        prompt = " ".join([task, *digits, "="])
        if split_of(prompt) != split:
            continue
        chosen = answer(task, digits)
        records.append(
            {
                "prompt": prompt,
                "chosen": " ".join(chosen),
                "rejected": " ".join(_corrupt(chosen, rng)),
            }
        )
    return records


def _corrupt(tokens: list[str], rng: np.random.Generator) -> list[str]:
    """Replaces one or two digits, each with a different digit."""
    corrupted = list(tokens)
    count = int(rng.integers(1, 3))
    for position in rng.choice(len(tokens), size=count, replace=False):
        shift = int(rng.integers(1, 10))  # never 0, so the digit always changes
        corrupted[position] = DIGITS[(int(tokens[position]) + shift) % 10]
    return corrupted
