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

from dpo_jax import reference as reference_lib
from dpo_jax import sharding
from dpo_jax.benchmarks import step_benchmark
from dpo_jax.models import ModelConfig, init_params
from dpo_jax.models.convert_hf import read_hf_config
from dpo_jax.run import stage as stage_lib
from dpo_jax.run import train

GIB = 1024**3
# Memory of one chip (HBM), by the generation named in the topology ("v5e:16x16" -> "v5e").
CHIP_MEMORY_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}


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

    try:
        description = topologies.get_topology_desc(topology, "tpu")
    except Exception as error:  # the TPU runtime raises its own error type for a bad layout
        raise ValueError(f"--topology={topology!r}: the TPU compiler refused it: {error}") from None
    return list(description.devices), CHIP_MEMORY_BYTES[generation]


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
    if config.model.source == "hf":
        overrides = dict(
            dtype=config.model.dtype,
            param_dtype=config.model.param_dtype,
            remat=config.model.remat,
            attention_impl=config.model.attention_impl,
        )
        source = os.path.join(config.model.hf_path, "config.json")
        return ModelConfig.from_hf_config(read_hf_config(config.model.hf_path), source, **overrides)
    _, model_config, _ = train.load_model(config, workdir=os.path.expanduser("~/.cache/dpo_jax"))
    return model_config


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
        ValueError: a mesh that does not divide the devices, or batch sizes that do not divide
            over the mesh's batch shards.
    """
    train.check_config(config)
    mesh = sharding.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices
    )
    micro_batch = config.data.batch_size // config.optimizer.grad_accum_steps
    sharding.check_batch_size(
        micro_batch, mesh, what="config.data.batch_size / config.optimizer.grad_accum_steps"
    )
    model_config = model_config_of(config)
    ctx = train.make_context(config, mesh, model_config, workdir="")
    abstract_params = _placed(
        jax.eval_shape(init_params, model_config, jax.random.key(0)), ctx.param_shardings
    )
    stage = _dpo_stage(config, ctx, abstract_params)
    init = functools.partial(stage_lib.init_state_fn, tx=stage.tx, stage=stage)
    abstract_state = jax.eval_shape(init, abstract_params)
    state_shardings = stage_lib.state_shardings(abstract_state, stage, ctx)
    state = _placed(abstract_state, state_shardings)
    batch = abstract_batch(config, stage.reference)
    batch = _placed(batch, sharding.batch_shardings(batch, mesh))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    update = stage_lib.compile_update(stage, ctx, state_shardings, batch)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = update.lower(state, stage.reference, batch, rng).compile()
    inputs = _StepInputs(state, stage, batch, model_config, time.perf_counter() - start)
    return _plan_of(compiled, mesh, target, device_memory_bytes, inputs)


@dataclasses.dataclass(frozen=True)
class _StepInputs:
    state: Any
    stage: stage_lib.Stage
    batch: dict[str, Any]
    model_config: ModelConfig
    compile_seconds: float


def _plan_of(compiled, mesh, target: str, device_memory_bytes: int, inputs: _StepInputs) -> Plan:
    state, stage, batch = inputs.state, inputs.stage, inputs.batch
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
    reference_bytes = _shard_bytes(state.reference_params) + _shard_bytes(stage.reference)
    if "ref_logps" in batch:
        reference_bytes += _shard_bytes(batch["ref_logps"])
    parts = {
        "params": _shard_bytes(state.params),
        "optimizer": _shard_bytes(state.opt_state),
        "reference": reference_bytes,
        "batch": _shard_bytes({k: v for k, v in batch.items() if k != "ref_logps"}),
    }
    return Plan(
        target=target,
        num_devices=mesh.devices.size,
        mesh_shape=dict(mesh.shape),
        device_memory_bytes=device_memory_bytes,
        parts=parts,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        model_flops=model_flops / mesh.devices.size,
        xla_flops=float(cost.get("flops", 0.0)),
        compile_seconds=inputs.compile_seconds,
        custom_calls=tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))),
    )


def format_plan(plan: Plan) -> str:
    """The plan as a short table, and whether it fits the device's memory."""
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
    return "\n".join(lines)


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
