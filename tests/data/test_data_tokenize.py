"""Tokenising pairs: layout per record shape and boundary mode, truncation, every drop counted.

Ids (tiny_tokenizers.VOCAB): <pad>=0 <bos>=1 <eos>=2 a=4 b=5 c=6 d=7 e=8 f=9 g=10 h=11
Human:=12 Assistant:=13 <user>=14 <assistant>=15 <end>=16.
"""

import pytest
from tiny_tokenizers import make_word_tokenizer

from dpo_jax.data.records import PreferenceText, RawRecord
from dpo_jax.data.tokenize import (
    DROP_REASONS,
    TRUNCATED_PARTS,
    DataStats,
    tokenize_pair,
    tokenize_records,
    tokenize_unpaired_records,
)


def _tokenize(records, tokenizer=None, **limits):
    tokenizer = tokenizer or make_word_tokenizer()
    raw = [RawRecord(record, f"records[{i}]") for i, record in enumerate(records)]
    limits.setdefault("max_length", 32)
    return tokenize_records(raw, tokenizer, **limits)


def _as_lists(pair):
    return pair.prompt_ids.tolist(), pair.chosen_ids.tolist(), pair.rejected_ids.tolist()


def test_explicit_record_layout():
    (pair,), stats = _tokenize([{"prompt": "a b", "chosen": "c d", "rejected": "e"}])
    # bos + prompt; each response + eos.
    assert _as_lists(pair) == ([1, 4, 5], [6, 7, 2], [8, 2])
    assert pair.lengths == (6, 5)
    assert stats.as_dict()["kept"] == 1


def test_no_bos_when_the_tokenizer_adds_none():
    (pair,), _ = _tokenize(
        [{"prompt": "a b", "chosen": "c", "rejected": "d"}], make_word_tokenizer(add_bos=False)
    )
    assert _as_lists(pair) == ([4, 5], [6, 2], [7, 2])


def test_implicit_record_layout():
    record = {"chosen": "Human: a Assistant: b c", "rejected": "Human: a Assistant: d"}
    (pair,), _ = _tokenize([record], response_marker="Assistant:")
    assert _as_lists(pair) == ([1, 12, 4, 13], [5, 6, 2], [7, 2])


def test_conversational_layout_has_one_bos():
    # The chat template writes "<bos>" itself; the pipeline must not add a second one.
    record = {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c d"}],
    }
    (pair,), _ = _tokenize([record])
    # Each response ends with the template's own "<end>" and gets no eos (TRL adds eos only to
    # non-conversational records).
    assert _as_lists(pair) == ([1, 14, 4, 16, 15], [5, 16], [6, 7, 16])


@pytest.mark.parametrize("boundary", ["separate", "joint"])
def test_conversational_responses_get_no_eos_in_either_boundary_mode(boundary):
    record = {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
    }
    (pair,), _ = _tokenize([record], boundary=boundary)
    assert _as_lists(pair) == ([1, 14, 4, 16, 15], [5, 16], [6, 16])


def test_joint_boundary_splits_at_the_common_prefix():
    # Word-level tokens never merge across the boundary, so "joint" gives the same rows as
    # "separate"; a prompt whose last word the responses extend ("a b" + "c" vs "a b" + " d")
    # still starts each response after the shared "a b".
    records = [{"prompt": "a b ", "chosen": "c d", "rejected": "e"}]
    (joint,), _ = _tokenize(records, boundary="joint")
    (separate,), _ = _tokenize(records, boundary="separate")
    assert _as_lists(joint) == _as_lists(separate) == ([1, 4, 5], [6, 7, 2], [8, 2])


@pytest.mark.parametrize(
    "mode, prompt_ids",
    [
        ("keep_end", [1, 8, 9]),  # bos stays, then the prompt's last 2 tokens
        ("keep_start", [1, 4, 5]),  # the first 3 tokens, bos included
    ],
)
def test_prompt_truncation_modes(mode, prompt_ids):
    record = {"prompt": "a b c d e f", "chosen": "g", "rejected": "h"}
    (pair,), stats = _tokenize([record], max_prompt_length=3, truncation_mode=mode)
    assert _as_lists(pair) == (prompt_ids, [10, 2], [11, 2])
    assert stats.truncated == {"records": 1, "prompt": 1, "chosen": 0, "rejected": 0}


def test_keep_end_without_bos():
    record = {"prompt": "a b c d e f", "chosen": "g", "rejected": "h"}
    (pair,), _ = _tokenize(
        [record],
        make_word_tokenizer(add_bos=False),
        max_prompt_length=2,
        truncation_mode="keep_end",
    )
    assert pair.prompt_ids.tolist() == [8, 9]


def test_responses_are_cut_at_their_end_by_max_length():
    record = {"prompt": "a", "chosen": "b c d", "rejected": "e"}
    (pair,), stats = _tokenize([record], max_length=4)
    # 2 prompt tokens leave 2 for each response: "b c" loses "d" and its eos.
    assert _as_lists(pair) == ([1, 4], [5, 6], [8, 2])
    assert stats.truncated == {"records": 1, "prompt": 0, "chosen": 1, "rejected": 0}


def test_prompt_then_response_truncation_together():
    record = {"prompt": "a b c d", "chosen": "e f g", "rejected": "h"}
    (pair,), stats = _tokenize(
        [record], max_length=5, max_prompt_length=3, truncation_mode="keep_end"
    )
    assert _as_lists(pair) == ([1, 6, 7], [8, 9], [11, 2])
    assert stats.truncated == {"records": 1, "prompt": 1, "chosen": 1, "rejected": 0}


@pytest.mark.parametrize(
    "record, limits, reason",
    [
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, {}, "chosen_equals_rejected"),
        ({"chosen": "a b", "rejected": "a b"}, {}, "chosen_equals_rejected"),
        ({"prompt": "a", "chosen": " ", "rejected": "b"}, {}, "empty_response"),
        ({"prompt": "a", "chosen": "b", "rejected": ""}, {}, "empty_response"),
        (
            {"prompt": "a b c d", "chosen": "e", "rejected": "f"},
            {"max_prompt_length": 3, "prompt_too_long": "drop"},
            "prompt_too_long",
        ),
        (
            {"prompt": "a b c d", "chosen": "e", "rejected": "f"},
            {"max_length": 5},
            "no_response_tokens",
        ),
        (
            {"prompt": "a", "chosen": "b c", "rejected": "b d"},
            {"max_length": 3},
            "chosen_equals_rejected_after_truncation",
        ),
        (
            {"prompt": "a", "chosen": "b <eos> <eos>", "rejected": "c"},
            {"on_boundary_problem": "skip"},
            "boundary_problem",
        ),
    ],
)
def test_drops_are_counted_by_reason(record, limits, reason):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    pairs, stats = _tokenize([good, record, good], **limits)
    assert len(pairs) == 2
    expected = dict.fromkeys(DROP_REASONS, 0) | {reason: 1}
    assert stats.dropped == expected
    assert (stats.records, stats.kept) == (3, 2)
    assert f"3 records: 2 kept in 0 rows; dropped: {reason}=1;" in str(stats)


def test_every_drop_reason_has_a_case():
    # test_drops_are_counted_by_reason covers every reason but "empty_prompt", tested below.
    assert set(DROP_REASONS) == {
        "chosen_equals_rejected",
        "empty_response",
        "empty_prompt",
        "prompt_too_long",
        "no_response_tokens",
        "chosen_equals_rejected_after_truncation",
        "boundary_problem",
    }


def test_empty_prompt_without_bos_is_dropped():
    tokenizer = make_word_tokenizer(add_bos=False)
    _, stats = _tokenize([{"prompt": "", "chosen": "a", "rejected": "b"}], tokenizer)
    assert stats.dropped["empty_prompt"] == 1


def test_prompt_over_the_limit_is_truncated_and_counted_by_default():
    records = [{"prompt": "a b c d", "chosen": "e", "rejected": "f"}] * 3
    pairs, stats = _tokenize(records, max_prompt_length=2)
    assert len(pairs) == 3
    assert stats.truncated["prompt"] == 3


def test_stats_report_every_key():
    stats = DataStats()
    keys = {"records", "kept", "rows"}
    keys |= {f"dropped/{r}" for r in DROP_REASONS} | {f"truncated/{p}" for p in TRUNCATED_PARTS}
    assert set(stats.as_dict()) == keys
    tokenize_pair(PreferenceText("a", "b", "b", "x"), make_word_tokenizer(), stats, max_length=8)
    assert "dropped: chosen_equals_rejected=1" in str(stats)


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_length": 1}, "max_length=1 must be an int >= 2"),
        (
            {"max_prompt_length": 32},
            r"max_prompt_length=32 must be None or in \[1, max_length=32\)",
        ),
        ({"truncation_mode": "left"}, "truncation_mode='left' must be one of"),
        ({"prompt_too_long": "skip"}, "prompt_too_long='skip' must be one of"),
        ({"boundary": "merged"}, "boundary='merged' must be one of"),
        ({"on_boundary_problem": "warn"}, "on_boundary_problem='warn' must be one of"),
    ],
)
def test_invalid_limits_are_errors(limits, message):
    with pytest.raises(ValueError, match=message):
        _tokenize([{"prompt": "a", "chosen": "b", "rejected": "c"}], **limits)


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO) records: prompt, completion, boolean label
# ---------------------------------------------------------------------------------------------


def _tokenize_unpaired(records, **limits):
    raw = [RawRecord(record, f"records[{i}]") for i, record in enumerate(records)]
    limits.setdefault("max_length", 32)
    limits.setdefault("kl_group_size", 3)
    return tokenize_unpaired_records(raw, make_word_tokenizer(), **limits)


def test_unpaired_records_take_the_previous_completion_within_each_group():
    records = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "c", "completion": "d e", "label": False},
        {"prompt": "f", "completion": "g", "label": True},
        {"prompt": "h", "completion": "a b", "label": False},  # a second group of one
    ]
    pairs, stats = _tokenize_unpaired(records)
    # (x_1, y_3), (x_2, y_1), (x_3, y_2) in the first group; the lone last record takes its own.
    assert [_as_lists(pair) for pair in pairs] == [
        ([1, 4], [5, 2], [10, 2]),
        ([1, 6], [7, 8, 2], [5, 2]),
        ([1, 9], [10, 2], [7, 8, 2]),
        ([1, 11], [4, 5, 2], [4, 5, 2]),
    ]
    assert [pair.label for pair in pairs] == [True, False, True, False]
    assert stats.kept == 4


def test_unpaired_conversational_record_gets_no_eos():
    record = {
        "prompt": [{"role": "user", "content": "a"}],
        "completion": [{"role": "assistant", "content": "b"}],
        "label": False,
    }
    (pair, _), _ = _tokenize_unpaired([record, record], kl_group_size=2)
    assert _as_lists(pair) == ([1, 14, 4, 16, 15], [5, 16], [5, 16])


def test_unpaired_truncation_and_drops_are_counted():
    records = [
        {"prompt": "a b c d e", "completion": "f g h", "label": True},  # prompt fills the row
        {"prompt": "a", "completion": "f g h", "label": True},  # completion cut to 3 tokens
        {"prompt": "b", "completion": " ", "label": False},  # empty
    ]
    pairs, stats = _tokenize_unpaired(records, max_length=5, kl_group_size=2)
    assert [_as_lists(pair) for pair in pairs] == [([1, 4], [9, 10, 11], [9, 10, 11])]
    counts = stats.as_dict()
    assert counts["dropped/no_response_tokens"] == 1 and counts["dropped/empty_response"] == 1
    assert counts["truncated/chosen"] == 1 and counts["truncated/records"] == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "completion": "b"}, "records[0]: unpaired (KTO) record has no 'label'"),
        ({"prompt": "a", "completion": "b", "label": 1}, "field 'label' must be a boolean"),
        ({"prompt": "a", "completion": "b", "label": "yes"}, "found 'yes' (str)"),
        ({"prompt": "a", "label": True}, "has no 'completion' field (found: ['label', 'prompt'])"),
    ],
)
def test_unpaired_records_without_a_boolean_label_are_errors(record, message):
    with pytest.raises(ValueError) as error:
        _tokenize_unpaired([record])
    assert message in str(error.value)


def test_unpaired_group_size_below_two_is_an_error():
    with pytest.raises(ValueError, match="kl_group_size=1 must be an int >= 2"):
        _tokenize_unpaired([{"prompt": "a", "completion": "b", "label": True}], kl_group_size=1)
