"""DPO-family preference losses on sequence log-probs: pure jax.numpy, no model, no config.

Every loss reads four summed log-probs per preference pair (policy and reference, chosen y_w and
rejected y_l) and returns a scalar; a variant that needs more of each pair (token counts, the
unlikelihood sum of y_l's tokens) declares it in the registry and reads it as one more [P]
array. Notation used in every docstring, per pair i:

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

Sections, in order: the registry, Pairs and f-divergence scores; TRL's DPOTrainer family;
the reference-free objectives (sft, simpo, cpo, orpo, unlikelihood; kto); LD-DPO, WPO and
unlikelihood sums from per-token log-probs; the argument checks; `dpo_loss_fn`. One module, so
that it imports jax alone and can be copied into another project as it is.
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

# -------------------------------------------------------------- the registry, Pairs, shared pieces
# The loss registry and what every variant reads: flat per-pair arrays and scalar settings.

# f-divergences whose f'(π/π_ref) replaces the log-ratio in the margin (arXiv:2309.16240).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp(x) for x <= 80 stays below float32's and bfloat16's largest value (3.4e38) with room for
# the differences and products that follow; TRL 1.16 clamps alpha_divergence's exponent here too.
_MAX_EXPONENT = 80.0


class Pairs(NamedTuple):
    """What every variant reads: flat [P] arrays, padding slots replaced by neutral values."""

    policy_chosen: jax.Array  # [P] float
    policy_rejected: jax.Array  # [P] float
    ref_chosen: jax.Array  # [P] float, zeros when reference-free
    ref_rejected: jax.Array  # [P] float, zeros when reference-free
    chosen_scores: jax.Array  # [P] float, f'(π/π_ref) of the chosen side (the log-ratio for KL)
    rejected_scores: jax.Array  # [P] float, likewise for the rejected side
    chosen_lengths: jax.Array | None  # [P] float, >= 1
    rejected_lengths: jax.Array | None  # [P] float, >= 1
    rejected_unlikelihoods: jax.Array | None  # [P] float, Σ_t log(1 − π(y_l,t)), <= 0
    labels: jax.Array | None  # [P] bool, KTO: True where the completion is desirable
    mask: jax.Array  # [P] bool, True on real pairs

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> jax.Array:
        """δ = Δc − Δr, the DPO margin on log-ratios (no f-divergence)."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def score_margin(self) -> jax.Array:
        """f'-score margin: δ itself for reverse_kl (the default)."""
        return self.chosen_scores - self.rejected_scores


class Hyper(NamedTuple):
    """Scalar settings a variant may read (floats may be traced; strings are static)."""

    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    bco_delta: jax.Array | float  # running mean reward δ₀ (bco_pair with the shift, else 0)
    kto_z0: jax.Array | float  # KTO's reference point z₀ (kto only, else 0)
    desirable_weight: float  # KTO λ_D
    undesirable_weight: float  # KTO λ_U
    ipo_form: str  # "per_token" or "summed"
    sft_form: str  # "per_token" or "per_sequence"
    sigmoid_label_smoothing: str  # "cdpo" or "ignore"
    unlikelihood_alpha: float  # α >= 0 of unlikelihood's y_l term


class Variant(NamedTuple):
    """A registered loss: its per-pair function and what it requires of the arguments.

    Attributes:
      fn: (Pairs, Hyper) -> [P] per-pair loss.
      label_smoothing_range: the interval ε must lie in ("[0, 0.5]", "[0, 0.5)", "(0, 0.5]"), or
        None when the variant does not read ε.
      needs_lengths: whether the variant always reads the response token counts.
      reads_reference: False for the reference-free objectives (simpo, cpo, orpo, sft): they never
        read π_ref, so a caller need not hold reference params for them.
      uses_scores: whether an f-divergence changes the variant (it reads `score_margin`), as
        TRL 1.16 applies `f_divergence_type` to the same variants.
      per_pair_inputs: the optional per-pair arrays of `dpo_loss_fn` (beyond the log-probs and
        lengths) the variant always reads, by argument name ("rejected_unlikelihoods", built from
        per-token log-probs by `sequence_log_unlikelihoods`); a missing one is an error.
    """

    fn: Callable[[Pairs, Hyper], jax.Array]
    label_smoothing_range: str | None
    needs_lengths: bool
    reads_reference: bool
    uses_scores: bool
    per_pair_inputs: tuple[str, ...] = ()


LOSS_VARIANTS: dict[str, Variant] = {}
# Old names kept working: name -> the registered name it stands for.
LOSS_ALIASES = {"aot_pair": "aot_unpaired"}

# (low, high, low inclusive, high inclusive) for each interval named in the registry.
INTERVALS = {
    "[0, 0.5]": (0.0, 0.5, True, True),
    "[0, 0.5)": (0.0, 0.5, True, False),
    "(0, 0.5]": (0.0, 0.5, False, True),
}


def register(
    name: str,
    label_smoothing_range: str | None = None,
    *,
    needs_lengths: bool = False,
    reads_reference: bool = True,
    uses_scores: bool = False,
    per_pair_inputs: tuple[str, ...] = (),
):
    """Decorator adding a per-pair loss function to LOSS_VARIANTS under `name`."""

    def add(fn):
        LOSS_VARIANTS[name] = Variant(
            fn, label_smoothing_range, needs_lengths, reads_reference, uses_scores, per_pair_inputs
        )
        return fn

    return add


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` [P] over `mask` [P]; 0 when no entry is valid (an all-padding batch)."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def smoothed_sigmoid(logits: jax.Array, label_smoothing) -> jax.Array:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the cDPO loss, the DPO loss when ε = 0."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * (
        jax.nn.log_sigmoid(-logits)
    )


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − e^x) for x < 0, accurate on both sides of −ln 2 (Mächler 2012)."""
    near_zero = x > -math.log(2.0)
    safe_near = jnp.where(near_zero, x, -1.0)  # keeps the unused branch finite for the gradient
    safe_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(safe_near)), jnp.log1p(-jnp.exp(safe_far)))


def f_divergence_scores(logratios: jax.Array, f_divergence_type: str, alpha) -> jax.Array:
    """f'(t) at t = π/π_ref = exp(log-ratio): the score the margin is built from (arXiv:2309.16240).

    reverse_kl: log t (plain DPO); forward_kl: 1 − 1/t; js_divergence: log(2t/(1+t)) =
    log 2 + log σ(log t); alpha_divergence: (t^(α−1) − 1)/(α − 1), i.e. log t when |α − 1| < 1e-6
    (TRL 1.16's rule). Overflow-safe in float32 and bfloat16: the exponents are clamped at 80 (so
    1/t for t < e^−80 and t^(α−1) above e^80 saturate at e^80 instead of reaching inf; the clamp
    has zero gradient) and computed with expm1, in the inputs' float32 (or wider) dtype.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -jnp.expm1(jnp.minimum(-logratios, _MAX_EXPONENT))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = jnp.minimum((alpha - 1.0) * logratios, _MAX_EXPONENT)
    return jnp.expm1(exponent) / (alpha - 1.0)


# ------------------------------------------------------------------------- TRL's DPOTrainer family
# The paired DPO family of TRL 1.16's DPOTrainer, one short per-pair function each.


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


# ----------------------------------------------------------------------- reference-free objectives
# Objectives that read the policy only (SFT, SimPO, CPO, ORPO), and KTO on unpaired completions.


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


@register("unlikelihood", reads_reference=False, per_pair_inputs=("rejected_unlikelihoods",))
def _unlikelihood(pairs: Pairs, hp: Hyper) -> jax.Array:
    """Unlikelihood training (Welleck et al. 2019, arXiv:1908.04319), the DPO paper's
    baseline (arXiv:2305.18290, §6): likelihood on y_w, unlikelihood on every token of y_l,

        ℓ = −log π(y_w|x) − α·Σ_{t=1}^{|y_l|} log(1 − π(y_l,t | x, y_l,<t)),

    α = unlikelihood_alpha.

    Both terms are sums over a response's scored tokens, not means (the module's convention); the
    loss is their mean over pairs. The sum of the second term is the `rejected_unlikelihoods`
    input, built by `sequence_log_unlikelihoods`, where each token's 1 − π is floored at
    UNLIKELIHOOD_FLOOR (1e-5), so a certain token costs at most 11.5 nats. Reads no reference.
    The DPO paper puts an optional α in [0, 1] on the unlikelihood term; any α >= 0 is accepted.
    """
    return -pairs.policy_chosen - hp.unlikelihood_alpha * pairs.rejected_unlikelihoods


# ----------------------------------------------------------------------------- LD-DPO and WPO sums
# Sequence log-probs from per-token ones for LD-DPO and WPO: pure jax.numpy on [B, 2, T] arrays.


def _slot_positions(scored: jax.Array, segment_ids: jax.Array, num_segments: int):
    """[B, 2, T, S] bool in-slot masks and [B, 2, T, S] 1-based positions among scored tokens."""
    slots = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)[None, None, None, :]
    in_slot = (segment_ids[..., None] == slots) & scored[..., None]  # [B, 2, T, S]
    positions = jnp.cumsum(in_slot.astype(jnp.int32), axis=2)  # [B, 2, T, S]
    return in_slot, positions


def check_ld_alpha(ld_alpha) -> None:
    """Raises ValueError unless ld_alpha is None or a number in [0, 1]."""
    if ld_alpha is not None and not (isinstance(ld_alpha, numbers.Real) and 0 <= ld_alpha <= 1):
        raise ValueError(f"ld_alpha={ld_alpha!r} must be None or in [0, 1]")


def ld_sequence_logps(
    token_logps: jax.Array,
    scored: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    ld_alpha: float,
) -> jax.Array:
    """LD-DPO's length-desensitised sums (arXiv:2409.06411, eq. 9), TRL 1.16's `ld_alpha`.

    For a pair whose responses have l_w and l_l scored tokens and l_s = min(l_w, l_l), each side's
    log-prob is Σ_{t ≤ l_s} log p(y_t) + α·Σ_{t > l_s} log p(y_t): the tokens past the shorter
    response count with weight α (1 gives the plain sum, 0 keeps the shared length only). Apply it
    to the policy and the reference alike.

    Args:
      token_logps: [B, 2, T] float per-token log-probs (0 where unscored), as `LogProbs`.
      scored: [B, 2, T] bool, True on the scored response tokens (the shifted target mask).
      segment_ids: [B, 2, T] int32, 0 on padding, k >= 1 for the k-th packed pair of the row.
      num_segments: S, pair slots per row.
      ld_alpha: α in [0, 1].

    Returns:
      [B, 2, S] float32 sums (0 in empty slots).

    Raises:
      ValueError: ld_alpha outside [0, 1], or shapes that are not all [B, 2, T].
    """
    check_ld_alpha(ld_alpha)
    if not (token_logps.shape == scored.shape == segment_ids.shape and token_logps.ndim == 3):
        raise ValueError(
            f"ld_sequence_logps: token_logps {token_logps.shape}, scored {scored.shape} and "
            f"segment_ids {segment_ids.shape} must all be [B, 2, T]"
        )
    in_slot, positions = _slot_positions(scored, segment_ids, num_segments)
    lengths = positions[:, :, -1, :]  # [B, 2, S]
    shared = jnp.minimum(lengths[:, 0], lengths[:, 1])[:, None, None, :]  # [B, 1, 1, S]
    weight = jnp.where(positions <= shared, 1.0, ld_alpha)  # [B, 2, T, S]
    values = token_logps.astype(jnp.float32)[..., None]  # [B, 2, T, 1]
    return jnp.sum(jnp.where(in_slot, weight * values, 0.0), axis=2)  # [B, 2, S]


def wpo_log_weights(
    token_logps: jax.Array,
    token_log_sum_sq: jax.Array,
    scored: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
) -> jax.Array:
    """WPO's per-sequence log weight (arXiv:2406.11827, eq. 2, TRL's `use_weighting`), no gradient.

    w = mean over the scored tokens of log p(y_t) − log Σ_v p_t(v)², the log-prob of y_t under the
    policy's distribution "aligned" by its own collision probability. exp(w_c + w_r) then
    multiplies the pair's loss (`dpo_loss_fn(wpo_log_weights=...)`).

    Args:
      token_logps: [B, 2, T] float log p(y_t) at each scored token position (0 elsewhere).
      token_log_sum_sq: [B, 2, T] float log Σ_v p_t(v)² of the distribution that scored y_t, at
        the same positions.
      scored: as in `ld_sequence_logps`.
      segment_ids: as in `ld_sequence_logps`.
      num_segments: as in `ld_sequence_logps`.

    Returns:
      [B, 2, S] float32 log weights (0 in empty slots).
    """
    in_slot, positions = _slot_positions(scored, segment_ids, num_segments)
    aligned = jax.lax.stop_gradient(token_logps - token_log_sum_sq).astype(jnp.float32)
    sums = jnp.sum(jnp.where(in_slot, aligned[..., None], 0.0), axis=2)  # [B, 2, S]
    lengths = jnp.maximum(positions[:, :, -1, :], 1)  # [B, 2, S]
    return sums / lengths


UNLIKELIHOOD_FLOOR = 1e-5  # 1 − π(y_t) is floored here: log(1 − π) >= log 1e-5 ≈ −11.5


def sequence_log_unlikelihoods(
    token_logps: jax.Array, scored: jax.Array, segment_ids: jax.Array, num_segments: int
) -> jax.Array:
    """Σ over each response's scored tokens of log(1 − π(y_t)): unlikelihood's y_l term.

    Each token's 1 − π(y_t) = 1 − e^(log π(y_t)) is computed as log1mexp (accurate for π near 0
    and near 1) and floored at UNLIKELIHOOD_FLOOR: a token the policy is sure of then contributes
    log 1e-5 with zero gradient, instead of −inf, or a gradient of −π/(1 − π) that grows without
    bound. Unscored positions (prompt, padding, other segments' tokens) contribute nothing, and
    whatever they hold (log π = 0 there) reaches neither the sum nor its gradient.

    Args:
      token_logps: [B, 2, T] float per-token log-probs (0 where unscored), as `LogProbs`.
      scored: as in `ld_sequence_logps`.
      segment_ids: as in `ld_sequence_logps`.
      num_segments: as in `ld_sequence_logps`.

    Returns:
      [B, 2, S] float32 sums, <= 0 (0 in empty slots); dpo_loss_fn reads the rejected side.
    """
    in_slot, _ = _slot_positions(scored, segment_ids, num_segments)  # [B, 2, T, S]
    logps = jnp.where(scored, token_logps.astype(jnp.float32), -1.0)  # [B, 2, T]
    # The floor as a cap on log π, so log1mexp never sees 0 (−inf, and a NaN gradient).
    log_unlikely = log1mexp(jnp.minimum(logps, math.log1p(-UNLIKELIHOOD_FLOOR)))  # [B, 2, T]
    return jnp.sum(jnp.where(in_slot, log_unlikely[..., None], 0.0), axis=2)  # [B, 2, S]


# --------------------------------------------------------------------------------- argument checks
# Argument checks of dpo_loss_fn: static values and shapes only, so they run at trace time.

IPO_FORMS = ("per_token", "summed")
SFT_FORMS = ("per_token", "per_sequence")
SIGMOID_LABEL_SMOOTHING = ("cdpo", "ignore")
BCO_REWARD_SHIFTS = ("running_mean", "none")


def known_names() -> list[str]:
    return sorted({*LOSS_VARIANTS, *LOSS_ALIASES})


def as_loss_names(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """The registered names of `loss_type` (aliases resolved), checked."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError(f"loss_type={loss_type!r} is empty; known: {known_names()}")
    for name in names:
        if name not in LOSS_VARIANTS and name not in LOSS_ALIASES:
            raise ValueError(f"unknown loss_type {name!r}; known: {known_names()}")
    names = tuple(LOSS_ALIASES.get(name, name) for name in names)
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type={list(names)} names a loss twice; give it one weight instead")
    if "kto" in names and len(names) > 1:
        raise ValueError(
            f"loss_type={list(names)}: 'kto' reads unpaired completions and cannot be combined"
        )
    return names


def as_loss_weights(names: tuple[str, ...], loss_weights) -> tuple:
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
    low, high, low_closed, high_closed = INTERVALS[interval]
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def check_choices(**choices) -> None:
    """Each keyword is a string setting; its allowed values are the module constant for it."""
    allowed = dict(
        ipo_form=IPO_FORMS,
        sft_form=SFT_FORMS,
        sigmoid_label_smoothing=SIGMOID_LABEL_SMOOTHING,
        bco_reward_shift=BCO_REWARD_SHIFTS,
        f_divergence_type=F_DIVERGENCE_TYPES,
    )
    for name, value in choices.items():
        if value not in allowed[name]:
            raise ValueError(f"{name}={value!r} is not one of {allowed[name]}")


def check_hyper(names, beta, label_smoothing, discopop_tau, sigmoid_label_smoothing) -> None:
    """Checks the scalars that are static Python numbers; traced values pass through unchecked."""
    if isinstance(beta, numbers.Real) and not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if isinstance(discopop_tau, numbers.Real) and not discopop_tau > 0:
        raise ValueError(f"discopop_tau={discopop_tau} must be > 0")
    if not isinstance(label_smoothing, numbers.Real):
        return
    ranges = {name: LOSS_VARIANTS[name].label_smoothing_range for name in names}
    if sigmoid_label_smoothing == "ignore":  # TRL 1.16: sigmoid and sigmoid_norm never read ε
        ranges.update({name: None for name in ("sigmoid", "sigmoid_norm") if name in ranges})
    if label_smoothing != 0 and all(interval is None for interval in ranges.values()):
        raise ValueError(
            f"label_smoothing={label_smoothing} is not used by loss_type={list(names)}"
            + (" (sigmoid_label_smoothing='ignore')" if sigmoid_label_smoothing == "ignore" else "")
        )
    for name, interval in ranges.items():
        if interval is not None and not _in_interval(label_smoothing, interval):
            raise ValueError(
                f"label_smoothing={label_smoothing} must be in {interval} for loss_type {name!r}"
            )


def check_f_divergence(names, f_divergence_type: str, alpha) -> None:
    """Only the variants built on the chosen − rejected score margin (and sft beside them) take an
    f-divergence: for the others the f-DPO reparameterisation leaves a β·log Z(x) term that does
    not cancel (TRL 1.16 raises likewise)."""
    if f_divergence_type == "reverse_kl":
        return
    unsupported = [n for n in names if not LOSS_VARIANTS[n].uses_scores and n != "sft"]
    if unsupported or names == ("sft",):
        users = sorted(name for name, variant in LOSS_VARIANTS.items() if variant.uses_scores)
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is not used by loss_type={list(names)} "
            f"(it applies to {users}, with 'sft' beside them)"
        )
    if f_divergence_type == "alpha_divergence" and isinstance(alpha, numbers.Real):
        if not alpha > 0:
            raise ValueError(f"f_alpha_divergence_coef={alpha} must be > 0")


def check_unlikelihood_alpha(names, alpha) -> None:
    if "unlikelihood" in names and isinstance(alpha, numbers.Real) and not alpha >= 0:
        raise ValueError(f"unlikelihood_alpha={alpha} must be >= 0 for loss_type 'unlikelihood'")


def check_kto_weights(names, desirable_weight, undesirable_weight) -> None:
    if "kto" not in names:
        return
    for name, value in (
        ("desirable_weight", desirable_weight),
        ("undesirable_weight", undesirable_weight),
    ):
        if isinstance(value, numbers.Real) and not value > 0:
            raise ValueError(f"{name}={value} must be > 0 for loss_type 'kto'")


def check_weighting(names, wpo_log_weights) -> None:
    if wpo_log_weights is not None and ({"aot", "aot_unpaired", "kto"} & set(names)):
        raise ValueError(
            f"wpo_log_weights with loss_type={list(names)}: aot and aot_unpaired sort the pairs "
            "(a per-pair weight would meet another pair's loss) and kto is unpaired"
        )


def check_shapes(named_arrays: dict) -> tuple[int, ...]:
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


def names_needing_lengths(names, ipo_form: str, sft_form: str) -> list[str]:
    """The listed variants that read response token counts under the chosen forms."""
    needing = [name for name in names if LOSS_VARIANTS[name].needs_lengths]
    if "ipo" in names and ipo_form == "per_token":
        needing.append("ipo")
    if "sft" in names and sft_form == "per_token":
        needing.append("sft")
    return needing


def check_optional_inputs(names, inputs: dict, needing: list[str]) -> None:
    """Reference pair given together, lengths where needed, bool masks and labels."""
    ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    for given, missing, value in (
        ("ref_chosen_logps", "ref_rejected_logps", ref_rejected),
        ("ref_rejected_logps", "ref_chosen_logps", ref_chosen),
    ):
        if value is None and (ref_chosen is not None or ref_rejected is not None):
            raise ValueError(f"{given} is given but {missing} is None; pass both or neither")
    for arg_name in ("chosen_lengths", "rejected_lengths"):
        if needing and inputs[arg_name] is None:
            raise ValueError(
                f"{arg_name}=None but loss_type {needing[0]!r} needs chosen_lengths and "
                "rejected_lengths (response token counts per pair)"
            )
    for name in names:
        for arg_name in LOSS_VARIANTS[name].per_pair_inputs:
            if inputs[arg_name] is None:
                raise ValueError(f"{arg_name}=None but loss_type {name!r} needs it ([P] per pair)")
    for arg_name in ("pair_mask", "kto_labels"):
        value = inputs[arg_name]
        if value is not None and jnp.result_type(value) != jnp.bool_:
            raise ValueError(f"{arg_name} must be a bool array, got dtype {jnp.result_type(value)}")
    if ("kto" in names) != (inputs["kto_labels"] is not None):
        raise ValueError(
            "loss_type 'kto' needs kto_labels (bool, True = desirable), and only kto reads them "
            f"(loss_type={list(names)}, kto_labels given: {inputs['kto_labels'] is not None})"
        )


# ------------------------------------------------------------------------------------- dpo_loss_fn
# dpo_loss_fn: the preference loss of a batch from summed log-probs, in TRL's argument order.


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
        rejected_unlikelihoods=flat("rejected_unlikelihoods", 0.0),
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
    rejected_unlikelihoods: jax.Array | None = None,
    unlikelihood_alpha: float = 1.0,
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
      ref_chosen_logps: [P] float, log π_ref(y_w|x), given with ref_rejected_logps or not at
        all: None, or `reference_free=True`, takes them as 0.
      ref_rejected_logps: [P] float, log π_ref(y_l|x), as ref_chosen_logps.
      beta: β > 0, the KL-penalty strength (IPO's τ, ORPO's λ); a static float is validated.
      loss_type: a name in `LOSS_VARIANTS` (or an alias in `LOSS_ALIASES`) or distinct names.
      label_smoothing: ε for the variants that read it: sigmoid and sigmoid_norm (cDPO, see
        sigmoid_label_smoothing), aot, aot_unpaired, simpo, cpo in [0, 0.5]; robust in [0, 0.5);
        exo_pair in (0, 0.5] (0 is an error). A non-zero ε no listed variant reads is an error.
      loss_weights: one weight per `loss_type` name; None means all 1 (TRL's `loss_weights`).
      reference_free: if True, ignore the reference log-probs (take them as 0).
      chosen_lengths: [P] response token counts (clamped to >= 1), needed by simpo,
        sigmoid_norm, orpo, ipo with ipo_form="per_token" and sft with sft_form="per_token".
      rejected_lengths: [P] the same, of the rejected responses.
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
      desirable_weight: KTO's λ_D.
      undesirable_weight: KTO's λ_U.
      wpo_log_weights: WPO (arXiv:2406.11827): ([P], [P]) per-sequence log weights of the chosen
        and rejected sides, each the mean over its tokens of log p(y_t) − log Σ_v p(v)²; every
        per-pair loss is multiplied by exp(w_c + w_r) without gradient. None: no weighting.
      rejected_unlikelihoods: [P] float, unlikelihood only: Σ_t log(1 − π(y_l,t | x, y_l,<t))
        over the rejected response's tokens (`sequence_log_unlikelihoods`, rejected side).
      unlikelihood_alpha: α >= 0, the weight of unlikelihood's rejected term.

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
      ValueError: naming the argument, for a loss name unknown or repeated, a setting unknown or
        out of its range (β, ε, α, τ, the KTO weights, the `loss_weights` length), an option the
        chosen variants do not read (an f-divergence, WPO weights with aot or kto, bco state
        without the bco shift), mismatched shapes, a non-bool mask or label, or an input a chosen
        variant needs and lacks (lengths, one reference array without the other, kto_labels,
        rejected_unlikelihoods). The checks read static values and shapes, so the function jits.
    """
    names = as_loss_names(loss_type)
    weights = as_loss_weights(names, loss_weights)
    check_choices(
        ipo_form=ipo_form, sft_form=sft_form, sigmoid_label_smoothing=sigmoid_label_smoothing,
        bco_reward_shift=bco_reward_shift, f_divergence_type=f_divergence_type,
    )  # fmt: skip
    check_hyper(names, beta, label_smoothing, discopop_tau, sigmoid_label_smoothing)
    check_unlikelihood_alpha(names, unlikelihood_alpha)
    check_f_divergence(names, f_divergence_type, f_alpha_divergence_coef)
    check_weighting(names, wpo_log_weights)
    check_kto_weights(names, desirable_weight, undesirable_weight)
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_mask=pair_mask,
        kto_labels=kto_labels,
        rejected_unlikelihoods=rejected_unlikelihoods,
    )
    if wpo_log_weights is not None:
        inputs.update(wpo_chosen=wpo_log_weights[0], wpo_rejected=wpo_log_weights[1])
    check_shapes(inputs)
    check_optional_inputs(names, inputs, names_needing_lengths(names, ipo_form, sft_form))
    pairs = _build_pairs(inputs, reference_free, f_divergence_type, f_alpha_divergence_coef)

    metrics, bco_delta = _bco_state(
        names, pairs, beta, bco_reward_shift, bco_running_mean, bco_running_count
    )
    kto_z0 = _kto_reference_point(names, pairs)
    hyper = Hyper(
        beta, label_smoothing, discopop_tau, simpo_gamma, bco_delta, kto_z0,
        desirable_weight, undesirable_weight, ipo_form, sft_form, sigmoid_label_smoothing,
        unlikelihood_alpha,
    )  # fmt: skip

    loss, loss_metrics = _weighted_sum(names, weights, pairs, hyper, wpo_log_weights)
    pair_metrics = (
        _kto_metrics(pairs, beta, kto_z0) if "kto" in names else _reward_metrics(pairs, beta)
    )
    return loss, {**metrics, **loss_metrics, **pair_metrics}


def _weighted_sum(names, weights, pairs, hyper, wpo_log_weights):
    """Σ_k w_k · (masked mean of variant k's per-pair loss), and `loss/<name>`, `loss` metrics."""
    loss, metrics = 0.0, {}
    for name, weight in zip(names, weights, strict=True):
        per_pair = _apply_weighting(LOSS_VARIANTS[name].fn(pairs, hyper), pairs, wpo_log_weights)
        component = masked_mean(per_pair, pairs.mask)
        metrics[f"loss/{name}"] = jax.lax.stop_gradient(component)
        loss = loss + weight * component
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_ALIASES",
    "LOSS_VARIANTS",
    "Variant",
    "check_ld_alpha",
    "dpo_loss_fn",
    "ld_sequence_logps",
    "sequence_log_unlikelihoods",
    "wpo_log_weights",
]
