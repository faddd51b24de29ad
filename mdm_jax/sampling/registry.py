"""The sampler registry: ``config.sampling.sampler`` selects a function registered here.

Every sampler is ``fn(apply_fn, params, key, **static_kwargs) -> SampleResult`` and is
traceable, so a caller jits it with the keyword arguments closed over.
"""

from mdm_jax.core.registry import Registry

SAMPLERS = Registry("sampler", "sampling.sampler")


def get_sampler(name: str):
  """The sampler function registered under ``name`` ("ancestral", "ar", ...)."""
  return SAMPLERS.get(name)
