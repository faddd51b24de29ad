"""Prime (partial masking, ell sub-tokens per token) on OpenWebText: the full-size setup.

The same data, DiT-small, optimizer and schedule as ``configs/owt_mdm.py``
(read its docstring for data preparation and hardware); only the objective
changes: every GPT-2 token (V = 50,257) is written as ell base-b digits with
b = ceil(V ** (1/ell)) and masked digit by digit.  ell = 4 (b = 15) by default;
choose ell in 2..8 with the config argument::

  python -m mdm_jax.main --config=owt_prime:ell=4 --workdir=runs/owt_prime_l4 \\
      --config.data.path=data/owt_gpt2_1024

Evaluation reports the valid (marginal) bound whatever ``prime.loss`` is.
Variants combine: ``:ell=6,microbatches=4``, ``:ell=2,smoke``.
"""

from mdm_jax.configs.owt_mdm import apply_variants, get_owt_base

DEFAULT_ELL = 4
ELL_RANGE = range(2, 9)


def get_config(arg: str = ""):
  c = get_owt_base()
  c.objective = "diffusion"
  c.prime.ell = DEFAULT_ELL
  c.prime.loss = "marginal"
  c.prime.carry_over = True
  c = apply_variants(c, arg)
  if int(c.prime.ell) not in ELL_RANGE:
    raise ValueError(f"configs/owt_prime.py: ell={c.prime.ell} is outside 2..8 (use "
                     "configs/owt_mdm.py for ell = 1).")
  return c
