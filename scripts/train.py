"""Train a policy with SFT then DPO: `python scripts/train.py [--config=...] [--workdir=...]`.

With no flags it runs configs/default.py (the main job: no download, a few minutes on a CPU).
Override any config field with `--config.<group>.<field>=value`, e.g. `--config.dpo.beta=0.3`;
pick a variant with `--config=configs/default.py:tiny`. Rerunning with the same --workdir resumes.
"""

import os
import sys

from absl import app, flags, logging

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"
)

_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Training config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "./runs/default", "Checkpoints, metrics and the exported model go here."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the full traceback.")
# Many hosts (docs/pods.md, "Running on many hosts"): one process per host, the same flags on each.
_MODE = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "none", "explicit", "slurm", "tpu"], "auto: from the flags/env."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run (explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process, in [0, num_processes).")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for the others.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs each checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    from dpo_jax.run import distributed, errors  # after flag parsing, so --help stays fast
    from dpo_jax.run.train import train_and_evaluate

    if not _VERBOSE.value:  # a full disk's echoes from orbax's threads: held, dropped if reported
        errors.hold_background_reports()
    try:
        distributed.initialize(
            mode=_MODE.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            timeout_s=_TIMEOUT.value,
            config=_CONFIG.value,
        )
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Exception as error:  # noqa: BLE001 - errors.report re-raises what is not the user's
        sys.exit(errors.report(error, verbose=_VERBOSE.value))


if __name__ == "__main__":
    cli.run(main)
