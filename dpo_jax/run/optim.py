"""The optax optimizer: AdamW or RMSprop, warmup + decay schedule, global-norm clipping.

Gradient accumulation is not here: the step scans over micro-batches and makes one optimizer
update per batch (see `dpo_jax.step`), so the optimizer, its state and the schedule count
optimizer steps only.
"""

import re

import jax
import optax

from dpo_jax import lora

OPTIMIZERS = ("adamw", "rmsprop")
DECAYS = ("constant", "cosine", "linear")


def make_schedule(
    learning_rate: float, *, warmup_steps: int, decay: str, total_steps: int, final_fraction: float
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay` to the end.

    Args:
      learning_rate: the peak rate, > 0.
      warmup_steps: optimizer steps of linear warmup, >= 0 (the DPO paper: 150).
      decay: "constant" (stay at the peak), "cosine" or "linear" (from the peak to
        `final_fraction * learning_rate` at `total_steps`).
      total_steps: optimizer steps of the whole run, >= warmup_steps.
      final_fraction: the end rate as a fraction of the peak, in [0, 1].

    Returns:
      step -> learning rate.

    Raises:
      ValueError: on an unknown decay or out-of-range numbers.
    """
    if decay not in DECAYS:
        raise ValueError(f"optimizer.decay={decay!r} is unknown; known: {DECAYS}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be > 0")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"optimizer.final_fraction={final_fraction} must be in [0, 1]")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "constant":
        after = optax.constant_schedule(learning_rate)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
    else:
        after = optax.linear_schedule(learning_rate, learning_rate * final_fraction, decay_steps)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    name: str,
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    rmsprop_decay: float,
    max_grad_norm: float | None,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or RMSprop with `schedule` as the learning rate.

    Args:
      name: "adamw" or "rmsprop" (the DPO paper's choice).
      schedule: step -> learning rate (`make_schedule`).
      weight_decay: AdamW's decoupled weight decay; must be 0 for RMSprop.
      b1, b2, eps: AdamW's moment decays and epsilon (eps is RMSprop's too).
      rmsprop_decay: RMSprop's squared-gradient decay.
      max_grad_norm: clip the global gradient norm to this; None or 0: no clipping.

    Returns:
      An optax GradientTransformation (the step reports `schedule(step)` as `learning_rate`).

    Raises:
      ValueError: on an unknown name, a decay outside [0, 1), eps <= 0, or a weight decay
        given to RMSprop.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is unknown; known: {OPTIMIZERS}")
    for field, value in (("b1", b1), ("b2", b2), ("rmsprop_decay", rmsprop_decay)):
        if not 0 <= value < 1:
            raise ValueError(f"optimizer.{field}={value} must be in [0, 1)")
    if not eps > 0:
        raise ValueError(f"optimizer.eps={eps} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0")
    if name == "adamw":
        base = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        if weight_decay:
            raise ValueError(
                f"optimizer.weight_decay={weight_decay} is not applied by rmsprop; set it to 0"
            )
        # eps outside the square root, g / (sqrt(nu) + eps): torch.optim.RMSprop's form, the
        # optimizer of the DPO paper's code (optax's default puts eps inside the root).
        base = optax.rmsprop(schedule, decay=rmsprop_decay, eps=eps, eps_in_sqrt=False)
    if not max_grad_norm:
        return base
    if max_grad_norm < 0:
        raise ValueError(f"optimizer.max_grad_norm={max_grad_norm} must be >= 0")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), base)


def only_trainable(
    tx: optax.GradientTransformation, patterns: tuple[str, ...]
) -> optax.GradientTransformation:
    """`tx` on the params whose path ("layers/attn/q_kernel") matches one of `patterns`; every
    other param frozen: zero updates and no optimizer state, by `optax.partition`.

    The layers are stacked on one leading axis, so a pattern picks a kind of kernel in every
    layer; a subset of the layers is not a subset of leaves. With LoRA the paths are the
    adapters' ("layers/attn/q_kernel/lora_a"). No patterns: `tx` on everything.

    Raises (when the optimizer state is built, as the first params are seen):
      ValueError: a pattern that matches no param (the message lists them).
    """
    if not patterns:
        return tx

    # Params are nested dicts; anything else is a leaf (optax.tree_map_params passes
    # placeholders that are empty pytrees, which must be labelled too).
    not_dict = lambda x: not isinstance(x, dict)

    def labels(params):
        leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=not_dict)
        names = [lora.path_name(path) for path, _ in leaves]
        for pattern in patterns:
            if not any(re.search(pattern, name) for name in names):
                raise ValueError(
                    f"config.optimizer.trainable: {pattern!r} matches no param; params: "
                    f"{', '.join(names)}"
                )

        def label(path, _):
            name = lora.path_name(path)
            return "trained" if any(re.search(p, name) for p in patterns) else "frozen"

        return jax.tree_util.tree_map_with_path(label, params, is_leaf=not_dict)

    return optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)
