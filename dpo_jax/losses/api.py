"""dpo_loss_fn: the preference loss of a batch from summed log-probs, in TRL's argument order."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from . import checks
from .core import LOSS_VARIANTS, Hyper, Pairs, f_divergence_scores, masked_mean


def _build_pairs(inputs: dict, reference_free: bool, f_divergence_type: str, alpha) -> Pairs:
    """Flattens to [P], upcasts to float32 at least, neutralises padding slots, scores sides.

    Padding slots get log-prob 0 and length 1, so NaN or inf there cannot reach the loss or
    its gradient.
    """
    logps = [value for key, value in inputs.items() if key.endswith("logps") and value is not None]
    dtype = jnp.promote_types(jnp.result_type(*logps), jnp.float32)
    mask = inputs["pair_mask"]
    num_pairs = jnp.size(inputs["policy_chosen_logps"])
    mask = jnp.ones((num_pairs,), bool) if mask is None else jnp.reshape(mask, (-1,))

    def flat(key, fill):
        array = inputs[key]
        if array is None:
            return None
        flat_array = jnp.reshape(array, (-1,)).astype(dtype)
        if key.endswith("lengths"):
            flat_array = jnp.maximum(flat_array, 1.0)  # an empty response must not divide by 0
        return jnp.where(mask, flat_array, fill)

    zeros = jnp.zeros((num_pairs,), dtype)
    use_ref = inputs["ref_chosen_logps"] is not None and not reference_free
    policy_chosen = flat("policy_chosen_logps", 0.0)
    policy_rejected = flat("policy_rejected_logps", 0.0)
    ref_chosen = flat("ref_chosen_logps", 0.0) if use_ref else zeros
    ref_rejected = flat("ref_rejected_logps", 0.0) if use_ref else zeros
    labels = inputs["kto_labels"]
    return Pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_scores=f_divergence_scores(policy_chosen - ref_chosen, f_divergence_type, alpha),
        rejected_scores=f_divergence_scores(
            policy_rejected - ref_rejected, f_divergence_type, alpha
        ),
        chosen_lengths=flat("chosen_lengths", 1.0),
        rejected_lengths=flat("rejected_lengths", 1.0),
        labels=None if labels is None else jnp.reshape(labels, (-1,)),
        mask=mask,
    )


def _bco_state(names, pairs: Pairs, beta, shift: str, running_mean, running_count):
    """bco_pair's δ₀ for this batch and the state metrics; ({}, 0) without the shift.

    One step of TRL's RunningMoments fed the batch's mean reward (the count is batches seen):
    r̄ = mean over valid pairs of the 2P rewards β·Δc and β·Δr; n' = n + 1; δ₀' = δ₀ + (r̄ − δ₀)/n'.
    """
    if "bco_pair" not in names or shift == "none":
        if running_mean is not None or running_count is not None:
            raise ValueError(
                f"bco_running_mean={running_mean}, bco_running_count={running_count} are given "
                f"but loss_type={list(names)} with bco_reward_shift={shift!r} keeps no running mean"
            )
        return {}, 0.0
    running_mean = 0.0 if running_mean is None else running_mean
    count = (0.0 if running_count is None else running_count) + 1.0
    rewards = jax.lax.stop_gradient(
        beta * jnp.concatenate([pairs.chosen_logratios, pairs.rejected_logratios])
    )  # [2P]
    batch_mean = masked_mean(rewards, jnp.concatenate([pairs.mask, pairs.mask]))
    delta = running_mean + (batch_mean - running_mean) / count
    return {"bco/running_mean": delta, "bco/running_count": count}, delta


def _kto_reference_point(names, pairs: Pairs) -> jax.Array | float:
    """KTO's z₀ = max(0, mean over the batch of the mismatched completions' log-ratio), no grad."""
    if "kto" not in names:
        return 0.0
    kl = masked_mean(jax.lax.stop_gradient(pairs.rejected_logratios), pairs.mask)
    return jnp.maximum(kl, 0.0)


def _reward_metrics(pairs: Pairs, beta) -> dict[str, jax.Array]:
    """TRL's metric names; reward = β·(log π − log π_ref), means over valid pairs, no gradient."""
    pairs = jax.tree.map(jax.lax.stop_gradient, pairs)
    chosen_rewards = beta * pairs.chosen_logratios
    rejected_rewards = beta * pairs.rejected_logratios
    accuracies = (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)
    return {
        "rewards/chosen": masked_mean(chosen_rewards, pairs.mask),
        "rewards/rejected": masked_mean(rejected_rewards, pairs.mask),
        "rewards/accuracies": masked_mean(accuracies, pairs.mask),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, pairs.mask),
        "logps/chosen": masked_mean(pairs.policy_chosen, pairs.mask),
        "logps/rejected": masked_mean(pairs.policy_rejected, pairs.mask),
    }


def _kto_metrics(pairs: Pairs, beta, z0) -> dict[str, jax.Array]:
    """TRL's KTO metrics: rewards and log-probs of the desirable ("chosen") and undesirable
    ("rejected") completions, each a mean over its own completions, and `kl` = z₀."""
    pairs = jax.tree.map(jax.lax.stop_gradient, pairs)
    desirable, undesirable = pairs.mask & pairs.labels, pairs.mask & ~pairs.labels
    rewards = beta * pairs.chosen_logratios
    chosen_reward, rejected_reward = (
        masked_mean(rewards, desirable),
        masked_mean(rewards, undesirable),
    )
    return {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": masked_mean(pairs.policy_chosen, desirable),
        "logps/rejected": masked_mean(pairs.policy_chosen, undesirable),
        "kl": jnp.asarray(z0, rewards.dtype),
    }


def _apply_weighting(per_pair: jax.Array, pairs: Pairs, log_weights) -> jax.Array:
    """WPO (arXiv:2406.11827, eq. 2): ℓ_i · exp(w_c,i + w_r,i), the weight without gradient."""
    if log_weights is None:
        return per_pair
    chosen, rejected = (jnp.where(pairs.mask, jnp.reshape(w, (-1,)), 0.0) for w in log_weights)
    weight = jax.lax.stop_gradient(jnp.exp(chosen + rejected))
    return per_pair * weight


def dpo_loss_fn(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    sigmoid_label_smoothing: str = "cdpo",
    ipo_form: str = "per_token",
    sft_form: str = "per_token",
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    bco_reward_shift: str = "running_mean",
    bco_running_mean: jax.Array | None = None,
    bco_running_count: jax.Array | None = None,
    kto_labels: jax.Array | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    wpo_log_weights: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference loss of a batch of pairs from summed log-probs, in TRL's argument order.

    L = Σ_k w_k · mean_{i: pair_mask_i} ℓ_k(i) over the names k in `loss_type`, where ℓ_k is
    the per-pair loss of `LOSS_VARIANTS[k]` (each variant's docstring gives its equation).
    The default is DPO: ℓ(i) = −log σ(β·[(log π(y_w) − log π_ref(y_w))
    − (log π(y_l) − log π_ref(y_l))]). RPO is `["sigmoid", "sft"]` with weights `[1, α]`,
    ORPO `["sft", "orpo"]`, CPO `["cpo", "sft"]`. Every setting that changes a formula is an
    explicit argument; none changes with which optional arrays are passed.

    Args:
      policy_chosen_logps: [P] float, log π(y_w|x) summed over the chosen response's tokens.
        Any shape works (every element is one pair, e.g. [B, S] for packed rows) as long as all
        per-pair arguments share it; bfloat16 is upcast to float32. For kto: log π(y|x) of the
        completion.
      policy_rejected_logps: [P] float, log π(y_l|x). For kto: log π(y'|x) of the mismatched
        completion y' (another record's) that estimates the reference point z₀.
      ref_chosen_logps, ref_rejected_logps: [P] float, the same under π_ref, both or neither:
        None, or `reference_free=True`, takes them as 0.
      beta: β > 0, the KL-penalty strength (IPO's τ, ORPO's λ); a static float is validated.
      loss_type: a name in `LOSS_VARIANTS` (or an alias in `LOSS_ALIASES`) or distinct names.
      label_smoothing: ε for the variants that read it: sigmoid and sigmoid_norm (cDPO, see
        sigmoid_label_smoothing), aot, aot_unpaired, simpo, cpo in [0, 0.5]; robust in [0, 0.5);
        exo_pair in (0, 0.5] (0 is an error). A non-zero ε no listed variant reads is an error.
      loss_weights: one weight per `loss_type` name; None means all 1 (TRL's `loss_weights`).
      reference_free: if True, ignore the reference log-probs (take them as 0).
      chosen_lengths, rejected_lengths: [P] response token counts (clamped to >= 1), needed by
        simpo, sigmoid_norm, orpo, ipo with ipo_form="per_token" and sft with sft_form="per_token".
      pair_mask: [P] bool, True on real pairs; padding slots (packed rows) count in neither the
        loss, the gradient nor the metrics, whatever they hold. None means all pairs are real.
      f_divergence_type: "reverse_kl" (DPO), "forward_kl", "js_divergence", "alpha_divergence":
        the margin is built from f'(π/π_ref) instead of the log-ratio (TRL 1.16's variants:
        sigmoid, hinge, ipo, robust, exo_pair, discopop, sigmoid_norm); see `f_divergence_scores`.
      f_alpha_divergence_coef: α > 0 of alpha_divergence.
      sigmoid_label_smoothing: "cdpo" (default: sigmoid and sigmoid_norm read ε as cDPO does) or
        "ignore" (TRL 1.16: they never read it).
      ipo_form: "per_token" (default, TRL's) or "summed" (the paper's equation on sums).
      sft_form: "per_token" (default, TRL's token-level NLL) or "per_sequence" (mean of −log π).
      discopop_tau: τ of discopop.
      simpo_gamma: γ of simpo, the target reward margin (TRL's CPOConfig.simpo_gamma).
      bco_reward_shift: "running_mean" (default, the BCO paper's δ₀) or "none" (TRL 1.16).
      bco_running_mean: δ₀ before this batch (running_mean shift only), a float32 scalar carried
        by the caller between steps (None = 0 at the first step).
      bco_running_count: number of batches δ₀ averages (None = 0), carried with it.
      kto_labels: [P] bool, kto only: True where the completion is desirable.
      desirable_weight, undesirable_weight: KTO's λ_D and λ_U.
      wpo_log_weights: WPO (arXiv:2406.11827): ([P], [P]) per-sequence log weights of the chosen
        and rejected sides, each the mean over its tokens of log p(y_t) − log Σ_v p(v)²; every
        per-pair loss is multiplied by exp(w_c + w_r) without gradient. None: no weighting.

    Returns:
      (loss, metrics): loss is a scalar; metrics holds scalars without gradient: `loss`,
      `loss/<name>` for each name (unweighted), `rewards/chosen`, `rewards/rejected`,
      `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (TRL's names; means
      over valid pairs, reward = β·(log π − log π_ref)); with the bco shift the updated state
      `bco/running_mean`, `bco/running_count` to pass to the next call (TRL's RunningMoments,
      applied before the loss: r̄ = mean of the 2·P rewards β·Δc, β·Δr over valid pairs;
      n' = n + 1; δ₀' = δ₀ + (r̄ − δ₀)/n'). For kto, TRL's KTO metrics instead (`kl` = z₀,
      chosen/rejected meaning desirable/undesirable completions, no accuracies).

    Raises:
      ValueError: naming the argument, for an unknown or repeated loss name, a `loss_weights`
        length mismatch, β <= 0, ε outside its variant's range, an unknown setting string, an
        f-divergence with a variant it does not apply to, α <= 0, WPO weights with aot or kto,
        mismatched shapes, one reference array without the other, missing lengths, a non-bool
        pair_mask or kto_labels, kto without labels or with a weight <= 0, or bco state given
        without a bco running mean. All checks read static values and shapes, so the function
        jits.
    """
    names = checks.as_loss_names(loss_type)
    weights = checks.as_loss_weights(names, loss_weights)
    checks.check_choices(
        ipo_form=ipo_form,
        sft_form=sft_form,
        sigmoid_label_smoothing=sigmoid_label_smoothing,
        bco_reward_shift=bco_reward_shift,
        f_divergence_type=f_divergence_type,
    )
    checks.check_hyper(names, beta, label_smoothing, discopop_tau, sigmoid_label_smoothing)
    checks.check_f_divergence(names, f_divergence_type, f_alpha_divergence_coef)
    checks.check_weighting(names, wpo_log_weights)
    checks.check_kto_weights(names, desirable_weight, undesirable_weight)
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_mask=pair_mask,
        kto_labels=kto_labels,
    )
    if wpo_log_weights is not None:
        inputs.update(wpo_chosen=wpo_log_weights[0], wpo_rejected=wpo_log_weights[1])
    checks.check_shapes(inputs)
    checks.check_optional_inputs(
        names, inputs, checks.names_needing_lengths(names, ipo_form, sft_form)
    )
    pairs = _build_pairs(inputs, reference_free, f_divergence_type, f_alpha_divergence_coef)

    metrics, bco_delta = _bco_state(
        names, pairs, beta, bco_reward_shift, bco_running_mean, bco_running_count
    )
    kto_z0 = _kto_reference_point(names, pairs)
    hyper = Hyper(
        beta, label_smoothing, discopop_tau, simpo_gamma, bco_delta, kto_z0,
        desirable_weight, undesirable_weight, ipo_form, sft_form, sigmoid_label_smoothing,
    )  # fmt: skip

    loss = 0.0
    for name, weight in zip(names, weights, strict=True):
        per_pair = _apply_weighting(LOSS_VARIANTS[name].fn(pairs, hyper), pairs, wpo_log_weights)
        component = masked_mean(per_pair, pairs.mask)
        metrics[f"loss/{name}"] = jax.lax.stop_gradient(component)
        loss = loss + weight * component
    metrics["loss"] = jax.lax.stop_gradient(loss)
    if "kto" in names:
        metrics.update(_kto_metrics(pairs, beta, kto_z0))
    else:
        metrics.update(_reward_metrics(pairs, beta))
    return loss, metrics
