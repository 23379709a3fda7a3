"""Preference records as a TFDS dataset in array_record files, written and read without TensorFlow.

Each example has four Text features: `format` ("explicit", "implicit" or "conversational"),
`prompt`, `chosen` and `rejected`. Strings are stored as they are (an implicit record stores an
empty `prompt`); the message lists of a conversational record are stored as JSON. TFDS shuffles
examples when it writes them, so example i is not the i-th record given.

    builder = PreferenceRecords(data_dir=d, splits={"train": "train.jsonl", "eval": rows})
    builder.download_and_prepare()
    source = PreferenceDataSource(builder, "train")  # a sequence of record dicts
    iterator, stats = make_pair_iterator(source, tokenizer, ...)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from dpo_jax.data.records import RawRecord, load_records

FORMATS = ("explicit", "implicit", "conversational")


class PreferenceRecords(tfds.core.GeneratorBasedBuilder):
    """Writes preference records (from JSONL/Parquet paths or lists of dicts) as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt/chosen/rejected Text features plus the record's format."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks for a checksums file beside the builder's code, and on Python >= 3.9 that
        # look-up imports `importlib_resources`, which tensorflow-datasets 4.9.10 does not
        # install. This builder downloads nothing, so it has no checksums and no code path.
        return None

    def __init__(self, *, splits: Mapping[str, Any] | None = None, **kwargs: Any):
        """Args:
        splits: split name -> records source (anything `records.load_records` reads); needed
          only to prepare the dataset, not to read a prepared one.
        **kwargs: `data_dir` and the other `tfds.core.DatasetBuilder` arguments.
        """
        self._sources = dict(splits or {})
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"format": text, "prompt": text, "chosen": text, "rejected": text}
            ),
            description="Preference pairs for DPO: a prompt, a chosen and a rejected response.",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download: the records are given
        if not self._sources:
            raise ValueError("PreferenceRecords needs splits={name: records} to prepare")
        return {name: self._generate_examples(source) for name, source in self._sources.items()}

    def _generate_examples(self, source: Any):
        for index, raw in enumerate(load_records(source)):
            yield index, encode_record(raw)


def encode_record(raw: RawRecord) -> dict[str, str]:
    """A record as the builder's four strings.

    Raises:
      ValueError: `chosen` or `rejected` is missing (the message lists the fields found).
      TypeError: a field is neither a string nor a list of messages.
    """
    record, where = raw.record, raw.where
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where}: record has no {key!r} field (found: {sorted(record)})")
    values = {key: record.get(key) for key in ("prompt", "chosen", "rejected")}
    if any(isinstance(value, (list, tuple)) for value in values.values()):
        return {"format": "conversational"} | {
            key: json.dumps(None if value is None else list(value)) for key, value in values.items()
        }
    for key, value in values.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"{where}: field {key!r} must be a string or a list of messages, "
                f"found {type(value).__name__}"
            )
    implicit = values["prompt"] is None
    return {
        "format": "implicit" if implicit else "explicit",
        "prompt": "" if implicit else values["prompt"],
        "chosen": values["chosen"],
        "rejected": values["rejected"],
    }


def decode_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """The record dict back from a stored example (Text features come back as bytes)."""
    fields = {
        key: value.decode("utf-8") if isinstance(value, bytes) else str(value)
        for key, value in example.items()
    }
    record_format = fields.pop("format")
    if record_format not in FORMATS:
        raise ValueError(f"stored format={record_format!r} must be one of {FORMATS}")
    if record_format == "conversational":
        record = {key: json.loads(value) for key, value in fields.items()}
        return {key: value for key, value in record.items() if value is not None}
    if record_format == "implicit":
        del fields["prompt"]
    return fields


class PreferenceDataSource(Sequence):
    """A prepared split read by index through `builder.as_data_source` (no TensorFlow)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_example(self._source[index])
