"""Checkpoints of a training stage with orbax, and export of the final policy to HF format.

A checkpoint holds the train state (step, policy params, optimizer state, and the reference only
when TR-DPO moves it), the run's base PRNG key, and the data iterator's position (grain's state,
as JSON). A frozen reference is never saved: it is re-derived from its source (the SFT stage's
final checkpoint, or the loaded / initialised model).
"""

import ctypes
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpo_jax import storage
from dpo_jax.models import ModelConfig, save_hf
from dpo_jax.models.convert_peft import save_peft
from dpo_jax.run import errors
from dpo_jax.run.guards import check_finite

# In a LoRA stage's directory: the sha256 of the base its adapters are trained on.
LORA_BASE_FILE = "lora_base.json"
# Gigabytes of a checkpoint's arrays orbax writes at once. Its default, 96, lets the write
# buffers of a whole state be in host memory at the same time.
SAVE_CONCURRENT_GB = 1


@functools.cache
def _libc():
    """glibc, or None where there is none (loaded once)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_host_memory() -> None:
    """Returns freed heap pages to the OS (glibc's `malloc_trim`; a no-op without glibc).

    Orbax's writer threads allocate in glibc's per-thread arenas; once freed, those pages stay
    in the process, where the next step's buffers do not reuse them; so do the compiler's. The
    training loop calls this after compiling the step and after each save (with
    config.checkpoint.async_save=False the save is done by then).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def make_manager(
    directory: str, *, keep: int, every_steps: int, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last `keep` checkpoints, one every `every_steps`.

    Args:
      directory: where the step directories go (a local path or a gs:// URL).
      keep: checkpoints kept.
      every_steps: save every N steps (and whenever `save` is forced).
      async_save: the save is written in the background while the next steps run, so the
        saved state and the next step's state are both alive (on a CPU host, both in RAM).
        False: `save` returns once the checkpoint is written (config.checkpoint.async_save).

    Raises:
      ValueError: keep or every_steps < 1.
    """
    if keep < 1 or every_steps < 1:
        raise ValueError(
            f"checkpoint.keep={keep} and checkpoint.every_steps={every_steps} must be >= 1"
        )
    # Orbax writes each checkpoint to a temporary directory and renames it when complete (on an
    # object store: writes a commit marker last), so a kill mid-write leaves the previous
    # checkpoints whole; the partial one is removed here. gs:// goes to tensorstore as it is.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=every_steps,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    if not storage.is_remote(directory):
        directory = os.path.abspath(directory)
    # The handlers the args name anyway, the state's with its writes in flight capped.
    handlers = {
        "state": ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB),
        "data": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


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

    Raises:
      OSError: the disk is full (this save's or the previous one's write, which orbax reports
        here), naming the checkpoints directory.
    """
    if not (force or manager.should_save(step)):
        return False
    check_finite(state.params, f"checkpoint of step {step}")  # never write NaN weights
    items = {"train_state": state, "rng": _global_key_data(rng, state.step.sharding)}
    with errors.naming_full_disk(str(manager.directory)):
        return manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(items), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight to be written.

    Raises:
      OSError: the disk is full, naming the checkpoints directory (orbax's own error names a
        file deep in its temporary directory, or none).
    """
    with errors.naming_full_disk(str(manager.directory)):
        manager.wait_until_finished()


def _global_key_data(rng: jax.Array, replicated: jax.sharding.Sharding) -> jax.Array:
    """The key's data as an array replicated like the step: with several processes orbax saves
    only global arrays, and the base key is the same on every process."""
    data = jax.random.key_data(rng)
    if jax.process_count() == 1 or not data.is_fully_addressable:
        return data
    host = np.asarray(data)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[Any, jax.Array, dict[str, Any]] | None:
    """The newest readable checkpoint placed as `abstract_state` says, or None when there is none.

    A checkpoint that cannot be read (truncated or garbage files, a missing item, an empty step
    directory) is moved to `<checkpoints>/../damaged_checkpoints/<step>` with a message saying
    why, and the next older one is tried: a damaged newest checkpoint never blocks a restart,
    and, moved aside, it does not count against `keep`, so the good one it fell back to is kept
    until a newer one is complete.

    Args:
      manager: from `make_manager`.
      abstract_state: the TrainState as `jax.ShapeDtypeStruct`s carrying their shardings.

    Returns:
      (state, rng, data_state) or None.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore(manager, step, abstract_state)
        except Exception as error:  # noqa: BLE001 - any failure to read means a damaged step
            _move_aside(manager, step, error)
    return None


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
    abstract_rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    if jax.process_count() > 1:  # saved replicated like the step (`_global_key_data`)
        abstract_rng = jax.ShapeDtypeStruct(
            abstract_rng.shape, abstract_rng.dtype, sharding=abstract_state.step.sharding
        )
    target = {"train_state": abstract_state, "rng": abstract_rng}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    items = restored["state"]
    if not isinstance(restored["data"], dict):
        raise ValueError(f"its data-iterator state is {restored['data']!r}, not a JSON object")
    return items["train_state"], jax.random.wrap_key_data(items["rng"]), restored["data"]


def _move_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    directory = str(manager.directory)
    source = storage.join(directory, str(step))
    damaged = storage.join(directory.rstrip("/").rsplit("/", 1)[0], "damaged_checkpoints")
    target = storage.join(damaged, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        storage.make_dirs(damaged)
        storage.move(source, target)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    print(
        f"checkpoint {source} is damaged ({reason}); moved it to {target} and falling back to "
        "the previous checkpoint",
        file=sys.stderr,
    )
    manager.reload()


def export_hf(directory: str, model_config: ModelConfig, params: Any) -> None:
    """Writes the policy as a Hugging Face model directory (config.json + model.safetensors).

    Every process must call it: a tensor spanning several hosts' devices is gathered (one at a
    time, so devices hold at most one extra whole tensor); process 0 writes.

    Raises:
      NonFiniteParams: a tensor holds NaN or infinity (nothing is written).
    """
    check_finite(params, f"the export to {directory}")
    if jax.process_count() == 1:  # streamed, one stacked param at a time (`save_hf`)
        save_hf(directory, model_config, params)
        return
    host = jax.tree.map(_to_host, params)
    if jax.process_index() == 0:
        save_hf(directory, model_config, host)


def export_peft(
    directory: str,
    model_config: ModelConfig,
    adapters: Any,
    *,
    rank,
    alpha,
    base_model,
    base_fingerprint,
) -> None:
    """Writes LoRA adapters alone in PEFT's format (`dpo_jax.models.convert_peft`); every
    process calls it, process 0 writes.

    Raises:
      NonFiniteParams: an adapter holds NaN or infinity (nothing is written).
    """
    check_finite(adapters, f"the adapter export to {directory}")
    host = jax.tree.map(_to_host, adapters)
    if jax.process_index() == 0:
        save_peft(
            directory,
            model_config,
            host,
            rank=rank,
            alpha=alpha,
            base_model=base_model,
            base_fingerprint=base_fingerprint,
        )


def check_lora_base(directory: str, fingerprint: str, has_checkpoints: bool) -> None:
    """Records LoRA's base fingerprint in `directory`/lora_base.json, or, when the stage has
    checkpoints to resume, refuses a base other than the one they were trained on.

    Raises:
      ValueError: naming the file and both fingerprints.
    """
    path = storage.join(directory, LORA_BASE_FILE)
    if has_checkpoints and storage.exists(path):
        recorded = json.loads(storage.read_text(path))["base_fingerprint"]
        if recorded != fingerprint:
            raise ValueError(
                f"{path}: the LoRA checkpoints in {directory} were trained on a base with "
                f"sha256 {recorded[:16]}…, but the configured base has sha256 "
                f"{fingerprint[:16]}…: resume with the base they were trained on, or use "
                "another workdir"
            )
        return
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps({"base_fingerprint": fingerprint}) + "\n")


def _to_host(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(leaf, tiled=True)
    return jax.device_get(leaf)
