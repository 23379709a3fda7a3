"""The derivation on an enumerable bandit: `python scripts/bandit.py [--out_dir=docs]`.

DPO of a tabular policy on N Bradley–Terry pairs drawn from π_ref, for N from 16 to 2^20;
prints KL(π_θ ‖ π*) for each N (π* = π_ref·exp(r/β)/Z computed exactly) and writes
bandit_kl.png and bandit_kl.csv to --out_dir. About a minute on a 2-core CPU.
"""

import os

from absl import app, flags

_OUT_DIR = flags.DEFINE_string("out_dir", "docs", "Where bandit_kl.png and bandit_kl.csv go.")
_SEEDS = flags.DEFINE_integer("num_seeds", 4, "Independent pair samples per N.")
_PAIR_COUNTS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np  # after flag parsing, so --help stays fast

    from dpo_jax.experiments import bandit

    problem = bandit.make_bandit()
    kls = bandit.kl_curve(problem, _PAIR_COUNTS, num_seeds=_SEEDS.value)
    print(f"{'pairs':>8} {'median KL(π_θ ‖ π*) nats':>26} {'max over seeds':>16}")
    for num_pairs, row in zip(_PAIR_COUNTS, kls, strict=True):
        print(f"{num_pairs:>8} {np.median(row):>26.5f} {row.max():>16.5f}")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    png = os.path.join(_OUT_DIR.value, "bandit_kl.png")
    csv = os.path.join(_OUT_DIR.value, "bandit_kl.csv")
    bandit.write_curve(_PAIR_COUNTS, kls, png, csv)
    print(f"wrote {png} and {csv}")


if __name__ == "__main__":
    app.run(main)
