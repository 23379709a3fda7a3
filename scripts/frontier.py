"""The DPO paper's reward-vs-KL experiment in miniature: `python scripts/frontier.py`.

Trains π_ref by SFT on the synthetic task, labels pairs of its samples by Bradley–Terry on the
true reward, then runs DPO at several β, Unlikelihood, Preferred-FT and best-of-N, and writes
frontier.csv, frontier_matched.csv (DPO minus the others at matched KL) and frontier.png to
--out_dir (default docs/, the files docs/results.md shows). About eight minutes on a 2-core CPU
(2026-12-04, with PPO, PPO-GT and the temperature sweep). The models come from --config
(the main job's, configs/default.py).
"""

import dataclasses
import os

from absl import app, flags, logging

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"
)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Base training config.")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs", "Where the CSVs and frontier.png go.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/frontier", "Where the training runs go.")
_BETAS = flags.DEFINE_list("betas", None, "DPO's β values, e.g. 1,2 (default: FrontierSettings').")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs each checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    from dpo_jax.experiments import frontier  # after flag parsing, so --help stays fast

    settings = frontier.FrontierSettings()
    if _BETAS.value:
        try:
            betas = tuple(float(beta) for beta in _BETAS.value)
        except ValueError as error:
            raise app.UsageError(f"--betas={','.join(_BETAS.value)}: {error}") from None
        settings = dataclasses.replace(settings, betas=betas)
    result = frontier.run_frontier(_CONFIG.value, _RUNS_DIR.value, settings)
    frontier.write_results(result, _OUT_DIR.value)
    print(frontier.format_table(result))
    print(f"wrote frontier.csv, frontier_matched.csv and frontier.png to {_OUT_DIR.value}")


if __name__ == "__main__":
    cli.run(main)
