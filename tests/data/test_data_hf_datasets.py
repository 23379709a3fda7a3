"""Hugging Face `datasets` sources (dpo_jax.data.hf_datasets): a Dataset, a save_to_disk
directory, Parquet and a data folder read through `datasets`, and hf://, each give the token rows
of the same records read from JSONL; column renames, splits, fingerprints and bad input."""

import json

import datasets
import pytest
from tiny_tokenizers import make_word_tokenizer

from dpo_jax.data import hf_datasets
from dpo_jax.data.pipeline import tokenize_source
from dpo_jax.run import ref_cache

# The three record shapes, each its own dataset (an Arrow table has one schema).
SHAPES = {
    "explicit": [
        {"prompt": "a b", "chosen": "c d", "rejected": "e"},
        {"prompt": "b", "chosen": "f g h", "rejected": "g"},
        {"prompt": "c c", "chosen": "d", "rejected": "a a b"},
    ],
    "implicit": [
        {"chosen": "Human: a b Assistant: c", "rejected": "Human: a b Assistant: d e"},
        {"chosen": "Human: f Assistant: g h", "rejected": "Human: f Assistant: a"},
    ],
    "conversational": [
        {
            "prompt": [{"role": "user", "content": "a b"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "d e"}],
        },
        {
            "prompt": [{"role": "user", "content": "f"}],
            "chosen": [{"role": "assistant", "content": "g h"}],
            "rejected": [{"role": "assistant", "content": "a"}],
        },
    ],
}
LIMITS = dict(max_length=16, max_prompt_length=8)


def _rows(source):
    pairs, stats = tokenize_source(source, make_word_tokenizer(), **LIMITS)
    return [
        (p.prompt_ids.tolist(), p.chosen_ids.tolist(), p.rejected_ids.tolist()) for p in pairs
    ], stats


def _jsonl(tmp_path, records, name="records.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_datasets_source_gives_the_token_rows_of_the_same_jsonl(tmp_path, shape):
    records = SHAPES[shape]
    expected, expected_stats = _rows(_jsonl(tmp_path, records))
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "records.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder, records, "train.jsonl")
    parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "records.parquet"))
    sources = {
        "Dataset": dataset,
        "save_to_disk": str(tmp_path / "saved"),
        "Parquet through datasets (a DatasetDict)": parquet,
        "IterableDataset": datasets.IterableDataset.from_generator(lambda: iter(records)),
        "hf:// (load_dataset on a data folder)": f"hf://{folder}",
    }
    for name, source in sources.items():
        rows, stats = _rows(source)
        assert rows == expected, name
        assert stats.kept == expected_stats.kept == len(records), name


def test_columns_are_renamed_and_a_missing_one_is_named():
    dataset = datasets.Dataset.from_list(
        [{"question": "a b", "good": "c", "bad": "d"}, {"question": "f", "good": "g", "bad": "h"}]
    )
    columns = hf_datasets.parse_columns("prompt=question, chosen=good,rejected=bad")
    records = hf_datasets.open_source(dataset, split="train", columns=columns)
    assert records[1] == {"prompt": "f", "chosen": "g", "rejected": "h"}
    assert len(records) == 2 and records.name == "the given Dataset"
    with pytest.raises(ValueError, match=r"maps 'chosen' to column 'best'.*\['question', 'good"):
        hf_datasets.open_source(dataset, split="train", columns={"chosen": "best"})
    with pytest.raises(ValueError, match="config.data.columns: 'prompt' is not field=column"):
        hf_datasets.parse_columns("prompt")


def test_a_split_that_does_not_exist_is_named_with_the_splits_there(tmp_path):
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(SHAPES["explicit"]),
            "test": datasets.Dataset.from_list(SHAPES["explicit"][:1]),
        }
    )
    dataset_dict.save_to_disk(str(tmp_path / "dict"))
    test = hf_datasets.open_source(str(tmp_path / "dict"), split="test")
    assert len(test) == 1 and test.name == f"{tmp_path / 'dict'}[test]"
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits: \['train', 'test'\]"):
        hf_datasets.open_source(str(tmp_path / "dict"), split="validation")
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits: \['train', 'test'\]"):
        hf_datasets.open_source(dataset_dict, split="validation")


def test_a_dataset_that_cannot_be_found_is_one_line(tmp_path):
    with pytest.raises(ValueError) as info:
        hf_datasets.open_source(f"hf://{tmp_path / 'nowhere'}", split="train")
    message = str(info.value)
    assert message.startswith(f"hf://{tmp_path / 'nowhere'}: the dataset cannot be loaded (")
    assert "\n" not in message


def test_the_reference_cache_keys_on_the_datasets_fingerprint():
    def digest(dataset):
        return ref_cache._source_digest(hf_datasets.open_source(dataset, split="train"))

    dataset = datasets.Dataset.from_list(SHAPES["explicit"])
    same = datasets.Dataset.from_list(SHAPES["explicit"])
    changed = dataset.map(lambda r: {"chosen": r["chosen"] + " a"})
    assert digest(dataset) == digest(dataset)
    assert digest(changed) != digest(dataset)
    assert hf_datasets.open_source(same, split="train").fingerprint
