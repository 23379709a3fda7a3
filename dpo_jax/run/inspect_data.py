"""`python scripts/inspect_data.py`'s library: a config's training pairs as the model sees them."""

import ml_collections
from rich.console import Console

from dpo_jax.data.inspection import inspect_pairs
from dpo_jax.data.tokenize import DataStats
from dpo_jax.run import build, train


def inspect_training_data(
    config: ml_collections.ConfigDict, *, num_pairs: int, console: Console, workdir: str = ""
) -> DataStats:
    """Prints the first `num_pairs` pairs of the DPO stage's training source, laid out with the
    config's data settings (`config.data`: row length, packing, truncation, boundary), then
    the counts of dropped and truncated records of the whole source.

    The tokenizer is the one training uses (`train.load_model`: for an HF or GGUF model this
    loads its weights too).

    Raises:
      ValueError: an invalid config, or data the pipeline refuses (the message names the record).
    """
    train.check_config(config)
    tokenizer, _, _ = train.load_model(config, workdir)
    source, _ = build.data_sources(config)
    options = build._data_options(config)  # the very options the training stages pass
    return inspect_pairs(source, tokenizer, console, num_pairs=num_pairs, **options)
