"""Run-time guards of the training loop: non-finite steps and a collapsed policy.

The step itself never applies a non-finite update (`dpo_jax.step.update_fn` keeps the old state
and reports `nonfinite`); these guards decide what the run does about it. Each step's flag is
read one step late (after the next step is dispatched), so the device stays busy while the host
waits for a finished scalar.
"""

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from dpo_jax.run.errors import Diverged, NonFiniteParams, ReferenceMismatch

# Below this mean |log π(y_w|x) − log π(y_l|x)|, chosen and rejected count as identical.
_COLLAPSE_MARGIN = 1e-6


@dataclasses.dataclass
class StepGuard:
    """Watches the steps of one stage.

    Attributes:
      stage: the stage's name, for messages.
      on_nonfinite: "stop" (raise `Diverged` at the first non-finite step) or "skip".
      max_skipped_steps: with "skip", raise `Diverged` after this many skipped in a row.
      collapse_patience: warn after this many log steps in a row that look collapsed.
      step0_tolerance: check that the first step's policy is its reference: the mean
        |log π − log π_ref| per sequence (metric `logps/ref_abs_diff`) of step 1 at most this
        many nats, relative to max(1, |logps/chosen|); None: no check (no reference, a resumed
        stage, or `config.guards.check_step0=False`).
    """

    stage: str
    on_nonfinite: str
    max_skipped_steps: int
    collapse_patience: int
    step0_tolerance: float | None = None
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    collapsed_logs: int = 0
    _pending: Any = None  # (step, device metrics, data position) of the last dispatched step

    def after_dispatch(self, step: int, device_metrics: dict, data_position: Any) -> None:
        """Checks the previous step's flag, then remembers this one's (step counted from 1)."""
        self.check_pending()
        self._pending = (step, device_metrics, data_position)

    def check_pending(self) -> None:
        """Reads the flag of the last remembered step (blocking until it has run).

        Raises:
          Diverged: the step was not finite and on_nonfinite is "stop", or too many in a row
            were skipped.
        """
        if self._pending is None:
            return
        step, device_metrics, data_position = self._pending
        self._pending = None
        if step == 1 and self.step0_tolerance is not None:
            self._check_step0(device_metrics)
        if not int(jax.device_get(device_metrics["nonfinite"])):
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        values = jax.device_get({k: device_metrics[k] for k in ("loss", "grad_norm")})
        what = (
            f"[{self.stage}] step {step}: non-finite loss, gradient norm or params "
            f"(loss={float(values['loss']):.6g}, grad_norm={float(values['grad_norm']):.6g}) on "
            f"the batch read at data position {data_position}; the update was not applied"
        )
        if self.on_nonfinite == "stop":
            raise Diverged(
                f"{what}. Nothing non-finite was saved. Lower config.optimizer.learning_rate, "
                "or set config.guards.on_nonfinite='skip' to skip such steps"
            )
        print(f"{what} (skipped: {self.skipped_in_a_row} in a row)", file=sys.stderr)
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise Diverged(
                f"[{self.stage}] {self.skipped_in_a_row} steps in a row were not finite (up to "
                f"step {step}; config.guards.max_skipped_steps={self.max_skipped_steps}): the "
                "run has diverged. Lower config.optimizer.learning_rate"
            )

    def _check_step0(self, device_metrics: dict) -> None:
        """Raises `ReferenceMismatch` when step 1's policy and reference log-probs differ."""
        names = ("logps/ref_abs_diff", "logps/chosen")
        gap, chosen = (float(jax.device_get(device_metrics[name])) for name in names)
        allowed = self.step0_tolerance * max(1.0, abs(chosen))
        if gap > allowed:
            raise ReferenceMismatch(
                f"[{self.stage}] step 1: the policy is not its reference before any update: "
                f"mean |log π − log π_ref| = {gap:.6g} nats per sequence (allowed {allowed:.3g}; "
                "the rewards should start at 0 and the sigmoid loss at ln 2). Likely causes: "
                "dropout on in one forward, the policy and reference params in different dtypes, "
                "or a reference that is not the starting policy. Turn the check off with "
                "config.guards.check_step0=False"
            )

    def after_log(self, step: int, metrics: dict[str, float]) -> None:
        """Warns when the fetched metrics look collapsed for `collapse_patience` logs in a row:
        a gradient norm of exactly 0, or chosen and rejected with identical log-probs."""
        zero_grad = metrics.get("grad_norm") == 0.0
        identical = metrics.get("logps/abs_margin", 1.0) < _COLLAPSE_MARGIN
        self.collapsed_logs = self.collapsed_logs + 1 if (zero_grad or identical) else 0
        if self.collapsed_logs == self.collapse_patience:
            signs = [
                sign
                for sign, seen in (("grad_norm 0", zero_grad), ("chosen == rejected", identical))
                if seen
            ]
            print(
                f"[{self.stage}] warning: step {step}: the policy looks collapsed "
                f"({', '.join(signs)} for {self.collapsed_logs} log steps in a "
                "row) while the loss may look healthy; lower config.optimizer.learning_rate",
                file=sys.stderr,
            )


def check_finite(params: Any, what: str) -> None:
    """Raises `NonFiniteParams` naming the tensors of `params` that hold NaN or infinity.

    Args:
      params: a pytree of arrays (device or host).
      what: what the params are about to be or were, for the message ("checkpoint step 200").
    """
    finite = jax.tree.map(lambda leaf: np.asarray(jax.numpy.all(jax.numpy.isfinite(leaf))), params)
    bad = [
        jax.tree_util.keystr(path)
        for path, ok in jax.tree_util.tree_leaves_with_path(jax.device_get(finite))
        if not bool(ok)
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteParams(f"{what}: non-finite values in {len(bad)} tensor(s): {shown}")
