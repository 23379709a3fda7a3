"""Running one training stage: state placement and init, the compiled step, the loop, eval, logs.

The loop dispatches step t, then fetches the metrics of step t − 1 (only at log steps), so the
host never waits on the device except at a log step, and then only for work already queued.
"""

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import reference as reference_lib
from dpo_jax import sharding
from dpo_jax import step as step_lib
from dpo_jax.run import checkpoint, errors, preemption
from dpo_jax.run.guards import StepGuard
from dpo_jax.run.metrics_log import MetricsWriter, ProgressBar


@dataclasses.dataclass
class Stage:
    """One training stage (SFT or DPO): what update_fn needs besides the state and batches.

    Attributes:
      name: "sft" or "dpo"; also the stage's directory under the workdir.
      num_steps: optimizer steps.
      options: the step's static loss options.
      tx, schedule: the optimizer and its learning-rate schedule.
      reference: the stage's reference, one value of `dpo_jax.reference` (frozen, precomputed,
        moving, none or adapters_off); train and eval read it the same way.
      train_batches: iterator of host batches with get_state/set_state.
      eval_batches: list of host batches (possibly empty).
      update_fn, eval_fn: the stage's pure steps, with `dpo_jax.step.update_fn`'s and
        `eval_fn`'s signatures (the reward model's stage brings its own:
        `dpo_jax.run.reward_model`).
      running: `TrainState.running` at step 0, as floats (bco_pair's δ₀ and count, PPO's
        adaptive β), or None.
    """

    name: str
    num_steps: int
    options: step_lib.LossOptions
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    reference: reference_lib.Reference
    train_batches: Any
    eval_batches: list
    update_fn: Any = step_lib.update_fn
    eval_fn: Any = step_lib.eval_fn
    eval_step: Any = None  # the compiled eval_fn, made on first use and kept
    running: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage shares: placement, the model, and where and how often to write."""

    mesh: Any
    apply_fn: Any
    param_shardings: Any
    workdir: str
    seed: int
    checkpoint_every: int
    checkpoint_keep: int
    log_every: int
    eval_every: int
    num_eval_batches: int
    progress_bar: bool
    tensorboard: bool
    final_logit_softcapping: float | None = None  # the model's logit cap, applied to log-probs
    on_nonfinite: str = "stop"  # a non-finite step: "stop" or "skip" (see dpo_jax.run.guards)
    max_skipped_steps: int = 10  # with "skip": stop after this many in a row
    collapse_patience: int = 3  # warn after this many collapsed-looking log steps in a row
    step0_tolerance: float | None = None  # the step-0 check's relative tolerance; None: off
    checkpoint_async: bool = True  # a save overlaps the next steps (False: it finishes first)
    wandb: Any = None  # the run's `wandb_log.WandbLog` (None: no W&B), fed by the metrics writer


def init_state_fn(params: Any, *, tx: optax.GradientTransformation, stage: Stage):
    """The step-0 TrainState of a stage that starts from `params` (a pure function to jit)."""
    trainable = reference_lib.trainable_init(stage.reference, params)  # LoRA: fresh adapters
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        opt_state=tx.init(trainable),
        # A moving reference starts as the initial policy, in buffers of its own (at most one
        # jit output can take over a donated input's buffers).
        reference_params=reference_lib.initial_state(stage.reference, params),
        running=jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), stage.running),
    )


def state_shardings(abstract_state: step_lib.TrainState, stage: Stage, ctx: Context):
    """The NamedSharding of every leaf of the state: params by rule, optimizer state like them."""
    replicated = sharding.replicated(ctx.mesh)
    trainable = trainable_shardings(stage, ctx)
    opt_shardings = _like_params(
        abstract_state.opt_state, abstract_state.params, trainable, replicated
    )
    return step_lib.TrainState(
        step=replicated,
        params=trainable,
        opt_state=opt_shardings,
        reference_params=reference_lib.state_shardings(stage.reference, ctx.param_shardings),
        running=jax.tree.map(lambda _: replicated, stage.running),
    )


def _like_params(abstract_opt_state, abstract_params, param_shardings, replicated) -> Any:
    """The optimizer state's shardings: a leaf whose path ends with a param's path (a moment:
    `.../mu/layers/attn/q_kernel`) and has its shape is sharded like that param; every other
    leaf (counts, scalars) is replicated.

    By path rather than `optax.tree_map_params`, which traces `init` on one placeholder in
    place of the params and so cannot run an `optax.partition` whose labels read the params'
    paths (`optim.only_trainable`).
    """
    params = {
        _dict_keys(path): (leaf.shape, where)
        for (path, leaf), where in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params),
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            shape, where = params.get(keys[start:], (None, None))
            if shape == leaf.shape:
                return where
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _dict_keys(path: tuple) -> tuple[str, ...]:
    """The trailing run of dict keys of a pytree path (a param's path inside a state)."""
    keys: list[str] = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(str(key.key))
    return tuple(reversed(keys))


def trainable_shardings(stage: Stage, ctx: Context) -> Any:
    """The shardings of the state's params: the model's, or LoRA's adapters (replicated)."""
    replicated = sharding.replicated(ctx.mesh)
    return reference_lib.trainable_shardings(stage.reference, ctx.param_shardings, replicated)


def _placed_init(stage: Stage, initial_params: Any, ctx: Context):
    """(init function, its output as ShapeDtypeStructs carrying shardings, the shardings)."""
    init = functools.partial(init_state_fn, tx=stage.tx, stage=stage)
    abstract = jax.eval_shape(init, initial_params)
    shardings = state_shardings(abstract, stage, ctx)
    placed = jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        abstract,
        shardings,
    )
    return init, placed, shardings


def init_state(stage: Stage, initial_params: Any, ctx: Context) -> step_lib.TrainState:
    """A fresh state at step 0, compiled with `out_shardings` from `jax.eval_shape`, so every
    array is created in place on its devices (never built on the host and then moved).

    `initial_params` are donated to the state (the policy takes over their buffers, so one copy
    exists, not two) unless the stage's reference holds them (a frozen reference).
    """
    init, _, shardings = _placed_init(stage, initial_params, ctx)
    donate = () if reference_lib.holds_params(stage.reference) else (0,)
    return jax.jit(
        init,
        in_shardings=(ctx.param_shardings,),
        out_shardings=shardings,
        donate_argnums=donate,
    )(initial_params)


def _release(stage: Stage, initial_params: Any) -> None:
    """Frees `initial_params` on resume, unless the reference holds them: the restored state
    has its own params, and nothing else reads these (as `init_state` would have donated them)."""
    if not reference_lib.holds_params(stage.reference):
        for leaf in jax.tree.leaves(initial_params):
            leaf.delete()


def restore_or_init(manager, stage: Stage, initial_params: Any, ctx: Context):
    """(state, rng, data_state): the stage's latest checkpoint, or a fresh state at step 0
    with the key of `ctx.seed` and no data state."""
    _, placed, _ = _placed_init(stage, initial_params, ctx)
    restored = checkpoint.restore_latest(manager, placed)
    if restored is not None:
        _release(stage, initial_params)
        return restored
    return init_state(stage, initial_params, ctx), jax.random.key(ctx.seed), None


def compile_update(stage: Stage, ctx: Context, state_sharding: Any, sample_batch: dict):
    """The jitted `stage.update_fn`: the one `jax.jit` of the training step.

    The state is donated (its buffers are reused for the new state); the reference, the batch
    and the key are not.
    """
    update = functools.partial(
        stage.update_fn,
        apply_fn=ctx.apply_fn,
        tx=stage.tx,
        schedule=stage.schedule,
        options=stage.options,
        mesh=ctx.mesh,
    )
    replicated = sharding.replicated(ctx.mesh)
    return jax.jit(
        update,
        in_shardings=(
            state_sharding,
            reference_lib.shardings(stage.reference, ctx.param_shardings),
            sharding.batch_shardings(sample_batch, ctx.mesh),
            replicated,
        ),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def compile_eval(stage: Stage, ctx: Context, sample_batch: dict):
    """The jitted `stage.eval_fn` (metrics only, nothing donated)."""
    evaluate = functools.partial(stage.eval_fn, apply_fn=ctx.apply_fn, options=stage.options)
    return jax.jit(
        evaluate,
        in_shardings=(
            trainable_shardings(stage, ctx),
            reference_lib.shardings(stage.reference, ctx.param_shardings),
            reference_lib.state_shardings(stage.reference, ctx.param_shardings),
            sharding.batch_shardings(sample_batch, ctx.mesh),
        ),
        out_shardings=sharding.replicated(ctx.mesh),
    )


def evaluate(stage: Stage, params: Any, reference_params: Any, ctx: Context) -> dict[str, float]:
    """Metrics over the stage's eval batches, each batch weighted by its number of pairs.

    Args:
      stage: the stage (its reference and eval batches).
      params: the state's params to evaluate (the policy's, or LoRA's adapters).
      reference_params: `TrainState.reference_params` (the moving reference's current params),
        or, before training, `dpo_jax.reference.initial_state(stage.reference, params)`.
      ctx: the shared context.

    Returns:
      Pair-weighted means of the eval metrics; an empty dict when the stage has no eval batches.
    """
    batches = stage.eval_batches
    if ctx.num_eval_batches:
        batches = batches[: ctx.num_eval_batches]
    if not batches:
        return {}
    if stage.eval_step is None:
        stage.eval_step = compile_eval(stage, ctx, batches[0])
    with jax.set_mesh(ctx.mesh):  # as in training (see run_stage)
        results = [
            stage.eval_step(
                params, stage.reference, reference_params, sharding.put_batch(batch, ctx.mesh)
            )
            for batch in batches
        ]
    results = jax.device_get(results)
    weights = np.array([r["num_pairs"] for r in results], np.float64)
    total = max(weights.sum(), 1.0)
    metrics = {
        name: float(sum(w * r[name] for w, r in zip(weights, results, strict=True)) / total)
        for name in results[0]
        if name not in ("num_pairs", "num_tokens") and not name.startswith("bco/")
    }
    metrics["num_pairs"] = int(total)
    return metrics


def run_stage(stage: Stage, initial_params: Any, ctx: Context):
    """Trains a stage to `stage.num_steps`, resuming from its checkpoints.

    `initial_params` are consumed (donated to the state, or freed on resume) unless the stage's
    reference holds them; do not use them after this call.

    Returns:
      (final state, train history): the history lists the fetched train metrics of this run
      (dicts of floats, with "step"), empty when the stage was already complete.

    Raises:
      errors.Preempted: SIGTERM or SIGINT arrived; a checkpoint of the last finished step was
        written first.
      errors.Diverged: a non-finite step (see `dpo_jax.run.guards`); nothing non-finite was written.
    """
    directory = os.path.join(ctx.workdir, stage.name)
    manager = checkpoint.make_manager(
        os.path.join(directory, "checkpoints"),
        keep=ctx.checkpoint_keep,
        every_steps=ctx.checkpoint_every,
        async_save=ctx.checkpoint_async,
    )
    if isinstance(stage.reference, reference_lib.AdaptersOffReference):
        has_checkpoints = manager.latest_step() is not None
        checkpoint.check_lora_base(directory, stage.reference.base_fingerprint, has_checkpoints)
    state, rng, data_state = restore_or_init(manager, stage, initial_params, ctx)
    start = int(jax.device_get(state.step))
    if data_state is not None:
        stage.train_batches.set_state(data_state)
    is_main = jax.process_index() == 0
    # Records after `start` are from steps this run replays (a crash after the last checkpoint).
    writer = MetricsWriter(
        directory,
        tensorboard=ctx.tensorboard,
        enabled=is_main,
        resume_step=start,
        wandb_log=ctx.wandb,
        stage=stage.name,
    )
    bar = ProgressBar(
        total=stage.num_steps,
        initial=start,
        description=stage.name,
        enabled=ctx.progress_bar and is_main,
    )
    # The step-0 check needs a reference that is the starting policy, and a fresh stage.
    checks_step0 = start == 0 and reference_lib.kind_name(stage.reference) != "none"
    guard = StepGuard(
        stage.name,
        ctx.on_nonfinite,
        ctx.max_skipped_steps,
        ctx.collapse_patience,
        step0_tolerance=ctx.step0_tolerance if checks_step0 else None,
    )
    loop = _Loop(stage, ctx, manager, writer, bar, guard)
    try:
        # The mesh in context lets the chunked log-prob head and splash attention run per shard
        # (shard_map over the batch axes) instead of leaving their partitioning to XLA.
        with preemption.catch_stop_signals() as stop, jax.set_mesh(ctx.mesh):
            state, history = loop.run(state, rng, start, stop)
    finally:
        bar.close()
        try:
            writer.close()
        finally:  # the save in flight is waited for even when the disk refuses the metrics
            checkpoint.wait_until_finished(manager)
    return state, history


@dataclasses.dataclass
class _Loop:
    """The training loop of one stage and where it writes."""

    stage: Stage
    ctx: Context
    manager: Any
    writer: MetricsWriter
    bar: ProgressBar
    guard: StepGuard

    def run(self, state, rng, start: int, stop: preemption.StopRequest):
        stage, ctx = self.stage, self.ctx
        update, history = None, []
        pending = None  # (step, device metrics, tokens per second) of the last log step
        tokens, last_time = 0, time.perf_counter()
        _, num_row_groups = sharding.row_group(ctx.mesh)
        for step in range(start, stage.num_steps):
            data_position = stage.train_batches.get_state()
            host_batch = next(stage.train_batches)
            batch = sharding.put_batch(host_batch, ctx.mesh)
            if update is None:
                update = compile_update(stage, ctx, state_shardings_of(state), host_batch)
                # Compiled ahead of the first call (which then finds it in jit's cache), so the
                # compiler's freed heap goes back to the OS before the step allocates: 0.4 GB of
                # the 2.5 GB peak of Gemma 3 270M's QLoRA run (docs/lora.md).
                update.lower(state, stage.reference, batch, rng).compile()
                checkpoint.release_host_memory()
            state, metrics = update(state, stage.reference, batch, rng)
            done = step + 1
            self.guard.after_dispatch(done, metrics, data_position)
            # host_batch is this process's row block; every block is an equal share of the batch.
            tokens += num_row_groups * int(np.count_nonzero(host_batch["segment_ids"]))
            if pending is not None:  # one step behind: step - 1's metrics are ready or nearly
                history.append(self._log(pending))
                pending = None
            if done % ctx.log_every == 0 or done == stage.num_steps:
                now = time.perf_counter()
                pending = (done, metrics, tokens / max(now - last_time, 1e-9))
                tokens, last_time = 0, now
            self.bar.update()
            if ctx.eval_every and done % ctx.eval_every == 0 and stage.eval_batches:
                metrics_eval = evaluate(stage, state.params, state.reference_params, ctx)
                self.writer.write(done, metrics_eval, split="eval")
            if self._should_stop(done, stop):
                signal_name = stop.signal_name or "a stop signal (on another process)"
                self._preempted(done, state, rng, pending, history, signal_name)
            self._save(done, state, rng, force=done == stage.num_steps)
        self.guard.check_pending()
        if pending is not None:
            history.append(self._log(pending))
        return state, history

    def _should_stop(self, done: int, stop: preemption.StopRequest) -> bool:
        """Whether to stop after step `done`. With several processes, the flags are all-reduced
        at log steps only (one small collective each), so every process stops at the same step;
        set config.log.every_steps so that a log interval fits the scheduler's grace period."""
        if jax.process_count() == 1:
            return stop.requested
        if done % self.ctx.log_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested))))

    def _save(self, done: int, state, rng, *, force: bool) -> None:
        data_state = self.stage.train_batches.get_state()
        if checkpoint.save(self.manager, done, state, rng, data_state, force=force):
            checkpoint.release_host_memory()  # the (finished, when synchronous) save's buffers

    def _preempted(self, done, state, rng, pending, history, signal_name) -> None:
        """Saves the finished step and stops the run (`errors.Preempted`)."""
        self.guard.check_pending()  # never save a step that is to be reported as diverged
        if pending is not None:
            history.append(self._log(pending))
        self._save(done, state, rng, force=True)
        checkpoint.wait_until_finished(self.manager)
        where = os.path.join(self.ctx.workdir, self.stage.name, "checkpoints", str(done))
        raise errors.Preempted(
            f"[{self.stage.name}] {signal_name} received: saved step {done} to {where}; "
            "rerun the same command to resume"
        )

    def _log(self, pending) -> dict[str, float]:
        step, device_metrics, tokens_per_second = pending
        metrics = {name: float(value) for name, value in jax.device_get(device_metrics).items()}
        metrics["tokens_per_second"] = tokens_per_second
        self.writer.write(step, metrics, split="train")
        self.bar.show(metrics)
        self.guard.after_log(step, metrics)
        return {"step": step, **metrics}


def state_shardings_of(state: step_lib.TrainState):
    """The shardings a live state's arrays already have (to compile against them)."""
    return jax.tree.map(lambda leaf: leaf.sharding, state)
