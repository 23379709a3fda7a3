"""Time, FLOPs, MFU and memory of the training step, and of its alternatives, in one run.

The step is the one training compiles: `dpo_jax.run.stage.compile_update` on a `Stage` and `Context`
made by `dpo_jax.run.train`'s own construction functions, fed random weights and random tokens of
the config's shape. Each variant (the default, bf16, remat, chunked log-probs, cuDNN attention,
precomputed reference log-probs, ...) runs in a fresh subprocess, so one variant's allocations never
count against another's peak memory, and each measures the matmul peak right before its own timed
steps, so its MFU is against the machine's speed at that moment (the CPUs these run on are shared,
and their speed moves by tens of percent within minutes).

Model FLOPs of one step (`model_flops`), with P the matmul parameters (the q/k/v/o and MLP kernels
of every layer plus the unembedding; the embedding lookup is no matmul), N the tokens of the
batch (chosen and rejected rows both), T the row length, L the layers, D_attn = heads × head_dim,
and R the rows (2 × pairs):
  policy forward + backward:  6 · P · N
  reference forward:          2 · P · N  (0 with precomputed reference log-probs)
  attention:                  (6 + 2) · 2 · T² · D_attn · L · R  ((6 + 0) without the reference)
The attention term counts q·kᵀ and p·v (each T² · D_attn multiply-adds per head group per row,
2 FLOPs each, hence 2 · T² · D_attn FLOPs per matmul-pair "parameter-token" unit) fully, over
the whole T × T square, as XLA computes it; the causal half is reported apart
(`attention_flops_causal_half`). This is PaLM's 6·P + 12·L·T·D_attn per token for training.
Every position's logits are counted (the step computes them all), whether or not it is scored.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax.benchmarks import data_effects
from dpo_jax.benchmarks import memory as memory_lib

VARIANTS = {
    # name: {config field: value}; a value of None is taken from config.bench (the chunk size).
    "default": {},
    "float32": {"model.dtype": "float32"},
    "bfloat16": {"model.dtype": "bfloat16"},
    "remat": {"model.remat": True},
    "no_remat": {"model.remat": False},
    "chunked": {"model.logits_chunk_size": None},
    "full_logits": {"model.logits_chunk_size": 0},
    "cudnn": {"model.attention_impl": "cudnn"},
    "xla_attention": {"model.attention_impl": "xla"},
    # The reference kinds (dpo_jax.reference); "default" is the frozen one.
    "precomputed_ref": {"dpo.reference": "precomputed"},
    "tr_dpo": {"dpo.reference": "moving", "dpo.ref_sync_every": 16},
    "reference_free": {"dpo.reference": "none"},
    # LoRA (dpo_jax.lora): rank-8 adapters on every layer's linear kernels; the base held once.
    "lora": {"lora.rank": 8, "dpo.reference": "adapters_off"},
    # Pairs of varied length (data_effects.varied_batch), one a row or packed up to 3 a row.
    "padded_varied": {"bench.lengths": "varied", "data.pairs_per_row": 1},
    "packed_varied": {"bench.lengths": "varied", "data.pairs_per_row": 3},
}


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(model_config) -> int:
    """P: parameters that multiply activations (q, k, v, o, gate, up, down; the unembedding)."""
    d, f = model_config.hidden_size, model_config.intermediate_size
    q_dim = model_config.num_heads * model_config.head_dim
    kv_dim = model_config.num_kv_heads * model_config.head_dim
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * f
    return model_config.num_layers * per_layer + d * model_config.vocab_size


def model_flops(model_config, *, num_rows: int, row_length: int, reference_in_step: bool) -> dict:
    """Model FLOPs of one DPO step (see the module docstring for the formula).

    Args:
      model_config: the ModelConfig.
      num_rows: R, sequences the model sees per step (2 × pairs).
      row_length: T.
      reference_in_step: whether the step runs the reference forward.

    Returns:
      {"matmul_params", "tokens", "dense_flops", "attention_flops", "attention_flops_causal_half",
       "total_flops"}; total = dense + attention (attention counted fully).
    """
    params = matmul_params(model_config)
    tokens = num_rows * row_length
    multiplier = 6 + (2 if reference_in_step else 0)
    attention_dim = model_config.num_heads * model_config.head_dim
    attention = multiplier * 2 * row_length**2 * attention_dim * model_config.num_layers * num_rows
    dense = multiplier * params * tokens
    return {
        "matmul_params": params,
        "tokens": tokens,
        "dense_flops": dense,
        "attention_flops": attention,
        "attention_flops_causal_half": attention // 2,
        "total_flops": dense + attention,
    }


# ----------------------------------------------------------------------------- measuring


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _make_peak_dot(dtype: str, size: int):
    """A jitted [n, n] @ [n, n] `jnp.dot` in `dtype`, compiled and run once, and its FLOPs.

    Accumulated in float32 (`preferred_element_type`), as the model's matmuls are: for bf16 on
    an AVX-512-BF16 CPU that form ran at 700 GFLOP/s where a bf16-out `jnp.dot` ran at 220 (and
    float32 at 355), so a bf16-out dot would understate the peak and overstate MFU.
    """
    keys = jax.random.split(jax.random.key(0))
    lhs, rhs = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    dot = jax.jit(lambda lhs, rhs: jnp.dot(lhs, rhs, preferred_element_type=jnp.float32))
    jax.block_until_ready(dot(lhs, rhs))  # compile, and touch every page once
    return (lambda: dot(lhs, rhs)), 2 * size**3


def random_batch(
    *, pairs: int, prompt_length: int, response_length: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A host batch as the pipeline makes it: one pair a row, prompt then response, no padding.

    Returns:
      tokens, response_mask, positions, segment_ids [B, 2, T]; pair_mask [B, 1].
    """
    length = prompt_length + response_length
    shape = (pairs, 2, length)
    rng = np.random.default_rng(seed)
    response_mask = np.zeros(shape, bool)
    response_mask[:, :, prompt_length:] = True
    return {
        "tokens": rng.integers(0, vocab_size, shape, dtype=np.int32),
        "response_mask": response_mask,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "pair_mask": np.ones((pairs, 1), bool),
    }


def with_variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` with variant `name` applied (see VARIANTS).

    Raises:
      ValueError: an unknown variant name.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown benchmark variant {name!r}; known: {sorted(VARIANTS)}")
    config = ml_collections.ConfigDict(config.to_dict())
    for field, value in VARIANTS[name].items():
        group, key = field.split(".")
        config[group][key] = config.bench.chunk_size if value is None else value
    return config


def variant_available(config: ml_collections.ConfigDict) -> str | None:
    """None when the variant can run on this backend, else why not."""
    if config.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU (backend: {jax.default_backend()})"
    return None


def build_step(config: ml_collections.ConfigDict):
    """The compiled training step of `config` and its inputs, built as training builds them.

    Returns:
      (update, state, reference, batch, rng, model_config, stage): `update` is
      `dpo_jax.run.stage.compile_update`'s jitted update_fn (state donated).
    """
    from dpo_jax import reference as reference_lib
    from dpo_jax import sharding  # heavy: only in the subprocess
    from dpo_jax import step as step_lib
    from dpo_jax.run import stage as stage_lib
    from dpo_jax.run import train

    train.check_config(config)
    mesh = train.make_mesh(config)
    _, model_config, loaded = train.load_model(config, workdir=config.bench.workdir)
    # Random weights of the model's shapes, except a quantised base (QLoRA), which is the file's.
    loaded = loaded if config.model.quantized else None
    ctx = train.make_context(config, mesh, model_config, workdir="", loaded=loaded)
    params = train.initial_params(model_config, loaded, ctx, config.seed)
    del loaded
    options = train.loss_options(
        config, train.loss_names(config.dpo.loss_type), ctx.final_logit_softcapping
    )
    tx, schedule = train.stage_optimizer(
        config, config.optimizer.learning_rate, config.optimizer.warmup_steps, 1000
    )
    reference = train.make_reference(config, params)
    precomputed = isinstance(reference, reference_lib.PrecomputedReference)
    stage = stage_lib.Stage(
        name="dpo",
        num_steps=1000,
        options=options,
        tx=tx,
        schedule=schedule,
        reference=reference,
        train_batches=None,
        eval_batches=[],
    )
    host_batch = _host_batch(config, model_config.vocab_size)
    if precomputed:  # the one pass before training, as train.make_dpo_stage runs it
        compute = jax.jit(
            lambda p, b: step_lib.ref_logps_fn(
                p,
                b,
                apply_fn=ctx.apply_fn,
                logits_chunk_size=options.logits_chunk_size,
                final_logit_softcapping=options.final_logit_softcapping,
            )
        )
        host_batch["ref_logps"] = np.asarray(compute(params, sharding.put_batch(host_batch, mesh)))
    state = stage_lib.init_state(stage, params, ctx)  # as training builds it (consumes params)
    update = stage_lib.compile_update(stage, ctx, stage_lib.state_shardings_of(state), host_batch)
    batch = sharding.put_batch(host_batch, mesh)
    return update, state, reference, batch, jax.random.key(config.seed), model_config, stage


def _host_batch(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, np.ndarray]:
    """Random tokens of the config's shape: every pair the same length, or varied lengths."""
    bench = config.bench
    if bench.lengths == "fixed":
        return random_batch(
            pairs=config.data.batch_size,
            prompt_length=bench.prompt_length,
            response_length=bench.response_length,
            vocab_size=vocab_size,
            seed=config.seed,
        )
    if bench.lengths != "varied":
        raise ValueError(f"config.bench.lengths={bench.lengths!r} must be 'fixed' or 'varied'")
    return data_effects.varied_batch(
        rows=config.data.batch_size,
        max_length=config.data.max_length,
        pairs_per_row=config.data.pairs_per_row,
        prompt_length=bench.prompt_length,
        response_length=bench.response_length,
        min_length=bench.min_length,
        vocab_size=vocab_size,
        seed=config.seed,
    )


def measure_variant(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compiles and times one variant's step in this process (see `run_benchmark`)."""
    from dpo_jax import reference as reference_lib
    from dpo_jax.reference import kind_name

    bench = config.bench
    update, state, reference, batch, rng, model_config, stage = build_step(config)
    num_real_tokens = int(jax.device_get(jnp.sum(batch["segment_ids"] > 0)))
    # What the stage holds on its devices between steps: policy, optimizer state, reference (if
    # any kind keeps params) and the batch; the step's temporaries come on top (XLA's analysis).
    held_bytes = memory_lib.live_buffer_bytes()
    # The model's params: the state's, or (LoRA) the base the reference holds.
    model_params = reference_lib.held_params(reference)
    if model_params is None:
        model_params = state.params
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(model_params))
    start = time.perf_counter()
    compiled = update.lower(state, reference, batch, rng).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    for _ in range(bench.warmup_steps):
        state, metrics = compiled(state, reference, batch, rng)
    jax.block_until_ready(state)
    flops = model_flops(
        model_config,
        num_rows=2 * config.data.batch_size,
        row_length=config.data.max_length,
        reference_in_step=kind_name(stage.reference) in ("frozen", "moving", "adapters_off"),
    )
    state, step_times, peaks, mfus = _timed_steps(
        compiled, (state, reference, batch, rng), bench, model_config.dtype, flops["total_flops"]
    )
    step_s = statistics.median(step_times)
    peak = {
        "dtype": model_config.dtype,
        "size": bench.peak_matmul_size,
        "flops_per_s": statistics.median(peaks),
        "per_step_flops_per_s": peaks,
        # Contention only slows a dot down, so the fastest one is the machine's own speed.
        "best_flops_per_s": max(peaks),
    }
    loss = float(jax.device_get(compiled(state, reference, batch, rng)[1]["loss"]))
    device_stats = jax.devices()[0].memory_stats() or {}
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "step_s": step_s,
        "step_times_s": step_times,
        "compile_s": compile_s,
        "tokens_per_s": flops["tokens"] / step_s,
        "real_tokens": num_real_tokens,  # non-padding positions
        "real_tokens_per_s": num_real_tokens / step_s,
        **flops,
        "achieved_flops_per_s": flops["total_flops"] / step_s,
        "peak": peak,
        "mfu": statistics.median(mfus),
        "per_step_mfu": mfus,
        # Conservative: the median step against the fastest dot of the run.
        "mfu_vs_best_peak": flops["total_flops"] / step_s / max(peaks),
        "mfu_spec": (
            flops["total_flops"] / step_s / bench.spec_peak_flops if bench.spec_peak_flops else None
        ),
        **memory_lib.xla_memory(memory),
        "reference_kind": kind_name(stage.reference),
        "held_bytes": held_bytes,
        "param_bytes": param_bytes,
        "peak_rss_bytes": memory_lib.peak_rss_bytes(),
        "device_peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
        "loss_after": loss,
    }


def _timed_steps(compiled, inputs: tuple, bench, dtype: str, step_flops: float):
    """(state, step seconds, neighbouring peaks, per-step MFUs) of `bench.timed_steps` steps.

    Shared CPUs change speed within seconds, so the peak is measured next to each timed step
    (a few dots before it) and each step's MFU is against its own neighbouring peak; the
    reported MFU is the median of those, the peak the median of the neighbouring peaks.
    """
    state, reference, batch, rng = inputs
    dot, dot_flops = _make_peak_dot(dtype, bench.peak_matmul_size)
    step_times, peaks, mfus = [], [], []
    for _ in range(bench.timed_steps):
        peak_s, _ = _median_seconds(dot, bench.peak_repeats)
        start = time.perf_counter()
        state, _ = compiled(state, reference, batch, rng)
        jax.block_until_ready(state)
        step_times.append(time.perf_counter() - start)
        peaks.append(dot_flops / peak_s)
        mfus.append(step_flops / step_times[-1] / peaks[-1])
    return state, step_times, peaks, mfus


def _run_in_subprocess(config: ml_collections.ConfigDict, *extra: str) -> dict:
    """`python -m step_benchmark CONFIG` (one variant), or the module and flags in `extra`."""
    module, *flags = extra or (__name__,)
    process = subprocess.run(
        [sys.executable, "-m", module, config.to_json(), *flags], capture_output=True, text=True
    )
    if process.returncode != 0:
        return {"error": f"exit {process.returncode}: {process.stderr.strip()[-2000:]}"}
    return json.loads(process.stdout.strip().splitlines()[-1])


def run_benchmark(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every variant of `config.bench.variants`, each in a fresh subprocess, plus the V = 262,144
    log-prob memory check and the reference-cache hit (`data_effects`).

    Returns:
      {"config": the config as a dict, "variants": {name: measure_variant's dict, or
       {"n/a": reason} or {"error": ...}}, "ratios": {name: step_s / the first variant's step_s},
       "logprob_memory": `measure_logprob_memory`'s result or None, "ref_cache" and
       "packing": `data_effects.measure_cache_hit`'s and `measure_packing`'s or None}.
    """
    names = [name.strip() for name in config.bench.variants.split(",") if name.strip()]
    results: dict[str, Any] = {}
    for name in names:
        variant = with_variant(config, name)
        reason = variant_available(variant)
        results[name] = {"n/a": reason} if reason else _run_in_subprocess(variant)
        print(f"[benchmark] {name}: {_one_line(results[name])}", file=sys.stderr, flush=True)
    baseline = results[names[0]].get("step_s")
    ratios = {
        name: result["step_s"] / baseline
        for name, result in results.items()
        if baseline and "step_s" in result
    }
    logprob_memory = None
    if config.bench.logprob_memory_tokens:
        from dpo_jax.benchmarks.logprob_memory import measure_logprob_memory

        try:
            logprob_memory = measure_logprob_memory(
                vocab_size=262_144,
                num_tokens=config.bench.logprob_memory_tokens,
                hidden_size=config.bench.logprob_memory_hidden,
                chunk_size=config.bench.logprob_memory_chunk,
            )
        except RuntimeError as error:  # e.g. the full path runs out of memory
            logprob_memory = {"error": str(error)[-2000:]}
    ref_cache = packing = None
    if config.bench.cache_pairs:
        ref_cache = _run_in_subprocess(config, data_effects.__name__, "--measure=cache")
    if config.bench.packing:
        packing = _run_in_subprocess(config, data_effects.__name__, "--measure=packing")
    return {
        "config": config.to_dict(),
        "variants": results,
        "ratios": ratios,
        "logprob_memory": logprob_memory,
        "ref_cache": ref_cache,
        "packing": packing,
    }


def format_table(result: dict[str, Any]) -> str:
    """`run_benchmark`'s result as a plain-text table (GB = 1e9 bytes, TFLOP = 1e12 FLOPs)."""
    gigabytes = lambda n: "-" if n is None else f"{n / 1e9:.2f}"
    header = (
        f"{'variant':<16}{'s/step':>8}{'vs first':>9}{'tokens/s':>10}{'TFLOP':>7}{'GFLOP/s':>9}"
        f"{'peak GFLOP/s':>13}{'MFU':>7}{'best-peak MFU':>14}{'compile s':>10}"
        f"{'XLA GB':>8}{'RSS GB':>8}{'dev GB':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, row in result["variants"].items():
        if "step_s" not in row:
            lines.append(f"{name:<16}{'n/a: ' + str(row.get('n/a') or row.get('error'))[:90]}")
            continue
        lines.append(
            f"{name:<16}{row['step_s']:>8.3f}{result['ratios'][name]:>9.3f}"
            f"{row['tokens_per_s']:>10.0f}{row['total_flops'] / 1e12:>7.3f}"
            f"{row['achieved_flops_per_s'] / 1e9:>9.1f}{row['peak']['flops_per_s'] / 1e9:>13.1f}"
            f"{row['mfu']:>7.1%}{row['mfu_vs_best_peak']:>14.1%}{row['compile_s']:>10.1f}{gigabytes(row['xla_peak_bytes']):>8}"
            f"{gigabytes(row['peak_rss_bytes']):>8}{gigabytes(row['device_peak_bytes_in_use']):>8}"
        )
    first = next(iter(result["variants"].values()))
    if first.get("mfu_spec") is not None:
        lines.append(f"MFU of the first variant against the spec peak: {first['mfu_spec']:.1%}")
    lines.append(
        "TFLOP: model FLOPs per step (6·P·N policy + 2·P·N reference in the step + attention, "
        "causal counted fully). MFU: median over steps of each step against the dots timed just "
        "before it; best-peak MFU: the median step against the fastest of those dots."
    )
    lines += ["", _reference_memory_table(result)]
    effects = data_effects.format_lines(result)
    lines += ["", *effects] if effects else []
    memory = result.get("logprob_memory")
    if memory and "ratios" in memory:
        from dpo_jax.benchmarks.logprob_memory import format_table as memory_table

        lines += ["", "Log-prob forward+backward at V = 262,144 (full vs chunked):"]
        lines.append(memory_table(memory))
    elif memory:
        lines.append(f"log-prob memory check failed: {memory['error'][:300]}")
    return "\n".join(lines)


def _reference_memory_table(result: dict[str, Any]) -> str:
    """Device memory each variant holds during the DPO stage, by its kind of reference."""
    lines = [
        "Memory held during the DPO stage (live arrays between steps: policy, optimizer state, "
        "reference, batch; GB = 1e9 bytes):",
        f"{'variant':<16}{'reference':>12}{'held GB':>9}{'x params':>10}{'+ step temp GB':>16}",
    ]
    for name, row in result["variants"].items():
        if "held_bytes" in row:
            copies = row["held_bytes"] / row["param_bytes"]
            lines.append(
                f"{name:<16}{row['reference_kind']:>12}{row['held_bytes'] / 1e9:>9.3f}"
                f"{copies:>10.2f}{row['xla_temp_bytes'] / 1e9:>16.3f}"
            )
    return "\n".join(lines)


def _one_line(result: dict) -> str:
    if "step_s" not in result:
        return str(result)[:300]
    return f"{result['step_s']:.3f} s/step, MFU {result['mfu']:.1%}"


if __name__ == "__main__":  # the subprocess of `run_benchmark`: one variant, JSON out
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="the variant's config, as ConfigDict.to_json()")
    variant_config = ml_collections.ConfigDict(json.loads(parser.parse_args().config))
    print(json.dumps(measure_variant(variant_config)))
