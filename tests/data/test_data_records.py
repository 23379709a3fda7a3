"""Reading and normalising preference records: the three shapes, the file formats, bad input."""

import json

import pyarrow
import pyarrow.parquet
import pytest
from tiny_tokenizers import make_word_tokenizer

from dpo_jax.data.records import (
    PreferenceText,
    RawRecord,
    load_records,
    normalize_record,
    split_common_prefix,
)


def _normalize(record, tokenizer=None, **kwargs):
    return normalize_record(RawRecord(record, "here"), tokenizer, **kwargs)


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_explicit_record():
    text = _normalize({"prompt": "a b", "chosen": "c", "rejected": "d", "extra": 1})
    assert text == PreferenceText("a b", "c", "d", "here")


def test_byte_strings_are_decoded():
    text = _normalize({"prompt": b"a", "chosen": b"c", "rejected": "d"})
    assert (text.prompt, text.chosen, text.rejected) == ("a", "c", "d")


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        # HH-RLHF: the prompt ends right after the last "\n\nAssistant:" they share.
        (
            "\n\nHuman: hi\n\nAssistant: I am fine",
            "\n\nHuman: hi\n\nAssistant: I am bad",
            ("\n\nHuman: hi\n\nAssistant:", " I am fine", " I am bad"),
        ),
        # No marker: cut before the last shared whitespace, so "fi"/"ba" words are not split.
        ("Q: 2+2? A: fine", "Q: 2+2? A: bad", ("Q: 2+2? A:", " fine", " bad")),
        ("Q: say foo", "Q: say fob", ("Q: say", " foo", " fob")),
        # One text a prefix of the other.
        ("a b c", "a b c d", ("a b", " c", " c d")),
        # Nothing shared: an empty prompt.
        ("yes", "no", ("", "yes", "no")),
    ],
)
def test_implicit_prompt_is_cut_at_a_boundary(chosen, rejected, expected):
    assert split_common_prefix(chosen, rejected) == expected
    text = _normalize({"chosen": chosen, "rejected": rejected})
    assert (text.prompt, text.chosen, text.rejected) == expected


def test_implicit_prompt_with_custom_marker():
    split = split_common_prefix("x ### ans: 1", "x ### ans: 2", response_marker="###")
    assert split == ("x ###", " ans: 1", " ans: 2")


def test_conversational_with_explicit_prompt():
    tokenizer = make_word_tokenizer()
    record = {
        "prompt": [{"role": "user", "content": "a b"}],
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "d e"}],
    }
    text = _normalize(record, tokenizer)
    # The prompt is rendered with the generation prompt; a response is what follows it.
    assert text.prompt == "<bos><user> a b <end> <assistant> "
    assert text.chosen == "c <end> "
    assert text.rejected == "d e <end> "


def test_conversational_implicit_prompt_is_the_shared_messages():
    tokenizer = make_word_tokenizer()
    shared = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    record = {
        "chosen": shared + [{"role": "assistant", "content": "d"}],
        "rejected": shared + [{"role": "assistant", "content": "e"}],
    }
    text = _normalize(record, tokenizer)
    assert text.prompt == "<bos><user> a <end> <assistant> b <end> <user> c <end> <assistant> "
    assert (text.chosen, text.rejected) == ("d <end> ", "e <end> ")


def test_conversational_template_that_is_not_prefix_stable_is_an_error():
    # This template closes the last turn differently from the others.
    template = (
        "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} | {% endif %}{% endfor %}"
        "{% if add_generation_prompt %} >{% endif %}"
    )
    tokenizer = make_word_tokenizer(chat_template=template)
    record = {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "d"}],
    }
    with pytest.raises(ValueError, match="here: the rendered prompt is not a prefix"):
        _normalize(record, tokenizer)


def test_conversational_needs_a_chat_template():
    record = {"chosen": [{"role": "assistant", "content": "c"}], "rejected": []}
    with pytest.raises(ValueError, match="here: a conversational record needs a tokenizer"):
        _normalize(record, make_word_tokenizer(chat_template=None))


def test_missing_field_lists_the_fields_found():
    with pytest.raises(ValueError) as error:
        _normalize({"prompt": "a", "chosen": "b", "response": "c"})
    assert str(error.value) == (
        "here: record has no 'rejected' field (found: ['chosen', 'prompt', 'response'])"
    )


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string .* int"),
        ({"prompt": {"x": 1}, "chosen": "a", "rejected": "b"}, "field 'prompt' .* found dict"),
        ({"chosen": [{"role": "user"}], "rejected": []}, r"chosen\[0\] must be a message"),
        ({"chosen": ["hi"], "rejected": []}, r"chosen\[0\] must be a message"),
        ({"prompt": "a", "chosen": [], "rejected": "b"}, "mixed record shapes"),
    ],
)
def test_wrong_types_are_named(record, message):
    with pytest.raises(TypeError, match=f"^here: {message}"):
        _normalize(record, make_word_tokenizer())


def test_jsonl_reads_records_with_their_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}), "", '{"chosen": "x"}'],
    )
    raw = load_records(path)
    assert [r.where for r in raw] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(ValueError, match=f"^{path}:3: record has no 'rejected' field"):
        normalize_record(raw[1])


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}), '{"prompt": "a", "chosen": '],
    )
    with pytest.raises(ValueError, match=f"^{path}:2: malformed JSON"):
        load_records(str(path))


def test_json_line_that_is_not_an_object(tmp_path):
    path = _write_jsonl(tmp_path / "list.jsonl", ['["a", "b"]'])
    with pytest.raises(ValueError, match=f"^{path}:1: a JSON array, not an object"):
        load_records(path)
    path = _write_jsonl(tmp_path / "number.jsonl", ["3"])
    with pytest.raises(ValueError, match=f"^{path}:1: expected a JSON object, found int"):
        load_records(path)


@pytest.mark.parametrize("source", [[], "empty.jsonl"])
def test_empty_dataset_is_an_error(tmp_path, source):
    if isinstance(source, str):
        source = _write_jsonl(tmp_path / source, [""])
    with pytest.raises(ValueError, match="the dataset is empty"):
        load_records(source)


def test_unknown_source_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown file type"):
        load_records(tmp_path / "data.csv")
    with pytest.raises(TypeError, match="must be a path or a sequence of dicts, found int"):
        load_records(3)
    with pytest.raises(TypeError, match=r"^records\[1\]: expected a dict, found str"):
        load_records([{"chosen": "a", "rejected": "b"}, "oops"])


def test_parquet_round_trip_with_messages(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "a"}],
            "chosen": [{"role": "assistant", "content": "b"}],
            "rejected": [{"role": "assistant", "content": "c"}],
        },
        {
            "prompt": [{"role": "user", "content": "d"}],
            "chosen": [{"role": "assistant", "content": "e"}],
            "rejected": [{"role": "assistant", "content": "f"}],
        },
    ]
    path = tmp_path / "data.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    raw = load_records(path)
    assert [r.record for r in raw] == rows
    assert [r.where for r in raw] == [f"{path} row 0", f"{path} row 1"]
    text = normalize_record(raw[1], make_word_tokenizer())
    assert (text.prompt, text.chosen) == ("<bos><user> d <end> <assistant> ", "e <end> ")
