"""The loss registry and what every variant reads: flat per-pair arrays and scalar settings."""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

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
    """

    fn: Callable[[Pairs, Hyper], jax.Array]
    label_smoothing_range: str | None
    needs_lengths: bool
    reads_reference: bool
    uses_scores: bool


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
):
    """Decorator adding a per-pair loss function to LOSS_VARIANTS under `name`."""

    def add(fn):
        LOSS_VARIANTS[name] = Variant(
            fn, label_smoothing_range, needs_lengths, reads_reference, uses_scores
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
