"""Batched generation with the KV cache: greedy, temperature, top-k and top-p, stopping at eos.

`generate(model_config, params, prompts, max_new_tokens=...)` left-pads the prompts, fills the
cache with one prefill call, then decodes one token per iteration of a `lax.while_loop`, all in
one jit-compiled program (compiled once per model, shapes and sampling options; the cache is
donated to it). Randomness comes only from the explicit key: token t of a row is drawn with
`jax.random.fold_in(rng, t)`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.data import synthetic
from dpo_jax.models import ModelConfig, init_cache, load_hf, make_decode_fn
from dpo_jax.tokenizer import Tokenizer, check_tokenizer_fits


class SamplingOptions(NamedTuple):
    """How the next token is chosen from the logits.

    Attributes:
      temperature: 0 for greedy (argmax); > 0 divides the logits before sampling.
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p,
        in (0, 1] (1 = all). Applied after top_k, on the tempered distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


GREEDY = SamplingOptions()


class Generation(NamedTuple):
    """Generated continuations (the prompt not included).

    Attributes:
      tokens: [N, max_new_tokens] int32; `pad_id` after a row's eos.
      lengths: [N] int32 tokens generated per row, its eos included.
      finished: [N] bool, True where the row stopped at an eos token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def completions(self) -> list[list[int]]:
        """Each row's generated ids without padding (the eos kept when there was one)."""
        return [
            row[:length].tolist() for row, length in zip(self.tokens, self.lengths, strict=True)
        ]


def check_options(options: SamplingOptions) -> None:
    """Raises ValueError naming the field when a sampling option is out of its range."""
    if not options.temperature >= 0:
        raise ValueError(f"temperature={options.temperature} must be >= 0 (0 = greedy)")
    if not isinstance(options.top_k, int) or options.top_k < 0:
        raise ValueError(f"top_k={options.top_k!r} must be an int >= 0 (0 = no top-k)")
    if not 0 < options.top_p <= 1:
        raise ValueError(f"top_p={options.top_p} must be in (0, 1] (1 = no top-p)")


def filter_logits(logits: jax.Array, options: SamplingOptions) -> jax.Array:
    """Tempered logits with the tokens outside top-k / top-p set to −inf.

    Args:
      logits: [N, V] float32.
      options: temperature > 0, top_k, top_p.

    Returns:
      [N, V] float32 logits to sample from with `jax.random.categorical`.
    """
    logits = logits.astype(jnp.float32) / options.temperature
    if options.top_k and options.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, options.top_k)[0][:, -1:]  # [N, 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if options.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)  # [N, V], most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept when the tokens more likely than it hold less than top_p, so the most
        # likely token is always kept.
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < options.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def next_token(logits: jax.Array, rng: jax.Array, options: SamplingOptions) -> jax.Array:
    """[N, V] logits -> [N] int32 tokens: argmax when temperature is 0, else a filtered draw."""
    if options.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, options), axis=-1).astype(jnp.int32)


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads token-id prompts to one length.

    Args:
      prompts: N non-empty sequences of token ids.
      pad_id: the id written on padding (never attended to).

    Returns:
      tokens [N, P] int32, positions [N, P] int32 (0 at each row's first real token, 0 on
      padding), valid [N, P] bool (False on padding).

    Raises:
      ValueError: no prompts, or an empty prompt (naming its index).
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. bos)")
    length = max(len(prompt) for prompt in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt) :] = prompt
        valid[i, length - len(prompt) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, valid


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text prompt as training encodes it: bos first when the tokenizer adds one.

    Raises:
      ValueError: an empty prompt (an empty string, or one that encodes to no tokens).
    """
    ids = list(tokenizer.encode(text)) if text else []
    if not ids:
        raise ValueError(f"prompt {text!r} is empty: it encodes to no tokens")
    if tokenizer.add_bos and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def _eos_ids(model_config: ModelConfig, eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_id is None:
        eos_id = model_config.eos_token_id
    if eos_id is None:
        return ()
    return tuple(int(i) for i in eos_id) if isinstance(eos_id, Sequence) else (int(eos_id),)


def _check_lengths(model_config: ModelConfig, prompt_length: int, max_new_tokens: int) -> None:
    context = model_config.max_position_embeddings
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if prompt_length >= context:
        raise ValueError(
            f"the longest prompt has {prompt_length} tokens; the model's context is {context} "
            "(max_position_embeddings), so it leaves no room to generate"
        )
    if prompt_length + max_new_tokens > context:
        raise ValueError(
            f"prompt ({prompt_length} tokens) + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {context} tokens (max_position_embeddings)"
        )


def generate(
    model_config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    options: SamplingOptions = GREEDY,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
) -> Generation:
    """Continues each prompt by up to `max_new_tokens` tokens, stopping a row at eos.

    Args:
      model_config: the model.
      params: its params (from `init_params`, a converter or a checkpoint).
      prompts: N token-id sequences (bos included if the model wants one), any lengths.
      max_new_tokens: the most tokens generated per row, >= 1.
      rng: a PRNG key; needed unless greedy (temperature 0).
      options: `SamplingOptions` (default greedy).
      eos_id: id or ids that end a row; None = the config's eos_token_id (none: never stop).
      pad_id: written after a row's end and on left-padding; None = the config's pad id or 0.

    Returns:
      A `Generation` of numpy arrays.

    Raises:
      ValueError: an empty prompt, a prompt that does not fit the model's context with
        max_new_tokens, an out-of-range sampling option, or sampling without a key.
    """
    check_options(options)
    if options.temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key (jax.random.key(seed))")
    pad_id = pad_id if pad_id is not None else (model_config.pad_token_id or 0)
    tokens, positions, valid = pad_prompts(prompts, pad_id)
    _check_lengths(model_config, tokens.shape[1], max_new_tokens)
    rng = rng if rng is not None else jax.random.key(0)
    cache = init_cache(model_config, tokens.shape[0], tokens.shape[1] + max_new_tokens)
    generate_fn = _compiled_generate(
        model_config, max_new_tokens, options, _eos_ids(model_config, eos_id), int(pad_id)
    )
    out_tokens, lengths, finished, _ = generate_fn(params, cache, tokens, positions, valid, rng)
    return Generation(np.asarray(out_tokens), np.asarray(lengths), np.asarray(finished))


def make_sample_fn(
    model_config: ModelConfig,
    *,
    max_new_tokens: int,
    options: SamplingOptions,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
) -> Callable:
    """`generate`'s program as a pure function to call inside another jitted step (PPO's rollout).

    Returns:
      sample_fn(params, tokens [N, P], positions [N, P], valid [N, P] bool, rng) ->
      (out [N, max_new_tokens] int32, pad after each row's end; lengths [N] int32, eos counted;
      finished [N] bool, True where the row ended with eos), with prompts left-padded as
      `pad_prompts` pads them. The KV cache is made inside.

    Raises:
      ValueError: an out-of-range sampling option.
    """
    check_options(options)
    pad_id = pad_id if pad_id is not None else (model_config.pad_token_id or 0)
    generate_fn = functools.partial(
        _generate,
        decode_fn=make_decode_fn(model_config),
        max_new_tokens=max_new_tokens,
        options=options,
        eos_ids=_eos_ids(model_config, eos_id),
        pad_id=int(pad_id),
    )

    def sample_fn(params, tokens, positions, valid, rng):
        cache = init_cache(model_config, tokens.shape[0], tokens.shape[1] + max_new_tokens)
        out, lengths, finished, _ = generate_fn(params, cache, tokens, positions, valid, rng)
        return out, lengths, finished

    return sample_fn


@functools.lru_cache(maxsize=16)
def _compiled_generate(model_config, max_new_tokens, options, eos_ids, pad_id):
    """One jitted generation program per model and static options.

    The cache is donated and returned, so its input buffer is the loop's carry: one cache in
    memory, updated in place by every decode step.
    """
    return jax.jit(
        functools.partial(
            _generate,
            decode_fn=make_decode_fn(model_config),
            max_new_tokens=max_new_tokens,
            options=options,
            eos_ids=eos_ids,
            pad_id=pad_id,
        ),
        donate_argnums=1,
    )


def _generate(
    params,
    cache,
    tokens,
    positions,
    valid,
    rng,
    *,
    decode_fn,
    max_new_tokens,
    options,
    eos_ids,
    pad_id,
):
    """Prefill, then a while_loop of single-token decode steps until every row ends."""
    batch_size = tokens.shape[0]
    logits, cache = decode_fn(params, cache, tokens, positions, valid)
    first = next_token(logits[:, -1], jax.random.fold_in(rng, 0), options)  # [N]
    next_position = positions[:, -1] + 1  # [N], the first generated token's position
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, out, done, lengths = carry
        out = out.at[:, step].set(jnp.where(done, pad_id, token))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
        logits, cache = decode_fn(
            params, cache, token[:, None], (next_position + step)[:, None], ~done[:, None]
        )
        token = next_token(logits[:, 0], jax.random.fold_in(rng, step + 1), options)
        return step + 1, token, cache, out, done, lengths

    carry = (
        jnp.zeros((), jnp.int32),
        first,
        cache,
        jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch_size,), bool),
        jnp.zeros((batch_size,), jnp.int32),
    )
    _, _, cache, out, finished, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths, finished, cache  # no eos ids: eos is -1, so nothing finishes


TOKENIZER_CHOICES = ("auto", "model", "synthetic")


def load_model(path: str, tokenizer: str = "auto") -> tuple[ModelConfig, Any, Any]:
    """A model to sample from: a .gguf file, a Hugging Face directory or a training workdir.

    Args:
      path: a `.gguf` file (e.g. the packaged Gemma 3 270M); a directory with config.json and
        safetensors; or a training workdir, whose exported final policy `<workdir>/hf` is read.
      tokenizer: "model" (the GGUF's, or tokenizer.json of the directory), "synthetic" (the
        synthetic task's word-level tokenizer), "auto" (the model's when there is one, else
        the synthetic one for a model of the synthetic vocabulary size), or a tokenizer dir.

    Returns:
      (model_config, params, tokenizer).

    Raises:
      FileNotFoundError: nothing loadable at `path` (the message says what was looked for).
      ValueError: the tokenizer does not fit the model, or none could be chosen.
    """
    model_tokenizer = None
    if os.path.isfile(path) and path.endswith(".gguf"):
        from dpo_jax.models.convert_gguf import load_gguf

        model_config, params, model_tokenizer = load_gguf(path)
        model_dir = None
    else:
        model_dir = (
            os.path.join(path, "hf")
            if os.path.isfile(os.path.join(path, "hf", "config.json"))
            else path
        )
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(
                f"{path}: no checkpoint here: expected a .gguf file, a model directory with "
                "config.json, or a training workdir with hf/config.json (written at the end of "
                "training)"
            )
        model_config, params = load_hf(model_dir)
    if tokenizer not in TOKENIZER_CHOICES:
        chosen = Tokenizer.from_dir(tokenizer)
    elif tokenizer == "synthetic":
        chosen = synthetic.make_tokenizer()
    elif model_tokenizer is not None:
        chosen = model_tokenizer
    elif model_dir is not None and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        chosen = Tokenizer.from_dir(model_dir)
    elif tokenizer == "auto" and model_config.vocab_size == len(synthetic.VOCAB):
        chosen = synthetic.make_tokenizer()
    else:
        raise ValueError(
            f"{path}: no tokenizer found with the model; pass tokenizer='synthetic' or a "
            "directory with tokenizer.json"
        )
    check_tokenizer_fits(chosen, model_config)
    return model_config, params, chosen
