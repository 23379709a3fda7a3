"""Test set-up: 8 CPU devices, strict rank promotion and a per-session compilation cache, set
before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests build the same tiny model and step afresh (a new `jax.jit` each time, so the
# in-memory cache misses), and the subprocess tests run the same tiny job again and again: an
# on-disk cache of compiled programs lets each identical program compile once per session. The
# directory is new for every session and removed at its end, so every program the suite runs is
# still compiled from scratch once; the environment variables reach the subprocesses (the main
# job, the notebook kernels, the multi-process runs), which inherit os.environ.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="dpo_jax_test_compile_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
