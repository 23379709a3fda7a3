"""What every experiment does with the main job: configs derived from a base, quiet runs in
fresh workdirs, and the JSONL and CSV files they read and write."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from dpo_jax.models import load_hf
from dpo_jax.run.train import train_and_evaluate


def derived_config(base: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of `base` with dotted fields set, e.g. {"dpo.beta": 0.1}."""
    config = base.copy_and_resolve_references()
    for dotted, value in fields.items():
        *groups, key = dotted.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[key] = value
    return config


def quiet_config(base: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    return derived_config(
        base,
        **{
            "log.progress_bar": False,
            "log.tensorboard": False,
            "log.eval_every_steps": 0,
            "checkpoint.every_steps": 10_000,
            "checkpoint.export_hf": True,
            "seed": seed,
        },
    )


def train_and_load(config: ml_collections.ConfigDict, workdir: str):
    """train_and_evaluate in a fresh workdir; returns (model_config, params) of its export."""
    shutil.rmtree(workdir, ignore_errors=True)
    train_and_evaluate(config, workdir)
    return load_hf(os.path.join(workdir, "hf"))


def write_jsonl(records: list[dict], path: str) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def write_csv(path: str, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.write(",".join(fields) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(field, "")) for field in fields) + "\n")
