"""Compare a policy with its reference: `python scripts/evaluate.py --policy=runs/default/hf ...`.

On held-out prompts: the exact-match rate of greedy completions under each model, the sequence
KL(π ‖ π_ref) from policy samples, and the win rate of policy samples over reference samples
under a reward function (dpo_jax.evaluation.REWARD_FUNCTIONS). Models are .gguf files, HF
directories or training workdirs; records default to the synthetic task's held-out split.

    python scripts/evaluate.py --policy=runs/default/hf --reference=runs/sft_reference/hf
"""

import sys

from absl import app, flags

_POLICY = flags.DEFINE_string("policy", None, "The trained policy (.gguf, HF dir or workdir).")
_REFERENCE = flags.DEFINE_string("reference", None, "The reference model, same kinds of path.")
_RECORDS = flags.DEFINE_string(
    "records", "synthetic", "A .jsonl/.parquet of records, or synthetic."
)
_NUM = flags.DEFINE_integer("num_prompts", 256, "Held-out synthetic prompts (records=synthetic).")
_REWARD = flags.DEFINE_string("reward", "synthetic_digits", "Reward of the win rate; '' = none.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto", "auto, model, synthetic, or a directory.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Most tokens generated per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the samples.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error.")
flags.mark_flags_as_required(["policy", "reference"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # after flag parsing, so --help stays fast

    from dpo_jax import evaluation, sampling
    from dpo_jax.data import synthetic

    try:
        model_config, policy, tokenizer = sampling.load_model(_POLICY.value, _TOKENIZER.value)
        _, reference, _ = sampling.load_model(_REFERENCE.value, _TOKENIZER.value)
        records = _RECORDS.value
        if records == "synthetic":
            records = synthetic.make_records(_NUM.value, split="eval")
        result = evaluation.compare_to_reference(
            model_config,
            policy,
            reference,
            tokenizer,
            records,
            rng=jax.random.key(_SEED.value),
            reward=_REWARD.value or None,
            max_new_tokens=_MAX_NEW.value,
        )
    except (ValueError, FileNotFoundError) as error:
        if _DEBUG.value:
            raise
        sys.exit(f"error: {error}")
    for name, value in result.items():
        print(f"{name:<24}{value:>10.4f}")


if __name__ == "__main__":
    app.run(main)
