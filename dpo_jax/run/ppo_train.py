"""PPO from a config (`python scripts/train_ppo.py`): the DPO paper's RLHF baseline, run by the
main job's machinery.

SFT first (config.sft, as the main job), then PPO (config.ppo) from the SFT model on the prompts
of config.data.source. The PPO stage is an ordinary `dpo_jax.run.stage.Stage` carrying
`dpo_jax.ppo_step.ppo_update_fn`, so `stage.run_stage` gives it the main job's jit over sharded
batches, orbax checkpoints, exact resume (the iteration's key is the run's key folded with the
step; the prompt order is a checkpointed position), the non-finite guard, the step-0 check
(π = π_ref before the first update) and metrics.jsonl / TensorBoard under TRL's PPO names.

The score of a sampled response is one of:
- a reward model (`config.ppo.reward_model`, an export of scripts/train_reward_model.py): its
  head on the response's last token, inside the jitted step; the value model starts from it,
  as TRL's does. It must have been trained with this run's tokenizer (its digest is checked).
- a true reward (`config.ppo.true_reward`, a name in `dpo_jax.evaluation.REWARD_FUNCTIONS`):
  PPO-GT. The function is Python on text, so the step calls it on the host through
  `jax.pure_callback` (the prompts' text is looked up by index); the value model starts from
  the SFT model with a zero head.

One process only for now: the host-side score and the prompt order are per-process (a run on
several processes is refused with one line).
"""

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import evaluation, ppo_step, sampling, sharding
from dpo_jax import reference as reference_lib
from dpo_jax import step as step_lib
from dpo_jax.data import records as records_lib
from dpo_jax.run import build, checkpoint, ref_cache, reward_model, run_config, train
from dpo_jax.run import stage as stage_lib


def prompt_texts(source: Any, tokenizer: Any) -> list[str]:
    """The prompt of every record of `source` (a path or a list of dicts): a prompt-only
    record's "prompt", or the prompt of a preference record of any of the three shapes."""
    texts = []
    for raw in records_lib.load_records(source):
        if "chosen" not in raw.record and isinstance(raw.record.get("prompt"), str):
            texts.append(raw.record["prompt"])
        else:
            texts.append(records_lib.normalize_record(raw, tokenizer).prompt)
    return texts


class PromptBatches:
    """Rollout prompts, left-padded to one length, in a seeded order reshuffled every epoch.

    Its state is the number of prompts read (JSON), checkpointed with the run like the data
    pipeline's, so a resumed run reads the prompts the uninterrupted one read.
    """

    def __init__(self, prompt_ids: list[list[int]], batch_size: int, *, seed: int, pad_id: int):
        tokens, positions, valid = sampling.pad_prompts(prompt_ids, pad_id)
        self._rows = {
            "tokens": tokens,
            "positions": positions,
            "segment_ids": valid.astype(np.int32),
        }
        self._batch_size = batch_size
        self._seed = seed
        self._position = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._rows["tokens"]))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        num_prompts = len(self._rows["tokens"])
        reads = range(self._position, self._position + self._batch_size)
        index = np.array([self._order(k // num_prompts)[k % num_prompts] for k in reads], np.int32)
        self._position += self._batch_size
        return {**{key: rows[index] for key, rows in self._rows.items()}, "prompt_index": index}

    def get_state(self) -> dict[str, int]:
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._position = int(state["position"])


def encode_prompts(texts: list[str], tokenizer, max_prompt_length: int) -> tuple[list, list, int]:
    """(kept texts, their token ids, number skipped): prompts longer than max_prompt_length
    tokens (0: no limit) are skipped and counted, never cut (a cut prompt asks another question).
    """
    kept_texts, kept_ids = [], []
    for text in texts:
        ids = sampling.encode_prompt(tokenizer, text)
        if max_prompt_length and len(ids) > max_prompt_length:
            continue
        kept_texts.append(text)
        kept_ids.append(ids)
    return kept_texts, kept_ids, len(texts) - len(kept_texts)


def true_reward_scores(name: str, prompts: list[str], tokenizer):
    """score_fn of a true reward: the Python function on the decoded responses, on the host.

    A non-finite reward stops the run with a line naming the reward, the prompt and the
    completion (`NonFiniteReward`, raised from the callback and re-raised by `train_ppo`).
    """
    reward = evaluation.reward_fn(name)
    problems: list[str] = []

    def on_host(prompt_index, response, lengths):
        scores = np.zeros(len(prompt_index), np.float32)
        for row, (index, length) in enumerate(zip(prompt_index, lengths, strict=True)):
            completion = tokenizer.decode(response[row, :length], skip_special_tokens=True)
            scores[row] = reward(prompts[index], completion)
            if not math.isfinite(scores[row]) and not problems:
                problems.append(
                    f"config.ppo.true_reward={name!r} returned {scores[row]} for prompt "
                    f"{prompts[index]!r}, completion {completion!r}: a reward must be finite"
                )
        if problems:
            raise NonFiniteReward(problems[0])
        return scores

    def score_fn(reference_params, rows, prompt_index, response, lengths):
        del reference_params, rows
        shape = jax.ShapeDtypeStruct(prompt_index.shape, jnp.float32)
        return jax.pure_callback(on_host, shape, prompt_index, response, lengths)

    return score_fn, problems


class NonFiniteReward(ValueError):
    """A true reward returned NaN or infinity."""


def load_reward_model(directory: str, model_config, tokenizer) -> dict:
    """The reward model's params, after checking it reads this run's tokens.

    Raises:
      ValueError: no export there, another vocabulary size, or another tokenizer's digest.
    """
    if not os.path.exists(os.path.join(directory, reward_model.HEAD_FILE)):
        raise ValueError(
            f"config.ppo.reward_model={directory!r}: no {reward_model.HEAD_FILE} there; give "
            "the export directory of scripts/train_reward_model.py (<workdir>/reward_model/export)"
        )
    rm_config, params = reward_model.load(directory)
    saved = reward_model.tokenizer_digest_of(directory)
    if rm_config.vocab_size != model_config.vocab_size or (
        saved is not None and saved != ref_cache.tokenizer_digest(tokenizer)
    ):
        raise ValueError(
            f"config.ppo.reward_model={directory!r} was trained with another tokenizer "
            f"(vocabulary {rm_config.vocab_size} vs the policy's {model_config.vocab_size}, "
            f"digest {str(saved)[:12]} vs {ref_cache.tokenizer_digest(tokenizer)[:12]}): it "
            "would score other tokens than the policy samples"
        )
    return params


def ppo_context(ctx: stage_lib.Context) -> stage_lib.Context:
    """The run's context with the shardings of {"policy", "value": {"backbone", "head"}}."""
    replicated = sharding.replicated(ctx.mesh)
    value = {"backbone": ctx.param_shardings, "head": {"kernel": replicated, "bias": replicated}}
    return dataclasses.replace(ctx, param_shardings={"policy": ctx.param_shardings, "value": value})


def ppo_settings(config: ml_collections.ConfigDict) -> ppo_step.PPOSettings:
    fields = ppo_step.PPOSettings._fields
    return ppo_step.PPOSettings(**{name: config.ppo[name] for name in fields})


def max_new_tokens(config: ml_collections.ConfigDict) -> int:
    """config.ppo.max_new_tokens, or the row's room after the longest prompt (0 = unset)."""
    return config.ppo.max_new_tokens or config.data.max_length - config.data.max_prompt_length


def make_ppo_stage(config, model_config, tokenizer, prompt_ids, score_fn, ref_params):
    """The PPO stage: `ppo_update_fn` on `PromptBatches`, a FrozenReference of π_ref and the
    reward model (or the value model's start)."""
    settings = ppo_settings(config)
    updates = settings.epochs * settings.num_minibatches  # optimizer updates per iteration
    tx, schedule = build.stage_optimizer(
        config, config.ppo.learning_rate, config.ppo.warmup_steps, config.ppo.num_steps * updates
    )
    sample_fn = sampling.make_sample_fn(
        model_config,
        max_new_tokens=max_new_tokens(config),
        options=sampling.SamplingOptions(temperature=1.0),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    update_fn = functools.partial(
        ppo_step.ppo_update_fn, settings=settings, sample_fn=sample_fn, score_fn=score_fn
    )
    batches = PromptBatches(
        prompt_ids, config.ppo.rollout_batch_size, seed=config.data.shuffle_seed,
        pad_id=tokenizer.pad_id,
    )  # fmt: skip
    return stage_lib.Stage(
        name="ppo",
        num_steps=config.ppo.num_steps,
        options=step_lib.LossOptions(),
        tx=tx,
        schedule=lambda step: schedule(step * updates),  # logged per iteration
        reference=reference_lib.FrozenReference(ref_params),
        train_batches=batches,
        eval_batches=[],
        update_fn=update_fn,
        running=ppo_step.initial_running(settings),
    )


def _score_source(config, model_config, tokenizer, prompts, policy_params, apply_fn):
    """(score_fn, the value model's start, the true reward's problem list or None)."""
    if config.ppo.reward_model:
        rm_params = load_reward_model(config.ppo.reward_model, model_config, tokenizer)

        def score_fn(reference_params, rows, prompt_index, response, lengths):
            del prompt_index, response, lengths
            return ppo_step.reward_model_scores(apply_fn, reference_params["value"], rows)

        return score_fn, rm_params, None
    score_fn, problems = true_reward_scores(config.ppo.true_reward, prompts, tokenizer)
    head = reward_model.init_head(model_config.hidden_size)
    return score_fn, {"backbone": policy_params, "head": head}, problems


def check_reward_source(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError without a reward source, with an unknown true reward, or on a setup PPO
    does not support yet (several processes, a sequence mesh axis)."""
    if not config.ppo.reward_model and not config.ppo.true_reward:
        raise ValueError(
            "PPO has no reward source: set config.ppo.reward_model to a reward model export "
            "(scripts/train_reward_model.py) or config.ppo.true_reward to one of "
            f"{sorted(evaluation.REWARD_FUNCTIONS)}"
        )
    if config.ppo.true_reward and config.ppo.true_reward not in evaluation.REWARD_FUNCTIONS:
        raise ValueError(
            f"config.ppo.true_reward={config.ppo.true_reward!r} is not a known reward; known: "
            f"{sorted(evaluation.REWARD_FUNCTIONS)}"
        )
    if jax.process_count() > 1:
        raise ValueError(
            f"PPO runs on one process for now ({jax.process_count()} started): the true reward "
            "is scored on the host and the prompt order is per process"
        )
    if config.mesh.sequence != 1:
        raise ValueError(
            f"config.mesh.sequence={config.mesh.sequence}: PPO does not split rows over a "
            "sequence axis (its prompt and rollout rows are not padded to its multiples); set 1"
        )


def train_ppo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """SFT (config.sft.num_steps), then PPO (config.ppo) from the SFT model; exports the policy.

    Writes the stages under `workdir` (sft/, ppo/ with checkpoints and metrics) and the policy
    as a Hugging Face directory to `workdir/ppo/export`.

    Returns:
      {"train_first", "train_last": the first and last logged PPO metrics of this run,
      "num_prompts", "skipped_prompts", "export": the export directory}.

    Raises:
      ValueError: a bad setting or reward source, raised before any model is built (but the
        reward model's tokenizer, checked when it is read).
      NonFiniteReward: the true reward returned NaN or infinity.
    """
    train.check_config(config)
    check_reward_source(config)
    run_config.check_workdir(config, workdir)
    mesh = train.make_mesh(config)
    sharding.check_batch_size(
        config.ppo.rollout_batch_size, mesh, what="config.ppo.rollout_batch_size"
    )
    tokenizer, model_config, loaded = train.load_model(config, workdir)
    ctx = train.make_context(config, mesh, model_config, workdir)
    sources, counts = train.data_sources(config), {}
    prompts, prompt_ids, skipped = encode_prompts(
        prompt_texts(sources[0], tokenizer), tokenizer, config.data.max_prompt_length
    )
    print(
        f"[ppo] {len(prompts)} prompts; {skipped} longer than config.data.max_prompt_length="
        f"{config.data.max_prompt_length} skipped"
    )
    params = train.initial_params(model_config, loaded, ctx, config.seed)
    if config.sft.num_steps:
        sft_stage = build.make_sft_stage(config, tokenizer, ctx, sources, counts)
        params = stage_lib.run_stage(sft_stage, params, ctx)[0].params
    score_fn, value_start, problems = _score_source(
        config, model_config, tokenizer, prompts, params, ctx.apply_fn
    )
    ppo_ctx = ppo_context(ctx)
    # Placed as the step reads them (a no-op for what is already there: the SFT policy).
    start = jax.device_put({"policy": params, "value": value_start}, ppo_ctx.param_shardings)
    stage = make_ppo_stage(config, model_config, tokenizer, prompt_ids, score_fn, start)
    try:
        state, history = stage_lib.run_stage(stage, start, ppo_ctx)
    except Exception:
        if problems:  # the host callback's error reaches here wrapped by XLA: say it plainly
            raise NonFiniteReward(problems[0]) from None
        raise
    directory = os.path.join(workdir, "ppo", "export")
    checkpoint.export_hf(directory, model_config, state.params["policy"])
    return {
        "train_first": history[0] if history else {},
        "train_last": history[-1] if history else {},
        "num_prompts": len(prompts),
        "skipped_prompts": skipped,
        "export": directory,
    }
