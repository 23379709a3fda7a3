"""Where metrics go: a JSONL file, TensorBoard event files and a tqdm progress bar."""

import json
import os
import time
from typing import Any

import numpy as np

# What the progress bar shows, by metric name -> short label.
_BAR_FIELDS = {"loss": "loss", "rewards/accuracies": "acc", "tokens_per_second": "tok/s"}


class MetricsWriter:
    """Writes scalar metrics of one stage to `<directory>/metrics.jsonl` and TensorBoard.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, directory: str, *, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # only runs that want event files pay for it

            self._tensorboard = SummaryWriter(os.path.join(directory, "tb"))

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
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


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
