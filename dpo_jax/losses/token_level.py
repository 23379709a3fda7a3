"""Sequence log-probs from per-token ones for LD-DPO and WPO: pure jax.numpy on [B, 2, T] arrays."""

import numbers

import jax
import jax.numpy as jnp


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
      scored, segment_ids, num_segments: as in `ld_sequence_logps`.

    Returns:
      [B, 2, S] float32 log weights (0 in empty slots).
    """
    in_slot, positions = _slot_positions(scored, segment_ids, num_segments)
    aligned = jax.lax.stop_gradient(token_logps - token_log_sum_sq).astype(jnp.float32)
    sums = jnp.sum(jnp.where(in_slot, aligned[..., None], 0.0), axis=2)  # [B, 2, S]
    lengths = jnp.maximum(positions[:, :, -1, :], 1)  # [B, 2, S]
    return sums / lengths
