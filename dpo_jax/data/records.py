"""Preference records: read JSONL, Parquet and lists; normalise them to prompt/chosen/rejected."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from dpo_jax import storage
from dpo_jax.data import hf_datasets
from dpo_jax.data.boundary import BoundaryError

# HH-RLHF's turn marker: an implicit prompt is cut right after its last occurrence.
DEFAULT_RESPONSE_MARKER = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class PreferenceText:
    """One preference pair as text: the response strings follow the prompt string directly.

    Attributes:
      prompt: the prompt text (for conversations, rendered with the generation prompt).
      chosen: the preferred response text.
      rejected: the dispreferred response text.
      where: where the record came from, for messages (`data.jsonl:12`, `records[3]`).
      conversational: True when rendered from messages by a chat template, whose own
        end-of-turn closes each response (no eos is appended then, as in TRL).
    """

    prompt: str
    chosen: str
    rejected: str
    where: str
    conversational: bool = False


@dataclasses.dataclass(frozen=True)
class UnpairedText:
    """One unpaired (KTO) record as text: a completion of the prompt, desirable or not.

    Attributes:
      prompt: the prompt text (for conversations, rendered with the generation prompt).
      completion: the completion text, following the prompt directly.
      label: True when the completion is desirable, False when it is not.
      where: where the record came from, for messages.
      conversational: True when rendered from messages by a chat template (no eos appended).
    """

    prompt: str
    completion: str
    label: bool
    where: str
    conversational: bool = False


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """A record as read, before normalisation, with its place for error messages."""

    record: Mapping[str, Any]
    where: str


def read_jsonl(path: str | os.PathLike) -> list[RawRecord]:
    """Reads one JSON object per line; blank lines are skipped.

    Raises:
      ValueError: a line is not valid JSON or not an object (the message names `path:line`).
    """
    path = os.fspath(path)
    records = []
    with storage.open_file(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode_line(raw_line, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if isinstance(record, list):
                raise ValueError(
                    f"{where}: a JSON array, not an object: a .jsonl file holds one record "
                    "object per line (a .json file may hold one array of records)"
                )
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
            records.append(RawRecord(record, where))
    return records


def _decode_line(raw_line: bytes, where: str) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not valid UTF-8 (byte {raw_line[e.start]:#04x} at byte {e.start + 1} of "
            "the line); re-encode the file as UTF-8"
        ) from None


def read_json_array(path: str | os.PathLike) -> list[RawRecord]:
    """Reads a `.json` file holding one array of record objects (records named `path[i]`).

    Raises:
      ValueError: the file is not valid UTF-8 or JSON, or an element is not an object.
    """
    path = os.fspath(path)
    with storage.open_file(path, "rb") as f:
        text = _decode_line(f.read(), path)
    try:
        array = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    records = []
    for index, record in enumerate(array):
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}[{index}]: expected a JSON object, found {type(record).__name__}"
            )
        records.append(RawRecord(record, f"{path}[{index}]"))
    return records


def _is_json_array(path: str) -> bool:
    with storage.open_file(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_parquet(path: str | os.PathLike) -> list[RawRecord]:
    """Reads every row of a Parquet file as a record (list columns become lists of dicts)."""
    import pyarrow.parquet  # only Parquet users pay for pyarrow

    path = os.fspath(path)
    with storage.open_file(path, "rb") as f:
        rows = pyarrow.parquet.read_table(f).to_pylist()
    return [RawRecord(row, f"{path} row {index}") for index, row in enumerate(rows)]


def from_sequence(records: Sequence[Mapping[str, Any]], name: str = "records") -> list[RawRecord]:
    """Wraps in-memory records (a list of dicts, or any random-access source of dicts).

    Raises:
      TypeError: an element is not a dict.
    """
    raw = []
    for index in range(len(records)):
        record = records[index]
        where = f"{name}[{index}]"
        if not isinstance(record, Mapping):
            raise TypeError(f"{where}: expected a dict, found {type(record).__name__}")
        raw.append(RawRecord(record, where))
    return raw


def is_tfds_directory(path: Any) -> bool:
    """Whether `path` (local or a URL) is a prepared TFDS version directory: it holds
    dataset_info.json and features.json (`dpo_jax.data.tfds_source`)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    if path.endswith((".jsonl", ".json", ".parquet")) or path.startswith(hf_datasets.HUB_PREFIX):
        return False
    if not storage.is_remote(path) and not os.path.isdir(path):
        return False
    markers = ("dataset_info.json", "features.json")
    return all(storage.exists(storage.join(path, name)) for name in markers)


def load_records(source: Any) -> list[RawRecord]:
    """Reads records from a `.jsonl`/`.json` or `.parquet` path, a sequence of dicts, or a
    Hugging Face `datasets` source (`dpo_jax.data.hf_datasets`: hf://<name>, a `save_to_disk`
    directory, a `Dataset` or `DatasetRecords`; a bare one is read at split "train", unrenamed).

    A `.json` file may hold one object per line (as `.jsonl`) or one array of objects.

    A TFDS dataset is read through `dpo_jax.data.tfds_source.PreferenceDataSource`, which is
    such a sequence; a prepared TFDS version directory (local or a URL) given as a path is read
    at split "train" through it.

    Raises:
      ValueError: there are no records, or the path's suffix is not known.
      TypeError: `source` is none of the above.
    """
    if hf_datasets.is_dataset_object(source) or hf_datasets.is_hf_path(source):
        source = hf_datasets.open_source(source, split="train")
    if is_tfds_directory(source):
        from dpo_jax.data import tfds_source  # imports tensorflow_datasets: only when used

        source = tfds_source.PreferenceDataSource.from_directory(source, "train")
    if isinstance(source, hf_datasets.DatasetRecords):
        raw = from_sequence(source, name=source.name)
        name = source.name
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".json") and _is_json_array(path):
            raw = read_json_array(path)
        elif path.endswith((".jsonl", ".json")):
            raw = read_jsonl(path)
        elif path.endswith(".parquet"):
            raw = read_parquet(path)
        else:
            raise ValueError(
                f"{path}: unknown file type (expected .jsonl, .json, .parquet, a TFDS "
                "directory with dataset_info.json, or a save_to_disk directory)"
            )
        name = path
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        name = getattr(source, "name", None)  # a tfds_source.PreferenceDataSource names itself
        raw = from_sequence(source, **({"name": name} if name else {}))
        name = name or "the given records"
    else:
        raise TypeError(
            f"records source must be a path or a sequence of dicts, found {type(source).__name__}"
        )
    if not raw:
        raise ValueError(f"{name}: the dataset is empty (no preference records)")
    return raw


def normalize_record(
    raw: RawRecord, tokenizer: Any = None, *, response_marker: str = DEFAULT_RESPONSE_MARKER
) -> PreferenceText:
    """Turns a record of any of the three shapes into prompt/chosen/rejected text.

    Shapes:
      explicit: `prompt`, `chosen`, `rejected` strings.
      conversational: `chosen`/`rejected` (and optionally `prompt`) lists of `{"role", "content"}`
        messages, rendered with `tokenizer.apply_chat_template`. Without `prompt`, the prompt is
        the longest common list of leading messages. The prompt is rendered with the generation
        prompt; a response is render(prompt + response) minus the rendered prompt.
      implicit: `chosen`/`rejected` strings only (HH-RLHF); see `split_common_prefix`.

    Byte strings (as TFDS returns them) are decoded as UTF-8.

    Raises:
      ValueError: `chosen` or `rejected` is missing (the message lists the fields found), or a
        conversation's rendered prompt is not a prefix of its rendered full conversation.
      TypeError: a field has the wrong type, or the shapes are mixed.
    """
    record, where = raw.record, raw.where
    fields = {}
    for key in ("prompt", "chosen", "rejected"):
        if key not in record or (key == "prompt" and record[key] is None):
            if key != "prompt":
                raise ValueError(f"{where}: record has no {key!r} field (found: {sorted(record)})")
            continue
        fields[key] = _check_field(record[key], key, where)
    conversational = [isinstance(value, list) for value in fields.values()]
    if any(conversational) and not all(conversational):
        kinds = {key: type(value).__name__ for key, value in fields.items()}
        raise TypeError(f"{where}: mixed record shapes: {kinds} (use all strings or all messages)")
    if all(conversational):
        return _render_conversation(fields, where, tokenizer)
    if "prompt" in fields:
        return PreferenceText(fields["prompt"], fields["chosen"], fields["rejected"], where)
    if fields["chosen"] == fields["rejected"]:
        return PreferenceText("", fields["chosen"], fields["rejected"], where)
    prompt, chosen, rejected = split_common_prefix(
        fields["chosen"], fields["rejected"], response_marker=response_marker
    )
    return PreferenceText(prompt, chosen, rejected, where)


def normalize_unpaired_record(raw: RawRecord, tokenizer: Any = None) -> UnpairedText:
    """Turns a KTO record, `prompt`, `completion` and a boolean `label`, into UnpairedText.

    `prompt` and `completion` are both strings, or both lists of `{"role", "content"}` messages
    (rendered as `normalize_record` renders a conversation); `label` must be a bool (True =
    desirable), as TRL's KTOTrainer reads it: 0/1, "yes" or None are refused, not guessed.

    Raises:
      ValueError: a field is missing (the message lists the fields found) or `label` is not a
        bool, naming the record.
      TypeError: a field has the wrong type, or the shapes are mixed.
    """
    record, where = raw.record, raw.where
    for key in ("prompt", "completion", "label"):
        if key not in record or record[key] is None:
            raise ValueError(
                f"{where}: unpaired (KTO) record has no {key!r} field (found: {sorted(record)})"
            )
    label = record["label"]
    if not isinstance(label, bool):
        raise ValueError(
            f"{where}: field 'label' must be a boolean (True = desirable completion), "
            f"found {label!r} ({type(label).__name__})"
        )
    prompt = _check_field(record["prompt"], "prompt", where)
    completion = _check_field(record["completion"], "completion", where)
    if isinstance(prompt, list) != isinstance(completion, list):
        kinds = {"prompt": type(prompt).__name__, "completion": type(completion).__name__}
        raise TypeError(f"{where}: mixed record shapes: {kinds} (use all strings or all messages)")
    if not isinstance(prompt, list):
        return UnpairedText(prompt, completion, label, where)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: a conversational record needs a tokenizer with a chat template")
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    response = _rendered_response(tokenizer, prompt, completion, prompt_text, "completion", where)
    return UnpairedText(prompt_text, response, label, where, conversational=True)


def split_common_prefix(
    chosen: str, rejected: str, *, response_marker: str = DEFAULT_RESPONSE_MARKER
) -> tuple[str, str, str]:
    """Splits two texts into (shared prompt, chosen response, rejected response).

    The prompt is the longest common prefix, cut back to a boundary so no word is split:
    right after the last `response_marker` in the prefix (HH-RLHF's "\\n\\nAssistant:") when
    there is one, else just before the last whitespace character of the prefix, so the
    whitespace opens the response (as TRL's `extract_prompt` does). With no such boundary the
    prompt is empty.

    Returns:
      (prompt, chosen_response, rejected_response), with prompt + response == the input.
    """
    limit = min(len(chosen), len(rejected))
    common = 0
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    prefix = chosen[:common]
    marker_at = prefix.rfind(response_marker) if response_marker else -1
    if marker_at >= 0:
        cut = marker_at + len(response_marker)
    else:
        cut = max((i for i, char in enumerate(prefix) if char.isspace()), default=0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _check_field(value: Any, key: str, where: str) -> str | list:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        messages = []
        for index, message in enumerate(value):
            if not (
                isinstance(message, Mapping)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise TypeError(
                    f"{where}: {key}[{index}] must be a message {{'role': str, 'content': str}}, "
                    f"found {message!r:.80}"
                )
            messages.append(dict(message))
        return messages
    raise TypeError(
        f"{where}: field {key!r} must be a string or a list of {{'role', 'content'}} messages, "
        f"found {type(value).__name__}"
    )


def _render_conversation(fields: dict, where: str, tokenizer: Any) -> PreferenceText:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: a conversational record needs a tokenizer with a chat template")
    chosen, rejected = fields["chosen"], fields["rejected"]
    if "prompt" in fields:
        prompt = fields["prompt"]
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        responses = [
            _rendered_response(tokenizer, prompt, messages, prompt_text, name, where)
            for name, messages in (("chosen", chosen), ("rejected", rejected))
        ]
    except (ValueError, jinja2.TemplateError) as e:
        message = str(e)
        error = BoundaryError if isinstance(e, BoundaryError) else ValueError
        raise error(message if message.startswith(where) else f"{where}: {message}") from None
    return PreferenceText(prompt_text, responses[0], responses[1], where, conversational=True)


def _rendered_response(tokenizer, prompt, messages, prompt_text: str, name: str, where: str) -> str:
    """render(prompt + messages) minus the rendered prompt; "" for no messages (counted later as
    an empty response)."""
    if not messages:
        return ""
    full_text = tokenizer.apply_chat_template(prompt + messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise BoundaryError(
            f"{where}: the rendered prompt is not a prefix of the rendered prompt + {name} "
            f"(the chat template renders a turn differently once it is followed by a "
            f"response): {prompt_text[-60:]!r} vs {full_text[: len(prompt_text)][-60:]!r}"
        )
    return full_text[len(prompt_text) :]


def unpair_records(raw_records: Sequence[RawRecord]) -> list[RawRecord]:
    """Preference records as unpaired (KTO) ones, TRL's `unpair_preference_dataset`: each pair
    (prompt, chosen, rejected) becomes (prompt, chosen, True) then (prompt, rejected, False).
    Records that already hold a `completion` pass through unchanged.

    The prompt and responses are split as `normalize_record` splits them (an implicit prompt at
    the common prefix, a conversation at its shared leading messages), so both records share the
    prompt. Each new record's place reads `<where> (chosen)` / `<where> (rejected)`.
    """
    unpaired = []
    for raw in raw_records:
        if "completion" in raw.record:
            unpaired.append(raw)
            continue
        record = raw.record
        prompt, chosen, rejected = (
            record.get("prompt"),
            record.get("chosen"),
            record.get("rejected"),
        )
        if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = split_common_prefix(chosen, rejected)
        for side, completion, label in (("chosen", chosen, True), ("rejected", rejected, False)):
            fields = {"prompt": prompt, "completion": completion, "label": label}
            unpaired.append(RawRecord(fields, f"{raw.where} ({side})"))
    return unpaired
