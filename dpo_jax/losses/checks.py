"""Argument checks of dpo_loss_fn: static values and shapes only, so they run at trace time."""

import numbers
from collections.abc import Sequence

import jax.numpy as jnp

from .core import F_DIVERGENCE_TYPES, INTERVALS, LOSS_ALIASES, LOSS_VARIANTS

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
    for arg_name in ("pair_mask", "kto_labels"):
        value = inputs[arg_name]
        if value is not None and jnp.result_type(value) != jnp.bool_:
            raise ValueError(f"{arg_name} must be a bool array, got dtype {jnp.result_type(value)}")
    if ("kto" in names) != (inputs["kto_labels"] is not None):
        raise ValueError(
            "loss_type 'kto' needs kto_labels (bool, True = desirable), and only kto reads them "
            f"(loss_type={list(names)}, kto_labels given: {inputs['kto_labels'] is not None})"
        )
