"""The reference model π_ref as one small value of a few kinds, and the functions that read it.

DPO scores the policy against a reference. Where the reference lives, what it costs, and how its
log-probs are made differ by kind; the step and the loop never ask which kind they hold, they
call the functions below, which dispatch on it:

- `FrozenReference`: log-probs from a forward of its frozen params inside the step. Holds one
  param copy (an argument of the step: never donated, never checkpointed).
- `PrecomputedReference`: log-probs carried in `batch["ref_logps"]`, made in one pass before
  training. Holds no params: the pass's params are released once it is done.
- `MovingReference` (TR-DPO): log-probs from a forward of `TrainState.reference_params`, which
  are mixed towards the policy every N steps. Holds one param copy, in the state (donated and
  checkpointed with it).
- `PrecomputedReference(cache=path)`, the "cached" kind: the same, with the table read from or
  written to a file keyed by a fingerprint of everything the log-probs depend on.
- `NoReference`: log π_ref taken as 0 (SimPO, SFT, reference-free DPO). Holds nothing.
- `AdaptersOffReference` (LoRA): the base model with its adapters switched off. It holds the
  one copy of the base params; the policy is that base plus the low-rank adapters the state
  trains (`dpo_jax.lora`), so no second copy of the base exists.

What the state trains is the reference's business too: `trainable_init` makes the state's
params from the model the stage starts from (the model itself, or fresh adapters), and
`policy_params` turns the state's params back into the model's (the identity, or base +
adapters merged). A new kind is a new class here and a new case in each function below;
nothing in the step or the loop changes.

The kind is a pytree node type, so it is static under `jax.jit`: each kind traces its own step,
and the dispatch costs nothing at run time.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dpo_jax import lora


@flax.struct.dataclass
class FrozenReference:
    """A fixed reference: its params are an argument of the step, under `stop_gradient`.

    Attributes:
      params: the reference params (a nested dict of arrays, sharded like the policy's).
    """

    params: Any


@flax.struct.dataclass
class PrecomputedReference:
    """Reference log-probs computed once before training and carried in each batch.

    Attributes:
      cache: the file they were read from or written to (`dpo_jax.run.ref_cache`, the "cached"
        kind), or "" when they were computed for this run only.
    """

    cache: str = flax.struct.field(pytree_node=False, default="")


@flax.struct.dataclass
class MovingReference:
    """TR-DPO: the reference is `TrainState.reference_params`, starting as the initial policy
    and pulled towards it every `sync_every` steps: ref <- α·policy + (1 − α)·ref.

    Attributes:
      sync_every: steps between updates of the reference (>= 1).
      alpha: the mixing weight α in [0, 1].
    """

    sync_every: int = flax.struct.field(pytree_node=False)
    alpha: float = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class NoReference:
    """No reference model: log π_ref is taken as 0 (TRL's `reference_free`; SimPO and SFT never
    read it)."""


@flax.struct.dataclass
class AdaptersOffReference:
    """LoRA: the reference is `base`, the model the stage starts from, with no adapters; the
    policy is `base` with the state's adapters merged in (`dpo_jax.lora.merge`).

    Attributes:
      base: the base params (never donated, never checkpointed, never differentiated).
      spec: the adapters' rank, alpha and target patterns.
      seed: seeds the adapters' initial A.
      base_fingerprint: sha256 of the base params (`ref_cache.params_digest`): a checkpoint of
        adapters trained on another base is refused, and exports carry it.
    """

    base: Any
    spec: lora.LoraSpec = flax.struct.field(pytree_node=False)
    seed: int = flax.struct.field(pytree_node=False, default=0)
    base_fingerprint: str = flax.struct.field(pytree_node=False, default="")


Reference = (
    FrozenReference | PrecomputedReference | MovingReference | NoReference | AdaptersOffReference
)
KINDS = {
    "frozen": FrozenReference,
    "precomputed": PrecomputedReference,
    "cached": PrecomputedReference,  # precomputed, kept on disk by fingerprint (ref_cache.py)
    "moving": MovingReference,
    "none": NoReference,
    "adapters_off": AdaptersOffReference,  # LoRA (config.lora.rank > 0)
}


def kind_name(reference: Reference) -> str:
    """'frozen', 'precomputed', 'cached', 'moving', 'none' or 'adapters_off'."""
    if isinstance(reference, PrecomputedReference) and reference.cache:
        return "cached"
    for name, cls in KINDS.items():
        if isinstance(reference, cls):
            return name
    raise TypeError(f"not a reference kind: {type(reference).__name__}; known: {sorted(KINDS)}")


def initial_state(reference: Reference, policy_params: Any) -> Any:
    """What `TrainState.reference_params` starts as: the initial policy for a moving reference
    (jit copies it into buffers of its own), None for every other kind."""
    match reference:
        case MovingReference():
            return policy_params
        case FrozenReference() | PrecomputedReference() | NoReference() | AdaptersOffReference():
            return None
    raise TypeError(f"not a reference kind: {type(reference).__name__}")


def bind(reference: Reference, reference_params: Any) -> Reference:
    """The reference as the step reads it: a moving reference becomes the frozen reference of
    its current params (`TrainState.reference_params`); every other kind is returned as it is."""
    if isinstance(reference, MovingReference):
        return FrozenReference(reference_params)
    return reference


def reference_logps(
    reference: Reference, batch: dict[str, jax.Array], forward: Callable[[Any], jax.Array]
) -> jax.Array:
    """[B, 2, S] float32 summed reference log-probs of a batch's pairs.

    Args:
      reference: a bound reference (see `bind`): frozen, precomputed, none or adapters_off.
      batch: the step's batch ([B, 2, T] arrays, pair_mask [B, S], and `ref_logps` [B, 2, S]
        when the reference is precomputed).
      forward: params -> [B, 2, S] summed log-probs of the batch (the model's `logprob_fn`).

    Raises:
      ValueError: a precomputed reference with no `ref_logps` in the batch, or a moving
        reference that was not bound to its params.
    """
    match reference:
        case FrozenReference(params=params) | AdaptersOffReference(base=params):
            # stop_gradient twice as a guard: the step differentiates the policy params only.
            return jax.lax.stop_gradient(forward(jax.lax.stop_gradient(params)))
        case PrecomputedReference():
            if "ref_logps" not in batch:
                raise ValueError("a precomputed reference needs batch['ref_logps'] [B, 2, S]")
            return batch["ref_logps"].astype(jnp.float32)
        case NoReference():
            num_rows, num_slots = batch["pair_mask"].shape
            return jnp.zeros((num_rows, 2, num_slots), jnp.float32)
        case MovingReference():
            raise ValueError("bind a moving reference to TrainState.reference_params first")
    raise TypeError(f"not a reference kind: {type(reference).__name__}")


def advance(reference: Reference, reference_params: Any, policy_params: Any, step: jax.Array):
    """`TrainState.reference_params` after optimizer step `step` (counted from 1).

    A moving reference mixes towards the policy when `step % sync_every == 0`; for every other
    kind the value (None) passes through.
    """
    if not isinstance(reference, MovingReference):
        return reference_params
    alpha = reference.alpha

    def mix(ref_params):
        return jax.tree.map(
            lambda p, r: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), policy_params, ref_params
        )

    due = step % reference.sync_every == 0
    return jax.lax.cond(due, mix, lambda ref_params: ref_params, reference_params)


def holds_params(reference: Reference) -> bool:
    """Whether the reference value itself holds the params it was built from (a frozen one, or
    LoRA's base), so they must stay alive: the state's initialiser may not donate them."""
    return isinstance(reference, FrozenReference | AdaptersOffReference)


def shardings(reference: Reference, param_shardings: Any) -> Any:
    """The `in_shardings` of a reference argument: its params like the policy's, if it has any."""
    match reference:
        case FrozenReference():
            return reference.replace(params=param_shardings)
        case AdaptersOffReference():
            return reference.replace(base=param_shardings)
    return reference


def held_params(reference: Reference) -> Any:
    """π_ref's params where the reference holds them after training (frozen: its params; LoRA:
    the base), else None (a precomputed, moving or absent one keeps none of the start model)."""
    match reference:
        case FrozenReference(params=params) | AdaptersOffReference(base=params):
            return params
    return None


def trainable_init(reference: Reference, params: Any) -> Any:
    """The state's initial params from the model the stage starts from: that model for every
    kind but LoRA's, whose state trains fresh adapters over the base (B = 0: the same model)."""
    if isinstance(reference, AdaptersOffReference):
        return lora.init_adapters(params, reference.spec, jax.random.key(reference.seed))
    return params


def policy_params(reference: Reference, trainable: Any) -> Any:
    """The policy's model params from the state's params: the identity, or LoRA's base with the
    adapters merged in (differentiable in the adapters only), for export, sampling and
    summaries; the step reads `forward_params`."""
    if isinstance(reference, AdaptersOffReference):
        base = jax.lax.stop_gradient(reference.base)
        return lora.merge(base, trainable, reference.spec)
    return trainable


def forward_params(reference: Reference, trainable: Any, dropout_rng: jax.Array | None = None):
    """The params the step's policy forward reads: the identity, or for LoRA the base with the
    adapters attached unmerged (`lora.attach`: each targeted kernel computes x·W +
    s·dropout(x)·A·B; dropout only with `dropout_rng`), or merged when its spec says so."""
    if not isinstance(reference, AdaptersOffReference):
        return trainable
    if reference.spec.merged:
        return policy_params(reference, trainable)
    base = jax.lax.stop_gradient(reference.base)
    return lora.attach(base, trainable, reference.spec, dropout_rng)


def trainable_shardings(reference: Reference, param_shardings: Any, replicated: Any) -> Any:
    """The shardings of the state's params: the model's, or LoRA's adapters replicated (they
    are r·(in + out) per kernel: small enough for every device to hold whole)."""
    if isinstance(reference, AdaptersOffReference):
        abstract = jax.eval_shape(lambda: trainable_init(reference, reference.base))
        return jax.tree.map(lambda _: replicated, abstract)
    return param_shardings


def state_shardings(reference: Reference, param_shardings: Any) -> Any:
    """The shardings of `TrainState.reference_params` (like the policy's when it moves)."""
    return param_shardings if isinstance(reference, MovingReference) else None
