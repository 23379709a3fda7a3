"""scripts/inspect_data.py: the first pairs as the model sees them, and the data counts."""

import io
import json
import os
import subprocess
import sys

from rich.console import Console

sys.path.insert(0, os.path.dirname(__file__))
from test_train_step import tiny_config  # noqa: E402

from dpo_jax.data import synthetic  # noqa: E402
from dpo_jax.run.inspect_data import inspect_training_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plain_console():
    return Console(file=io.StringIO(), no_color=True, width=200)


def _expected_lines(record):
    """The prompt and chosen lines worked out from the record's text (word-level tokens)."""
    prompt = ["<bos>", *record["prompt"].split()]
    chosen = [*record["chosen"].split(), "<eos>"]
    start, end = len(prompt), len(prompt) + len(chosen) - 1
    return (
        f"  prompt    {' '.join(prompt)}   positions 0-{start - 1} ({len(prompt)} tokens)",
        f"  chosen    {' '.join(chosen)}   scored at {start}-{end} ({len(chosen)} tokens)",
    )


def test_inspect_default_config_prints_tokens_positions_padding_and_counts():
    config = tiny_config()  # the default's data settings; 64 synthetic pairs
    console = _plain_console()
    stats = inspect_training_data(config, num_pairs=2, console=console)
    out = console.file.getvalue()
    records = synthetic.make_records(config.data.num_train_pairs, seed=config.seed, split="train")
    for index in (0, 1):
        prompt_line, chosen_line = _expected_lines(records[index])
        assert f"records[{index}]  (row {index}, segment 1)" in out
        assert prompt_line in out and chosen_line in out
    assert "records[2]" not in out
    length = 1 + len(records[0]["prompt"].split()) + len(records[0]["chosen"].split()) + 1
    padding = config.data.max_length - length
    assert f"row 0: chosen side {padding}, " in out
    assert out.rstrip().endswith(
        "data: 64 records: 64 kept in 64 rows; dropped: none; truncated: none"
    )
    assert stats.kept == 64


def test_drops_and_truncations_are_reported(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "sort 3 1 2 =", "chosen": "1 2 3", "rejected": "1 3 2"},
        {"prompt": "sort 3 1 2 =", "chosen": "1 2 3", "rejected": "1 2 3"},  # identical
        {"prompt": "copy 1 2 3 4 5 6 7 8 9 =", "chosen": "1", "rejected": "2"},  # 11 > 10 tokens
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = tiny_config(data__source=str(path), data__eval_source="")
    console = _plain_console()
    inspect_training_data(config, num_pairs=1, console=console)
    out = console.file.getvalue()
    assert "  prompt    <bos> sort 3 1 2 =   positions 0-5 (6 tokens)" in out
    assert "  rejected  1 3 2 <eos>   scored at 6-9 (4 tokens)" in out
    assert (
        "data: 3 records: 2 kept in 2 rows; dropped: chosen_equals_rejected=1; "
        "truncated: records=1, prompt=1" in out
    )


def test_packed_rows_show_each_pair_in_its_segment():
    config = tiny_config(data__pairs_per_row=2, data__max_length=36)
    console = _plain_console()
    inspect_training_data(config, num_pairs=2, console=console)
    out = console.file.getvalue()
    assert "records[0]  (row 0, segment 1)" in out and "records[1]  (row 0, segment 2)" in out
    assert "up to 2 pair(s) a row" in out


def test_on_a_terminal_the_scored_tokens_are_green():
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    inspect_training_data(tiny_config(), num_pairs=1, console=console)
    assert "\x1b[1;32m" in console.file.getvalue()  # bold green: the scored response


def test_the_script_runs_on_the_default_config():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "inspect_data.py"), "--num_pairs=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = synthetic.make_records(4096, seed=0, split="train")[0]
    prompt_line, chosen_line = _expected_lines(record)
    assert prompt_line in result.stdout and chosen_line in result.stdout
    assert (
        "data: 4096 records: 4096 kept in 4096 rows; dropped: none; truncated: none"
        in result.stdout
    )
