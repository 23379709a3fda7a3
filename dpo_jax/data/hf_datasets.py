"""Hugging Face `datasets` as record sources: Hub names, `save_to_disk` directories, objects.

TRL users arrive with a dataset name or a `datasets.Dataset` in hand. Each becomes a random-access
sequence of record dicts (`DatasetRecords`), read by `dpo_jax.data.records.load_records` like any
other source: the same three record shapes, the same counted drops and boundary checks.
- `hf://<name>`: `datasets.load_dataset(name, split=...)`: a Hub id
  ("trl-lib/ultrafeedback_binarized") or anything else `load_dataset` takes, such as a local
  folder of data files;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`:
  `datasets.load_from_disk` (a `DatasetDict`'s split is chosen by `split`);
- in code, a `datasets.Dataset`, a `DatasetDict` (with `split`) or an `IterableDataset` (read
  once into memory: a preference set fits, and the pipeline shuffles by index).

`columns` maps the record fields this codebase reads to the dataset's columns,
{"prompt": "question", "chosen": "answer_good", ...}; unmapped fields are read under their own
names. The reference cache (`dpo_jax.run.ref_cache`) keys on the dataset's own fingerprint
(`Dataset._fingerprint`, which `datasets` derives from the data files and every transform), so
a changed dataset misses the cache and an unchanged one hits it without a pass over its rows.
`datasets` is imported only when such a source is read.
"""

from __future__ import annotations

import collections.abc
import json
import os
from collections.abc import Mapping
from typing import Any

HUB_PREFIX = "hf://"
# The files `save_to_disk` writes: a Dataset's state, or a DatasetDict's split list.
_DISK_MARKERS = ("state.json", "dataset_dict.json")


def is_hf_path(source: Any) -> bool:
    """Whether `source` is a string naming a `datasets` source: hf://... or a saved directory."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = os.fspath(source)
    if path.startswith(HUB_PREFIX):
        return True
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _DISK_MARKERS)


def is_dataset_object(source: Any) -> bool:
    """Whether `source` is a `datasets` Dataset, DatasetDict, IterableDataset(Dict), by its type's
    module (so that `datasets` need not be imported to ask)."""
    return type(source).__module__.split(".")[0] == "datasets"


def parse_columns(text: str) -> dict[str, str]:
    """`config.data.columns` ("prompt=question,chosen=good") as {field: column}.

    Raises:
      ValueError: an entry is not field=column (naming it).
    """
    columns = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        field, sep, column = entry.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(
                f"config.data.columns: {entry!r} is not field=column (e.g. prompt=question)"
            )
        columns[field.strip()] = column.strip()
    return columns


class DatasetRecords(collections.abc.Sequence):
    """A `datasets.Dataset` as a sequence of record dicts, its columns renamed by `columns`.

    Attributes:
      name: what error messages call it ("hf://trl-lib/x[train]"); record i is "name row i".
      fingerprint: the dataset's own fingerprint (a digest of its files and transforms).
    """

    def __init__(self, dataset: Any, name: str, columns: Mapping[str, str] | None = None):
        self._dataset = dataset
        self.name = name
        self._columns = dict(columns or {})
        present = list(dataset.column_names)
        for field, column in self._columns.items():
            if column not in present:
                raise ValueError(
                    f"{name}: config.data.columns maps {field!r} to column {column!r}, which the "
                    f"dataset does not have; its columns: {present}"
                )
        self.fingerprint = getattr(dataset, "_fingerprint", None) or _content_digest(dataset)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = dict(self._dataset[int(index)])
        for field, column in self._columns.items():
            row[field] = row.pop(column)
        return row


def open_source(
    source: Any, *, split: str, columns: Mapping[str, str] | None = None
) -> DatasetRecords:
    """A `datasets` source (see the module docstring) as `DatasetRecords`.

    Args:
      source: hf://<name>, a `save_to_disk` directory, or a `datasets` object.
      split: the split of a Hub dataset or a DatasetDict ("train").
      columns: {field: column} renames.

    Raises:
      ValueError: the split or a column does not exist, or the dataset cannot be found or read
        (one line naming it; what `datasets` said follows, first line only).
    """
    if is_dataset_object(source):
        return DatasetRecords(*_from_object(source, split), columns)
    path = os.fspath(source)
    if path.startswith(HUB_PREFIX):
        return DatasetRecords(
            _from_hub(path[len(HUB_PREFIX) :], split), f"{path}[{split}]", columns
        )
    return DatasetRecords(*_from_disk(path, split), columns)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _from_hub(name: str, split: str):
    import datasets

    try:
        builder = datasets.load_dataset_builder(name)
    except Exception as error:  # noqa: BLE001 - datasets raises many types (not found, offline, HTTP)
        raise ValueError(
            f"{HUB_PREFIX}{name}: the dataset cannot be loaded ({_first_line(error)})"
        ) from None
    splits = list(builder.info.splits or {})
    if splits and split not in splits:
        raise ValueError(f"{HUB_PREFIX}{name}: no split {split!r}; its splits: {splits}")
    try:  # what load_dataset does, on the builder already resolved (no second lookup)
        builder.download_and_prepare()
        return builder.as_dataset(split=split)
    except Exception as error:  # noqa: BLE001 - as above
        raise ValueError(
            f"{HUB_PREFIX}{name}[{split}]: cannot be read ({_first_line(error)})"
        ) from None


def _from_disk(path: str, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # noqa: BLE001 - as above
        raise ValueError(
            f"{path}: not a readable save_to_disk directory ({_first_line(error)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _split_of(loaded, split, path), f"{path}[{split}]"
    return loaded, path


def _from_object(dataset: Any, split: str):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _from_object(_split_of(dataset, split, "the given DatasetDict"), split)
    if isinstance(dataset, datasets.IterableDataset):
        rows = list(dataset)  # one pass, into memory: the pipeline reads records by index
        return datasets.Dataset.from_list(rows), f"the given IterableDataset ({len(rows)} rows)"
    return dataset, "the given Dataset"


def _split_of(dataset_dict: Any, split: str, name: str):
    if split not in dataset_dict:
        raise ValueError(f"{name}: no split {split!r}; its splits: {list(dataset_dict)}")
    return dataset_dict[split]


def _content_digest(dataset: Any) -> str:
    """A digest of the rows, for a dataset that carries no fingerprint."""
    import hashlib

    rows = [dataset[i] for i in range(len(dataset))]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
