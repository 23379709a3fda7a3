"""Summed response log-probs of preference pairs, from a model's final hidden states."""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from dpo_jax.sharding import BATCH_AXES, SEQUENCE_AXIS, sequence_shards

_BATCH_KEYS = ("tokens", "response_mask", "positions", "segment_ids")


class LogProbs(NamedTuple):
    """Log-probs of a batch of pairs (pair axis: 0 = chosen, 1 = rejected).

    Attributes:
      logps: [B, 2, S] float32, log π(response | prompt) summed over the scored tokens of the
        pair in slot s of row b (0 where the slot holds no pair).
      token_logps: [B, 2, T] float32, log π(tokens[t] | tokens[<t] of its segment) at token
        position t where token t is scored, else 0.
      lengths: [B, 2, S] int32, the number of scored tokens in each slot.
      token_log_sum_sq: [B, 2, T] float32, log Σ_v p(v)² of the distribution that scored token t,
        at the positions of token_logps (0 elsewhere), without gradient; None unless
        `logprob_fn(..., with_log_sum_sq=True)` (WPO's weights).
    """

    logps: jax.Array
    token_logps: jax.Array
    lengths: jax.Array
    token_log_sum_sq: jax.Array | None = None


def next_token_targets(
    tokens: jax.Array, response_mask: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The shift by one and the response masking, in one place.

    The logits at position t predict token t + 1. That prediction is scored when token t + 1 is a
    response token of the same (non-padding) segment as position t, so the last token of a segment
    never predicts the first token of the next one, padding is never scored, and the last position
    of a row predicts nothing. A response token at the very start of a segment has no position
    predicting it and is not scored (a response always follows its prompt).

    Args:
      tokens: [N, T] int32 token ids.
      response_mask: [N, T] bool, True on response tokens.
      segment_ids: [N, T] int32, 0 on padding, k >= 1 for the k-th packed segment of the row.

    Returns:
      targets: [N, T] int32, targets[t] = tokens[t + 1] (0 at the last position).
      target_mask: [N, T] bool, True where the prediction made at position t is scored.

    Raises:
      ValueError: if the three arrays are not all [N, T] of one shape.
    """
    if tokens.ndim != 2 or response_mask.shape != tokens.shape or segment_ids.shape != tokens.shape:
        raise ValueError(
            f"next_token_targets: tokens {tokens.shape}, response_mask {response_mask.shape} and "
            f"segment_ids {segment_ids.shape} must all be [N, T] of one shape"
        )
    same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    scored = response_mask[:, 1:].astype(bool) & same_segment  # [N, T - 1]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [N, T]
    target_mask = jnp.pad(scored, ((0, 0), (0, 1)))  # [N, T], last position False
    return targets, target_mask


def token_logps_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] as logits[target] − logsumexp(logits), in float32.

    Only the target's logit is gathered and the logsumexp reduces over V, so no [..., V] float32
    log-softmax is materialised (XLA fuses the upcast into the reduction).

    Args:
      logits: [..., V] any float dtype.
      targets: [...] int32 ids in [0, V).

    Returns:
      [...] float32 log-probs of the targets.

    Raises:
      ValueError: if the leading shapes of logits and targets differ.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"token_logps_from_logits: logits {logits.shape} must be targets {targets.shape} + [V]"
        )
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # logsumexp in float32: bf16 loses ~3 digits, and the log-prob is a small difference of two
    # large numbers.
    log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return target_logits.astype(jnp.float32) - log_normalizer


def _logits(
    hidden: jax.Array, unembedding: jax.Array, final_logit_softcapping: float | None = None
) -> jax.Array:
    """[..., D] @ [D, V] -> [..., V] float32, accumulated in float32 whatever the input dtype,
    then cap·tanh(logits / cap) when a soft-cap is given (as the model's own logits are)."""
    logits = jnp.einsum("...d,dv->...v", hidden, unembedding, preferred_element_type=jnp.float32)
    if final_logit_softcapping is not None:
        if not final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping={final_logit_softcapping} must be > 0")
        logits = jnp.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    return logits


def unembedded_token_logps(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    final_logit_softcapping: float | None = None,
) -> jax.Array:
    """token_logps_from_logits(_logits(hidden, unembedding, cap), targets), with a leaner backward.

    The values are exactly those of the two functions composed. Without a soft-cap the gradient
    is written by hand (`_head_backward`): d logp / d logits = g·(onehot(target) − softmax) in one
    elementwise pass over the saved logits, then the two matmuls. Autodiff of the composition
    instead materialises exp(logits − max) in the forward, scatters the gather's cotangent into a
    second [N, V] array and, on CPU, copies that array transposed for the unembedding's gradient:
    three extra passes over N·V floats, memory-bound work that cost about 15% of the head's
    forward+backward in the bench_cpu step (N·V = 4,112 × 32,000). The gradients agree with
    autodiff's to float32 rounding (a different summation order, not a different formula).

    Args:
      hidden: [..., D] final hidden states.
      unembedding: [D, V].
      targets: [...] int32 ids in [0, V).
      final_logit_softcapping: the model's logit soft-cap or None (with a cap, plain autodiff).

    Returns:
      [...] float32 log-probs of the targets.
    """
    if final_logit_softcapping is not None:
        logits = _logits(hidden, unembedding, final_logit_softcapping)
        return token_logps_from_logits(logits, targets)
    return _head_logps(hidden, unembedding, targets)


@jax.custom_vjp
def _head_logps(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array) -> jax.Array:
    return token_logps_from_logits(_logits(hidden, unembedding), targets)


def _head_forward(hidden, unembedding, targets):
    logits = _logits(hidden, unembedding)  # [..., V] float32
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [...], as token_logps_from_logits
    return target_logits - log_normalizer, (hidden, unembedding, targets, logits, log_normalizer)


def _head_backward(residuals, cotangent):
    hidden, unembedding, targets, logits, log_normalizer = residuals
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)  # [..., V]
    is_target = targets[..., None] == vocab  # fused into the pass below, never materialised
    softmax = jnp.exp(logits - log_normalizer[..., None])
    # [..., V] d logp / d logits, in the compute dtype as autodiff's dot transpose would give it.
    logits_grad = (cotangent[..., None] * (is_target - softmax)).astype(hidden.dtype)
    hidden_grad = jnp.einsum(
        "...v,dv->...d", logits_grad, unembedding, preferred_element_type=jnp.float32
    )
    unembedding_grad = jnp.einsum(
        "...d,...v->dv", hidden, logits_grad, preferred_element_type=jnp.float32
    )
    return hidden_grad.astype(hidden.dtype), unembedding_grad.astype(unembedding.dtype), None


_head_logps.defvjp(_head_forward, _head_backward)


def chunked_token_logps(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    final_logit_softcapping: float | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> jax.Array:
    """token_logps_from_logits(hidden @ unembedding, targets) without holding all the logits.

    Chunks along the sequence inside each row: every row's T positions are cut into chunks of
    P = max(1, chunk_size // N) positions (the last one zero-padded), and a scan computes each
    chunk's [N, P, V] float32 logits, logsumexp and gather. The batch axis N stays leading (and
    sharded, where the caller shards it) in every chunk, so no device gathers another's hidden
    states or targets: a data-parallel mesh splits each chunk's work, where flattening [N, T]
    rows across the sharded axis made every device compute every chunk. The body is wrapped in
    `jax.checkpoint`, so the backward recomputes each chunk's logits instead of keeping them, and
    the scan accumulates the unembedding's gradient across chunks.

    Each position sees all of V at once, so no running logsumexp is carried over chunks and the
    gather is local; each chunk is a plain [N·P, D] @ [D, V] matmul whose gradient adds into one
    [D, V] buffer.

    Memory (float32 logits): about 2·N·P·V·4 bytes live in the backward (a chunk's logits and
    their cotangent, N·P ≈ chunk_size rows, divided over the devices sharding N) plus the [D, V]
    gradient, against 2·N·T·V·4 for the full path: 0.5 GB instead of 8.6 GB for V = 262,144,
    chunk_size = 256 and N·T = 4,096 on one device.

    Args:
      hidden: [N, T, D] final hidden states.
      unembedding: [D, V] output projection.
      targets: [N, T] int32 target ids.
      chunk_size: token rows per chunk on each device, > 0 (N·P ≈ chunk_size, N counting the
        rows of one batch shard).
      final_logit_softcapping: the model's logit soft-cap, or None (see `logprob_fn`).
      mesh: the mesh whose batch axes (`sharding.BATCH_AXES`) split N, and whose "sequence"
        axis, if any, splits T (context parallelism); None: the mesh in
        context (`jax.set_mesh`), if any. With batch shards, the loop runs inside `shard_map`
        over them, so each device accumulates its share of the unembedding's gradient locally
        and it is summed across devices once, after the loop (XLA's own partitioning of the
        scan all-reduced the [D, V] gradient once per chunk).

    Returns:
      [N, T] float32 log-probs of the targets.

    Raises:
      ValueError: on a non-positive chunk_size or soft-cap, or mismatched shapes.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    if (
        hidden.ndim != 3
        or hidden.shape[:2] != targets.shape
        or unembedding.ndim != 2
        or unembedding.shape[0] != hidden.shape[2]
    ):
        raise ValueError(
            f"chunked_token_logps: hidden {hidden.shape}, unembedding {unembedding.shape} and "
            f"targets {targets.shape} must be [N, T, D], [D, V] and [N, T]"
        )
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names and mesh.shape[axis] > 1)
    split_rows = sequence_shards(mesh) > 1
    local = functools.partial(
        _local_chunked_token_logps,
        chunk_size=chunk_size,
        final_logit_softcapping=final_logit_softcapping,
    )
    if not axes and not split_rows:
        return local(hidden, unembedding, targets)
    # Rows over the batch axes and, under context parallelism, each row's positions over
    # "sequence": every device scores its own slice of tokens, no hidden state is gathered.
    rows = PartitionSpec(axes or None, SEQUENCE_AXIS if split_rows else None)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, PartitionSpec(), rows),
        out_specs=rows,
        axis_names=set(axes) | ({SEQUENCE_AXIS} if split_rows else set()),
        check_vma=False,
    )
    return sharded(hidden, unembedding, targets)


def _local_chunked_token_logps(
    hidden, unembedding, targets, *, chunk_size, final_logit_softcapping
):
    """`chunked_token_logps` on one device's rows."""
    rows, length, width = hidden.shape
    chunk_length = min(max(1, chunk_size // rows), length)  # P positions of each row per chunk
    num_chunks = -(-length // chunk_length)
    padding = num_chunks * chunk_length - length
    hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))  # [N, K·P, D]
    targets = jnp.pad(targets, ((0, 0), (0, padding)))  # [N, K·P]
    # [K, N, P, ...]: the scan walks the chunk axis; the batch axis stays leading in each chunk.
    hidden_chunks = hidden.reshape(rows, num_chunks, chunk_length, width).transpose(1, 0, 2, 3)
    target_chunks = targets.reshape(rows, num_chunks, chunk_length).transpose(1, 0, 2)

    @jax.checkpoint
    def chunk_logps(unembedding, hidden_chunk, target_chunk):
        return unembedded_token_logps(
            hidden_chunk, unembedding, target_chunk, final_logit_softcapping
        )  # [N, P]

    def body(carry, chunk):
        return carry, chunk_logps(unembedding, *chunk)

    _, logps = jax.lax.scan(body, None, (hidden_chunks, target_chunks))  # [K, N, P]
    logps = logps.transpose(1, 0, 2).reshape(rows, num_chunks * chunk_length)  # [N, K·P]
    return logps[:, :length]  # [N, T]


def token_log_sum_sq_probs(
    hidden: jax.Array,
    unembedding: jax.Array,
    *,
    chunk_size: int | None = None,
    final_logit_softcapping: float | None = None,
) -> jax.Array:
    """log Σ_v p(v)² = logsumexp(2z) − 2·logsumexp(z) of each position's logits z, no gradient.

    WPO's alignment term (arXiv:2406.11827). With `chunk_size`, each row's positions are taken
    `chunk_size` at a time (the batch axis stays leading), so at most [N, chunk_size, V] logits
    exist at once; without it the [N, T, V] logits are formed once. It is an extra forward pass
    of the unembedding, with nothing kept for the backward.

    Args:
      hidden: [N, T, D] final hidden states.
      unembedding: [D, V].
      chunk_size: positions per chunk, or None.
      final_logit_softcapping: the model's logit soft-cap, or None.

    Returns:
      [N, T] float32.
    """
    hidden, unembedding = jax.lax.stop_gradient((hidden, unembedding))

    def positions(h):  # [N, C, D] -> [N, C]
        logits = _logits(h, unembedding, final_logit_softcapping)
        return jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * jax.nn.logsumexp(logits, axis=-1)

    if chunk_size is None:
        return positions(hidden)
    rows, length, width = hidden.shape
    num_chunks = -(-length // chunk_size)
    padded = jnp.pad(hidden, ((0, 0), (0, num_chunks * chunk_size - length), (0, 0)))
    chunks = jnp.moveaxis(padded.reshape(rows, num_chunks, chunk_size, width), 1, 0)  # [K, N, C, D]
    values = jax.lax.map(positions, chunks)  # [K, N, C]
    return jnp.moveaxis(values, 0, 1).reshape(rows, -1)[:, :length]  # [N, T]


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Sums of `values` over each packed segment k = 1..num_segments of each row.

    Values must already be masked; segment 0 (padding) and ids above num_segments are left out.
    An elementwise one-hot reduction, not a matmul, so float32 values keep full precision on
    accelerators whose default matmul precision is lower.

    Args:
      values: [N, T] numbers to sum.
      segment_ids: [N, T] int32.
      num_segments: S, the number of segment slots per row.

    Returns:
      [N, S] sums, slot s holding segment s + 1, in the dtype of values.

    Raises:
      ValueError: if the shapes differ.
    """
    if values.shape != segment_ids.shape or values.ndim != 2:
        raise ValueError(
            f"segment_sums: values {values.shape} and segment_ids {segment_ids.shape} "
            "must both be [N, T]"
        )
    slots = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)[None, None, :]  # [1, 1, S]
    in_segment = segment_ids[:, :, None] == slots  # [N, T, S]
    zero = jnp.zeros((), values.dtype)
    return jnp.sum(jnp.where(in_segment, values[:, :, None], zero), axis=1)  # [N, S]


def _check_batch(batch: dict[str, jax.Array]) -> None:
    missing = [key for key in _BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"logprob_fn: batch has no {missing} (found: {sorted(batch)})")
    shape = batch["tokens"].shape
    if len(shape) != 3 or shape[1] != 2:
        raise ValueError(f"logprob_fn: batch['tokens'] is {shape}, expected [B, 2, T]")
    for key in _BATCH_KEYS[1:]:
        if batch[key].shape != shape:
            raise ValueError(f"logprob_fn: batch[{key!r}] is {batch[key].shape}, expected {shape}")
    if "pair_mask" not in batch and not isinstance(batch["segment_ids"], jax.core.Tracer):
        # Without pair_mask a row holds one pair (S = 1); a packed batch would lose pairs 2..k.
        # Checked when the ids are concrete; under jit this is the caller's promise.
        most = int(jnp.max(batch["segment_ids"]))
        if most > 1:
            raise ValueError(
                f"logprob_fn: batch['segment_ids'] reaches {most} (packed rows) but the batch has "
                "no 'pair_mask'; pass pair_mask [B, S] for packed batches"
            )
    pair_mask = batch["pair_mask"].shape if "pair_mask" in batch else (shape[0], 1)
    if len(pair_mask) != 2 or pair_mask[0] != shape[0]:
        raise ValueError(f"logprob_fn: batch['pair_mask'] is {pair_mask}, expected [{shape[0]}, S]")


def _model_softcap(apply_fn: Callable, given: float | None | str) -> float | None:
    """The cap to score with: the one apply_fn carries for "model"; a given one must agree."""
    carried = getattr(apply_fn, "final_logit_softcapping", None)
    if isinstance(given, str):
        if given != "model":
            raise ValueError(f"final_logit_softcapping={given!r}: a number, None or 'model'")
        return carried
    if hasattr(apply_fn, "final_logit_softcapping") and given != carried:
        raise ValueError(
            f"final_logit_softcapping={given} but the model's config has {carried}; pass "
            "'model' (the default) to use the model's"
        )
    return given


def logprob_fn(
    apply_fn: Callable[..., tuple[jax.Array, jax.Array]],
    params: Any,
    batch: dict[str, jax.Array],
    *,
    logits_chunk_size: int | None = None,
    final_logit_softcapping: float | None | str = "model",
    mesh: Mesh | AbstractMesh | None = None,
    with_log_sum_sq: bool = False,
) -> LogProbs:
    """Log-probs of the chosen and rejected responses, from one concatenated forward pass.

    Chosen and rejected rows go through the model together as [2B, T] and come back to [B, 2, ...]
    right after. Sums are over scored tokens (see `next_token_targets`), never means. Keeping one
    packed segment's attention from another is apply_fn's job (it gets positions, segment_ids).

    Args:
      apply_fn: (params, tokens [2B, T], positions [2B, T], segment_ids [2B, T]) ->
        (hidden [2B, T, D], unembedding [D, V]), hidden being the final (normed) hidden states.
      params: the model's parameters, passed through to apply_fn.
      batch: tokens, response_mask, positions, segment_ids, each [B, 2, T]; pair_mask [B, S],
        optional for unpacked batches (one pair per row: S = 1).
      logits_chunk_size: None for full [2B, T, V] logits; else rows per chunk of the chunked path.
      final_logit_softcapping: the model's logit soft-cap, cap·tanh(logits / cap), or None. It
        must be the model config's `final_logit_softcapping`: apply_fn returns hidden states, not
        logits. "model" (the default) reads it from `apply_fn.final_logit_softcapping`, which
        `models.make_apply_fn` sets (None for an apply_fn without it); a value that differs from
        the one apply_fn carries is an error.
      mesh: passed to `chunked_token_logps` (None: the mesh in context, if any).
      with_log_sum_sq: also return `token_log_sum_sq` (`token_log_sum_sq_probs`, WPO).

    Returns:
      LogProbs(logps [B, 2, S] float32, token_logps [B, 2, T] float32, lengths [B, 2, S] int32,
      token_log_sum_sq [B, 2, T] float32 or None).

    Raises:
      ValueError: on a missing key or a shape that does not match.
    """
    _check_batch(batch)
    final_logit_softcapping = _model_softcap(apply_fn, final_logit_softcapping)
    batch_size, _, length = batch["tokens"].shape
    num_segments = batch["pair_mask"].shape[1] if "pair_mask" in batch else 1
    tokens, response_mask, positions, segment_ids = (
        batch[key].reshape(2 * batch_size, length)  # [2B, T]
        for key in _BATCH_KEYS
    )
    hidden, unembedding = apply_fn(params, tokens, positions, segment_ids)
    targets, target_mask = next_token_targets(tokens, response_mask, segment_ids)
    chunk_size, softcap = logits_chunk_size, final_logit_softcapping
    if chunk_size is None:
        predicted = unembedded_token_logps(hidden, unembedding, targets, softcap)  # [2B, T]
    else:
        predicted = chunked_token_logps(
            hidden,
            unembedding,
            targets,
            chunk_size=chunk_size,
            final_logit_softcapping=softcap,
            mesh=mesh,
        )
    # `where`, not a product: whatever is computed at an unscored position never reaches the sum.
    predicted = jnp.where(target_mask, predicted, 0.0)
    # The prediction made at t - 1 is the log-prob of token t: align to the token's own position.
    token_logps = jnp.pad(predicted[:, :-1], ((0, 0), (1, 0)))  # [2B, T]
    scored = jnp.pad(target_mask[:, :-1], ((0, 0), (1, 0))).astype(jnp.int32)  # [2B, T]
    logps = segment_sums(token_logps, segment_ids, num_segments)  # [2B, S]
    lengths = segment_sums(scored, segment_ids, num_segments)  # [2B, S]
    log_sum_sq = None
    if with_log_sum_sq:
        per_position = token_log_sum_sq_probs(
            hidden, unembedding, chunk_size=chunk_size, final_logit_softcapping=softcap
        )  # [2B, T], at the predicting position
        per_position = jnp.where(target_mask, per_position, 0.0)
        log_sum_sq = jnp.pad(per_position[:, :-1], ((0, 0), (1, 0))).reshape(batch_size, 2, length)
    return LogProbs(
        logps=logps.reshape(batch_size, 2, num_segments),  # [B, 2, S]
        token_logps=token_logps.reshape(batch_size, 2, length),  # [B, 2, T]
        lengths=lengths.reshape(batch_size, 2, num_segments),  # [B, 2, S]
        token_log_sum_sq=log_sum_sq,  # [B, 2, T] or None
    )
