"""DPO-family preference losses on sequence log-probs: pure jax.numpy, no model, no config.

Every loss reads four summed log-probs per preference pair (policy and reference, chosen y_w and
rejected y_l) and returns a scalar. Notation used in every docstring, per pair i:

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

Modules: `core` (the registry, Pairs, f-divergence scores), `pairwise` (TRL's DPOTrainer family),
`reference_free` (sft, simpo, cpo, orpo; kto), `checks`, `api` (`dpo_loss_fn`), `token_level`
(LD-DPO and WPO sums from per-token log-probs).
"""

from . import pairwise, reference_free  # noqa: F401  (they fill LOSS_VARIANTS)
from .api import dpo_loss_fn
from .core import F_DIVERGENCE_TYPES, LOSS_ALIASES, LOSS_VARIANTS, Variant
from .token_level import check_ld_alpha, ld_sequence_logps, wpo_log_weights

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_ALIASES",
    "LOSS_VARIANTS",
    "Variant",
    "check_ld_alpha",
    "dpo_loss_fn",
    "ld_sequence_logps",
    "wpo_log_weights",
]
