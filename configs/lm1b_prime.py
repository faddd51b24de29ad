"""Prime (partial masking) on LM1B: the full-size setup of ``configs/lm1b_mdm.py``.

Read ``configs/lm1b_mdm.py`` for data preparation and the tokenizer (a 32,768-id
BPE, since BERT's uncased WordPiece is not available offline).  ell = 3 by
default (b = 32 exactly, since 32 ** 3 = 32,768); choose ell in 2..8::

  python -m mdm_jax.main --config=lm1b_prime:ell=3 --workdir=runs/lm1b_prime_l3 \\
      --config.data.path=data/lm1b_bpe32k_128

Variants combine: ``:ell=5,microbatches=2``, ``:ell=2,smoke``.
"""

from mdm_jax.configs.lm1b_mdm import get_lm1b_base
from mdm_jax.configs.owt_mdm import apply_variants

DEFAULT_ELL = 3
ELL_RANGE = range(2, 9)


def get_config(arg: str = ""):
  c = get_lm1b_base()
  c.objective = "diffusion"
  c.prime.ell = DEFAULT_ELL
  c.prime.loss = "marginal"
  c.prime.carry_over = True
  c = apply_variants(c, arg)
  if int(c.prime.ell) not in ELL_RANGE:
    raise ValueError(f"configs/lm1b_prime.py: ell={c.prime.ell} is outside 2..8 (use "
                     "configs/lm1b_mdm.py for ell = 1).")
  return c
