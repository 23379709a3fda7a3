"""Memory figures the benchmarks report: peak RSS, live device buffers, XLA's analysis."""

import resource

import jax


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def live_buffer_bytes() -> int:
    """Bytes of the device buffers live arrays hold, each buffer once: two Array objects can
    share one (`jax.device_get` of a CPU array leaves a second over the same buffer)."""
    buffers = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffers[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    return sum(buffers.values())


def xla_memory(memory) -> dict[str, int]:
    """XLA's memory analysis of the compiled step, and its peak (arguments + outputs +
    temporaries − what the outputs alias of the arguments)."""
    return {
        "xla_argument_bytes": memory.argument_size_in_bytes,
        "xla_output_bytes": memory.output_size_in_bytes,
        "xla_temp_bytes": memory.temp_size_in_bytes,
        "xla_alias_bytes": memory.alias_size_in_bytes,
        "xla_peak_bytes": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes,
    }
