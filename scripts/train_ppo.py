"""PPO, the DPO paper's RLHF baseline: `python scripts/train_ppo.py --config.ppo.true_reward=...`.

SFT (config.sft, as the main job), then PPO (config.ppo) from the SFT model on the prompts of
config.data.source, scored by a reward model export (--config.ppo.reward_model=DIR, from
scripts/train_reward_model.py) or by a true reward (--config.ppo.true_reward=NAME, PPO-GT), and
prints the first and last iteration's score and KL. The policy is exported to
<workdir>/ppo/export (a Hugging Face directory); rerunning with the same --workdir resumes.
"""

import os
import sys

from absl import app, flags, logging

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"
)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "./runs/ppo", "Checkpoints, metrics and the export.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the full traceback.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs each checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    from dpo_jax.run import errors, ppo_train  # after flag parsing, so --help stays fast

    try:
        summary = ppo_train.train_ppo(_CONFIG.value, _WORKDIR.value)
    except Exception as error:  # noqa: BLE001 - errors.report re-raises what is not the user's
        sys.exit(errors.report(error, verbose=_VERBOSE.value))
    first, last = summary["train_first"], summary["train_last"]
    if last:
        print(
            f"PPO scores {first['objective/scores']:.4f} -> {last['objective/scores']:.4f}, "
            f"KL {first['objective/kl']:.4f} -> {last['objective/kl']:.4f} nats "
            f"(iterations {first['step']}-{last['step']}); exported to {summary['export']}"
        )
    else:
        print(f"PPO was already complete; the export is {summary['export']}")


if __name__ == "__main__":
    cli.run(main)
