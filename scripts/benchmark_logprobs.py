"""Peak memory and time of the log-prob forward+backward, chunked vs full-vocabulary logits.

    python scripts/benchmark_logprobs.py  # V = 262,144, 4,096 tokens, D = 640 (Gemma 3 270M)

Each variant runs in its own subprocess; the full path needs about 12 GB of free memory at the
defaults (two [4096, 262144] float32 buffers plus the unembedding and its gradient).
"""

import argparse
import json
import pathlib

from dpo_jax.benchmarks.logprob_memory import format_table, measure_logprob_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=262_144, help="V")
    parser.add_argument("--num_tokens", type=int, default=4096, help="N·T tokens scored per call")
    parser.add_argument("--hidden_size", type=int, default=640, help="D")
    parser.add_argument("--chunk_size", type=int, default=256, help="token rows per chunk")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument(
        "--output", type=pathlib.Path, default=pathlib.Path("bench_results/logprob_memory.json")
    )
    args = parser.parse_args()
    result = measure_logprob_memory(
        vocab_size=args.vocab_size,
        num_tokens=args.num_tokens,
        hidden_size=args.hidden_size,
        chunk_size=args.chunk_size,
        repeats=args.repeats,
    )
    print(format_table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
