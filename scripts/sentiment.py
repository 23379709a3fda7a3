"""Gemma 3 270M tuned toward positive movie reviews, judged by VADER: `python scripts/sentiment.py`.

The DPO paper's controlled-sentiment experiment on a real model (dpo_jax.experiments.sentiment):
pairs of the packaged Gemma 3 270M's continuations of review openings, labelled by Bradley–Terry
on VADER's score; DPO with LoRA at each β, Preferred-FT with the same adapters, and best-of-N,
scored on held-out openings by mean VADER score and KL. Writes sentiment.csv and
sentiment_samples.md to --out_dir (default docs/, the files docs/results.md shows). The training
config is --config (configs/pretrained.py:gemma3_gguf_lora: rank-8 adapters on every linear
kernel); the model is --model (default: the packaged Gemma 3 270M GGUF).
"""

import dataclasses
import os

from absl import app, flags, logging

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "pretrained.py:gemma3_gguf_lora"
)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Base training config (LoRA).")
_MODEL = flags.DEFINE_string(
    "model", "", "π_ref: a .gguf file or a Hugging Face directory ('' = the packaged Gemma 3 270M)."
)
_OUT_DIR = flags.DEFINE_string("out_dir", "docs", "Where sentiment.csv and the samples go.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/sentiment", "Where the training runs go.")
_TRAIN = flags.DEFINE_integer("num_train_openings", None, "Openings that make pairs.")
_EVAL = flags.DEFINE_integer("num_eval_openings", None, "Held-out openings scored.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Passes over the pairs of each tuning run.")
_BETAS = flags.DEFINE_list("betas", None, "DPO's β values, e.g. 0.1,0.5.")


def _settings(sentiment):
    """SentimentSettings with the flags that were given."""
    fields = {"num_train_openings": _TRAIN.value, "num_eval_openings": _EVAL.value}
    fields["epochs"] = _EPOCHS.value
    if _BETAS.value:
        try:
            fields["betas"] = tuple(float(beta) for beta in _BETAS.value)
        except ValueError as error:
            raise app.UsageError(f"--betas={','.join(_BETAS.value)}: {error}") from None
    given = {name: value for name, value in fields.items() if value is not None}
    return dataclasses.replace(sentiment.SentimentSettings(), **given)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs each checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    from dpo_jax.experiments import sentiment  # after flag parsing, so --help stays fast
    from dpo_jax.run.train import gguf_path

    model = _MODEL.value or gguf_path(_CONFIG.value, _RUNS_DIR.value)
    result = sentiment.run_sentiment(_CONFIG.value, model, _RUNS_DIR.value, _settings(sentiment))
    sentiment.write_results(result, _OUT_DIR.value)
    print(sentiment.format_table(result))
    print(f"wrote sentiment.csv and sentiment_samples.md to {_OUT_DIR.value}")


if __name__ == "__main__":
    cli.run(main)
