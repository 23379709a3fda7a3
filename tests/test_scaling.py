"""Scanned layers keep the compiled program's size flat in depth (dpo_jax.benchmarks.scaling)."""

from dpo_jax.benchmarks import scaling


def test_hlo_size_does_not_grow_with_depth():
    # A Python loop over layers made the optimized HLO grow linearly with depth; the scan's body
    # is compiled once, so 2 and 8 layers give the same number of HLO instructions.
    shallow = scaling.measure_compile(2, length=128)
    deep = scaling.measure_compile(8, length=128)
    assert deep["hlo_instructions"] == shallow["hlo_instructions"], (shallow, deep)
    assert deep["hlo_chars"] <= 1.01 * shallow["hlo_chars"], (shallow, deep)
