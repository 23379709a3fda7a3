"""The prompt/response boundary: the known bugs built on purpose, each a clear error or a count.

Ids (tiny_tokenizers.VOCAB): <pad>=0 <bos>=1 <eos>=2 a=4 b=5 c=6 d=7 e=8 f=9 g=10 h=11
Human:=12 Assistant:=13 <user>=14 <assistant>=15 <end>=16.
"""

import numpy as np
import pytest
import tokenizers
from tiny_tokenizers import VOCAB, make_word_tokenizer

from dpo_jax.data.boundary import BoundaryError, find_problem
from dpo_jax.data.pipeline import make_pair_iterator
from dpo_jax.data.records import RawRecord
from dpo_jax.data.tokenize import DROP_REASONS, tokenize_records, tokenize_unpaired_records
from dpo_jax.tokenizer import Tokenizer

# Responses open with a space: "joint" tokenises prompt + response as one text.
GOOD = {"prompt": "a b", "chosen": " c", "rejected": " d"}


def _tokenize(records, tokenizer=None, **options):
    raw = [RawRecord(record, f"data.jsonl:{i + 1}") for i, record in enumerate(records)]
    return tokenize_records(raw, tokenizer or make_word_tokenizer(), max_length=32, **options)


class _BosOnEveryEncode(Tokenizer):
    """The bug of a tokenizer whose encode adds bos each call (add_special_tokens left on)."""

    def encode(self, text):
        return [self.bos_id, *super().encode(text)]


def _bos_on_every_encode():
    word = make_word_tokenizer()
    return _BosOnEveryEncode(
        word.backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos=True
    )


def test_a_tokenizer_that_adds_bos_to_every_encode_is_an_error():
    # Without the check the chosen row would be <bos> a b <bos> c <eos>: a bos mid-sequence.
    with pytest.raises(BoundaryError) as error:
        _tokenize([GOOD], _bos_on_every_encode())
    message = str(error.value)
    assert message.startswith("data.jsonl:1: chosen row")
    assert "bos ['<bos>'=1] is the first response token (row position 3)" in message
    assert "the prompt ends ['<bos>'=1, 'a'=4, 'b'=5]" in message


def test_joint_mode_encodes_the_whole_text_once_so_that_tokenizer_gives_one_bos():
    (pair,), _ = _tokenize([GOOD], _bos_on_every_encode(), boundary="joint")
    assert (pair.prompt_ids.tolist(), pair.chosen_ids.tolist()) == ([1, 4, 5], [6, 2])


@pytest.mark.parametrize("boundary", ["separate", "joint"])
def test_a_response_that_starts_with_the_bos_string_is_an_error(boundary):
    record = {"prompt": "a b", "chosen": " c", "rejected": " <bos> d"}
    with pytest.raises(BoundaryError, match=r"data.jsonl:2: rejected row.*bos \['<bos>'=1\]"):
        _tokenize([GOOD, record], boundary=boundary)


def test_a_bos_string_inside_a_response_is_an_error():
    record = {"prompt": "a b", "chosen": " c <bos> d", "rejected": " d"}
    with pytest.raises(BoundaryError, match=r"data.jsonl:1: chosen row.*bos \['<bos>'=1\] inside"):
        _tokenize([record])


def test_a_response_ending_in_the_eos_string_gets_one_eos():
    # _with_eos appends eos only when the response does not already end with it.
    record = {"prompt": "a b", "chosen": "c <eos>", "rejected": "d"}
    (pair,), _ = _tokenize([record])
    assert pair.chosen_ids.tolist() == [6, 2]
    assert pair.rejected_ids.tolist() == [7, 2]


@pytest.mark.parametrize(
    "chosen, message",
    [
        ("c <eos> <eos>", r"the response ends in two eos \['c'=6, '<eos>'=2, '<eos>'=2\]"),
        # "c <eos> d" gets its own eos: eos twice in one response, the first mid-response.
        ("c <eos> d", r"eos \['<eos>'=2\] inside the response at token 1"),
    ],
)
def test_a_doubled_or_inner_eos_is_an_error(chosen, message):
    record = {"prompt": "a b", "chosen": chosen, "rejected": "d"}
    with pytest.raises(BoundaryError, match=rf"data.jsonl:1: chosen row.*{message}"):
        _tokenize([record])


# The last turn loses its "<end>" once a response follows it, so the prompt rendered alone
# ("<bos><user> a <end> <assistant> ") is not a prefix of the whole conversation's rendering.
SHIFTY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
    "{% if not (m['role'] == 'user' and not loop.last) %}<end> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
CONVERSATION = {
    "prompt": [{"role": "user", "content": "a"}],
    "chosen": [{"role": "assistant", "content": "b"}],
    "rejected": [{"role": "assistant", "content": "c"}],
}


def test_a_chat_template_whose_prompt_is_not_a_prefix_is_an_error():
    tokenizer = make_word_tokenizer(chat_template=SHIFTY_TEMPLATE)
    with pytest.raises(BoundaryError) as error:
        _tokenize([CONVERSATION], tokenizer)
    message = str(error.value)
    assert message.startswith("data.jsonl:1: the rendered prompt is not a prefix")
    assert "'<bos><user> a <end> <assistant> ' vs '<bos><user> a <assistant> b <end'" in message


def test_the_same_conversation_with_a_consistent_template_passes():
    (pair,), stats = _tokenize([CONVERSATION])
    assert pair.prompt_ids.tolist() == [1, 14, 4, 16, 15]
    assert stats.dropped["boundary_problem"] == 0


def test_a_special_token_at_the_boundary_passes_when_the_whole_text_has_it_there():
    tokenizer = make_word_tokenizer()
    tokenizer.backend.add_special_tokens(["<assistant>"])  # the template's marker is special
    (pair,), _ = _tokenize([CONVERSATION], tokenizer)
    assert pair.prompt_ids.tolist()[-1] == 15


def test_skip_counts_each_kind_of_problem_and_keeps_the_rest():
    bad = [
        {"prompt": "a b", "chosen": "c", "rejected": "<bos> d"},
        {"prompt": "a b", "chosen": "c <eos> <eos>", "rejected": "d"},
        {"prompt": "a b", "chosen": "c <eos> d", "rejected": "d"},
    ]
    pairs, stats = _tokenize([GOOD, *bad, GOOD], on_boundary_problem="skip")
    assert len(pairs) == 2 and (stats.records, stats.kept) == (5, 2)
    assert stats.dropped == dict.fromkeys(DROP_REASONS, 0) | {"boundary_problem": 3}
    assert "dropped: boundary_problem=3" in str(stats)
    template_tokenizer = make_word_tokenizer(chat_template=SHIFTY_TEMPLATE)
    pairs, stats = _tokenize([CONVERSATION], template_tokenizer, on_boundary_problem="skip")
    assert (pairs, stats.records, stats.dropped["boundary_problem"]) == ([], 1, 1)


def test_unpaired_records_are_checked_too():
    raw = [
        RawRecord({"prompt": "a", "completion": "b", "label": True}, "kto.jsonl:1"),
        RawRecord({"prompt": "a", "completion": "<bos> c", "label": False}, "kto.jsonl:2"),
    ]
    options = dict(max_length=16, kl_group_size=2)
    with pytest.raises(BoundaryError, match="kto.jsonl:2: completion row.*bos"):
        tokenize_unpaired_records(raw, make_word_tokenizer(), **options)
    pairs, stats = tokenize_unpaired_records(
        raw, make_word_tokenizer(), on_boundary_problem="skip", **options
    )
    assert (len(pairs), stats.dropped["boundary_problem"]) == (1, 1)


def _bpe_tokenizer():
    """A BPE whose merges cross the prompt/response boundary: "b c" merges before "a b"."""
    vocab = {token: i for i, token in enumerate([*VOCAB[:4], "a", "b", "c", "x", "ab", "bc", "xa"])}
    merges = [("b", "c"), ("a", "b"), ("x", "a")]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>"))
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos=True)


def test_separate_mode_allows_a_merge_at_the_last_prompt_token_only():
    tokenizer = _bpe_tokenizer()
    # "ab" + "c": the prompt is [<bos>, ab], the whole text [<bos>, a, bc, <eos>]; they differ
    # only at the last prompt token, which "separate" keeps as the prompt encodes alone.
    (pair,), _ = _tokenize([{"prompt": "ab", "chosen": "c", "rejected": "a"}], tokenizer)
    assert pair.prompt_ids.tolist() == [1, 8]
    # "xab" + "c": the prompt [<bos>, x, ab] vs the whole [<bos>, xa, bc, <eos>] differ at
    # token 1, before the last prompt token: the prompt is not a prefix.
    record = {"prompt": "xab", "chosen": "c", "rejected": "a"}
    with pytest.raises(BoundaryError, match=r"not a prefix.*at token 1 the row has \['x'=7"):
        _tokenize([record], tokenizer)
    # "joint" splits at the common prefix, so its rows are the whole text by construction.
    (pair,), _ = _tokenize([record], tokenizer, boundary="joint")
    assert (pair.prompt_ids.tolist(), pair.chosen_ids.tolist()) == ([1], [10, 9, 2])


def test_find_problem_on_hand_built_rows():
    tokenizer = make_word_tokenizer()
    good = find_problem([1, 4, 5], [6, 2], [1, 4, 5, 6, 2], tokenizer, conversational=False)
    assert good is None
    bad = find_problem([1, 4, 5], [1, 6, 2], [1, 4, 5, 6, 2], tokenizer, conversational=False)
    assert bad == "bos ['<bos>'=1] is the first response token (row position 3)"
    # An eos the whole text does not have at the boundary: a prompt ending in the eos string.
    eos_end = find_problem([1, 4, 2], [6, 2], [1, 4, 3, 6, 2], tokenizer, conversational=False)
    assert eos_end == (
        "special token ['<eos>'=2] is the last prompt token (row position 2) where the whole "
        "text has ['<unk>'=3]"
    )


@pytest.mark.parametrize(
    "record, limits, message",
    [
        (
            {"prompt": "a b c d", "chosen": "e", "rejected": "f"},
            {"max_prompt_length": 3},
            "data.jsonl:2: the prompt has 5 tokens > max_prompt_length=3",
        ),
        (
            {"prompt": "a", "chosen": "b c d", "rejected": "e"},
            {"max_length": 5},
            "data.jsonl:2: the chosen row has 2 prompt . 4 response tokens > max_length=5",
        ),
        (
            {"prompt": "a b c d", "chosen": "e", "rejected": "f"},
            {"max_length": 5},
            "data.jsonl:2: the chosen row has 5 prompt . 2 response tokens > max_length=5",
        ),
    ],
)
def test_prompt_too_long_error_refuses_every_cut(record, limits, message):
    raw = [RawRecord(r, f"data.jsonl:{i + 1}") for i, r in enumerate([GOOD, record])]
    limits = {"max_length": 32, **limits}
    with pytest.raises(ValueError, match=message):
        tokenize_records(raw, make_word_tokenizer(), prompt_too_long="error", **limits)
    pairs, stats = tokenize_records(
        raw[:1], make_word_tokenizer(), prompt_too_long="error", **limits
    )
    assert len(pairs) == 1 and stats.truncated["records"] == 0


ADVERSARIAL = [
    {"prompt": "a", "chosen": "b", "rejected": "c"},
    {"prompt": "a b c d e f g", "chosen": "h", "rejected": "b"},  # the prompt fills the row
    {"prompt": "a b c d e", "chosen": "f g h", "rejected": "f g"},  # equal once cut
    {"prompt": "a", "chosen": "  ", "rejected": "c"},  # whitespace only
    {"prompt": "", "chosen": "b", "rejected": "c"},  # bos alone is the prompt
    {"prompt": "a b c d e f", "chosen": "g h", "rejected": "h"},  # cut to 1 token each
    {"prompt": "a", "chosen": "b <eos>", "rejected": "<eos>"},  # eos alone is a response
    {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [],  # nothing after the template
        "rejected": [{"role": "assistant", "content": "c"}],
    },
    {
        "prompt": [{"role": "user", "content": "a b"}],  # 6 tokens with the template's
        "chosen": [{"role": "assistant", "content": "e f"}],
        "rejected": [{"role": "assistant", "content": "g"}],
    },
    {"prompt": "a", "chosen": "b c d e f g h", "rejected": "c d e f g h a"},
]


@pytest.mark.parametrize("pairs_per_row", [1, 2])
def test_no_pair_with_zero_scored_tokens_reaches_a_batch(pairs_per_row):
    iterator, stats = make_pair_iterator(
        ADVERSARIAL,
        make_word_tokenizer(),
        batch_size=2,
        max_length=8,
        pairs_per_row=pairs_per_row,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    scored = []
    for batch in iterator:
        for b, k in zip(*np.nonzero(batch["pair_mask"]), strict=True):
            in_pair = batch["segment_ids"][b] == k + 1  # [2, T]
            # The shift by one scores token t from t - 1: a response's first token needs a
            # token of its own pair before it, so count response tokens past each segment start.
            starts = np.argmax(in_pair, axis=1)
            mask = batch["response_mask"][b] & in_pair
            assert not mask[np.arange(2), starts].any(), "a pair's first token is never scored"
            scored.append(mask.sum(axis=1).tolist())
    assert all(min(counts) >= 1 for counts in scored)
    assert len(scored) == stats.kept == 6
    assert stats.dropped["no_response_tokens"] == 1
    assert stats.dropped["chosen_equals_rejected_after_truncation"] == 1
    assert stats.dropped["empty_response"] == 2
    # The 1-token rows: "g h" and "h" cut to one token each; "<eos>" alone scores its eos.
    assert [1, 1] in scored and [2, 1] in scored
