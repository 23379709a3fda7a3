"""Preference records as a TFDS dataset in array_record files, written and read without TensorFlow.

Each example has four Text features: `format` ("explicit", "implicit" or "conversational"),
`prompt`, `chosen` and `rejected`. Strings are stored as they are (an implicit record stores an
empty `prompt`); the message lists of a conversational record are stored as JSON. TFDS shuffles
examples when it writes them, so example i is not the i-th record given.

    builder = PreferenceRecords(data_dir=d, splits={"train": "train.jsonl", "eval": rows})
    builder.download_and_prepare()
    source = PreferenceDataSource(builder, "train")  # a sequence of record dicts
    iterator, stats = make_pair_iterator(source, tokenizer, ...)

A prepared dataset's version directory (`<data_dir>/preference_records/1.0.0`, the one holding
`dataset_info.json`) may be a URL: `PreferenceDataSource.from_directory("gs://b/...", "train")`,
or `config.data.source` set to it. array_record's reader (C++, in the PyPI wheel) opens local files
only, so the split's files are first copied to a local staging directory through `etils.epath`,
each file written beside its place and renamed (so processes sharing a host may stage at once) and
skipped when a file of the same size is already there. This is what MaxText and grain users do
with a gcsfuse mount, done by the library; prepare a dataset locally and copy its directory up
(`gcloud storage cp -r`): TFDS's writer is the same local-only C++.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from dpo_jax import storage
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
    """A prepared split read by index through `builder.as_data_source` (no TensorFlow).

    `fingerprint` (for the reference cache) digests the split's stored files, so the same
    dataset staged from a bucket or read locally keys the same entry.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        if split not in builder.info.splits:
            raise ValueError(
                f"{builder.data_dir}: no split {split!r} (splits: {sorted(builder.info.splits)})"
            )
        self._source = builder.as_data_source(split=split)
        self.name = f"{builder.data_dir}[{split}]"
        self._files = sorted(_split_files(builder.data_dir, split))
        self._fingerprint = None

    @classmethod
    def from_directory(
        cls, data_dir: str | os.PathLike, split: str, *, staging_dir: str | None = None
    ) -> PreferenceDataSource:
        """The split of a prepared version directory, local or a URL (staged locally first).

        Args:
          data_dir: the directory holding `dataset_info.json` and the array_record shards.
          split: the split to read ("train", ...).
          staging_dir: where a URL's files are copied (default: a directory under the system's
            temporary directory named by a digest of the URL, so reruns reuse it).

        Raises:
          FileNotFoundError, OSError: the directory or a file is missing (the message names it).
          ValueError: `split` is not one of the dataset's splits.
        """
        data_dir = os.fspath(data_dir)
        if storage.is_remote(data_dir):
            data_dir = stage_split(data_dir, split, staging_dir=staging_dir)
        return cls(tfds.builder_from_directory(data_dir), split)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            hasher = hashlib.sha256()
            for path in self._files:
                hasher.update(os.path.basename(path).encode() + b"\0")
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        hasher.update(chunk)
            self._fingerprint = "tfds " + hasher.hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return decode_example(self._source[index])


def _split_files(data_dir: str, split: str) -> list[str]:
    info = json.loads(storage.read_text(storage.join(data_dir, "dataset_info.json")))
    prefix = f"{info['name']}-{split}."
    names = [name for name in storage.list_dir(data_dir) if name.startswith(prefix)]
    return [storage.join(data_dir, name) for name in names]


def stage_split(url: str, split: str, *, staging_dir: str | None = None) -> str:
    """Copies the dataset's metadata and `split`'s shards from `url` to a local directory (a file
    already there with the object's size is kept) and returns that directory.

    Raises:
      FileNotFoundError: `url` holds no dataset_info.json (the message names it).
      ValueError: the dataset has no files of `split`.
    """
    if staging_dir is None:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        staging_dir = os.path.join(tempfile.gettempdir(), "dpo_jax_tfds", digest)
    os.makedirs(staging_dir, exist_ok=True)
    info_url = storage.join(url, "dataset_info.json")
    if not storage.exists(info_url):
        raise FileNotFoundError(f"{url}: not a prepared TFDS directory (no dataset_info.json)")
    shards = _split_files(url, split)
    if not shards:
        info = json.loads(storage.read_text(info_url))
        splits = sorted(s["name"] for s in info.get("splits", []))
        raise ValueError(f"{url}: no split {split!r} (splits: {splits})")
    for source in [info_url, storage.join(url, "features.json"), *shards]:
        target = os.path.join(staging_dir, os.path.basename(source))
        if os.path.exists(target) and os.path.getsize(target) == storage.size(source):
            continue
        # Streamed (a shard may be GBs), written beside its place and renamed into it.
        partial = f"{target}.{os.getpid()}.tmp"
        with storage.open_file(source, "rb") as reader, open(partial, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 24)
        os.replace(partial, target)
    return staging_dir
