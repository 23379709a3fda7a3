"""Experiments built on the library's public functions: `bandit` (the derivation on an
enumerable bandit), `frontier` (reward vs KL), `online_dpo`."""
