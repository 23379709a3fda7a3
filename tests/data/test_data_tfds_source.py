"""TFDS array_record round trip, in a fresh interpreter that must never import TensorFlow."""

import json
import os
import subprocess
import sys
import textwrap

RECORDS = [
    {"prompt": "a b", "chosen": "c", "rejected": "d"},
    {"prompt": "", "chosen": "e", "rejected": "f"},  # an explicit empty prompt stays explicit
    {"chosen": "Human: a Assistant: b", "rejected": "Human: a Assistant: c"},
    {
        "prompt": [{"role": "user", "content": "a"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c d"}],
    },
    {
        "chosen": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
        "rejected": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "g"}],
    },
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[2])  # tiny_tokenizers
    from tiny_tokenizers import make_word_tokenizer
    from dpo_jax.data.pipeline import make_pair_iterator
    from dpo_jax.data.tfds_source import PreferenceDataSource, PreferenceRecords

    data_dir, records_file = sys.argv[1], sys.argv[3]
    records = json.load(open(records_file))
    jsonl = data_dir + "/records.jsonl"
    with open(jsonl, "w") as f:
        f.write("\\n".join(json.dumps(r) for r in records))
    splits = {"train": records, "eval": jsonl}
    PreferenceRecords(data_dir=data_dir, splits=splits).download_and_prepare()
    builder = PreferenceRecords(data_dir=data_dir)  # reads the prepared files; no splits needed
    read = {split: list(PreferenceDataSource(builder, split)) for split in ("train", "eval")}
    iterator, stats = make_pair_iterator(
        PreferenceDataSource(builder, "train"), make_word_tokenizer(), batch_size=5,
        max_length=12, num_epochs=1, shuffle=False, process_index=0, process_count=1,
    )
    batch = next(iterator)
    # The version directory as a path: load_records reads its "train" split; a missing split
    # names the splits there.
    from dpo_jax.data.records import load_records
    by_path = [raw.record for raw in load_records(str(builder.data_dir))]
    try:
        PreferenceDataSource(builder, "test")
    except ValueError as error:
        missing = str(error)
    print(json.dumps({
        "read": read,
        "by_path": by_path,
        "missing": missing,
        "names": [raw.where for raw in load_records(str(builder.data_dir))[:1]],
        "stats": stats.as_dict(),
        "pairs": int(batch["pair_mask"].sum()),
        "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"),
    }))
    """
)


def _canonical(records):
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def test_tfds_round_trip_without_tensorflow(tmp_path):
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(RECORDS))
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), os.path.dirname(__file__), str(records_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensorflow"] == []
    # TFDS shuffles on write: compare as multisets. Every shape comes back exactly.
    for split in ("train", "eval"):
        assert _canonical(report["read"][split]) == _canonical(RECORDS)
    assert report["by_path"] == report["read"]["train"]
    version_dir = f"{tmp_path}/preference_records/1.0.0"
    assert report["names"] == [f"{version_dir}[train][0]"]
    assert report["missing"] == f"{version_dir}: no split 'test' (splits: ['eval', 'train'])"
    assert report["stats"]["kept"] == len(RECORDS) and report["pairs"] == len(RECORDS)
