"""What scales with the pod: compile time and program size by depth; the chunked head on 8 devices.

Two measurements, each in a fresh Python process:
- the model's forward+backward (scanned layers, remat) compiled at several depths: seconds to
  lower and compile, and the optimized HLO's size (characters and instructions), which a
  Python loop over layers would grow linearly;
- the log-prob head's forward+backward on a data=8 mesh of virtual CPU devices, chunked along
  each row's sequence, against full logits and against the head as it was before (rows
  flattened across the sharded axis, then chunked): median wall time, and the compiled
  program's collectives (all-gathers of hidden states are what the chunking must not have).
  Eight virtual devices share this machine's cores, so times say little; the HLO says more.
"""

import json
import os
import statistics
import subprocess
import sys
import time

_DEPTH_MODEL = dict(
    family="llama",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    remat=True,
)


def measure_compile(num_layers: int, rows: int = 2, length: int = 256) -> dict:
    """Compile time and optimized HLO size of the model's forward+backward at one depth."""
    import jax
    import jax.numpy as jnp

    from dpo_jax.logprobs import chunked_token_logps
    from dpo_jax.models import ModelConfig, init_params, make_apply_fn

    config = ModelConfig(num_layers=num_layers, **_DEPTH_MODEL)
    apply_fn = make_apply_fn(config)

    def loss(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        hidden, unembedding = apply_fn(params, tokens, positions, jnp.ones_like(tokens))
        return jnp.sum(chunked_token_logps(hidden, unembedding, tokens, chunk_size=128))

    params = jax.eval_shape(init_params, config, jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    instructions = sum(1 for line in hlo.splitlines() if " = " in line)
    return {
        "num_layers": num_layers,
        "compile_s": seconds,
        "hlo_chars": len(hlo),
        "hlo_instructions": instructions,
    }


def measure_head(
    rows: int = 8, length: int = 512, width: int = 256, vocab: int = 32_000, chunk: int = 128
):
    """Chunked vs full head on a data=8 mesh: median seconds of value_and_grad, collectives."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dpo_jax.logprobs import chunked_token_logps, token_logps_from_logits

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    by_row = NamedSharding(mesh, PartitionSpec("data"))
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.device_put(jax.random.normal(keys[0], (rows, length, width)), by_row)
    unembedding = jax.random.normal(keys[1], (width, vocab)) / np.sqrt(width)
    targets = jax.device_put(jax.random.randint(keys[2], (rows, length), 0, vocab), by_row)
    results = {}
    for name in ("full", "chunked", "flattened"):

        def loss(hidden, unembedding, name=name):
            if name == "full":
                return jnp.sum(token_logps_from_logits(hidden @ unembedding, targets))
            if name == "flattened":
                return jnp.sum(_flattened_token_logps(hidden, unembedding, targets, chunk * rows))
            logps = chunked_token_logps(hidden, unembedding, targets, chunk_size=chunk, mesh=mesh)
            return jnp.sum(logps)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        compiled = step.lower(hidden, unembedding).compile()
        hlo = compiled.as_text()
        jax.block_until_ready(compiled(hidden, unembedding))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(compiled(hidden, unembedding))
            times.append(time.perf_counter() - start)
        results[name] = {
            "chunk_size": None if name == "full" else chunk,
            "median_s": statistics.median(times),
            "all_gathers": hlo.count(" all-gather("),
            "all_reduces": hlo.count(" all-reduce("),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        }
    return {"rows": rows, "length": length, "width": width, "vocab": vocab, **results}


def _flattened_token_logps(hidden, unembedding, targets, chunk_rows: int):
    """The head as it was before: [N, T] rows flattened across the sharded batch axis, then
    chunks of `chunk_rows` of them scanned (for comparison only)."""
    import jax
    import jax.numpy as jnp

    from dpo_jax.logprobs import unembedded_token_logps

    rows = hidden.reshape(-1, hidden.shape[-1]).reshape(-1, chunk_rows, hidden.shape[-1])
    row_targets = targets.reshape(-1, chunk_rows)

    def body(carry, chunk):
        return carry, jax.checkpoint(unembedded_token_logps)(chunk[0], unembedding, chunk[1])

    return jnp.reshape(jax.lax.scan(body, None, (rows, row_targets))[1], targets.shape)


def _in_subprocess(function: str, argument: int | None, devices: int) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    code = (
        "import json, sys; from dpo_jax.benchmarks import scaling; "
        f"print(json.dumps(scaling.{function}({'' if argument is None else argument})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"scaling.{function}({argument}) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_scaling(depths: tuple[int, ...] = (4, 16, 32)) -> dict:
    """Both measurements, each in its own process; returns JSON-ready results."""
    compile_rows = [_in_subprocess("measure_compile", depth, 1) for depth in depths]
    first, last = compile_rows[0], compile_rows[-1]
    return {
        "compile": compile_rows,
        "compile_ratio": last["compile_s"] / first["compile_s"],
        "hlo_ratio": last["hlo_chars"] / first["hlo_chars"],
        "head_data8": _in_subprocess("measure_head", None, 8),
    }


def format_scaling(result: dict) -> str:
    """A short text table of `run_scaling`'s result."""
    lines = ["layers  compile s  HLO chars  HLO instructions"]
    for row in result["compile"]:
        lines.append(
            f"{row['num_layers']:>6}  {row['compile_s']:>9.2f}  {row['hlo_chars']:>9}  "
            f"{row['hlo_instructions']:>16}"
        )
    lines.append(
        f"last/first: compile {result['compile_ratio']:.2f}x, HLO {result['hlo_ratio']:.2f}x"
    )
    head = result["head_data8"]
    lines.append(
        f"head on data=8, [{head['rows']}, {head['length']}, {head['width']}] x V={head['vocab']}:"
    )
    for name in ("full", "chunked", "flattened"):
        row = head[name]
        lines.append(
            f"  {name:<8} {row['median_s'] * 1e3:8.1f} ms  all-gathers {row['all_gathers']}  "
            f"all-reduces {row['all_reduces']}  temporaries {row['temp_bytes'] / 2**20:.0f} MiB"
        )
    return "\n".join(lines)
