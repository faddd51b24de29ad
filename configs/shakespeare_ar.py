"""Autoregressive baseline: the same DiT backbone with a causal mask, exact NLL.

  python -m mdm_jax.main --config=shakespeare_ar --workdir=runs/ar
"""

from mdm_jax.configs.shakespeare_prime import apply_variants, get_shakespeare_base


def get_config(arg: str = ""):
  c = get_shakespeare_base()
  c.objective = "ar"
  c.prime.ell = 1
  # BPE's own ids: with ell = 1 the numbering only decides which random embedding row a
  # token starts from (docs/results/vocabulary_order.md).
  c.data.token_order = "id"
  c.sampling.sampler = "ar"
  return apply_variants(c, arg)
