"""dpo_jax: Direct Preference Optimization in JAX. Kept empty so `import dpo_jax.losses` stays light."""

__version__ = "0.1.0"
