"""Benchmark the training step: `python scripts/benchmark.py [--config=configs/bench_cpu.py]`.

Builds the same compiled DPO step that training uses, on random weights and tokens of the
config's shape, and times it and its alternatives (bf16, remat, chunked log-probs, cuDNN
attention, precomputed reference log-probs), each against the matmul peak measured in the same
run. Prints a table and writes JSON to `--config.bench.output`. Run it on a quiet machine.
"""

import json
import os
import pathlib

from absl import app

from dpo_jax.run import cli

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "bench_cpu.py"
)

_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "Benchmark config file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dpo_jax.benchmarks import step_benchmark  # after flag parsing, so --help stays fast

    config = _CONFIG.value
    result = step_benchmark.run_benchmark(config)
    print(step_benchmark.format_table(result))
    output = pathlib.Path(config.bench.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    cli.run(main)
