"""Samplers: a name -> function table, selected by ``config.sampling.sampler``.

Every sampler is ``fn(apply_fn, params, key, **static_kwargs) -> SampleResult``
and is traceable, so a caller jits it with the keyword arguments closed over.
To add one, write the function and register it::

    from mdm_jax.sampling import SAMPLERS

    @SAMPLERS.register("my_sampler")
    def my_sampler(apply_fn, params, key, *, codec, schedule, ...): ...
"""

from mdm_jax.registry import Registry

SAMPLERS = Registry("sampler")

from mdm_jax.sampling.filters import (  # noqa: E402
    NEG_INF, apply_filters, apply_temperature, sample_categorical, top_k_filter,
    top_p_filter)
from mdm_jax.sampling.ancestral import (  # noqa: E402
    SampleResult, ancestral_sample, expected_idle_fraction, expected_nfe, initial_digits,
    time_grid)
from mdm_jax.sampling.autoregressive import ar_sample  # noqa: E402
from mdm_jax.sampling.confidence import confidence_sample  # noqa: E402
from mdm_jax.sampling.first_hitting import first_hitting_sample  # noqa: E402
from mdm_jax.sampling.punt import eb_sample, fast_dllm_sample, punt_sample  # noqa: E402
from mdm_jax.sampling.self_correction import (  # noqa: E402
    maskgit_sample, remdm_sample, self_correct_sample)

SAMPLERS.register("ancestral")(ancestral_sample)
SAMPLERS.register("ar")(ar_sample)
SAMPLERS.register("confidence")(confidence_sample)
SAMPLERS.register("first_hitting")(first_hitting_sample)
SAMPLERS.register("punt")(punt_sample)
SAMPLERS.register("eb")(eb_sample)
SAMPLERS.register("fast_dllm")(fast_dllm_sample)
SAMPLERS.register("maskgit")(maskgit_sample)
SAMPLERS.register("self_correct")(self_correct_sample)
SAMPLERS.register("remdm")(remdm_sample)


def get_sampler(name: str):
  """The sampler function registered under ``name`` ("ancestral", "ar", ...)."""
  return SAMPLERS.get(name)


__all__ = [
    "SAMPLERS", "get_sampler", "SampleResult", "ancestral_sample", "ar_sample",
    "confidence_sample", "first_hitting_sample", "punt_sample", "eb_sample",
    "fast_dllm_sample", "maskgit_sample", "self_correct_sample", "remdm_sample",
    "expected_idle_fraction", "expected_nfe", "initial_digits", "time_grid",
    "apply_filters", "apply_temperature", "top_k_filter", "top_p_filter",
    "sample_categorical", "NEG_INF",
]
