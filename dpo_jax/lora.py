"""Low-rank adapters (LoRA, Hu et al. 2021) as pure functions of params pytrees.

A targeted linear kernel W (any of the model's, stored [*in, *out], with a leading layers axis in
the scanned stack) gets two small matrices, A [in, r] and B [r, out], and the policy computes

    x·W + (alpha / r) · dropout(x)·A·B          (unmerged: `attach`, the step's form)
    x·(W + (alpha / r) · A·B)                   (merged: `merge`, for export and sampling)

B starts at zero, so at step 0 the policy is the base model exactly; A starts as PEFT's default
(kaiming-uniform with a = √5: uniform in ±1/√in). Only A and B are trained; W is never written.

The step runs the unmerged form: `attach` puts a `dpo_jax.models.linear.Adapted` kernel (the
base under stop_gradient, A, B, a dropout key) where each targeted kernel was, and the model's
linear layers (`linear.project`) add the low-rank path to x·W, so no W + s·A·B and no gradient
the size of W is formed, and adapter dropout (PEFT's: on the adapter path's input, in training
only) is possible. The untied unembedding (lm_head) is the exception: the chunked head needs the
weight whole, so an adapted lm_head is merged there (`linear.dense`). `LoraSpec.merged` selects
the merged form in the step too (the form of the first release, kept for comparison: it
differentiates through W + s·A·B and takes no dropout). `qwix` (Google's JAX LoRA) was
considered: it intercepts a module's einsum and creates the adapter params lazily on the first
call, which does not reach through our `jax.lax.scan` over stacked layers (each step's block is a
fresh module merged from a slice), so it would need the model rebuilt around it; an adapted
kernel as a pytree in the params reaches every family and the scan with one function.

Adapters are a nested dict shaped like the params it adapts:
`{"layers": {"attn": {"q_kernel": {"lora_a": [L, D, r], "lora_b": [L, r, H·Dh]}}}}`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax.models import linear

# The linear kernels LoRA can adapt, by leaf name, and how many of their leading axes (after
# the layers axis) are inputs; the rest are outputs. The layout is transformer._LOGICAL_AXES'.
KERNEL_INPUT_AXES = {
    "q_kernel": 1,  # [D, H, Dh]
    "k_kernel": 1,  # [D, K, Dh]
    "v_kernel": 1,  # [D, K, Dh]
    "o_kernel": 2,  # [H, Dh, D]
    "gate_kernel": 1,  # [D, F]
    "up_kernel": 1,  # [D, F]
    "down_kernel": 1,  # [F, D]
    "lm_head": 1,  # [D, V] (untied models only)
}
# The stacked decoder layers' subtree: its kernels carry a leading layers axis.
LAYERS_KEY = "layers"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (hashable: static under jit).

    Attributes:
      rank: r, the adapters' inner size (>= 1).
      alpha: the delta is scaled by alpha / rank (PEFT's `lora_alpha`; not rsLoRA's √r).
      targets: regular expressions searched in each param's path ("layers/attn/q_kernel");
        a linear kernel matching any of them is adapted.
      dropout: p of PEFT's `lora_dropout`, on the adapter path's input in training (unmerged).
      merged: run the step on W + s·A·B (no dropout) instead of the unmerged layers.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    merged: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_spec(
    rank: int, alpha: float, targets: tuple[str, ...], dropout: float = 0.0, merged: bool = False
) -> None:
    """Raises ValueError naming the config field of a bad LoRA setting (the targets' regexes
    are compiled by `config_checks`, with `optimizer.trainable`'s)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"config.lora.rank={rank!r} must be an integer >= 1 (0 turns LoRA off)")
    if not alpha > 0:
        raise ValueError(f"config.lora.alpha={alpha!r} must be > 0")
    if not targets:
        raise ValueError("config.lora.targets is empty: name the linear layers to adapt")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.lora.dropout={dropout!r} must be in [0, 1)")
    if dropout and merged:
        raise ValueError(
            f"config.lora.dropout={dropout!r} with config.lora.merged=True: the merged form "
            "multiplies x by W + s·A·B, so the adapters cannot drop their own input; set "
            "merged=False (the unmerged layers) or dropout=0"
        )


def path_name(path: tuple[Any, ...]) -> str:
    """A params path as "layers/attn/q_kernel"."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def _linear_paths(params: Any) -> dict[str, Any]:
    """{path name: leaf} of every linear kernel LoRA can adapt (a quantised one as one leaf)."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=linear.is_node)
    return {
        path_name(path): leaf
        for path, leaf in leaves
        if str(getattr(path[-1], "key", path[-1])) in KERNEL_INPUT_AXES
    }


def target_paths(params: Any, spec: LoraSpec) -> tuple[str, ...]:
    """The path names of the kernels `spec` adapts, in params order.

    Raises:
      ValueError: a pattern that matches no linear kernel (the message lists them).
    """
    linear = list(_linear_paths(params))
    for pattern in spec.targets:
        if not any(re.search(pattern, name) for name in linear):
            raise ValueError(
                f"config.lora.targets: {pattern!r} matches no linear layer of this model; "
                f"its linear layers: {', '.join(linear)}"
            )
    return tuple(n for n in linear if any(re.search(p, n) for p in spec.targets))


def _factor_shapes(name: str, shape: tuple[int, ...], rank: int):
    """(A's shape, B's shape) for a kernel of `shape` at path `name`."""
    layered = name.split("/")[0] == LAYERS_KEY
    lead = shape[:1] if layered else ()
    axes = shape[len(lead) :]
    fan_in, fan_out = linear.fan_in_out(axes, KERNEL_INPUT_AXES[name.split("/")[-1]])
    return (*lead, fan_in, rank), (*lead, rank, fan_out)


def _set(tree: dict, name: str, value: Any) -> None:
    *parents, leaf = name.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def init_adapters(params: Any, spec: LoraSpec, rng: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapters for `params`: A uniform in ±1/√in (PEFT's default), B zeros.

    Args:
      params: the base params (arrays or ShapeDtypeStructs: only shapes are read).
      spec: what to adapt.
      rng: a PRNG key; each kernel's A draws from `fold_in(rng, its index)`.
    """
    adapters: dict[str, Any] = {}
    kernels = _linear_paths(params)
    for index, name in enumerate(target_paths(params, spec)):
        a_shape, b_shape = _factor_shapes(name, kernels[name].shape, spec.rank)
        bound = 1.0 / math.sqrt(a_shape[-2])
        key = jax.random.fold_in(rng, index)
        lora_a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
        _set(adapters, name, {"lora_a": lora_a, "lora_b": jnp.zeros(b_shape, jnp.float32)})
    return adapters


def _adapter_at(adapters: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any] | None:
    node = adapters
    for key in path:
        node = node.get(str(getattr(key, "key", key))) if isinstance(node, dict) else None
    return node


def attach(
    base: Any, adapters: dict[str, Any], spec: LoraSpec, dropout_rng: jax.Array | None = None
) -> Any:
    """The policy's params for the unmerged forward: each adapted kernel of `base` replaced by a
    `linear.Adapted` kernel (base, A, B, and with `dropout_rng` and spec.dropout > 0 a dropout key
    per kernel and layer); the rest of `base` as it is.

    Args:
      base: the base params.
      adapters: from `init_adapters` (or trained).
      spec: what was adapted, and the dropout.
      dropout_rng: this step's key for dropout, or None (evaluation: no dropout).
    """
    names = {name: index for index, name in enumerate(target_paths(base, spec))}

    def attached(path, kernel):
        adapter = _adapter_at(adapters, path)
        if adapter is None:
            return kernel
        name = path_name(path)
        key = None
        if dropout_rng is not None and spec.dropout > 0:
            key = jax.random.fold_in(dropout_rng, names[name])
            if name.split("/")[0] == LAYERS_KEY:
                key = jax.random.split(key, kernel.shape[0])  # one per layer of the stack
        return linear.Adapted(
            kernel, adapter["lora_a"], adapter["lora_b"], key, spec.scale, spec.dropout
        )

    return jax.tree_util.tree_map_with_path(attached, base, is_leaf=linear.is_node)


def check_quantized_targets(base: Any, spec: LoraSpec) -> None:
    """QLoRA adapts the quantised kernels of its base: a target stored as floats there (an
    F32/F16/BF16 tensor of the file, kept whole) is refused, naming it, since a base kept in
    floats gains nothing from being read as blocks (load it with quantized=False).

    Raises:
      ValueError: a targeted kernel that is not `linear.Quantized` with a quantised type.
    """
    kernels = _linear_paths(base)
    quantized = [name for name, kernel in kernels.items() if linear.is_quantized(kernel)]
    for name in target_paths(base, spec):
        if name not in quantized:
            kernel = kernels[name]
            stored = "/".join(getattr(kernel, "type_names", ())) or str(kernel.dtype)
            raise ValueError(
                f"config.lora.targets: {name} is stored as {stored}, not a quantised kernel "
                "(config.model.quantized=True adapts quantised kernels; this model's: "
                f"{', '.join(quantized) or 'none'})"
            )


def merge(base: Any, adapters: dict[str, Any], spec: LoraSpec) -> Any:
    """The policy's params: `base` with W + (alpha / r)·A@B at each adapted kernel.

    Adapted kernels come out float32 (the model casts them to its compute dtype, as it does
    every param), so a small delta is not rounded away into a bfloat16 base. With B = 0 the
    result equals `base` exactly. Pure: `base` is read, never written.
    """

    # `linear.dense` of an attached kernel is the one implementation of W + s·A·B.
    return jax.tree.map(
        lambda kernel: (
            linear.dense(kernel, jnp.float32) if isinstance(kernel, linear.Adapted) else kernel
        ),
        attach(base, adapters, spec),
        is_leaf=linear.is_node,
    )


def num_params(tree: Any) -> int:
    """Elements in a pytree of arrays (or ShapeDtypeStructs; a quantised kernel counts the
    values it holds, not its bytes)."""
    leaves = jax.tree.leaves(tree, is_leaf=linear.is_node)
    return sum(math.prod(leaf.shape) for leaf in leaves)
