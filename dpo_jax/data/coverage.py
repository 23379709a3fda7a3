"""Whether a tokenizer fits the data: the rate of unknown tokens in a sample of its records.

A word-level tokenizer given text it was not built for (the synthetic task's tokenizer on real
English) maps most words to `<unk>`: training then runs, reports every record kept, and learns
nothing. Byte-level BPE tokenizers (Llama, Gemma, Qwen) never produce `<unk>`, so for them the
rate is 0 and the check costs a few hundred encodes.
"""

import dataclasses
from typing import Any

from dpo_jax.data.records import load_records, normalize_record


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Unknown tokens in the first records of a source.

    Attributes:
      records: records sampled.
      tokens: tokens in their prompts and responses.
      unknown: of those, the tokenizer's unknown token.
      records_with_unknown: sampled records holding at least one.
      first_where: where the first such record is (`data.jsonl:3`), or "".
    """

    records: int
    tokens: int
    unknown: int
    records_with_unknown: int
    first_where: str

    @property
    def rate(self) -> float:
        return self.unknown / max(self.tokens, 1)


def measure(source: Any, tokenizer: Any, *, sample: int = 256) -> Coverage:
    """Encodes the prompt, chosen and rejected text of the first `sample` records.

    Records that do not normalise (a missing field, ...) are left to the pipeline, which counts
    or reports them; a tokenizer without an unknown token gives 0 unknown.
    """
    unk_id = getattr(tokenizer, "unk_id", None)
    tokens = unknown = with_unknown = 0
    first_where = ""
    raw_records = load_records(source)[:sample]
    for raw in raw_records:
        try:
            text = normalize_record(raw, tokenizer)
        except (ValueError, TypeError):
            continue
        ids = [
            i for part in (text.prompt, text.chosen, text.rejected) for i in tokenizer.encode(part)
        ]
        count = sum(1 for i in ids if i == unk_id) if unk_id is not None else 0
        tokens, unknown = tokens + len(ids), unknown + count
        if count:
            with_unknown += 1
            first_where = first_where or raw.where
    return Coverage(len(raw_records), tokens, unknown, with_unknown, first_where)


def check(source: Any, tokenizer: Any, *, max_rate: float, name: str) -> Coverage:
    """`measure`, then an error when the unknown-token rate exceeds `max_rate`.

    Raises:
      ValueError: naming the source, the counts and the first record with unknown tokens.
    """
    coverage = measure(source, tokenizer)
    if coverage.rate > max_rate:
        raise ValueError(
            f"{name}: the tokenizer does not fit this data: {coverage.unknown} of "
            f"{coverage.tokens} tokens ({coverage.rate:.1%}) are unknown, in "
            f"{coverage.records_with_unknown} of the first {coverage.records} records (first: "
            f"{coverage.first_where}); use the model's tokenizer (config.data.tokenizer='model' "
            f"or a tokenizer directory), or raise config.data.max_unknown_token_rate="
            f"{max_rate}"
        )
    return coverage
