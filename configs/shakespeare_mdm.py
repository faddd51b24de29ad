"""Plain MDM (ell = 1, MDLM/MD4 ELBO) with the same backbone and data as the Prime default.

  python -m mdm_jax.main --config=shakespeare_mdm --workdir=runs/mdm
"""

from mdm_jax.configs.shakespeare_prime import apply_variants, get_shakespeare_base


def get_config(arg: str = ""):
  c = get_shakespeare_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  # BPE's own ids: with ell = 1 the numbering only decides which random embedding row a
  # token starts from (docs/results/vocabulary_order.md).
  c.data.token_order = "id"
  return apply_variants(c, arg)
