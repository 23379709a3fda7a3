"""The synthetic task: deterministic, learnable (rejected 1-2 digits off), short, split."""

import pytest

from dpo_jax.data import synthetic
from dpo_jax.data.pipeline import tokenize_source


def test_records_are_deterministic_by_seed():
    assert synthetic.make_records(50, seed=3) == synthetic.make_records(50, seed=3)
    assert synthetic.make_records(50, seed=3) != synthetic.make_records(50, seed=4)
    # A longer list extends a shorter one.
    assert synthetic.make_records(80, seed=3)[:50] == synthetic.make_records(50, seed=3)


def test_chosen_is_right_and_rejected_is_one_or_two_digits_off():
    for record in synthetic.make_records(300, seed=0):
        task, *digits, equals = record["prompt"].split()
        assert equals == "=" and synthetic.MIN_DIGITS <= len(digits) <= synthetic.MAX_DIGITS
        chosen, rejected = record["chosen"].split(), record["rejected"].split()
        assert chosen == synthetic.answer(task, digits)
        assert len(rejected) == len(chosen)
        assert 1 <= sum(c != r for c, r in zip(chosen, rejected, strict=True)) <= 2


def test_answers():
    digits = ["3", "1", "2"]
    assert synthetic.answer("sort", digits) == ["1", "2", "3"]
    assert synthetic.answer("reverse", digits) == ["2", "1", "3"]
    assert synthetic.answer("copy", digits) == digits
    with pytest.raises(ValueError, match="task='add' must be one of"):
        synthetic.answer("add", digits)


def test_splits_share_no_prompt():
    train = {r["prompt"] for r in synthetic.make_records(2000, seed=0)}
    held_out = {r["prompt"] for r in synthetic.make_records(200, seed=0, split="eval")}
    assert len(held_out) > 100
    assert not train & held_out
    with pytest.raises(ValueError, match="split='test' must be one of"):
        synthetic.make_records(1, split="test")


def test_tokenizer_and_lengths():
    tokenizer = synthetic.make_tokenizer()
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (
        0,
        1,
        2,
        True,
    )
    assert tokenizer.vocab_size == len(synthetic.VOCAB) == 18
    assert tokenizer.encode("sort 3 1 =") == [4, 10, 8, 17]
    pairs, stats = tokenize_source(
        synthetic.make_records(500, seed=1), tokenizer, max_length=synthetic.MAX_LENGTH
    )
    # Every pair fits without truncation, and no token is unknown.
    assert stats.kept == 500 and stats.truncated["records"] == 0
    assert max(len(p.prompt_ids) for p in pairs) == synthetic.MAX_PROMPT_LENGTH == 10
    assert max(len(p.chosen_ids) for p in pairs) == synthetic.MAX_RESPONSE_LENGTH == 8
    assert all(3 not in p.prompt_ids and 3 not in p.chosen_ids for p in pairs)
