"""dpo_jax: Direct Preference Optimization in JAX.

Kept empty so that `import dpo_jax.losses` stays light (jax only).
"""

__version__ = "0.1.0"
