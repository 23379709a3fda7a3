"""The pure training and evaluation steps: TrainState, update_fn, eval_fn, ref_logps_fn.

The reference model is one value of `dpo_jax.reference` (frozen, precomputed, moving, none or
adapters_off, LoRA's base); the steps read it only through that module's functions, never by
checking what is None.

Everything here is a module-level function of arrays and static options; `dpo_jax.run.train` binds
the static parts with `functools.partial` and calls `jax.jit` once per function.

Gradient accumulation is a `jax.lax.scan` over micro-batches inside `update_fn`, not
`optax.MultiSteps`: one call is one optimizer update on one global batch, so the step counter,
the schedule, the data iterator, checkpoints and logged metrics all count optimizer steps, and no
gradient-sized accumulator lives in the optimizer state (the scan's carry is freed after the
step). The loss of the batch is the pair-weighted mean of the micro-batch losses: exactly the
full-batch loss for the per-pair losses (sigmoid, ipo, hinge, ...), an approximation for the
losses that couple pairs across the batch (aot sorts within each micro-batch; sft with lengths
divides by each micro-batch's token count; bco_pair updates its running mean per micro-batch).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import reference as reference_lib
from dpo_jax import sharding
from dpo_jax.logprobs import LogProbs, logprob_fn, next_token_targets
from dpo_jax.losses import (
    LOSS_VARIANTS,
    dpo_loss_fn,
    ld_sequence_logps,
    sequence_log_unlikelihoods,
    wpo_log_weights,
)

# Batch keys that have the batch axis first and travel to the model (ref_logps is optional).
BATCH_KEYS = ("tokens", "response_mask", "positions", "segment_ids", "pair_mask")
# Losses that never read π_ref (`Variant.reads_reference`): sft, simpo, cpo, orpo.
REFERENCE_FREE_LOSSES = tuple(name for name, v in LOSS_VARIANTS.items() if not v.reads_reference)


@flax.struct.dataclass
class TrainState:
    """Everything the step changes, donated to it each step.

    Attributes:
      step: [] int32, optimizer updates done.
      params: what the step trains (a nested dict of arrays): the policy's params, or LoRA's
        adapters (`dpo_jax.reference.policy_params` gives the model's params from them).
      opt_state: optax state of `params` only.
      reference_params: the reference's part of the state, `dpo_jax.reference.initial_state`:
        the moving reference's params with TR-DPO (checkpointed with the state), else None (a
        frozen reference is the step's `reference` argument, never part of the state).
      running: the [] float32 scalars the objective carries from step to step, replicated (a
        dict, or None when it carries none): bco_pair's {"bco_running_mean": δ₀,
        "bco_running_count": the batches δ₀ has seen} (`initial_running`), PPO's adaptive
        {"kl_coef": β} (`dpo_jax.ppo_step`). Its step-0 value is the stage's `running`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    reference_params: Any = None
    running: dict[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Static hyper-parameters of the step (hashable, so they can be bound before `jax.jit`).

    Attributes:
      loss_type: names in `dpo_jax.losses.LOSS_VARIANTS` ("sft" alone for the SFT stage).
      loss_weights: one weight per name, or None (all 1).
      beta: β.
      label_smoothing: ε.
      logits_chunk_size: rows per chunk of the chunked log-prob path; None: full logits.
      num_microbatches: micro-batches per step (gradient accumulation), >= 1.
      final_logit_softcapping: the model's cap·tanh(logits / cap) on logits, or None.
      f_divergence_type: passed to `dpo_loss_fn` (see it for the values), as are
        f_alpha_divergence_coef, sigmoid_label_smoothing, bco_reward_shift, ipo_form,
        simpo_gamma, desirable_weight, undesirable_weight and unlikelihood_alpha; kto reads
        `batch["kto_labels"]` [B, S] too.
      ld_alpha: LD-DPO's α in [0, 1] (`losses.ld_sequence_logps`, for the policy and the
        reference alike), or None for plain sums.
      use_weighting: WPO (arXiv:2406.11827): each pair's loss times exp(w_w + w_l), w the mean
        over a response's tokens of log p − log Σ_v p(v)² under the policy, without gradient.
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    logits_chunk_size: int | None = None
    num_microbatches: int = 1
    final_logit_softcapping: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    sigmoid_label_smoothing: str = "cdpo"
    bco_reward_shift: str = "running_mean"
    ipo_form: str = "per_token"
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    unlikelihood_alpha: float = 1.0
    ld_alpha: float | None = None
    use_weighting: bool = False

    @property
    def uses_bco(self) -> bool:
        return "bco_pair" in self.loss_type and self.bco_reward_shift == "running_mean"

    @property
    def needs_lengths(self) -> bool:
        # Token counts go to every variant that can read them. ipo is among them always, so its
        # form never depends on which other losses are listed (with "sft" it would otherwise
        # switch form silently); in training it is TRL's ipo, on log-probs averaged per token.
        return any(
            name in ("simpo", "sigmoid_norm", "sft", "ipo", "orpo") for name in self.loss_type
        )

    @property
    def per_pair_inputs(self) -> tuple[str, ...]:
        """The optional per-pair arrays of `dpo_loss_fn` the listed losses read, by name."""
        lengths = ("chosen_lengths", "rejected_lengths") if self.needs_lengths else ()
        declared = (n for name in self.loss_type for n in LOSS_VARIANTS[name].per_pair_inputs)
        return tuple(dict.fromkeys((*lengths, *declared)))


def batch_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    """[] int32: the non-padding tokens of a batch, chosen and rejected rows both counted."""
    return jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32)


def _flat(values: jax.Array, side: int) -> jax.Array:
    """[B, 2, S] -> [B·S], the chosen (side 0) or rejected (side 1) slot of each pair."""
    return values[:, side, :].reshape(-1)


def _scored(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, 2, T] bool: the scored response tokens, at their own positions."""
    batch_size, _, length = batch["tokens"].shape
    rows = [batch[k].reshape(2 * batch_size, length) for k in ("tokens", "response_mask")]
    segment_ids = batch["segment_ids"].reshape(2 * batch_size, length)  # [2B, T]
    _, target_mask = next_token_targets(*rows, segment_ids)
    # The prediction at t - 1 scores token t.
    return jnp.pad(target_mask[:, :-1], ((0, 0), (1, 0))).reshape(batch_size, 2, length)


def sequence_logps(logprobs: LogProbs, batch: dict[str, jax.Array], ld_alpha) -> jax.Array:
    """[B, 2, S] sequence log-probs: the plain sums, or LD-DPO's when ld_alpha is set."""
    if ld_alpha is None:
        return logprobs.logps
    num_segments = logprobs.logps.shape[-1]
    return ld_sequence_logps(
        logprobs.token_logps, _scored(batch), batch["segment_ids"], num_segments, ld_alpha
    )


def _wpo_weights(policy: LogProbs, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """WPO's per-pair log weights of the chosen and the rejected side, each [B·S]."""
    weights = wpo_log_weights(
        policy.token_logps,
        policy.token_log_sum_sq,
        _scored(batch),
        batch["segment_ids"],
        policy.logps.shape[-1],
    )  # [B, 2, S]
    return _flat(weights, 0), _flat(weights, 1)


def _side_lengths(side: int) -> Callable:
    return lambda policy, batch: _flat(policy.lengths, side).astype(jnp.float32)


def _rejected_unlikelihoods(policy: LogProbs, batch: dict[str, jax.Array]) -> jax.Array:
    """[B·S] Σ_t log(1 − π(y_l,t)) over each rejected response's scored tokens."""
    sums = sequence_log_unlikelihoods(
        policy.token_logps, _scored(batch), batch["segment_ids"], policy.logps.shape[-1]
    )  # [B, 2, S]
    return _flat(sums, 1)


# Each optional per-pair argument of dpo_loss_fn, from the policy's LogProbs and the batch.
PER_PAIR_INPUTS: dict[str, Callable[[LogProbs, dict], jax.Array]] = {
    "chosen_lengths": _side_lengths(0),
    "rejected_lengths": _side_lengths(1),
    "rejected_unlikelihoods": _rejected_unlikelihoods,
}


def _forward_logps(apply_fn: Callable, options: LossOptions, batch: dict[str, jax.Array]):
    """params -> [B, 2, S] summed log-probs of `batch` (the reference's forward)."""
    return lambda params: sequence_logps(
        logprob_fn(
            apply_fn,
            params,
            batch,
            logits_chunk_size=options.logits_chunk_size,
            final_logit_softcapping=options.final_logit_softcapping,
        ),
        batch,
        options.ld_alpha,
    )


def initial_running(options: LossOptions) -> dict[str, float] | None:
    """`TrainState.running` at step 0 for a stage of these loss options: bco_pair's δ₀ and its
    count at 0, or None (no other objective of the step carries anything)."""
    if options.uses_bco:
        return {"bco_running_mean": 0.0, "bco_running_count": 0.0}
    return None


def loss_and_metrics(
    params: Any,
    reference: reference_lib.Reference,
    batch: dict[str, jax.Array],
    bco_state: tuple[jax.Array, jax.Array] | None,
    *,
    apply_fn: Callable,
    options: LossOptions,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The preference (or SFT) loss of a batch, and TRL's metrics.

    Args:
      params: the state's params (differentiated): the policy's, or LoRA's adapters.
      reference: a bound reference (`dpo_jax.reference.bind`): frozen, precomputed, none or
        adapters_off (whose base the adapters are merged into).
      batch: tokens, response_mask, positions, segment_ids [B, 2, T]; pair_mask [B, S];
        optionally ref_logps [B, 2, S].
      bco_state: (running mean, running count) for bco_pair, else None.
      apply_fn: the model's pure forward.
      options: static loss options.
      dropout_rng: the key of LoRA's adapter dropout in training, or None (no dropout).

    Returns:
      (loss, metrics), metrics as `dpo_jax.losses.dpo_loss_fn` plus `logps/accuracies` (the
      fraction of pairs whose chosen log-prob beats the rejected one, reference-free).
    """
    policy = logprob_fn(
        apply_fn,
        reference_lib.forward_params(reference, params, dropout_rng),  # LoRA: base + adapters
        batch,
        logits_chunk_size=options.logits_chunk_size,
        final_logit_softcapping=options.final_logit_softcapping,
        with_log_sum_sq=options.use_weighting,
    )
    policy_logps = sequence_logps(policy, batch, options.ld_alpha)  # [B, 2, S]
    forward = _forward_logps(apply_fn, options, batch)
    ref_logps = reference_lib.reference_logps(reference, batch, forward)  # [B, 2, S]
    per_pair = {name: PER_PAIR_INPUTS[name](policy, batch) for name in options.per_pair_inputs}
    bco = {}
    if options.uses_bco:
        bco = dict(bco_running_mean=bco_state[0], bco_running_count=bco_state[1])
    if "kto" in options.loss_type:  # unpaired: a completion, a mismatched one, a label
        bco.update(
            kto_labels=batch["kto_labels"].reshape(-1),  # [B·S]
            desirable_weight=options.desirable_weight,
            undesirable_weight=options.undesirable_weight,
        )
    pair_mask = batch["pair_mask"].reshape(-1)  # [B·S]
    loss, metrics = dpo_loss_fn(
        _flat(policy_logps, 0),  # [B·S]
        _flat(policy_logps, 1),
        _flat(ref_logps, 0),
        _flat(ref_logps, 1),
        beta=options.beta,
        loss_type=options.loss_type,
        label_smoothing=options.label_smoothing,
        loss_weights=options.loss_weights,
        pair_mask=pair_mask,
        f_divergence_type=options.f_divergence_type,
        f_alpha_divergence_coef=options.f_alpha_divergence_coef,
        sigmoid_label_smoothing=options.sigmoid_label_smoothing,
        bco_reward_shift=options.bco_reward_shift,
        ipo_form=options.ipo_form,
        simpo_gamma=options.simpo_gamma,
        unlikelihood_alpha=options.unlikelihood_alpha,
        wpo_log_weights=_wpo_weights(policy, batch) if options.use_weighting else None,
        **per_pair,
        **bco,
    )
    prefers_chosen = _flat(policy.logps, 0) > _flat(policy.logps, 1)  # [B·S]
    num_pairs = jnp.maximum(jnp.sum(pair_mask), 1)
    metrics["logps/accuracies"] = jnp.sum(prefers_chosen & pair_mask) / num_pairs
    # 0 when chosen and rejected get identical log-probs on every pair: a collapsed policy.
    abs_margin = jnp.abs(_flat(policy.logps, 0) - _flat(policy.logps, 1))  # [B·S]
    metrics["logps/abs_margin"] = jnp.sum(jnp.where(pair_mask, abs_margin, 0.0)) / num_pairs
    # Mean |log π − log π_ref| per sequence: 0 at step 0, when the policy is its reference.
    ref_gap = jnp.abs(policy_logps - ref_logps).mean(axis=1).reshape(-1)  # [B·S]
    metrics["logps/ref_abs_diff"] = jnp.sum(jnp.where(pair_mask, ref_gap, 0.0)) / num_pairs
    metrics["num_pairs"] = jnp.sum(pair_mask, dtype=jnp.int32)
    return loss, metrics


def _grads_and_metrics(
    params, reference, batch, bco_state, rng, *, apply_fn, options, mesh
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the loss wrt the policy params, over `options.num_microbatches` slices
    (micro-batch k's dropout key is `fold_in(rng, k)`)."""
    grad_fn = jax.grad(loss_and_metrics, has_aux=True)
    kwargs = dict(apply_fn=apply_fn, options=options)
    if options.num_microbatches == 1:
        return grad_fn(params, reference, batch, bco_state, dropout_rng=rng, **kwargs)
    micro = _split_microbatches(batch, options.num_microbatches, mesh)
    total_pairs = jnp.maximum(jnp.sum(batch["pair_mask"]), 1)

    def body(carry, indexed):
        grad_sum, bco = carry
        index, micro_batch = indexed
        key = jax.random.fold_in(rng, index)
        grads, metrics = grad_fn(params, reference, micro_batch, bco, dropout_rng=key, **kwargs)
        weight = jnp.sum(micro_batch["pair_mask"]) / total_pairs  # pairs of this slice / all
        grad_sum = jax.tree.map(lambda g, acc: acc + weight * g, grads, grad_sum)
        if bco is not None:
            bco = (metrics["bco/running_mean"], metrics["bco/running_count"])
        # Means over pairs become pair-weighted; counts and the bco state are kept as they are.
        weighted = {
            k: v if k == "num_pairs" or k.startswith("bco/") else weight * v
            for k, v in metrics.items()
        }
        return (grad_sum, bco), weighted

    zeros = jax.tree.map(jnp.zeros_like, params)
    indices = jnp.arange(options.num_microbatches)
    (grads, _), per_micro = jax.lax.scan(body, (zeros, bco_state), (indices, micro))
    metrics = {
        k: v[-1] if k.startswith("bco/") else jnp.sum(v, axis=0) for k, v in per_micro.items()
    }
    return grads, metrics


def _split_microbatches(batch: dict[str, jax.Array], num: int, mesh: Mesh) -> dict[str, jax.Array]:
    """[B, ...] -> [num, B / num, ...], micro-batch k taking rows k, k + num, k + 2·num, ...

    Strided rows, not contiguous blocks: with B split over the batch shards, each device's rows
    stay on that device in every micro-batch (a contiguous block would live on a few devices).
    """

    def split(key, x):
        rows = x.shape[0] // num
        x = x.reshape(rows, num, *x.shape[1:])  # [B / num, num, ...]
        x = jnp.swapaxes(x, 0, 1)  # [num, B / num, ...]
        spec = sharding.batch_spec(mesh, x.ndim - 1, token_axis=key in sharding.TOKEN_KEYS)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *spec)))

    return {key: split(key, value) for key, value in batch.items()}


def update_fn(
    state: TrainState,
    reference: reference_lib.Reference,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    options: LossOptions,
    mesh: Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of the policy on one global batch.

    Args:
      state: the train state (donated by the caller).
      reference: the stage's reference (`dpo_jax.reference`); never donated. A moving one reads
        its params from `state.reference_params`.
      batch: see `loss_and_metrics`; arrays sharded over the batch axes.
      rng: the run's base key; this step's is `fold_in(rng, state.step)`, read by LoRA's adapter
        dropout only (the models are otherwise deterministic).
      apply_fn: static, bound with functools.partial before jit, as are tx, schedule, options
        and mesh.

    Returns:
      (new state, metrics): metrics of `loss_and_metrics` plus grad_norm, learning_rate,
      num_tokens and nonfinite (1 when the step's loss, gradient norm or new params were not
      finite: then nothing but `state.step` changed).
    """
    bound = reference_lib.bind(reference, state.reference_params)
    bco_state = None
    if options.uses_bco:
        bco_state = (state.running["bco_running_mean"], state.running["bco_running_count"])
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = _grads_and_metrics(
        state.params, bound, batch, bco_state, step_rng, apply_fn=apply_fn, options=options,
        mesh=mesh,
    )  # fmt: skip
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics["num_tokens"] = batch_tokens(batch)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        reference_params=reference_lib.advance(
            reference, state.reference_params, params, state.step + 1
        ),
    )
    if options.uses_bco:
        running = {"bco_running_mean": "bco/running_mean", "bco_running_count": "bco/running_count"}
        new_state = new_state.replace(running={k: metrics[m] for k, m in running.items()})
    finite = all_finite(metrics["loss"], metrics["grad_norm"], params)
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
    return applied_if(finite, new_state, state), metrics


def all_finite(loss: jax.Array, grad_norm: jax.Array, params: Any) -> jax.Array:
    """[] bool: the loss, the gradient norm and every new param are finite."""
    leaves_finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(leaves_finite))


def applied_if(finite: jax.Array, new_state: TrainState, state: TrainState) -> TrainState:
    """The new state where the step was finite; else the old one with only the step counted.

    A guard over the whole state (params, optimizer, bco mean, moving reference) at once: a
    non-finite step changes nothing but the step counter, so NaN never reaches the params, a
    checkpoint or an export. optax.apply_if_finite is not used: it checks the gradients only
    (not the loss or the new params) and guards the optimizer state alone.
    """
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return kept.replace(step=new_state.step)


def eval_fn(
    params: Any,
    reference: reference_lib.Reference,
    reference_params: Any,
    batch: dict[str, jax.Array],
    *,
    apply_fn: Callable,
    options: LossOptions,
) -> dict[str, jax.Array]:
    """Metrics of `loss_and_metrics` on one batch, without a gradient or an update.

    `reference_params` is what `TrainState.reference_params` holds (or would hold at step 0), so
    a moving reference is evaluated at its current params, as the step reads it. bco_pair is
    evaluated with its running mean at 0 (the eval carries no state).
    """
    start = initial_running(options)  # the step-0 running mean and count, as training starts
    bco_state = tuple(jnp.asarray(v, jnp.float32) for v in start.values()) if start else None
    _, metrics = loss_and_metrics(
        params,
        reference_lib.bind(reference, reference_params),
        batch,
        bco_state,
        apply_fn=apply_fn,
        options=options,
    )
    metrics["num_tokens"] = batch_tokens(batch)
    return metrics


def ref_logps_fn(
    ref_params: Any,
    batch: dict[str, jax.Array],
    *,
    apply_fn: Callable,
    logits_chunk_size,
    final_logit_softcapping: float | None = None,
    ld_alpha: float | None = None,
) -> jax.Array:
    """[B, 2, S] float32 reference log-probs of a batch (for the precomputed pass): summed, or
    LD-DPO's with ld_alpha."""
    logprobs = logprob_fn(
        apply_fn,
        ref_params,
        batch,
        logits_chunk_size=logits_chunk_size,
        final_logit_softcapping=final_logit_softcapping,
    )
    return sequence_logps(logprobs, batch, ld_alpha)
