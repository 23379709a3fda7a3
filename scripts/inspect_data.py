"""Show a config's training pairs as the model sees them: `python scripts/inspect_data.py`.

Prints the first --num_pairs pairs (prompt, chosen and rejected as token strings, the scored
positions, each row's padding; colour-coded on a terminal), then the dropped and truncated
counts of the whole source:

    python scripts/inspect_data.py --config=configs/default.py --num_pairs=3
    python scripts/inspect_data.py --config=configs/default.py:packed
    python scripts/inspect_data.py --config=configs/pretrained.py --config.data.source=train.jsonl
"""

import os
import sys

from absl import app, flags

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"
)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Training config file.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 3, "How many pairs to show.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where a packaged GGUF model is assembled.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rich.console import Console  # after flag parsing, so --help stays fast

    from dpo_jax.run.inspect_data import inspect_training_data

    try:
        inspect_training_data(
            _CONFIG.value,
            num_pairs=_NUM_PAIRS.value,
            console=Console(soft_wrap=True),
            workdir=_WORKDIR.value,
        )
    except (ValueError, FileNotFoundError) as error:
        if _DEBUG.value:
            raise
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli.run(main)
