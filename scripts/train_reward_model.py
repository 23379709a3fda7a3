"""Train a Bradley-Terry reward model on the DPO pairs: `python scripts/train_reward_model.py`.

With no flags it runs configs/default.py's data: SFT (config.sft), then the reward model
(config.reward_model) on the synthetic task's pairs, and prints the held-out pair accuracy.
The model is exported to <workdir>/reward_model/export (a Hugging Face directory and
reward_head.safetensors); rerunning with the same --workdir resumes from its checkpoints.
"""

import os
import sys

from absl import app, flags, logging

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"
)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "./runs/reward_model", "Checkpoints and the export.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the full traceback.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs each checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    from dpo_jax.run import errors, reward_model  # after flag parsing, so --help stays fast

    try:
        summary = reward_model.train_reward_model(_CONFIG.value, _WORKDIR.value)
    except Exception as error:  # noqa: BLE001 - errors.report re-raises what is not the user's
        sys.exit(errors.report(error, verbose=_VERBOSE.value))
    before, after = summary["eval_before"], summary["eval_after"]
    print(
        f"held-out pair accuracy {before['rewards/accuracies']:.4f} -> "
        f"{after['rewards/accuracies']:.4f}, loss {before['loss']:.4f} -> {after['loss']:.4f} "
        f"({after['num_pairs']} pairs); exported to {summary['export']}"
    )


if __name__ == "__main__":
    cli.run(main)
