"""DPO-family preference losses on sequence log-probs: pure jax.numpy, no model, no config.

Every loss reads four summed log-probs per preference pair (policy and reference, chosen y_w and
rejected y_l) and returns a scalar. Notation used in every docstring below, per pair i:

    Δc = log π(y_w|x) − log π_ref(y_w|x)      (chosen log-ratio)
    Δr = log π(y_l|x) − log π_ref(y_l|x)      (rejected log-ratio)
    δ  = Δc − Δr                             (the DPO margin), z = β·δ
    ε  = label_smoothing,  |y| = number of response tokens

Conventions:
- Log-probs are sums over the response tokens (never means); a variant that length-normalises
  says so and takes the token counts as `chosen_lengths` / `rejected_lengths`.
- The loss is the mean over valid pairs (`pair_mask`) of a per-pair loss; a list of loss types
  gives Σ_k w_k · mean_i ℓ_k(i) (TRL's `loss_weights`).
- Arithmetic is in float32 at least (bfloat16 inputs are upcast; float64 stays float64).
- log σ is always `jax.nn.log_sigmoid`, never `log(sigmoid(x))`, which underflows to −inf.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

EXO_DEFAULT_EPSILON = 1e-3  # EXO paper's recommended ε, used when label_smoothing == 0


class Pairs(NamedTuple):
    """What every variant reads: flat [P] arrays, padding slots replaced by neutral values."""

    policy_chosen: jax.Array  # [P] float
    policy_rejected: jax.Array  # [P] float
    ref_chosen: jax.Array  # [P] float, zeros when reference-free
    ref_rejected: jax.Array  # [P] float, zeros when reference-free
    chosen_lengths: jax.Array | None  # [P] float, >= 1
    rejected_lengths: jax.Array | None  # [P] float, >= 1
    mask: jax.Array  # [P] bool, True on real pairs

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> jax.Array:
        return self.chosen_logratios - self.rejected_logratios


class Hyper(NamedTuple):
    """Scalar hyper-parameters a variant may read."""

    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    bco_delta: jax.Array | float  # running mean reward δ₀ (bco_pair only)


class Variant(NamedTuple):
    """A registered loss: its per-pair function and what it requires of the arguments."""

    fn: Callable[[Pairs, Hyper], jax.Array]  # -> [P] per-pair loss
    label_smoothing_range: str | None  # interval ε must lie in, or None when ε is unused
    needs_lengths: bool


LOSS_VARIANTS: dict[str, Variant] = {}

# (low, high, low inclusive, high inclusive) for each interval named in the registry.
_INTERVALS = {"[0, 0.5]": (0.0, 0.5, True, True), "[0, 0.5)": (0.0, 0.5, True, False)}


def _register(name: str, label_smoothing_range: str | None = None, needs_lengths: bool = False):
    def add(fn):
        LOSS_VARIANTS[name] = Variant(fn, label_smoothing_range, needs_lengths)
        return fn

    return add


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` [P] over `mask` [P]; 0 when no entry is valid (an all-padding batch)."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _smoothed_sigmoid(logits: jax.Array, label_smoothing) -> jax.Array:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the cDPO loss, the DPO loss when ε = 0."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * (
        jax.nn.log_sigmoid(-logits)
    )


@_register("sigmoid", label_smoothing_range="[0, 0.5]")
def _sigmoid(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DPO (arXiv:2305.18290, eq. 7); with ε > 0 conservative DPO (cDPO, Mitchell 2023):
    ℓ = −(1−ε)·log σ(βδ) − ε·log σ(−βδ)."""
    return _smoothed_sigmoid(hp.beta * pairs.margin, hp.label_smoothing)


@_register("hinge")
def _hinge(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SLiC hinge (arXiv:2305.10425): ℓ = max(0, 1 − βδ)."""
    return jax.nn.relu(1.0 - hp.beta * pairs.margin)


@_register("ipo")
def _ipo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """IPO (arXiv:2310.12036, eq. 17; β is the paper's τ): ℓ = (δ − 1/(2β))².

    With response lengths the log-ratios are per-token averages, as current TRL does:
    ℓ = (Δc/|y_w| − Δr/|y_l| − 1/(2β))².
    """
    if pairs.chosen_lengths is None:
        margin = pairs.margin
    else:
        margin = (
            pairs.chosen_logratios / pairs.chosen_lengths
            - pairs.rejected_logratios / pairs.rejected_lengths
        )
    return (margin - 1.0 / (2.0 * hp.beta)) ** 2


@_register("robust", label_smoothing_range="[0, 0.5)")
def _robust(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Robust DPO (arXiv:2403.00409), unbiased under a label-flip rate ε:
    ℓ = [−(1−ε)·log σ(βδ) + ε·log σ(−βδ)] / (1 − 2ε)."""
    logits = hp.beta * pairs.margin
    eps = hp.label_smoothing
    clean = -(1.0 - eps) * jax.nn.log_sigmoid(logits)
    flipped = eps * jax.nn.log_sigmoid(-logits)
    return (clean + flipped) / (1.0 - 2.0 * eps)


@_register("exo_pair", label_smoothing_range="[0, 0.5]")
def _exo_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Pairwise EXO (arXiv:2402.00856, eq. 16): KL(softmax(βΔc, βΔr) ‖ (1−ε, ε)),
    ℓ = σ(βδ)·[log σ(βδ) − log(1−ε)] + σ(−βδ)·[log σ(−βδ) − log ε].

    ε = label_smoothing, or EXO_DEFAULT_EPSILON (1e-3, the paper's value) when it is 0.
    """
    logits = hp.beta * pairs.margin
    eps = jnp.where(hp.label_smoothing == 0, EXO_DEFAULT_EPSILON, hp.label_smoothing)
    chosen_part = jax.nn.sigmoid(logits) * (jax.nn.log_sigmoid(logits) - jnp.log1p(-eps))
    rejected_part = jax.nn.sigmoid(-logits) * (jax.nn.log_sigmoid(-logits) - jnp.log(eps))
    return chosen_part + rejected_part


@_register("nca_pair")
def _nca_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Pairwise NCA (arXiv:2402.05369):
    ℓ = −log σ(βΔc) − ½·log σ(−βΔc) − ½·log σ(−βΔr)."""
    chosen_rewards = hp.beta * pairs.chosen_logratios
    rejected_rewards = hp.beta * pairs.rejected_logratios
    return (
        -jax.nn.log_sigmoid(chosen_rewards)
        - 0.5 * jax.nn.log_sigmoid(-chosen_rewards)
        - 0.5 * jax.nn.log_sigmoid(-rejected_rewards)
    )


@_register("bco_pair")
def _bco_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Pairwise BCO (arXiv:2404.04656) with reward shift δ₀ (the running mean reward):
    ℓ = −log σ(βΔc − δ₀) − log σ(−(βΔr − δ₀))."""
    return -jax.nn.log_sigmoid(hp.beta * pairs.chosen_logratios - hp.bco_delta) - (
        jax.nn.log_sigmoid(-(hp.beta * pairs.rejected_logratios - hp.bco_delta))
    )


@_register("sppo_hard")
def _sppo_hard(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SPPO with hard win probabilities (arXiv:2405.00675, eq. 4.7 with P = 1 / 0):
    ℓ = (Δc − 1/(2β))² + (Δr + 1/(2β))²."""
    half_inverse_beta = 0.5 / hp.beta
    return (pairs.chosen_logratios - half_inverse_beta) ** 2 + (
        pairs.rejected_logratios + half_inverse_beta
    ) ** 2


def _sorted_margin(first: jax.Array, second: jax.Array, mask: jax.Array) -> jax.Array:
    """sort(first) − sort(second) over the valid pairs, laid back onto the valid slots.

    Padding slots sort last (as +inf) in both, so the k smallest valid values pair up; the k-th
    sorted difference is then written to the k-th valid slot, which keeps `mask` meaningful.
    """
    num_valid = jnp.sum(mask)
    valid_rank = jnp.arange(first.shape[0]) < num_valid  # [P]
    first_sorted = jnp.where(valid_rank, jnp.sort(jnp.where(mask, first, jnp.inf)), 0.0)
    second_sorted = jnp.where(valid_rank, jnp.sort(jnp.where(mask, second, jnp.inf)), 0.0)
    valid_slots = jnp.argsort(~mask, stable=True)  # valid slots first, in order
    return jnp.zeros_like(first).at[valid_slots].set(first_sorted - second_sorted)


@_register("aot", label_smoothing_range="[0, 0.5]")
def _aot(pairs: Pairs, hp: Hyper) -> jax.Array:
    """AOT for paired data (arXiv:2406.05882): the cDPO loss on
    δ_sorted = sort_batch(log π(y_w) − log π(y_l)) − sort_batch(log π_ref(y_w) − log π_ref(y_l)).

    The sort runs over the pairs of this call (all valid pairs of the global batch under jit).
    """
    policy_logratios = pairs.policy_chosen - pairs.policy_rejected
    ref_logratios = pairs.ref_chosen - pairs.ref_rejected
    margin = _sorted_margin(policy_logratios, ref_logratios, pairs.mask)
    return _smoothed_sigmoid(hp.beta * margin, hp.label_smoothing)


@_register("aot_pair", label_smoothing_range="[0, 0.5]")
def _aot_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """AOT for unpaired data (arXiv:2406.05882; current TRL calls it `aot_unpaired`):
    the cDPO loss on δ_sorted = sort_batch(Δc) − sort_batch(Δr)."""
    margin = _sorted_margin(pairs.chosen_logratios, pairs.rejected_logratios, pairs.mask)
    return _smoothed_sigmoid(hp.beta * margin, hp.label_smoothing)


@_register("apo_zero")
def _apo_zero(pairs: Pairs, hp: Hyper) -> jax.Array:
    """APO-zero (arXiv:2408.06266, eq. 7): ℓ = (1 − σ(βΔc)) + σ(βΔr)."""
    return (1.0 - jax.nn.sigmoid(hp.beta * pairs.chosen_logratios)) + jax.nn.sigmoid(
        hp.beta * pairs.rejected_logratios
    )


@_register("apo_down")
def _apo_down(pairs: Pairs, hp: Hyper) -> jax.Array:
    """APO-down (arXiv:2408.06266, eq. 8): ℓ = σ(βΔc) + (1 − σ(βδ))."""
    return jax.nn.sigmoid(hp.beta * pairs.chosen_logratios) + (
        1.0 - jax.nn.sigmoid(hp.beta * pairs.margin)
    )


@_register("discopop")
def _discopop(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DiscoPOP / log-ratio modulated loss (arXiv:2406.08414, eq. 5), z = βδ, m = σ(z/τ):
    ℓ = −log σ(z)·(1 − m) + e^(−z)·m,  τ = discopop_tau (0.05 in the paper)."""
    logits = hp.beta * pairs.margin
    logistic_part = -jax.nn.log_sigmoid(logits) * jax.nn.sigmoid(-logits / hp.discopop_tau)
    # e^(−z)·σ(z/τ) as one exp: e^(−z) alone overflows for z < −88 in float32 and inf·0 is NaN.
    exp_part = jnp.exp(-logits + jax.nn.log_sigmoid(logits / hp.discopop_tau))
    return logistic_part + exp_part


@_register("simpo", label_smoothing_range="[0, 0.5]", needs_lengths=True)
def _simpo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SimPO (arXiv:2405.14734), reference-free and length-normalised, γ = simpo_gamma:
    z = β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ,  ℓ = −(1−ε)·log σ(z) − ε·log σ(−z).

    The reference log-probs are ignored whatever is passed (as in TRL's CPOTrainer).
    """
    average_margin = (
        pairs.policy_chosen / pairs.chosen_lengths - pairs.policy_rejected / pairs.rejected_lengths
    )
    return _smoothed_sigmoid(hp.beta * average_margin - hp.simpo_gamma, hp.label_smoothing)


@_register("sigmoid_norm", label_smoothing_range="[0, 0.5]", needs_lengths=True)
def _sigmoid_norm(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DPO on per-token log-ratios (TRL's `sigmoid_norm`), with cDPO smoothing:
    ℓ = −(1−ε)·log σ(β·(Δc/|y_w| − Δr/|y_l|)) − ε·log σ(−β·(…))."""
    average_margin = (
        pairs.chosen_logratios / pairs.chosen_lengths
        - pairs.rejected_logratios / pairs.rejected_lengths
    )
    return _smoothed_sigmoid(hp.beta * average_margin, hp.label_smoothing)


@_register("sft")
def _sft(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Negative log-likelihood of the chosen response (RPO's NLL term, arXiv:2404.19733).

    With `chosen_lengths`: the NLL per chosen token over the batch, −Σ_i log π(y_w,i) / Σ_i |y_w,i|
    (TRL's token-level cross-entropy), returned as per-pair terms whose masked mean is that ratio.
    Without: the summed NLL per pair, −log π(y_w), so the loss is its mean over pairs.
    """
    if pairs.chosen_lengths is None:
        return -pairs.policy_chosen
    mean_length = _masked_mean(pairs.chosen_lengths, pairs.mask)
    return -pairs.policy_chosen / mean_length


def _as_loss_names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError(f"loss_type={loss_type!r} is empty; known: {sorted(LOSS_VARIANTS)}")
    for name in names:
        if name not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss_type {name!r}; known: {sorted(LOSS_VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type={list(names)} names a loss twice; give it one weight instead")
    return names


def _as_loss_weights(names: tuple[str, ...], loss_weights) -> tuple:
    if loss_weights is None:
        return (1.0,) * len(names)
    loss_weights = tuple(loss_weights)
    if len(loss_weights) != len(names):
        raise ValueError(
            f"loss_weights={list(loss_weights)} has {len(loss_weights)} entries but "
            f"loss_type={list(names)} has {len(names)}"
        )
    return loss_weights


def _in_interval(value: float, interval: str) -> bool:
    low, high, low_closed, high_closed = _INTERVALS[interval]
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def _check_hyper(names: tuple[str, ...], beta, label_smoothing, discopop_tau) -> None:
    """Checks the scalars that are static Python numbers; traced values pass through unchecked."""
    if isinstance(beta, numbers.Real) and not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if isinstance(discopop_tau, numbers.Real) and not discopop_tau > 0:
        raise ValueError(f"discopop_tau={discopop_tau} must be > 0")
    if not isinstance(label_smoothing, numbers.Real):
        return
    ranges = {name: LOSS_VARIANTS[name].label_smoothing_range for name in names}
    if label_smoothing != 0 and all(interval is None for interval in ranges.values()):
        raise ValueError(
            f"label_smoothing={label_smoothing} is not used by loss_type={list(names)}"
        )
    for name, interval in ranges.items():
        if interval is not None and not _in_interval(label_smoothing, interval):
            raise ValueError(
                f"label_smoothing={label_smoothing} must be in {interval} for loss_type {name!r}"
            )


def _check_shapes(named_arrays: dict) -> tuple[int, ...]:
    """All given arrays share one shape with at least one axis; returns it."""
    first_name, first = next(iter(named_arrays.items()))
    shape = jnp.shape(first)
    if len(shape) == 0:
        raise ValueError(f"{first_name} has shape (); expected one entry per pair, e.g. [P]")
    for name, array in named_arrays.items():
        if array is not None and jnp.shape(array) != shape:
            raise ValueError(
                f"{name} has shape {jnp.shape(array)} but {first_name} has shape {shape}; "
                "all per-pair inputs must have the same shape"
            )
    return shape


def _check_optional_inputs(names, ref_chosen, ref_rejected, chosen_len, rejected_len, pair_mask):
    for given, missing, value in (
        ("ref_chosen_logps", "ref_rejected_logps", ref_rejected),
        ("ref_rejected_logps", "ref_chosen_logps", ref_chosen),
    ):
        if value is None and (ref_chosen is not None or ref_rejected is not None):
            raise ValueError(f"{given} is given but {missing} is None; pass both or neither")
    needing = [name for name in names if LOSS_VARIANTS[name].needs_lengths]
    if "ipo" in names and (chosen_len is not None or rejected_len is not None):
        needing.append("ipo")  # the length-normalised IPO needs both counts
    for arg_name, lengths in (("chosen_lengths", chosen_len), ("rejected_lengths", rejected_len)):
        if needing and lengths is None:
            raise ValueError(
                f"{arg_name}=None but loss_type {needing[0]!r} needs chosen_lengths and "
                "rejected_lengths (response token counts per pair)"
            )
    if pair_mask is not None and jnp.result_type(pair_mask) != jnp.bool_:
        raise ValueError(f"pair_mask must be a bool array, got dtype {jnp.result_type(pair_mask)}")


def _build_pairs(inputs: dict, reference_free: bool) -> Pairs:
    """Flattens to [P], upcasts to float32 at least, and neutralises padding slots.

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
    return Pairs(
        policy_chosen=flat("policy_chosen_logps", 0.0),
        policy_rejected=flat("policy_rejected_logps", 0.0),
        ref_chosen=flat("ref_chosen_logps", 0.0) if use_ref else zeros,
        ref_rejected=flat("ref_rejected_logps", 0.0) if use_ref else zeros,
        chosen_lengths=flat("chosen_lengths", 1.0),
        rejected_lengths=flat("rejected_lengths", 1.0),
        mask=mask,
    )


def _bco_state(names, pairs: Pairs, beta, running_mean, running_count):
    """bco_pair's δ₀ for this batch and the state metrics; ({}, 0) without bco_pair.

    One step of TRL's RunningMoments fed the batch's mean reward (the count is batches seen):
    r̄ = mean over valid pairs of the 2P rewards β·Δc and β·Δr; n' = n + 1; δ₀' = δ₀ + (r̄ − δ₀)/n'.
    """
    if "bco_pair" not in names:
        if running_mean is not None or running_count is not None:
            raise ValueError(
                f"bco_running_mean={running_mean}, bco_running_count={running_count} are given "
                f"but loss_type={list(names)} has no 'bco_pair'"
            )
        return {}, 0.0
    running_mean = 0.0 if running_mean is None else running_mean
    count = (0.0 if running_count is None else running_count) + 1.0
    rewards = jax.lax.stop_gradient(
        beta * jnp.concatenate([pairs.chosen_logratios, pairs.rejected_logratios])
    )  # [2P]
    batch_mean = _masked_mean(rewards, jnp.concatenate([pairs.mask, pairs.mask]))
    delta = running_mean + (batch_mean - running_mean) / count
    return {"bco/running_mean": delta, "bco/running_count": count}, delta


def _reward_metrics(pairs: Pairs, beta) -> dict[str, jax.Array]:
    """TRL's metric names; reward = β·(log π − log π_ref), means over valid pairs, no gradient."""
    pairs = jax.tree.map(jax.lax.stop_gradient, pairs)
    chosen_rewards = beta * pairs.chosen_logratios
    rejected_rewards = beta * pairs.rejected_logratios
    accuracies = (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)
    return {
        "rewards/chosen": _masked_mean(chosen_rewards, pairs.mask),
        "rewards/rejected": _masked_mean(rejected_rewards, pairs.mask),
        "rewards/accuracies": _masked_mean(accuracies, pairs.mask),
        "rewards/margins": _masked_mean(chosen_rewards - rejected_rewards, pairs.mask),
        "logps/chosen": _masked_mean(pairs.policy_chosen, pairs.mask),
        "logps/rejected": _masked_mean(pairs.policy_rejected, pairs.mask),
    }


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
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    bco_running_mean: jax.Array | None = None,
    bco_running_count: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference loss of a batch of pairs from summed log-probs, in TRL's argument order.

    L = Σ_k w_k · mean_{i: pair_mask_i} ℓ_k(i) over the names k in `loss_type`, where ℓ_k is
    the per-pair loss of `LOSS_VARIANTS[k]` (each variant's docstring gives its equation).
    The default is DPO: ℓ(i) = −log σ(β·[(log π(y_w) − log π_ref(y_w))
    − (log π(y_l) − log π_ref(y_l))]).
    RPO is `loss_type=["sigmoid", "sft"], loss_weights=[1, α]`.

    Args:
      policy_chosen_logps: [P] float, log π(y_w|x) summed over the chosen response's tokens.
        Any shape works (every element is one pair, e.g. [B, S] for packed rows) as long as all
        per-pair arguments share it; bfloat16 is upcast to float32.
      policy_rejected_logps: [P] float, log π(y_l|x), same convention.
      ref_chosen_logps: [P] float, log π_ref(y_w|x), or None with ref_rejected_logps None:
        then, or with `reference_free=True`, the reference log-probs are taken as 0.
      ref_rejected_logps: [P] float, log π_ref(y_l|x), or None (see above).
      beta: β > 0, the KL-penalty strength (IPO's τ); a static float is validated.
      loss_type: a name in `LOSS_VARIANTS` or a sequence of distinct names.
      label_smoothing: ε, the assumed label-flip rate, for the variants that use it: sigmoid,
        aot, aot_pair, simpo, sigmoid_norm and exo_pair in [0, 0.5] (exo_pair reads 0 as 1e-3),
        robust in [0, 0.5). A non-zero ε that no chosen variant uses is an error.
      loss_weights: one weight per `loss_type` name; None means all 1 (TRL's `loss_weights`).
      reference_free: if True, ignore the reference log-probs (take them as 0).
      chosen_lengths: [P] number of chosen response tokens (clamped to >= 1); needed by simpo
        and sigmoid_norm, switches ipo to its length-normalised form and sft to a per-token mean.
      rejected_lengths: [P] number of rejected response tokens, given together with the above.
      pair_mask: [P] bool, True on real pairs; padding slots (packed rows) count in neither the
        loss, the gradient nor the metrics, whatever they hold. None means all pairs are real.
      discopop_tau: τ of discopop.
      simpo_gamma: γ of simpo, the target reward margin (TRL's CPOConfig.simpo_gamma).
      bco_running_mean: δ₀ before this batch, the running mean reward of bco_pair, a float32
        scalar carried by the caller between steps (None = 0 at the first step).
      bco_running_count: number of batches δ₀ averages (None = 0), carried with it.

    Returns:
      (loss, metrics): loss is a scalar; metrics holds scalars without gradient: `loss`,
      `loss/<name>` for each name (unweighted), `rewards/chosen`, `rewards/rejected`,
      `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (TRL's names; means
      over valid pairs, reward = β·(log π − log π_ref)), and with bco_pair the updated state
      `bco/running_mean`, `bco/running_count` to pass to the next call. The bco update
      (TRL's RunningMoments, applied before the loss so δ₀ includes this batch): r̄ = mean of the
      2·P rewards β·Δc, β·Δr over valid pairs; n' = n + 1; δ₀' = δ₀ + (r̄ − δ₀)/n'.

    Raises:
      ValueError: naming the argument, for an unknown or repeated loss name, a `loss_weights`
        length mismatch, β <= 0, ε outside its variant's range, mismatched shapes, one reference
        array without the other, missing lengths, a non-bool pair_mask, or bco state given
        without bco_pair. All checks read static values and shapes, so the function jits.
    """
    names = _as_loss_names(loss_type)
    weights = _as_loss_weights(names, loss_weights)
    _check_hyper(names, beta, label_smoothing, discopop_tau)
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_mask=pair_mask,
    )
    _check_shapes(inputs)
    _check_optional_inputs(
        names, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, pair_mask
    )
    pairs = _build_pairs(inputs, reference_free)

    metrics, bco_delta = _bco_state(names, pairs, beta, bco_running_mean, bco_running_count)
    hyper = Hyper(beta, label_smoothing, discopop_tau, simpo_gamma, bco_delta)

    loss = 0.0
    for name, weight in zip(names, weights, strict=True):
        component = _masked_mean(LOSS_VARIANTS[name].fn(pairs, hyper), pairs.mask)
        metrics[f"loss/{name}"] = jax.lax.stop_gradient(component)
        loss = loss + weight * component
    metrics["loss"] = jax.lax.stop_gradient(loss)
    metrics.update(_reward_metrics(pairs, beta))
    return loss, metrics
