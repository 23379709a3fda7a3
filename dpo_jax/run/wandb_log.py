"""Weights & Biases logging of a run (config.log.wandb_project; off when it is "").

One W&B run per workdir, on process 0 only:
- it is created with the run's config (`config.to_dict()`), and its id is kept in
  `<workdir>/wandb_run_id`, so a resumed run (same workdir) continues the same W&B run
  (`wandb.init(id=..., resume="allow")`);
- every record `MetricsWriter` writes also goes to W&B as `<stage>/<split>/<name>`, against the
  stage's own step axis `<stage>/step` (`define_metric`), so SFT and DPO each start at step 1 and
  a resumed stage's replayed steps land on the same x values;
- at the end the summary's numbers go to the run's summary and its before/after table to a
  `wandb.Table` ("summary_table").

W&B's own settings apply (WANDB_MODE=offline writes under `<workdir>/wandb/` with no network;
WANDB_API_KEY or `wandb login` online); no credential passes through this module. `wandb` is
imported only by runs that log to it.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from dpo_jax import storage

RUN_ID_FILE = "wandb_run_id"


class WandbLog:
    """An open W&B run, or nothing (`enabled` False: every call does nothing)."""

    def __init__(self, run: Any = None):
        self._run = run
        self._stages: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def log(self, stage: str, split: str, step: int, scalars: dict[str, float]) -> None:
        """Logs one record of `stage` at its step (`MetricsWriter.write`'s values)."""
        if self._run is None:
            return
        if stage not in self._stages:
            self._run.define_metric(f"{stage}/step")
            self._run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        record = {f"{stage}/{split}/{name}": value for name, value in scalars.items()}
        self._run.log({f"{stage}/step": int(step), **record})

    def finish(
        self, exit_code: int = 0, summary: dict[str, Any] | None = None, table: list | None = None
    ) -> None:
        """Writes the run's summary (its numbers, flattened as "a/b/c") and `table` (a header
        row, then rows; `dpo_jax.run.train.summary_rows`), and closes the run."""
        if self._run is None:
            return
        import wandb

        self._run.summary.update(_numbers(summary or {}))
        if table:
            self._run.log({"summary_table": wandb.Table(columns=table[0], data=table[1:])})
        self._run.finish(exit_code=exit_code)
        self._run = None


def open_run(config: ml_collections.ConfigDict, workdir: str) -> WandbLog:
    """The run's W&B log: a new run, the workdir's run resumed, or a disabled log (no project,
    or not process 0)."""
    if not config.log.wandb_project or jax.process_index() != 0:
        return WandbLog()
    import wandb

    id_path = storage.join(workdir, RUN_ID_FILE)
    run_id = None  # a new run, unless this workdir already made one
    if storage.exists(id_path):
        run_id = storage.read_text(id_path).strip() or None
    storage.make_dirs(workdir)
    run = wandb.init(
        project=config.log.wandb_project,
        entity=config.log.wandb_entity or None,
        dir=None if storage.is_remote(workdir) else workdir,  # W&B's files are local (./wandb)
        id=run_id,
        resume="allow",
        config=config.to_dict(),
    )
    if run_id is None:
        storage.write_text(id_path, run.id + "\n")
    return WandbLog(run)


def _numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict, flattened to "a/b/c" keys."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
