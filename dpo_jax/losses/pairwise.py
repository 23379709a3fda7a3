"""The paired DPO family of TRL 1.16's DPOTrainer, one short per-pair function each.

Notation: Δc, Δr are the chosen / rejected log-ratios log π − log π_ref; δ = Δc − Δr; s_c, s_r the
f-divergence scores of Δc, Δr (s = Δ for reverse_kl, the default) and δ_s = s_c − s_r; ε is
label_smoothing; |y| a response's token count.
"""

import jax
import jax.numpy as jnp

from .core import Hyper, Pairs, register, smoothed_sigmoid


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


def _sigmoid_smoothing(hp: Hyper):
    """ε as sigmoid / sigmoid_norm read it: cDPO's ε, or 0 under TRL 1.16's "ignore"."""
    return hp.label_smoothing if hp.sigmoid_label_smoothing == "cdpo" else 0.0


@register("sigmoid", label_smoothing_range="[0, 0.5]", uses_scores=True)
def _sigmoid(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DPO (arXiv:2305.18290, eq. 7); with ε > 0 and sigmoid_label_smoothing="cdpo" conservative
    DPO (cDPO, Mitchell 2023): ℓ = −(1−ε)·log σ(βδ_s) − ε·log σ(−βδ_s). TRL 1.16 ignores ε here
    ("ignore"): ℓ = −log σ(βδ_s)."""
    return smoothed_sigmoid(hp.beta * pairs.score_margin, _sigmoid_smoothing(hp))


@register("hinge", uses_scores=True)
def _hinge(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SLiC hinge (arXiv:2305.10425): ℓ = max(0, 1 − βδ_s)."""
    return jax.nn.relu(1.0 - hp.beta * pairs.score_margin)


@register("ipo", uses_scores=True)
def _ipo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """IPO (arXiv:2310.12036, eq. 17; β is the paper's τ), by `ipo_form`:

    "per_token" (TRL's, confirmed with the IPO authors; needs lengths):
        ℓ = (s_c/|y_w| − s_r/|y_l| − 1/(2β))²;
    "summed" (the paper's equation on summed log-probs): ℓ = (δ_s − 1/(2β))².
    """
    if hp.ipo_form == "per_token":
        margin = pairs.chosen_scores / pairs.chosen_lengths - (
            pairs.rejected_scores / pairs.rejected_lengths
        )
    else:
        margin = pairs.score_margin
    return (margin - 1.0 / (2.0 * hp.beta)) ** 2


@register("robust", label_smoothing_range="[0, 0.5)", uses_scores=True)
def _robust(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Robust DPO (arXiv:2403.00409), unbiased under a label-flip rate ε:
    ℓ = [−(1−ε)·log σ(βδ_s) + ε·log σ(−βδ_s)] / (1 − 2ε)."""
    logits = hp.beta * pairs.score_margin
    eps = hp.label_smoothing
    clean = -(1.0 - eps) * jax.nn.log_sigmoid(logits)
    flipped = eps * jax.nn.log_sigmoid(-logits)
    return (clean + flipped) / (1.0 - 2.0 * eps)


@register("exo_pair", label_smoothing_range="(0, 0.5]", uses_scores=True)
def _exo_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Pairwise EXO (arXiv:2402.00856, eq. 16): KL(softmax(βs_c, βs_r) ‖ (1−ε, ε)),
    ℓ = σ(βδ_s)·[log σ(βδ_s) − log(1−ε)] + σ(−βδ_s)·[log σ(−βδ_s) − log ε].

    ε = label_smoothing must be > 0 (log ε); the paper uses 1e-3.
    """
    logits = hp.beta * pairs.score_margin
    eps = hp.label_smoothing
    chosen_part = jax.nn.sigmoid(logits) * (jax.nn.log_sigmoid(logits) - jnp.log1p(-eps))
    rejected_part = jax.nn.sigmoid(-logits) * (jax.nn.log_sigmoid(-logits) - jnp.log(eps))
    return chosen_part + rejected_part


@register("nca_pair")
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


@register("bco_pair")
def _bco_pair(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Pairwise BCO (arXiv:2404.04656) with reward shift δ₀:
    ℓ = −log σ(βΔc − δ₀) − log σ(−(βΔr − δ₀)); δ₀ is the running mean reward with
    bco_reward_shift="running_mean" (the paper's), 0 with "none" (TRL 1.16's)."""
    return -jax.nn.log_sigmoid(hp.beta * pairs.chosen_logratios - hp.bco_delta) - (
        jax.nn.log_sigmoid(-(hp.beta * pairs.rejected_logratios - hp.bco_delta))
    )


@register("sppo_hard")
def _sppo_hard(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SPPO with hard win probabilities (arXiv:2405.00675, eq. 4.7 with P = 1 / 0):
    ℓ = (Δc − 1/(2β))² + (Δr + 1/(2β))²."""
    half_inverse_beta = 0.5 / hp.beta
    return (pairs.chosen_logratios - half_inverse_beta) ** 2 + (
        pairs.rejected_logratios + half_inverse_beta
    ) ** 2


@register("aot", label_smoothing_range="[0, 0.5]")
def _aot(pairs: Pairs, hp: Hyper) -> jax.Array:
    """AOT for paired data (arXiv:2406.05882): the cDPO loss on
    δ_sorted = sort_batch(log π(y_w) − log π(y_l)) − sort_batch(log π_ref(y_w) − log π_ref(y_l)).

    The sort runs over the pairs of this call (all valid pairs of the global batch under jit).
    """
    policy_logratios = pairs.policy_chosen - pairs.policy_rejected
    ref_logratios = pairs.ref_chosen - pairs.ref_rejected
    margin = _sorted_margin(policy_logratios, ref_logratios, pairs.mask)
    return smoothed_sigmoid(hp.beta * margin, hp.label_smoothing)


@register("aot_unpaired", label_smoothing_range="[0, 0.5]")
def _aot_unpaired(pairs: Pairs, hp: Hyper) -> jax.Array:
    """AOT for unpaired data (arXiv:2406.05882; `aot_pair` is its old name, still accepted):
    the cDPO loss on δ_sorted = sort_batch(Δc) − sort_batch(Δr)."""
    margin = _sorted_margin(pairs.chosen_logratios, pairs.rejected_logratios, pairs.mask)
    return smoothed_sigmoid(hp.beta * margin, hp.label_smoothing)


@register("apo_zero")
def _apo_zero(pairs: Pairs, hp: Hyper) -> jax.Array:
    """APO-zero (arXiv:2408.06266, eq. 7): ℓ = (1 − σ(βΔc)) + σ(βΔr)."""
    return (1.0 - jax.nn.sigmoid(hp.beta * pairs.chosen_logratios)) + jax.nn.sigmoid(
        hp.beta * pairs.rejected_logratios
    )


@register("apo_down")
def _apo_down(pairs: Pairs, hp: Hyper) -> jax.Array:
    """APO-down (arXiv:2408.06266, eq. 8): ℓ = σ(βΔc) + (1 − σ(βδ))."""
    return jax.nn.sigmoid(hp.beta * pairs.chosen_logratios) + (
        1.0 - jax.nn.sigmoid(hp.beta * pairs.margin)
    )


@register("discopop", uses_scores=True)
def _discopop(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DiscoPOP / log-ratio modulated loss (arXiv:2406.08414, eq. 5), z = βδ_s, m = σ(z/τ):
    ℓ = −log σ(z)·(1 − m) + e^(−z)·m,  τ = discopop_tau (0.05 in the paper)."""
    logits = hp.beta * pairs.score_margin
    logistic_part = -jax.nn.log_sigmoid(logits) * jax.nn.sigmoid(-logits / hp.discopop_tau)
    # e^(−z)·σ(z/τ) as one exp: e^(−z) alone overflows for z < −88 in float32 and inf·0 is NaN.
    exp_part = jnp.exp(-logits + jax.nn.log_sigmoid(logits / hp.discopop_tau))
    return logistic_part + exp_part


@register("sigmoid_norm", label_smoothing_range="[0, 0.5]", needs_lengths=True, uses_scores=True)
def _sigmoid_norm(pairs: Pairs, hp: Hyper) -> jax.Array:
    """DPO on per-token scores (TRL's `sigmoid_norm`), z = β·(s_c/|y_w| − s_r/|y_l|):
    ℓ = −(1−ε)·log σ(z) − ε·log σ(−z) with sigmoid_label_smoothing="cdpo"; −log σ(z) with
    "ignore" (TRL 1.16)."""
    average_margin = pairs.chosen_scores / pairs.chosen_lengths - (
        pairs.rejected_scores / pairs.rejected_lengths
    )
    return smoothed_sigmoid(hp.beta * average_margin, _sigmoid_smoothing(hp))
