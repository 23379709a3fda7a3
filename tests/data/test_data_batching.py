"""Fixed-shape batches: one pair per row, packed rows, and padding rows, checked token by token."""

import numpy as np
import pytest

from dpo_jax.data.batching import collate_rows, pack_pairs
from dpo_jax.data.tokenize import TokenizedPair


def _pair(prompt, chosen, rejected, where="x"):
    as_array = lambda ids: np.asarray(ids, np.int32)
    return TokenizedPair(as_array(prompt), as_array(chosen), as_array(rejected), where)


def test_one_pair_per_row_layout():
    pair = _pair([1, 4, 5], [6, 7, 2], [8, 2])
    batch = collate_rows([[pair]], num_rows=2, max_length=8, pairs_per_row=1, pad_id=0)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((2, 2, 8), np.int32),
        "response_mask": ((2, 2, 8), bool),
        "positions": ((2, 2, 8), np.int32),
        "segment_ids": ((2, 2, 8), np.int32),
        "pair_mask": ((2, 1), bool),
    }
    np.testing.assert_array_equal(
        batch["tokens"][0], [[1, 4, 5, 6, 7, 2, 0, 0], [1, 4, 5, 8, 2, 0, 0, 0]]
    )
    # The response and its eos are scored; the prompt and padding are not.
    np.testing.assert_array_equal(
        batch["response_mask"][0], [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"][0], [[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"][0], [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    )
    # Row 1 is padding: no pair, pad tokens, segment 0.
    np.testing.assert_array_equal(batch["pair_mask"], [[True], [False]])
    assert not batch["tokens"][1].any() and not batch["segment_ids"][1].any()
    assert not batch["response_mask"][1].any()


def test_packed_row_layout():
    first = _pair([1, 4], [5, 2], [6, 7, 2])
    second = _pair([1, 8], [9, 10, 2], [11, 2])
    batch = collate_rows([[first, second]], num_rows=1, max_length=9, pairs_per_row=3, pad_id=0)
    # Chosen row: pair 1's prompt + chosen, then pair 2's; rejected row likewise.
    np.testing.assert_array_equal(
        batch["tokens"][0], [[1, 4, 5, 2, 1, 8, 9, 10, 2], [1, 4, 6, 7, 2, 1, 8, 11, 2]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"][0], [[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2, 2]]
    )
    np.testing.assert_array_equal(
        batch["positions"][0], [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    )
    np.testing.assert_array_equal(
        batch["response_mask"][0], [[0, 0, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(batch["pair_mask"], [[True, True, False]])


def test_collate_errors():
    pair = _pair([1, 4], [5, 2], [6, 2])
    with pytest.raises(ValueError, match="2 rows do not fit a batch of 1"):
        collate_rows([[pair], [pair]], num_rows=1, max_length=8, pairs_per_row=1, pad_id=0)
    with pytest.raises(ValueError, match="row 0 holds 2 pairs > pairs_per_row=1"):
        collate_rows([[pair, pair]], num_rows=1, max_length=8, pairs_per_row=1, pad_id=0)
    with pytest.raises(ValueError, match=r"row 0 \(x\) needs 4 > 3 tokens"):
        collate_rows([[pair]], num_rows=1, max_length=3, pairs_per_row=1, pad_id=0)


def test_pack_pairs_first_fit():
    lengths = np.array([[6, 5], [3, 4], [5, 5], [2, 2], [4, 1], [1, 1]])
    # Two pairs a row: 0 opens row 0 and 1 fills it (9, 9); 2 opens row 1 and 3 fills it;
    # 4 opens row 2 and 5 fills it.
    assert pack_pairs(lengths, max_length=10, pairs_per_row=2) == [[0, 1], [2, 3], [4, 5]]
    # Three a row: 2 does not fit row 0 (14 > 10), 3 does not either (11): both go to row 1;
    # 4 fits neither row 0 (13) nor row 1 (11): row 2; 5 fits row 0 exactly (10, 10).
    rows = pack_pairs(lengths, max_length=10, pairs_per_row=3)
    assert rows == [[0, 1, 5], [2, 3], [4]]


def test_pack_pairs_respects_limits_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=(200, 2))
    rows = pack_pairs(lengths, max_length=32, pairs_per_row=4)
    assert rows == pack_pairs(lengths, max_length=32, pairs_per_row=4)
    assert sorted(i for row in rows for i in row) == list(range(200))
    for row in rows:
        assert 1 <= len(row) <= 4
        assert np.all(lengths[row].sum(axis=0) <= 32)
    assert len(rows) < 200 / 2  # packing actually packs


def test_pack_pairs_rejects_a_pair_longer_than_a_row():
    with pytest.raises(ValueError, match=r"pair 1 has lengths \[3 9\] > max_length=8"):
        pack_pairs(np.array([[2, 2], [3, 9]]), max_length=8, pairs_per_row=2)


@pytest.mark.parametrize(
    "prompt, chosen, message",
    [
        ([1, 4], [], "x: the chosen row has 2 prompt and 0 response tokens: no token to score"),
        ([], [5, 2], "x: the chosen row has 0 prompt and 2 response tokens: no token to score"),
    ],
)
def test_a_pair_with_nothing_to_score_never_becomes_a_batch(prompt, chosen, message):
    pair = TokenizedPair(
        np.array(prompt, np.int32), np.array(chosen, np.int32), np.array([6, 2], np.int32), "x"
    )
    with pytest.raises(ValueError, match=message):
        collate_rows([[pair]], num_rows=1, max_length=8, pairs_per_row=1, pad_id=0)
