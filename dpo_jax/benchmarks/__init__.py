"""Benchmarks of dpo_jax's pieces, as functions returning dicts (scripts print and save them)."""
