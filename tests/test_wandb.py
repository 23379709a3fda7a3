"""Weights & Biases logging (dpo_jax.run.wandb_log) in W&B's offline mode: the run files of a short
main job and of its resume hold the logged metrics (read back by W&B's own `wandb leet inspect`),
the config and the summary table, under one run id."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_train_step import tiny_config

from dpo_jax.run import train, wandb_log


def _records(run_dir) -> list[dict]:
    """The records of an offline run's transaction log, as W&B's CLI prints them."""
    (log_file,) = [name for name in os.listdir(run_dir) if name.endswith(".wandb")]
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
    out = subprocess.run(
        [*command, os.path.join(run_dir, log_file)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _history(records, stage="dpo", split="train") -> dict[int, dict]:
    """{step: {name: value}} of one stage's logged records."""
    prefix = f"{stage}/{split}/"
    history = {}
    for record in records:
        if record["type"] != "history":
            continue
        item = record["history"]["item"]
        names = {k[len(prefix) :]: v for k, v in item.items() if k.startswith(prefix)}
        if names:
            history[int(item[f"{stage}/step"])] = names
    return history


def _jsonl(workdir, stage="dpo"):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def _run_dirs(workdir):
    root = os.path.join(workdir, "wandb")
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("offline-run"))


@pytest.mark.slow
def test_a_run_and_its_resume_log_to_one_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(
        log__wandb_project="dpo-jax-test", dpo__num_steps=4, checkpoint__every_steps=2,
        checkpoint__keep=3,
    )  # fmt: skip
    done = str(tmp_path / "done")
    summary = train.train_and_evaluate(config, done)
    with open(os.path.join(done, wandb_log.RUN_ID_FILE)) as f:
        run_id = f.read().strip()
    (first_dir,) = _run_dirs(done)
    assert first_dir.endswith(run_id)
    records = _records(first_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == run_id and run["project"] == "dpo-jax-test"
    assert run["config"]["update"]["dpo"]["beta"] == config.dpo.beta
    # Every train record of the JSONL log is in W&B, value for value, on the stage's own axis.
    for stage in ("sft", "dpo"):
        logged, expected = _history(records, stage), _jsonl(done, stage)
        assert sorted(logged) == sorted(expected)
        for step, names in logged.items():
            assert names["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6)
    # The summary table, as W&B stored it: the printed table's header and values.
    table_dir = os.path.join(first_dir, "files", "media", "table")
    (table_file,) = os.listdir(table_dir)
    with open(os.path.join(table_dir, table_file)) as f:
        table = json.load(f)
    assert table["columns"] == train.summary_rows(summary)[0]
    loss_row = next(row for row in table["data"] if row[0] == "loss")
    assert loss_row[2] == pytest.approx(summary["after_dpo"]["loss"], rel=1e-6)

    # Resume from step 2: the same W&B run id, and steps 3 and 4 logged again with the same losses.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(done, resumed, ignore=shutil.ignore_patterns("wandb"))
    shutil.rmtree(os.path.join(resumed, "dpo", "checkpoints", "4"))
    shutil.rmtree(os.path.join(resumed, "hf"))
    train.train_and_evaluate(config, resumed)
    (resume_dir,) = _run_dirs(resumed)
    assert resume_dir.endswith(run_id)
    resume_records = _records(resume_dir)
    (resume_run,) = [r["run"] for r in resume_records if r["type"] == "run"]
    assert resume_run["run_id"] == run_id and resume_run.get("resume") is True
    replayed = _history(resume_records, "dpo")
    assert sorted(replayed) == [3, 4]
    for step in (3, 4):
        assert replayed[step]["loss"] == pytest.approx(_jsonl(done)[step]["loss"], rel=1e-6)


def test_no_project_opens_no_run(tmp_path):
    log = wandb_log.open_run(tiny_config(), str(tmp_path))
    assert not log.enabled and log.run_id is None
    log.log("dpo", "train", 1, {"loss": 1.0})
    log.finish()
    assert not os.path.exists(os.path.join(tmp_path, wandb_log.RUN_ID_FILE))
