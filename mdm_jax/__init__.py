"""mdm_jax: masked diffusion models (MDM, Prime) in JAX."""

__version__ = "0.1.0"
