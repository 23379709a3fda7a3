"""The grain pipeline: layouts end to end, seeded shuffles, resumable state, per-host shards, eval.

Ids (tiny_tokenizers.VOCAB): <pad>=0 <bos>=1 <eos>=2 a=4 b=5 c=6 d=7 e=8 f=9 g=10 h=11
Human:=12 Assistant:=13 <user>=14 <assistant>=15 <end>=16.
"""

import json

import numpy as np
import pytest
from tiny_tokenizers import make_word_tokenizer

from dpo_jax.data import synthetic
from dpo_jax.data.pipeline import make_eval_batches, make_pair_iterator

HOST = {"process_index": 0, "process_count": 1}


def _first_batch(records, **kwargs):
    kwargs = {"batch_size": 1, "shuffle": False, "num_epochs": 1, **HOST, **kwargs}
    iterator, stats = make_pair_iterator(records, make_word_tokenizer(), **kwargs)
    return next(iterator), stats


def _pairs_in(batch):
    """Each real pair of a batch as (chosen tokens, rejected tokens), in row/segment order."""
    pairs = []
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    for b, slots in enumerate(batch["pair_mask"]):
        for k in np.flatnonzero(slots):
            sides = [tuple(tokens[b, s][segment_ids[b, s] == k + 1]) for s in (0, 1)]
            pairs.append(tuple(sides))
    return pairs


CONVERSATION = {
    "prompt": [{"role": "user", "content": "a b c"}],
    "chosen": [{"role": "assistant", "content": "d"}],
    "rejected": [{"role": "assistant", "content": "e f"}],
}


@pytest.mark.parametrize(
    "record, limits, chosen_row, rejected_row",
    [
        # explicit; no truncation
        (
            {"prompt": "a b c", "chosen": "d", "rejected": "e f"},
            {},
            [1, 4, 5, 6, 7, 2, 0, 0],
            [1, 4, 5, 6, 8, 9, 2, 0],
        ),
        # implicit (HH-RLHF): the prompt ends after "Assistant:"
        (
            {"chosen": "Human: a Assistant: d", "rejected": "Human: a Assistant: e f"},
            {},
            [1, 12, 4, 13, 7, 2, 0, 0],
            [1, 12, 4, 13, 8, 9, 2, 0],
        ),
        # conversational: the chat template's own bos, then <user> a b c <end> <assistant>
        (
            CONVERSATION,
            {"max_length": 10},
            # each response ends with the template's <end> and gets no eos (as in TRL)
            [1, 14, 4, 5, 6, 16, 15, 7, 16, 0],
            [1, 14, 4, 5, 6, 16, 15, 8, 9, 16],
        ),
        # keep_end: bos, then the prompt's last 2 tokens
        (
            {"prompt": "a b c", "chosen": "d", "rejected": "e f"},
            {"max_prompt_length": 3, "truncation_mode": "keep_end"},
            [1, 5, 6, 7, 2, 0, 0, 0],
            [1, 5, 6, 8, 9, 2, 0, 0],
        ),
        # keep_start: the prompt's first 3 tokens (bos included)
        (
            {"prompt": "a b c", "chosen": "d", "rejected": "e f"},
            {"max_prompt_length": 3, "truncation_mode": "keep_start"},
            [1, 4, 5, 7, 2, 0, 0, 0],
            [1, 4, 5, 8, 9, 2, 0, 0],
        ),
    ],
    ids=["explicit", "implicit", "conversational", "keep_end", "keep_start"],
)
def test_layout_per_shape_and_truncation_mode(record, limits, chosen_row, rejected_row):
    limits = {"max_length": 8, **limits}
    batch, _ = _first_batch([record], **limits)
    np.testing.assert_array_equal(batch["tokens"][0], [chosen_row, rejected_row])
    for side, row in enumerate((chosen_row, rejected_row)):
        real = np.array(row) != 0
        # The prompt is the tokens up to the first response token: ids before 7 ("d") or 8 ("e").
        first_response = row.index(7) if side == 0 else row.index(8)
        expected_mask = real & (np.arange(len(row)) >= first_response)
        np.testing.assert_array_equal(batch["response_mask"][0, side], expected_mask)
        np.testing.assert_array_equal(batch["segment_ids"][0, side], real.astype(int))
        np.testing.assert_array_equal(
            batch["positions"][0, side], np.where(real, np.arange(len(row)), 0)
        )
    np.testing.assert_array_equal(batch["pair_mask"], [[True]])


def _synthetic_iterator(n=40, **kwargs):
    kwargs = {"batch_size": 4, "max_length": synthetic.MAX_LENGTH, **HOST, **kwargs}
    return make_pair_iterator(
        synthetic.make_records(n, seed=0), synthetic.make_tokenizer(), **kwargs
    )


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _same_batches(first, second):
    return all(
        all(np.array_equal(a[key], b[key]) for key in a) for a, b in zip(first, second, strict=True)
    )


def test_shuffle_is_deterministic_by_seed_and_new_each_epoch():
    first = _take(_synthetic_iterator(seed=1)[0], 20)
    assert _same_batches(first, _take(_synthetic_iterator(seed=1)[0], 20))
    assert not _same_batches(first, _take(_synthetic_iterator(seed=2)[0], 20))
    # 40 pairs in batches of 4: batches 0-9 are epoch 1, 10-19 epoch 2, in another order.
    epoch_1 = [pair for batch in first[:10] for pair in _pairs_in(batch)]
    epoch_2 = [pair for batch in first[10:] for pair in _pairs_in(batch)]
    assert sorted(epoch_1) == sorted(epoch_2) and len(set(epoch_1)) == 40
    assert epoch_1 != epoch_2
    unshuffled = _take(_synthetic_iterator(shuffle=False, num_epochs=1)[0], 10)
    assert [p for b in unshuffled for p in _pairs_in(b)] != epoch_1


@pytest.mark.parametrize("pairs_per_row", [1, 3])
def test_resuming_from_a_saved_state_gives_the_same_batches(pairs_per_row):
    iterator, _ = _synthetic_iterator(pairs_per_row=pairs_per_row, max_length=40)
    _take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    expected = _take(iterator, 8)  # crosses into the next epoch
    resumed, _ = _synthetic_iterator(pairs_per_row=pairs_per_row, max_length=40)
    resumed.set_state(state)
    assert _same_batches(_take(resumed, 8), expected)


def test_host_shards_are_disjoint_and_cover_the_global_batch():
    kwargs = {"batch_size": 6, "num_epochs": 1}
    (whole, _), hosts = _synthetic_iterator(n=27, **kwargs), []
    for index in range(3):
        iterator, _ = _synthetic_iterator(n=27, process_index=index, process_count=3, **kwargs)
        hosts.append(list(iterator))
    whole = list(whole)
    assert len(whole) == 5 and all(len(batches) == 5 for batches in hosts)  # 27 pairs, 6 a batch
    for step, global_batch in enumerate(whole):
        assert all(hosts[i][step]["tokens"].shape == (2, 2, synthetic.MAX_LENGTH) for i in range(3))
        for key in global_batch:  # host i holds rows [2i, 2i + 2) of each global batch
            stacked = np.concatenate([hosts[i][step][key] for i in range(3)])
            np.testing.assert_array_equal(stacked, global_batch[key])
    seen = [pair for batches in hosts for batch in batches for pair in _pairs_in(batch)]
    assert len(seen) == len(set(seen)) == 27
    # The last global batch holds 3 pairs: host 0 has 2, host 1 has 1 and a padding row.
    np.testing.assert_array_equal(
        [hosts[i][-1]["pair_mask"].ravel() for i in range(3)], [[1, 1], [1, 0], [0, 0]]
    )


def test_packed_rows_hold_every_pair_once_per_epoch():
    iterator, stats = _synthetic_iterator(n=50, pairs_per_row=4, max_length=48, num_epochs=1)
    batches = list(iterator)
    assert stats.rows == len(batches) * 4 - sum(
        (~b["pair_mask"]).all(axis=1).sum() for b in batches
    )
    assert stats.rows < 50 / 2
    pairs = [pair for batch in batches for pair in _pairs_in(batch)]
    assert len(pairs) == len(set(pairs)) == 50
    for batch in batches:  # both sides of a row hold the same number of segments
        for side in (0, 1):
            segments = batch["segment_ids"][:, side].max(axis=1)
            np.testing.assert_array_equal(segments, batch["pair_mask"].sum(axis=1))


def test_eval_batches_hold_every_pair_once_in_order():
    records = synthetic.make_records(10, seed=0, split="eval")
    batches, stats = make_eval_batches(
        records, synthetic.make_tokenizer(), batch_size=4, max_length=synthetic.MAX_LENGTH, **HOST
    )
    assert len(batches) == 3 and stats.kept == 10
    np.testing.assert_array_equal(batches[2]["pair_mask"].ravel(), [True, True, False, False])
    tokenizer = synthetic.make_tokenizer()
    first_prompt = [tokenizer.bos_id, *tokenizer.encode(records[0]["prompt"])]
    assert batches[0]["tokens"][0, 0, : len(first_prompt)].tolist() == first_prompt
    assert sum(len(_pairs_in(batch)) for batch in batches) == 10


def test_counts_come_back_from_a_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a b c d e f", "chosen": "g", "rejected": "h"},  # prompt over the limit
        {"prompt": "a", "chosen": "b", "rejected": "b"},  # identical
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    _, stats = _first_batch(str(path), max_length=8, max_prompt_length=3)
    counts = stats.as_dict()
    assert (counts["records"], counts["kept"], counts["rows"]) == (3, 2, 2)
    assert counts["truncated/prompt"] == 1 and counts["dropped/chosen_equals_rejected"] == 1
    _, stats = _first_batch(str(path), max_length=8, max_prompt_length=3, prompt_too_long="drop")
    assert stats.as_dict()["dropped/prompt_too_long"] == 1 and stats.kept == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 3, "process_count": 2}, "batch_size=3 must be a positive multiple"),
        (
            {"process_index": 2, "process_count": 2},
            r"process_index=2 must be in \[0, process_count=2\)",
        ),
        ({"pairs_per_row": 0}, "pairs_per_row=0 must be >= 1"),
        ({"num_epochs": 0}, "num_epochs=0 must be None"),
    ],
)
def test_bad_arguments_are_errors_before_any_record_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _first_batch("no/such/file.jsonl", max_length=8, **kwargs)


def test_no_surviving_pair_is_an_error_with_the_counts():
    records = [{"prompt": "a", "chosen": "b", "rejected": "b"}] * 2
    with pytest.raises(ValueError, match="no preference pair survived.*chosen_equals_rejected=2"):
        _first_batch(records, max_length=8)


@pytest.mark.parametrize(
    "marker, chosen_row",
    [
        ("Assistant:", [1, 12, 4, 13, 5, 6, 2]),  # prompt ends after the marker: "b c" scored
        ("", [1, 12, 4, 13, 5, 6, 2]),  # no marker: prompt ends before the last shared space
    ],
)
def test_response_marker_sets_where_an_implicit_prompt_ends(marker, chosen_row):
    record = {"chosen": "Human: a Assistant: b c", "rejected": "Human: a Assistant: b d"}
    batch, _ = _first_batch([record], max_length=7, response_marker=marker)
    np.testing.assert_array_equal(batch["tokens"][0, 0], chosen_row)
    prompt_length = 4 if marker else 5
    np.testing.assert_array_equal(batch["response_mask"][0, 0], np.arange(7) >= prompt_length)


def test_unpaired_batches_carry_kto_labels():
    # A preference pair becomes (prompt, chosen, True) and (prompt, rejected, False); the
    # rejected slot of each row holds the previous record's completion (rotated in groups of 2).
    record = {"prompt": "a b c", "chosen": "d", "rejected": "e f"}
    batches, stats = make_eval_batches(
        [record], make_word_tokenizer(), batch_size=2, max_length=8, kl_group_size=2
    )
    batch = batches[0]
    assert stats.kept == 2
    np.testing.assert_array_equal(batch["kto_labels"], [[True], [False]])
    np.testing.assert_array_equal(
        batch["tokens"][:, :, :6],
        [[[1, 4, 5, 6, 7, 2], [1, 4, 5, 6, 8, 9]], [[1, 4, 5, 6, 8, 9], [1, 4, 5, 6, 7, 2]]],
    )
