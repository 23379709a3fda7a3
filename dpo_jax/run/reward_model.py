"""A Bradley-Terry reward model on the preference pairs: a scalar head on the decoder's last state.

r(x, y) = w·h_T + b, h_T the decoder's final (normed) hidden state at the last token of the
response y (its eos, where the tokenizer appends one), w [D] and b [] the head. Trained on the
pairs the DPO stage reads, through the same pipeline and batches ([B, 2, T], 0 = chosen), with
the loss −log σ(r_w − r_l) of `dpo_jax.losses.dpo_loss_fn` ("sigmoid", β = 1, no reference).

The stage is an ordinary `dpo_jax.run.stage.Stage` carrying this module's `update_fn` and `eval_fn`,
so `stage.run_stage` gives it the main job's jit over sharded batches, orbax checkpoints,
resume, guards and metrics. Params are {"backbone": the model's params, "head": {kernel, bias}};
`export` writes the backbone as a Hugging Face directory plus `reward_head.safetensors`.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from safetensors import safe_open
from safetensors.numpy import save_file

from dpo_jax import reference as reference_lib
from dpo_jax import sharding
from dpo_jax import step as step_lib
from dpo_jax.losses import dpo_loss_fn
from dpo_jax.models import ModelConfig, load_hf
from dpo_jax.run import build, checkpoint, ref_cache, run_config, train
from dpo_jax.run import stage as stage_lib

HEAD_FILE = "reward_head.safetensors"
TOKENIZER_KEY = "tokenizer_digest"  # in the head file's metadata
_BATCH_KEYS = ("tokens", "positions", "segment_ids")


def init_head(hidden_size: int) -> dict[str, jax.Array]:
    """A zero head: every reward is 0 before training, so the first loss is exactly ln 2."""
    return {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def last_response_index(
    response_mask: jax.Array, segment_ids: jax.Array, num_segments: int
) -> jax.Array:
    """[N, S] int32: the position of the last response token of segment s + 1 in each row.

    Args:
      response_mask: [N, T] bool, True on response tokens.
      segment_ids: [N, T] int32, 0 on padding, k >= 1 for the k-th packed pair of the row.
      num_segments: S.

    Returns:
      [N, S] positions; 0 for a slot with no response (its pair is masked out by pair_mask).
    """
    slots = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)[None, None, :]
    in_slot = (segment_ids[:, :, None] == slots) & response_mask[:, :, None]  # [N, T, S]
    positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :, None]  # [1, T, 1]
    last = jnp.max(jnp.where(in_slot, positions, -1), axis=1)  # [N, S]
    return jnp.maximum(last, 0)


def rewards_fn(apply_fn, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
    """[B, 2, S] float32 rewards of a batch's responses (slot s of pair axis 0 = chosen).

    Args:
      apply_fn: the backbone's forward, as `dpo_jax.logprobs.logprob_fn` takes it.
      params: {"backbone": ..., "head": {"kernel": [D], "bias": []}}.
      batch: tokens, response_mask, positions, segment_ids [B, 2, T]; pair_mask [B, S].
    """
    batch_size, _, length = batch["tokens"].shape
    num_segments = batch["pair_mask"].shape[1]
    rows = [batch[key].reshape(2 * batch_size, length) for key in _BATCH_KEYS]  # [2B, T]
    hidden, _ = apply_fn(params["backbone"], *rows)  # [2B, T, D]
    index = last_response_index(
        batch["response_mask"].reshape(2 * batch_size, length).astype(bool), rows[2], num_segments
    )  # [2B, S]
    last_hidden = jnp.take_along_axis(hidden, index[:, :, None], axis=1)  # [2B, S, D]
    head = params["head"]
    rewards = jnp.einsum("nsd,d->ns", last_hidden.astype(jnp.float32), head["kernel"])
    return (rewards + head["bias"]).reshape(batch_size, 2, num_segments)  # [B, 2, S]


def loss_and_metrics(params: dict, batch: dict[str, jax.Array], *, apply_fn):
    """−log σ(r_w − r_l), mean over valid pairs, and TRL's reward metrics (rewards/*)."""
    rewards = rewards_fn(apply_fn, params, batch)  # [B, 2, S]
    pair_mask = batch["pair_mask"].reshape(-1)  # [B·S]
    loss, metrics = dpo_loss_fn(
        rewards[:, 0].reshape(-1),
        rewards[:, 1].reshape(-1),
        beta=1.0,
        loss_type="sigmoid",
        pair_mask=pair_mask,
    )
    metrics = {k: v for k, v in metrics.items() if not k.startswith("logps/")}  # = rewards here
    metrics["num_pairs"] = jnp.sum(pair_mask, dtype=jnp.int32)
    return loss, metrics


def update_fn(state, reference, batch, rng, *, apply_fn, tx, schedule, options, mesh):
    """One optimizer update of the reward model; `dpo_jax.step.update_fn`'s signature.

    The reference, key, loss options and mesh are not read (the stage has no reference, and
    one micro-batch per step). A non-finite step changes nothing but the step counter.
    """
    del reference, rng, options, mesh
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    grads, metrics = grad_fn(state.params, batch, apply_fn=apply_fn)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics["num_tokens"] = step_lib.batch_tokens(batch)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    finite = step_lib.all_finite(metrics["loss"], metrics["grad_norm"], params)
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
    return step_lib.applied_if(finite, new_state, state), metrics


def eval_fn(params, reference, reference_params, batch, *, apply_fn, options):
    """Metrics of `loss_and_metrics` on one batch; `dpo_jax.step.eval_fn`'s signature."""
    del reference, reference_params, options
    _, metrics = loss_and_metrics(params, batch, apply_fn=apply_fn)
    metrics["num_tokens"] = step_lib.batch_tokens(batch)
    return metrics


def reward_context(ctx: stage_lib.Context) -> stage_lib.Context:
    """The run's context with the params' shardings of {"backbone", "head"} (head replicated)."""
    replicated = sharding.replicated(ctx.mesh)
    shardings = {
        "backbone": ctx.param_shardings,
        "head": {"kernel": replicated, "bias": replicated},
    }
    return dataclasses.replace(ctx, param_shardings=shardings)


def make_reward_stage(config, tokenizer, ctx, sources, counts: dict) -> stage_lib.Stage:
    """The reward model's stage from config.reward_model, on the DPO stage's pairs.

    Raises:
      ValueError: config.optimizer.grad_accum_steps != 1 (this step takes one micro-batch).
    """
    if config.optimizer.grad_accum_steps != 1:
        raise ValueError(
            f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}: the reward "
            "model's step takes the whole batch at once; set it to 1"
        )
    settings = config.reward_model
    tx, schedule = build.stage_optimizer(
        config, settings.learning_rate, settings.warmup_steps, settings.num_steps
    )
    return stage_lib.Stage(
        name="reward_model",
        num_steps=settings.num_steps,
        options=step_lib.LossOptions(),
        tx=tx,
        schedule=schedule,
        reference=reference_lib.NoReference(),
        # The DPO stage's own builders: the same pipeline, counts and checks, no second data path.
        train_batches=build._train_batches(config, tokenizer, sources[0], counts, "dpo", ctx.mesh),
        eval_batches=build._eval_batches(config, tokenizer, sources[1], counts, "dpo", ctx.mesh),
        update_fn=update_fn,
        eval_fn=eval_fn,
    )


def export(directory: str, model_config: ModelConfig, params: dict, tokenizer: Any) -> None:
    """The backbone as a Hugging Face directory (`checkpoint.export_hf`) and the head beside it
    in `reward_head.safetensors` (kernel [D], bias [], float32), whose metadata holds the
    tokenizer's digest (`ref_cache.tokenizer_digest`) so that PPO can refuse a reward model of
    another tokenizer. Every process calls it."""
    checkpoint.export_hf(directory, model_config, params["backbone"])
    head = {name: np.asarray(jax.device_get(value)) for name, value in params["head"].items()}
    if jax.process_index() == 0:
        metadata = {TOKENIZER_KEY: ref_cache.tokenizer_digest(tokenizer)}
        save_file(head, os.path.join(directory, HEAD_FILE), metadata=metadata)


def tokenizer_digest_of(directory: str) -> str | None:
    """The tokenizer digest an `export` wrote beside the head (None: an export without one)."""
    with safe_open(os.path.join(directory, HEAD_FILE), framework="numpy") as f:
        return (f.metadata() or {}).get(TOKENIZER_KEY)


def load(directory: str) -> tuple[ModelConfig, dict]:
    """(model config, params) of an `export`ed reward model.

    Raises:
      ValueError: the head file is missing a tensor or has one of the wrong shape.
    """
    model_config, backbone = load_hf(directory)
    path = os.path.join(directory, HEAD_FILE)
    expected = {"kernel": (model_config.hidden_size,), "bias": ()}
    head = {}
    with safe_open(path, framework="numpy") as f:
        for name, shape in expected.items():
            if name not in f.keys():
                raise ValueError(f"{path}: no tensor {name!r} (found: {sorted(f.keys())})")
            found = tuple(f.get_slice(name).get_shape())
            if found != shape:
                raise ValueError(f"{path}: {name} has shape {found}, expected {shape}")
            head[name] = jnp.asarray(f.get_tensor(name), jnp.float32)
    return model_config, {"backbone": backbone, "head": head}


def train_reward_model(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """SFT (config.sft.num_steps, as the main job), then the reward model on the same pairs.

    The backbone starts from the SFT model, as the DPO paper's reward model does. Writes the
    stages under `workdir` (sft/, reward_model/ with its checkpoints) and the export to
    `workdir/reward_model/export`.

    Returns:
      {"eval_before", "eval_after": held-out metrics (rewards/accuracies is the pair
      accuracy), "train_last": the last logged train metrics, "export": the export directory}.
    """
    train.check_config(config)
    run_config.check_workdir(config, workdir)
    mesh = train.make_mesh(config)
    tokenizer, model_config, loaded = train.load_model(config, workdir)
    ctx = train.make_context(config, mesh, model_config, workdir)
    sources, counts = train.data_sources(config), {}
    params = train.initial_params(model_config, loaded, ctx, config.seed)
    if config.sft.num_steps:
        sft_stage = build.make_sft_stage(config, tokenizer, ctx, sources, counts)
        params = stage_lib.run_stage(sft_stage, params, ctx)[0].params
    reward_ctx = reward_context(ctx)
    stage = make_reward_stage(config, tokenizer, reward_ctx, sources, counts)
    params = {"backbone": params, "head": init_head(model_config.hidden_size)}
    before = stage_lib.evaluate(stage, params, None, reward_ctx)
    state, history = stage_lib.run_stage(stage, params, reward_ctx)
    after = stage_lib.evaluate(stage, state.params, None, reward_ctx)
    directory = os.path.join(workdir, "reward_model", "export")
    export(directory, model_config, state.params, tokenizer)
    return {
        "eval_before": before,
        "eval_after": after,
        "train_last": history[-1] if history else {},
        "export": directory,
    }
