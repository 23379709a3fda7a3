"""Objectives that read the policy only (SFT, SimPO, CPO, ORPO), and KTO on unpaired completions.

None of the reference-free ones reads π_ref (`Variant.reads_reference` is False), so a trainer
that lists only them holds no reference params. Notation: a_w = log π(y_w)/|y_w| and
a_l = log π(y_l)/|y_l| are the per-token average log-probs, ε is label_smoothing.
"""

import jax
import jax.numpy as jnp

from .core import Hyper, Pairs, log1mexp, masked_mean, register, smoothed_sigmoid


@register("sft", reads_reference=False)
def _sft(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Negative log-likelihood of the chosen response (RPO's NLL term, arXiv:2404.19733), by
    `sft_form`:

    "per_token" (TRL's token-level cross-entropy; needs lengths): −Σ_i log π(y_w,i) / Σ_i |y_w,i|
        over the batch, returned as per-pair terms whose masked mean is that ratio;
    "per_sequence": −log π(y_w) per pair, so the loss is its mean over pairs.
    """
    if hp.sft_form == "per_sequence":
        return -pairs.policy_chosen
    mean_length = masked_mean(pairs.chosen_lengths, pairs.mask)
    return -pairs.policy_chosen / mean_length


@register("simpo", label_smoothing_range="[0, 0.5]", needs_lengths=True, reads_reference=False)
def _simpo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """SimPO (arXiv:2405.14734, eq. 6), γ = simpo_gamma:
    z = β·(a_w − a_l) − γ,  ℓ = −(1−ε)·log σ(z) − ε·log σ(−z) (TRL's CPOTrainer, loss "simpo",
    cpo_alpha = 0; with "sft" listed beside it, CPO-SimPO)."""
    average_margin = (
        pairs.policy_chosen / pairs.chosen_lengths - pairs.policy_rejected / pairs.rejected_lengths
    )
    return smoothed_sigmoid(hp.beta * average_margin - hp.simpo_gamma, hp.label_smoothing)


@register("cpo", label_smoothing_range="[0, 0.5]", reads_reference=False)
def _cpo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """CPO's preference term (arXiv:2401.08417, eq. 3), on summed log-probs:
    ℓ = −(1−ε)·log σ(β·(log π(y_w) − log π(y_l))) − ε·log σ(−β·(…)).

    The full CPO loss is `["cpo", "sft"]` with weights `[1, cpo_alpha]` (TRL's CPOTrainer with
    loss_type="sigmoid": its NLL is the per-token cross-entropy of the chosen responses).
    """
    return smoothed_sigmoid(
        hp.beta * (pairs.policy_chosen - pairs.policy_rejected), hp.label_smoothing
    )


@register("orpo", needs_lengths=True, reads_reference=False)
def _orpo(pairs: Pairs, hp: Hyper) -> jax.Array:
    """ORPO's odds-ratio term (arXiv:2403.07691, eqs. 4 and 7), β = the paper's λ:
    log odds(y) = a − log(1 − e^a);  ℓ = −β·log σ(log odds(y_w) − log odds(y_l)).

    The full ORPO loss is `["sft", "orpo"]` (TRL's ORPOTrainer: NLL per chosen token minus
    β·mean log σ(log odds ratio)). log(1 − e^a) is computed stably on both sides of −ln 2.
    """
    # At a = 0 (p = 1, as in padding slots) the odds are infinite and log(1 − e^a) = −inf: cap a
    # at −(machine ε), which changes nothing for p < 1 − 1e-7, and keep padding slots finite.
    cap = -jnp.finfo(pairs.policy_chosen.dtype).eps
    chosen = jnp.minimum(pairs.policy_chosen / pairs.chosen_lengths, cap)
    rejected = jnp.minimum(pairs.policy_rejected / pairs.rejected_lengths, cap)
    chosen, rejected = (jnp.where(pairs.mask, side, -1.0) for side in (chosen, rejected))
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -hp.beta * jax.nn.log_sigmoid(log_odds)


@register("kto")
def _kto(pairs: Pairs, hp: Hyper) -> jax.Array:
    """KTO (arXiv:2402.01306, eq. 7) on unpaired completions, TRL's KTOTrainer form.

    Each "pair" holds one completion y of prompt x (the chosen slot) and a mismatched completion
    y' of another prompt scored under x (the rejected slot, for the reference point). With
    Δ = log π(y|x) − log π_ref(y|x) and z₀ = max(0, mean_batch(log π(y'|x) − log π_ref(y'|x)))
    (no gradient):
        desirable (label True):    ℓ = λ_D·(1 − σ(β·(Δ − z₀)))
        undesirable (label False): ℓ = λ_U·(1 − σ(β·(z₀ − Δ)))
    with λ_D = desirable_weight, λ_U = undesirable_weight; the loss is the mean over completions.
    """
    logits = hp.beta * (pairs.chosen_logratios - hp.kto_z0)
    desirable = hp.desirable_weight * (1.0 - jax.nn.sigmoid(logits))
    undesirable = hp.undesirable_weight * (1.0 - jax.nn.sigmoid(-logits))
    return jnp.where(pairs.labels, desirable, undesirable)
