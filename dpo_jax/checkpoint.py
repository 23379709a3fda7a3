"""Checkpoints of a training stage with orbax, and export of the final policy to HF format.

A checkpoint holds the train state (step, policy params, optimizer state, and the reference only
when TR-DPO moves it), the run's base PRNG key, and the data iterator's position (grain's state,
as JSON). A frozen reference is never saved: it is re-derived from its source (the SFT stage's
final checkpoint, or the loaded / initialised model).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dpo_jax.models import ModelConfig, save_hf


def make_manager(directory: str, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last `keep` checkpoints, one every `every_steps`.

    Raises:
      ValueError: keep or every_steps < 1.
    """
    if keep < 1 or every_steps < 1:
        raise ValueError(
            f"checkpoint.keep={keep} and checkpoint.every_steps={every_steps} must be >= 1"
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    rng: jax.Array,
    data_state: dict[str, Any],
    *,
    force: bool = False,
) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; True if a save was started.

    Args:
      manager: from `make_manager`.
      step: the optimizer steps done (the checkpoint's name).
      state: the `TrainState` after `step` updates.
      rng: the run's base key (a typed PRNG key).
      data_state: the data iterator's `get_state()`, JSON-serialisable.
      force: save even when `step` is not a multiple of every_steps.
    """
    items = {"train_state": state, "rng": jax.random.key_data(rng)}
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[Any, jax.Array, dict[str, Any]] | None:
    """The latest checkpoint placed as `abstract_state` says, or None when there is none.

    Args:
      manager: from `make_manager`.
      abstract_state: the TrainState as `jax.ShapeDtypeStruct`s carrying their shardings.

    Returns:
      (state, rng, data_state) or None.
    """
    step = manager.latest_step()
    if step is None:
        return None
    abstract_rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    target = {"train_state": abstract_state, "rng": abstract_rng}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    items = restored["state"]
    return items["train_state"], jax.random.wrap_key_data(items["rng"]), restored["data"]


def export_hf(directory: str, model_config: ModelConfig, params: Any) -> None:
    """Writes the policy as a Hugging Face model directory (config.json + model.safetensors)."""
    save_hf(directory, model_config, jax.device_get(params))
