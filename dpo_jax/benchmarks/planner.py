"""Plans a config before renting the hardware: the real update_fn compiled for a device topology."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import lora, sharding
from dpo_jax import reference as reference_lib
from dpo_jax.benchmarks import step_benchmark
from dpo_jax.models import ModelConfig, gguf_blocks, init_params, linear
from dpo_jax.models.convert_hf import read_hf_config
from dpo_jax.run import stage as stage_lib
from dpo_jax.run import train

GIB = 1024**3
# Memory of one chip (HBM), by the generation named in the topology ("v5e:16x16" -> "v5e").
CHIP_MEMORY_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# The chips of one host (x, y, z) the TPU compiler assumes for a topology; a smaller slice
# (v5e-1, "v5e:1x1") is compiled as a host of its own size, or the compiler refuses it.
DEFAULT_HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class QuantizedBase:
    """A QLoRA plan's frozen base: the GGUF blocks of its kernels, held whole on every device
    (`train.make_context` replicates them), and the same weights' bytes as floats."""

    type_names: tuple[str, ...]  # the block types of the kernels ("Q4_K", ...)
    block_bytes: int  # the quantised kernels' uint8 blocks, per device
    num_weights: int  # the values those kernels hold

    @property
    def bits_per_weight(self) -> float:
        """Bits of blocks per weight (4.5 for Q4_K, 8.5 for Q8_0)."""
        return 8 * self.block_bytes / self.num_weights

    def float_bytes(self, dtype: str) -> int:
        """The same weights held whole in `dtype` ("float32", "bfloat16")."""
        return self.num_weights * jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device holds and computes in one training step, as the compiler sees it.

    All byte counts are per device. `parts` splits the step's arguments into the params, the
    optimizer state, the reference (its params or log-probs) and the batch, from their
    shardings; `temp_bytes` are the compiled step's temporaries (activations kept for the
    backward, gradients, the head's chunks, collectives' buffers).
    """

    target: str  # "v5e:16x16" or "cpu:8"
    num_devices: int
    mesh_shape: dict[str, int]
    device_memory_bytes: int  # a chip's HBM, or this host's RAM for a CPU mesh
    parts: dict[str, int]  # params, optimizer, reference, batch
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once)
    temp_bytes: int
    code_bytes: int
    model_flops: float  # per device, per step: 6 (+2 with a reference forward) x params x tokens
    xla_flops: float  # XLA's cost analysis per device; it counts each loop body once
    compile_seconds: float
    custom_calls: tuple[str, ...]  # kernels in the compiled program (tpu_custom_call: Pallas)
    quantized_base: QuantizedBase | None = None  # QLoRA's (config.model.quantized), else None

    @property
    def total_bytes(self) -> int:
        """Peak bytes one device needs: arguments, outputs not aliased, temporaries, code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def headroom(self) -> float:
        """1 - total / device memory (0.1: 10% under the device's memory)."""
        return 1.0 - self.total_bytes / self.device_memory_bytes

    def largest_part(self) -> tuple[str, int]:
        """The biggest of the argument parts and the temporaries."""
        candidates = {**self.parts, "temporaries": self.temp_bytes}
        name = max(candidates, key=candidates.get)
        return name, candidates[name]


def topology_devices(topology: str) -> tuple[list, int]:
    """The abstract devices of a TPU topology ("v5e:16x16") and one chip's memory in bytes.

    Raises:
        ValueError: an unknown generation or a layout the TPU compiler does not accept.
    """
    generation = topology.split(":")[0]
    if generation not in CHIP_MEMORY_BYTES or ":" not in topology:
        raise ValueError(
            f"--topology={topology!r}: expected <generation>:<layout> with a generation in "
            f"{sorted(CHIP_MEMORY_BYTES)} (e.g. 'v5e:16x16', 'v5p:4x4x4')"
        )
    from jax.experimental import topologies

    bounds = _sub_host_bounds(topology.split(":", 1)[1])
    options = {"chips_per_host_bounds": bounds} if bounds else {}
    try:
        description = topologies.get_topology_desc(topology, "tpu", **options)
    except Exception as error:  # the TPU runtime raises its own error type for a bad layout
        raise ValueError(f"--topology={topology!r}: the TPU compiler refused it: {error}") from None
    return list(description.devices), CHIP_MEMORY_BYTES[generation]


def _sub_host_bounds(layout: str) -> tuple[int, int, int] | None:
    """A layout ("1x1") smaller than one default host, as host bounds; None for any other."""
    try:
        dims = tuple(int(size) for size in layout.split("x"))
    except ValueError:
        return None  # the TPU compiler names what is wrong with it
    dims = dims + (1,) * (3 - len(dims))
    if len(dims) != 3 or dims == DEFAULT_HOST_BOUNDS:
        return None
    fits_a_host = all(0 < d <= h for d, h in zip(dims, DEFAULT_HOST_BOUNDS, strict=True))
    return dims if fits_a_host else None


def cpu_devices(num_devices: int) -> tuple[list, int]:
    """The first `num_devices` CPU devices and this host's RAM (shared by all of them).

    Raises:
        ValueError: fewer CPU devices than asked for (set the XLA flag before jax loads).
    """
    devices = jax.devices("cpu")
    if num_devices > len(devices):
        raise ValueError(
            f"--cpu_devices={num_devices}: only {len(devices)} CPU devices; run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}"
        )
    return devices[:num_devices], os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_config_of(config: ml_collections.ConfigDict) -> ModelConfig:
    """The model a config trains, from its fields or config.json, without loading weights."""
    return _model_of(config)[0]


def _model_of(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any]:
    """The model config and what `train.load_model` loads (None for "hf": config.json only)."""
    if config.model.source == "hf":
        overrides = dict(
            dtype=config.model.dtype,
            param_dtype=config.model.param_dtype,
            remat=config.model.remat,
            attention_impl=config.model.attention_impl,
            attention_block_size=config.model.attention_block_size,
        )
        source = os.path.join(config.model.hf_path, "config.json")
        hf_config = read_hf_config(config.model.hf_path)
        return ModelConfig.from_hf_config(hf_config, source, **overrides), None
    workdir = os.path.expanduser("~/.cache/dpo_jax")
    _, model_config, loaded = train.load_model(config, workdir=workdir)
    return model_config, loaded


def abstract_params_of(config: ml_collections.ConfigDict, model_config: ModelConfig, loaded: Any):
    """The params the DPO step starts from, as ShapeDtypeStructs (nothing read or allocated).

    Float params are `init_params`' shapes. A quantised base (config.model.quantized) is a
    GGUF's own blocks (source="gguf": its types per layer, padded as `load_gguf` holds them),
    or, with no file to read (source="random", or "hf", whose weights would be quantised on
    load), blocks of config.model.quantized_type shaped like the float params
    (`quantized_base`).
    """
    float_params = jax.eval_shape(init_params, model_config, jax.random.key(0))
    if not config.model.quantized:
        return float_params
    if config.model.source == "gguf":
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), loaded)
    return quantized_base(float_params, config.model.quantized_type)


def quantized_base(float_params: Any, type_name: str) -> Any:
    """An abstract QLoRA base: `float_params` with every Linear kernel (the kernels of
    `lora.KERNEL_INPUT_AXES`) and the embedding as a `linear.Quantized` of ShapeDtypeStructs in
    `type_name` blocks, laid out as a GGUF holds them; the rest (norms, biases) as they are.

    A Linear kernel [*stack, *in, *out] becomes data uint8 [*stack, out, row_bytes(in)] (its
    rows are the output features: HF's [out, in]); the embedding [V, D] becomes [V,
    row_bytes(D)] (a lookup gathers rows). type_index is int32 [*stack].

    Raises:
        ValueError: a kernel whose input features are not whole blocks of `type_name`.
    """

    def one(path, leaf):
        name = lora.path_name(path)
        kind = name.split("/")[-1]
        if kind not in lora.KERNEL_INPUT_AXES and name != "embedding":
            return leaf
        stack = leaf.shape[:1] if name.split("/")[0] == lora.LAYERS_KEY else ()
        kernel_shape = tuple(leaf.shape[len(stack) :])
        if name == "embedding":
            rows, cols = kernel_shape
        else:
            cols, rows = linear.fan_in_out(kernel_shape, lora.KERNEL_INPUT_AXES[kind])
        try:
            width = gguf_blocks.row_bytes(type_name, cols)
        except ValueError as error:
            raise ValueError(
                f"config.model.quantized_type={type_name!r}: {name} {tuple(leaf.shape)} cannot "
                f"be held in it: {error}"
            ) from None
        return linear.Quantized(
            jax.ShapeDtypeStruct((*stack, rows, width), jnp.uint8),
            jax.ShapeDtypeStruct(stack, jnp.int32),
            type_names=(type_name,),
            kernel_shape=kernel_shape,
            transposed=name != "embedding",
        )

    return jax.tree_util.tree_map_with_path(one, float_params)


def _quantized_base_of(params: Any) -> QuantizedBase | None:
    """What the quantised kernels of placed abstract params hold; None for a float model."""
    kernels = [
        leaf
        for leaf in jax.tree.leaves(params, is_leaf=linear.is_node)
        if isinstance(leaf, linear.Quantized)
    ]
    if not kernels:
        return None
    return QuantizedBase(
        type_names=tuple(dict.fromkeys(name for kernel in kernels for name in kernel.type_names)),
        block_bytes=_shard_bytes([kernel.data for kernel in kernels]),
        num_weights=sum(math.prod(kernel.shape) for kernel in kernels),
    )


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        tree,
        shardings,
    )


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of a tree of placed ShapeDtypeStructs."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def abstract_batch(config: ml_collections.ConfigDict, reference: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of one step's batch, as the data pipeline collates it."""
    rows, length, pairs = config.data.batch_size, config.data.max_length, config.data.pairs_per_row
    batch = {
        "tokens": jax.ShapeDtypeStruct((rows, 2, length), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((rows, 2, length), jnp.bool_),
        "positions": jax.ShapeDtypeStruct((rows, 2, length), jnp.int32),
        "segment_ids": jax.ShapeDtypeStruct((rows, 2, length), jnp.int32),
        "pair_mask": jax.ShapeDtypeStruct((rows, pairs), jnp.bool_),
    }
    if isinstance(reference, reference_lib.PrecomputedReference):
        batch["ref_logps"] = jax.ShapeDtypeStruct((rows, 2, pairs), jnp.float32)
    return batch


def _dpo_stage(config, ctx, abstract_params):
    options = train.loss_options(
        config, train.loss_names(config.dpo.loss_type), ctx.final_logit_softcapping
    )
    tx, schedule = train.stage_optimizer(
        config, config.optimizer.learning_rate, config.optimizer.warmup_steps, config.dpo.num_steps
    )
    return stage_lib.Stage(
        name="dpo",
        num_steps=config.dpo.num_steps,
        options=options,
        tx=tx,
        schedule=schedule,
        reference=train.make_reference(config, abstract_params),
        train_batches=None,
        eval_batches=[],
    )


def plan(config: ml_collections.ConfigDict, devices: list, device_memory_bytes: int, target: str):
    """Compiles the config's DPO update_fn for `devices` on abstract inputs (nothing allocated).

    The step is the one training runs (`train.make_context`, `train.make_reference`,
    `stage.compile_update`), lowered inside `jax.set_mesh` so the chunked head and splash
    attention see the mesh.

    Raises:
        ValueError: a mesh that does not divide the devices, batch sizes that do not divide
            over the mesh's batch shards, a row length that does not divide over its sequence
            axis, or a step the TPU compiler finds too big for a chip.
    """
    train.check_config(config, planning=True)
    mesh = train.make_mesh(config, devices=devices)
    model_config, loaded = _model_of(config)
    params = abstract_params_of(config, model_config, loaded)
    # A quantised base's bytes are replicated, as training places them (`loaded` shapes them).
    ctx = train.make_context(config, mesh, model_config, workdir="", loaded=params)
    params = _placed(params, ctx.param_shardings)
    stage = _dpo_stage(config, ctx, params)
    init = functools.partial(stage_lib.init_state_fn, tx=stage.tx, stage=stage)
    abstract_state = jax.eval_shape(init, params)
    state_shardings = stage_lib.state_shardings(abstract_state, stage, ctx)
    state = _placed(abstract_state, state_shardings)
    batch = abstract_batch(config, stage.reference)
    batch = _placed(batch, sharding.batch_shardings(batch, mesh))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    update = stage_lib.compile_update(stage, ctx, state_shardings, batch)
    parts, base = _parts(state, stage, batch), _quantized_base_of(params)
    args = (state, stage.reference, batch, rng)
    compiled, seconds = _compile(update, mesh, args, target, _held(parts, base))
    inputs = _StepInputs(stage, batch, model_config, parts, seconds, base)
    return _plan_of(compiled, mesh, target, device_memory_bytes, inputs)


def _parts(state, stage: stage_lib.Stage, batch: dict[str, Any]) -> dict[str, int]:
    """Bytes per device of the step's arguments: params, optimizer, reference, batch."""
    reference_bytes = _shard_bytes(state.reference_params) + _shard_bytes(stage.reference)
    if "ref_logps" in batch:
        reference_bytes += _shard_bytes(batch["ref_logps"])
    return {
        "params": _shard_bytes(state.params),
        "optimizer": _shard_bytes(state.opt_state),
        "reference": reference_bytes,
        "batch": _shard_bytes({k: v for k, v in batch.items() if k != "ref_logps"}),
    }


def _held(parts: dict[str, int], base: QuantizedBase | None) -> str:
    """The arguments per device in words (and a quantised base's blocks against floats)."""
    held = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in parts.items())
    if base is not None:
        held += (
            f"; the {'/'.join(base.type_names)} base's blocks {base.block_bytes / GIB:.2f} GiB, "
            f"as float32 {base.float_bytes('float32') / GIB:.2f} GiB, as bfloat16 "
            f"{base.float_bytes('bfloat16') / GIB:.2f} GiB"
        )
    return held


def _compile(update, mesh, args: tuple, target: str, held: str):
    """(`update` lowered on `args` and compiled for the mesh, the seconds that took).

    Raises:
        ValueError: the TPU compiler refused the step for want of memory (it checks a chip's
            HBM itself, so an over-full step has no memory analysis to report).
    """
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = update.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        message = str(error).strip().splitlines()[0]
        if not message.startswith("RESOURCE_EXHAUSTED"):
            raise
        raise ValueError(
            f"{target}: the step does not fit; the TPU compiler says {message!r} (arguments "
            f"per device: {held})"
        ) from None
    return compiled, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class _StepInputs:
    stage: stage_lib.Stage
    batch: dict[str, Any]
    model_config: ModelConfig
    parts: dict[str, int]
    compile_seconds: float
    quantized_base: QuantizedBase | None


def _plan_of(compiled, mesh, target: str, device_memory_bytes: int, inputs: _StepInputs) -> Plan:
    stage, batch = inputs.stage, inputs.batch
    model_flops = step_benchmark.model_flops(
        inputs.model_config,
        num_rows=2 * batch["tokens"].shape[0],
        row_length=batch["tokens"].shape[2],
        reference_in_step=reference_lib.kind_name(stage.reference)
        in ("frozen", "moving", "adapters_off"),
    )["total_flops"]
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return Plan(
        target=target,
        num_devices=mesh.devices.size,
        mesh_shape=dict(mesh.shape),
        device_memory_bytes=device_memory_bytes,
        parts=inputs.parts,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        model_flops=model_flops / mesh.devices.size,
        xla_flops=float(cost.get("flops", 0.0)),
        compile_seconds=inputs.compile_seconds,
        custom_calls=tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))),
        quantized_base=inputs.quantized_base,
    )


def format_plan(plan: Plan, headroom: float = 0.0) -> str:
    """The plan as a short table, and whether it fits (1 - headroom) of the device's memory."""
    gib = lambda n: f"{n / GIB:8.3f} GiB"  # noqa: E731
    mesh = " x ".join(f"{name}={size}" for name, size in plan.mesh_shape.items())
    lines = [
        f"target {plan.target}: {plan.num_devices} devices, mesh {mesh}",
        f"compiled in {plan.compile_seconds:.1f} s; per device:",
        *(f"  {name:<12}{gib(size)}" for name, size in plan.parts.items()),
        f"  {'arguments':<12}{gib(plan.argument_bytes)}  (the parts above, as compiled)",
        f"  {'outputs':<12}{gib(plan.output_bytes)}  ({gib(plan.alias_bytes).strip()} in place)",
        f"  {'temporaries':<12}{gib(plan.temp_bytes)}",
        f"  {'code':<12}{gib(plan.code_bytes)}",
        f"  {'total':<12}{gib(plan.total_bytes)}  of {gib(plan.device_memory_bytes).strip()} "
        f"({100 * plan.headroom:.1f}% free)",
        f"  {'FLOPs':<12}{plan.model_flops / 1e12:8.3f} TFLOP per step (model FLOPs; XLA's "
        f"cost analysis, loop bodies once: {plan.xla_flops / 1e12:.3f})",
        f"kernels: {', '.join(plan.custom_calls) or 'none'}",
    ]
    if plan.quantized_base is not None:
        lines[-1:-1] = _base_lines(plan.quantized_base, gib)
    return "\n".join([*lines, _verdict(plan, headroom)])


def _base_lines(base: QuantizedBase, gib) -> list[str]:
    """The quantised base's blocks against the same weights as floats."""
    return [
        f"quantised base ({'/'.join(base.type_names)}): {base.num_weights:,} weights at "
        f"{base.bits_per_weight:.2f} bits, whole on each device (in 'reference' above)",
        f"  {'blocks':<12}{gib(base.block_bytes)}",
        f"  {'as float32':<12}{gib(base.float_bytes('float32'))}",
        f"  {'as bfloat16':<12}{gib(base.float_bytes('bfloat16'))}",
    ]


def _verdict(plan: Plan, headroom: float) -> str:
    budget = (1.0 - headroom) * plan.device_memory_bytes
    spare = budget - plan.total_bytes
    return (
        f"{'fits' if spare >= 0 else 'does not fit'}: {abs(spare) / GIB:.2f} GiB "
        f"{'to spare under' if spare >= 0 else 'over'} the {budget / GIB:.2f} GiB budget "
        f"({100 * (1 - headroom):.0f}% of {plan.device_memory_bytes / GIB:.0f} GiB per device)"
    )


def check_fits(plan: Plan, headroom: float = 0.0) -> None:
    """Raises ValueError when the plan needs more than (1 - headroom) of the device's memory,
    saying by how much and which part dominates."""
    budget = (1.0 - headroom) * plan.device_memory_bytes
    if plan.total_bytes <= budget:
        return
    name, size = plan.largest_part()
    raise ValueError(
        f"{plan.target}: the step needs {plan.total_bytes / GIB:.2f} GiB per device, "
        f"{(plan.total_bytes - budget) / GIB:.2f} GiB over the {budget / GIB:.2f} GiB budget "
        f"({100 * (1 - headroom):.0f}% of {plan.device_memory_bytes / GIB:.0f} GiB); the largest "
        f"part is {name} ({size / GIB:.2f} GiB)"
    )


def as_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready numbers, with the derived total and headroom."""
    return {
        **dataclasses.asdict(plan),
        "total_bytes": plan.total_bytes,
        "headroom": plan.headroom,
        "mesh_devices": int(np.prod(list(plan.mesh_shape.values()))),
    }
