"""The config a workdir was trained with, kept beside its checkpoints and checked on every rerun.

A rerun of a workdir resumes its checkpoints; that is only the same run if the config that
shapes it is the same. The first run writes `<workdir>/run_config.json`; each later run compares
its config field by field. Fields that change how a run is executed but not what it computes
(logging, checkpoint cadence, the mesh, remat) may change freely. A change to a field that
shapes the checkpoint (the model, the optimizer, the kind of reference) is refused, naming the
fields: the checkpoint could not be restored into it. Any other change (data, loss, learning
rate, seed) is refused too, unless `config.checkpoint.allow_changed_config` is set, in which
case it is reported and the run goes on from the checkpoint.
"""

import json
import sys
from typing import Any

import jax
import ml_collections

from dpo_jax import storage

FILE_NAME = "run_config.json"
# Prefixes of dotted field names that may differ between runs of one workdir.
FREE_FIELDS = (
    "log.",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save",
    "checkpoint.export_hf",
    "checkpoint.allow_changed_config",
    "mesh.",
    "guards.",
    "model.remat",
    "model.logits_chunk_size",
    "model.attention_impl",
    "model.attention_block_size",
)
# Prefixes of fields whose change gives checkpoints of another shape: never allowed.
SHAPE_FIELDS = ("model.", "optimizer.name", "dpo.reference", "dpo.loss_type")


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"group.field": JSON value} of a config (tuples become lists, as JSON stores them)."""
    flat = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = json.loads(json.dumps(value))

    walk("", config.to_dict())
    return flat


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ, other than FREE_FIELDS, sorted."""
    names = set(saved) | set(current)
    return sorted(
        name
        for name in names
        if saved.get(name) != current.get(name) and not name.startswith(FREE_FIELDS)
    )


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the config to a new workdir, or checks it against the one saved there.

    Raises:
      ValueError: the saved config differs in a field that shapes the checkpoints, or in any
        other non-free field without `config.checkpoint.allow_changed_config`; the message
        names each field with its saved and current values.
    """
    path = storage.join(workdir, FILE_NAME)
    current = flatten(config)
    if not storage.exists(path):
        if jax.process_index() == 0:
            storage.write_text(path, json.dumps(current, indent=1, sort_keys=True))
        return
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the workdir's saved config ({error})") from None
    changed = changed_fields(saved, current)
    if not changed:
        return
    listing = "; ".join(f"{n}: {saved.get(n)!r} -> {current.get(n)!r}" for n in changed)
    shape_changes = [name for name in changed if name.startswith(SHAPE_FIELDS)]
    if shape_changes:
        raise ValueError(
            f"{workdir} was trained with another model or optimizer ({listing}); its "
            "checkpoints cannot be restored into this config: use a new --workdir"
        )
    if not config.checkpoint.allow_changed_config:
        raise ValueError(
            f"{workdir} was trained with another config ({listing}): resuming would not continue "
            "the same run. Use a new --workdir, or set config.checkpoint.allow_changed_config"
            "=True to resume with the new values"
        )
    print(f"resuming {workdir} with a changed config: {listing}", file=sys.stderr)
