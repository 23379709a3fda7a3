"""Compile time and HLO size at 4, 16 and 32 layers; the chunked head vs full logits on 8 devices.

    python scripts/benchmark_scaling.py  # writes bench_results/scaling.json

Each measurement runs in its own subprocess (the head's with 8 virtual CPU devices).
"""

import argparse
import json
import pathlib

from dpo_jax.benchmarks.scaling import format_scaling, run_scaling


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,16,32", help="layer counts, comma-separated")
    parser.add_argument(
        "--output", type=pathlib.Path, default=pathlib.Path("bench_results/scaling.json")
    )
    args = parser.parse_args()
    result = run_scaling(tuple(int(depth) for depth in args.depths.split(",")))
    print(format_scaling(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
