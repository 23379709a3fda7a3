"""Where metrics go: a JSONL file, TensorBoard event files, W&B and a tqdm progress bar."""

import json
import time
from typing import Any

import numpy as np

from dpo_jax import storage

# What the progress bar shows, by metric name -> short label.
_BAR_FIELDS = {"loss": "loss", "rewards/accuracies": "acc", "tokens_per_second": "tok/s"}


class MetricsWriter:
    """Writes scalar metrics of one stage to `<directory>/metrics.jsonl`, TensorBoard and W&B.

    Only process 0 writes; other processes get a writer that does nothing. A run resumed at
    `resume_step` first drops the records of later steps (written before a crash, and about to be
    replayed), so each step is listed once. On an object store (a gs:// workdir), which cannot
    append, the JSONL file is rewritten whole at each write (`dpo_jax.storage.write_text`: one
    upload, so a reader sees the old file or the new one); TensorBoard writes there through
    tensorboardX's own gs:// writer.
    """

    def __init__(
        self,
        directory: str,
        *,
        tensorboard: bool,
        enabled: bool = True,
        resume_step: int = 0,
        wandb_log: Any = None,
        stage: str = "",
    ):
        """`wandb_log`: the run's `dpo_jax.run.wandb_log.WandbLog` (or None), which gets every
        record as `<stage>/<split>/<name>`."""
        self.enabled = enabled
        self._wandb = wandb_log if enabled else None
        self._stage = stage
        self._tensorboard = None
        self._jsonl = None
        if not enabled:
            return
        storage.make_dirs(directory)
        self._path = storage.join(directory, "metrics.jsonl")
        kept = _drop_records_after(self._path, resume_step)
        self._lines = kept if storage.is_remote(directory) else None  # rewritten whole
        if self._lines is None:
            self._jsonl = open(self._path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # only runs that want event files pay for it

            self._tensorboard = SummaryWriter(storage.join(directory, "tb"))

    def write(self, step: int, metrics: dict[str, Any], *, split: str) -> None:
        """Writes one record `{"step", "split", "time", <name>: value, ...}` (values as floats).

        Args:
          step: the optimizer steps done.
          metrics: scalar metrics (numpy or Python numbers).
          split: "train" or "eval"; TensorBoard tags are `<split>/<name>`.
        """
        if not self.enabled:
            return
        scalars = {name: float(np.asarray(value)) for name, value in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time(), **scalars}
        line = json.dumps(record) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            storage.write_text(self._path, "".join(self._lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
        if self._wandb is not None:
            self._wandb.log(self._stage, split, int(step), scalars)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _drop_records_after(path: str, step: int) -> list[str]:
    """Rewrites the JSONL file at `path` without the records of steps after `step` (and without
    a last line cut short by a crash); returns the lines kept."""
    if not storage.exists(path):
        return []
    lines = storage.read_text(path).splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        storage.write_text(path, "".join(kept))  # atomic: the old file or the new one
    return kept


def _step_of(line: str) -> int | None:
    """The step of a JSONL record, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class ProgressBar:
    """A tqdm bar over optimizer steps, showing the last fetched loss, accuracy and tokens/s."""

    def __init__(self, *, total: int, initial: int, description: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True)

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        shown = {
            label: f"{float(metrics[name]):.4g}"
            for name, label in _BAR_FIELDS.items()
            if name in metrics
        }
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
