"""Sample from a model: `python scripts/sample.py --model=PATH --prompt="sort 3 1 2 ="`.

PATH is a .gguf file, a Hugging Face model directory, or a training workdir (its exported
policy, <workdir>/hf). Greedy by default; --temperature, --top_k and --top_p sample instead.

    python scripts/sample.py --model=runs/default --prompt="sort 3 1 2 =" --prompt="copy 4 4 ="
    python scripts/sample.py --model=runs/gemma3/gemma3-270m-q4_k_m.gguf \
        --prompt="The capital of France is" --temperature=0.8 --top_p=0.95
"""

import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "A .gguf file, an HF directory or a workdir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "A text prompt (repeat for a batch).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto", "auto, model, synthetic, or a directory.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Most tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass in (0, 1] (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the samples.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error.")
flags.mark_flags_as_required(["model", "prompt"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # after flag parsing, so --help stays fast

    from dpo_jax import sampling

    try:
        model_config, params, tokenizer = sampling.load_model(_MODEL.value, _TOKENIZER.value)
        options = sampling.SamplingOptions(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
        sampling.check_options(options)
        prompts = [sampling.encode_prompt(tokenizer, text) for text in _PROMPTS.value]
        out = sampling.generate(
            model_config,
            params,
            prompts,
            max_new_tokens=_MAX_NEW.value,
            rng=jax.random.key(_SEED.value),
            options=options,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
    except (ValueError, FileNotFoundError) as error:
        if _DEBUG.value:
            raise
        sys.exit(f"error: {error}")
    for text, completion in zip(_PROMPTS.value, out.completions(), strict=True):
        print(f"{text!r} -> {tokenizer.decode(completion, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    app.run(main)
