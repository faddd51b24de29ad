"""Samplers by name (``config.sampling.sampler``), and the code that runs them.

===================== ======================================================================
``ancestral.py``      ``ancestral``: MDM / Prime ancestral sampling with caching
``first_hitting.py``  ``first_hitting``: one reveal per event, exact event times
``confidence.py``     ``confidence``: most-confident-first, semi-autoregressive blocks
``punt.py``           ``punt``, ``eb``, ``fast_dllm``: adaptive parallel unmasking
``self_correction``   ``maskgit``, ``self_correct``, ``remdm``: samplers that can re-mask
``autoregressive.py`` ``ar``: left to right, for the AR baseline
``filters.py``        temperature, top-k, top-p, float32-safe categorical draws
``generate.py``       jit/compile/time a sampler and report NFE, tokens/s, entropy
===================== ======================================================================

Every sampler is ``fn(apply_fn, params, key, **static_kwargs) -> SampleResult`` and is
traceable.  To add one, write the function in a file of its own and register it with
its options spec and claims (``registry.py`` describes them)::

    import dataclasses
    from mdm_jax.sampling.registry import SAMPLERS, SamplerOptions

    @dataclasses.dataclass(frozen=True)
    class MyOptions(SamplerOptions):
      my_knob: float = 0.5            # read from config.sampling.my_knob

    @SAMPLERS.register("my_sampler", options=MyOptions, takes=("eps",))
    def my_sampler(apply_fn, params, key, *, codec, schedule, ..., my_knob=0.5, eps=1e-5): ...
"""

from mdm_jax.sampling.registry import (SAMPLERS, SamplerEntry, SamplerOptions, get_sampler,
                                       sampler_entry)
from mdm_jax.sampling.filters import (
    NEG_INF, apply_filters, apply_temperature, sample_categorical, top_k_filter,
    top_p_filter)
# The built-in samplers register themselves on import.
from mdm_jax.sampling.ancestral import (
    SampleResult, ancestral_sample, expected_idle_fraction, expected_nfe, initial_digits,
    time_grid)
from mdm_jax.sampling.autoregressive import ar_sample
from mdm_jax.sampling.confidence import confidence_sample
from mdm_jax.sampling.first_hitting import first_hitting_sample
from mdm_jax.sampling.punt import eb_sample, fast_dllm_sample, punt_sample
from mdm_jax.sampling.self_correction import maskgit_sample, remdm_sample, self_correct_sample
from mdm_jax.sampling.generate import (SAMPLER_OPTIONS, bind_options, run_sampler,
                                       sampler_options)

__all__ = [
    "SAMPLERS", "get_sampler", "sampler_entry", "SamplerEntry", "SamplerOptions", "bind_options",
    "SampleResult", "ancestral_sample", "ar_sample",
    "confidence_sample", "first_hitting_sample", "punt_sample", "eb_sample",
    "fast_dllm_sample", "maskgit_sample", "self_correct_sample", "remdm_sample",
    "expected_idle_fraction", "expected_nfe", "initial_digits", "time_grid",
    "apply_filters", "apply_temperature", "top_k_filter", "top_p_filter",
    "sample_categorical", "NEG_INF", "SAMPLER_OPTIONS", "run_sampler", "sampler_options",
]
